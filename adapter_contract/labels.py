"""Label sets and the exact probability of each label under label-constrained decoding.

A label is answered as a token sequence (its display text plus the end-of-turn marker). The labels'
sequences form a trie. Decoding constrained to the trie picks, at every node with several
children, one child with probability p(child) / sum p(children). The probability of a label is
the product of those choices along its path; nodes with one child are forced and cost nothing.
Which nodes branch depends only on the tokenizer and the label set, never on the image, so a
scorer can ask for every branch node's distribution at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, Field, model_validator


class Label(BaseModel):
    """One class: a stable id (dataset name), the text the model answers with, and its species."""

    id: str
    text: str
    species: str | None = None


class LabelSet(BaseModel):
    """An ordered label set. The order is the index space of every report and confusion matrix."""

    labels: list[Label] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> LabelSet:
        for attr in ("id", "text"):
            values = [getattr(label, attr) for label in self.labels]
            duplicates = sorted({v for v in values if values.count(v) > 1})
            if duplicates:
                raise ValueError(f"duplicate label {attr}s: {', '.join(duplicates)}")
        return self

    @property
    def ids(self) -> list[str]:
        return [label.id for label in self.labels]

    def index(self, label_id: str) -> int:
        return self.ids.index(label_id)

    def __len__(self) -> int:
        return len(self.labels)

    def extended(self, new: Sequence[Label]) -> LabelSet:
        """This set followed by the labels of `new` it does not hold yet (old indices stay put)."""
        known = set(self.ids)
        return LabelSet(labels=[*self.labels, *(label for label in new if label.id not in known)])


@dataclass(frozen=True)
class BranchNode:
    """A trie node where constrained decoding has a real choice to make."""

    prefix: tuple[int, ...]
    children: tuple[int, ...]


@dataclass
class LabelTrie:
    """Token-sequence trie over a label set, with its branch nodes listed in breadth-first order."""

    sequences: list[tuple[int, ...]]
    branches: list[BranchNode] = field(init=False)

    def __post_init__(self) -> None:
        if len(set(self.sequences)) != len(self.sequences):
            raise ValueError("two labels tokenize to the same answer")
        children: dict[tuple[int, ...], set[int]] = {}
        for seq in self.sequences:
            for depth in range(len(seq)):
                children.setdefault(seq[:depth], set()).add(seq[depth])
        self.branches = sorted(
            (BranchNode(prefix, tuple(sorted(kids))) for prefix, kids in children.items() if len(kids) > 1),
            key=lambda node: (len(node.prefix), node.prefix),
        )

    def distribution(self, branch_logprobs: Mapping[tuple[int, ...], Mapping[int, float]]) -> list[float]:
        """Label probabilities from each branch node's next-token log-probabilities.

        The log-probabilities may cover more tokens than the node's children, or be unnormalised:
        only the children are kept and renormalised.
        """
        conditionals = {
            node.prefix: _renormalise(node.children, branch_logprobs[node.prefix]) for node in self.branches
        }
        probs = []
        for seq in self.sequences:
            p = 1.0
            for depth in range(len(seq)):
                step = conditionals.get(seq[:depth])
                if step is not None:
                    p *= step[seq[depth]]
            probs.append(p)
        return probs


def _renormalise(children: Sequence[int], logprobs: Mapping[int, float]) -> dict[int, float]:
    values = [logprobs.get(token, -math.inf) for token in children]
    top = max(values)
    if top == -math.inf:
        return {token: 1.0 / len(children) for token in children}
    weights = [math.exp(v - top) for v in values]
    total = sum(weights)
    return {token: w / total for token, w in zip(children, weights, strict=True)}
