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
        """Label probabilities from every branch node's next-token log-probabilities.

        The log-probabilities may cover more tokens than the node's children, or be unnormalised:
        only the children are kept and renormalised.
        """
        probs, pending = self.resolve(branch_logprobs)
        if pending:
            raise KeyError(f"no log-probabilities for branch node {next(iter(pending))}")
        return [p for p in probs if p is not None]

    def resolve(
        self, branch_logprobs: Mapping[tuple[int, ...], Mapping[int, float]]
    ) -> tuple[list[float | None], dict[tuple[int, ...], float]]:
        """What some branch nodes' log-probabilities decide: each label's probability (None where
        a node on its path is missing) and, for each missing node first met on a path, the
        probability of reaching it, which bounds every label below it."""
        # Every branch node's choice among its children; None where its log-probabilities are missing.
        choices = {
            node.prefix: _renormalise(node.children, branch_logprobs[node.prefix])
            if node.prefix in branch_logprobs else None
            for node in self.branches
        }
        probs: list[float | None] = []
        pending: dict[tuple[int, ...], float] = {}
        for seq in self.sequences:
            p, missing = 1.0, None
            for depth in range(len(seq)):
                prefix = seq[:depth]
                if prefix not in choices:
                    continue  # one child: forced
                choice = choices[prefix]
                if choice is None:
                    missing = prefix
                    break
                p *= choice[seq[depth]]
            if missing is not None:
                pending[missing] = p
            probs.append(p if missing is None else None)
        return probs, pending

    def branches_under(self, prefix: tuple[int, ...]) -> list[BranchNode]:
        """The branch nodes at or below `prefix`, shallowest first."""
        return [node for node in self.branches if node.prefix[: len(prefix)] == prefix]


def _renormalise(children: Sequence[int], logprobs: Mapping[int, float]) -> dict[int, float]:
    values = [logprobs.get(token, -math.inf) for token in children]
    top = max(values)
    if top == -math.inf:
        return {token: 1.0 / len(children) for token in children}
    weights = [math.exp(v - top) for v in values]
    total = sum(weights)
    return {token: w / total for token, w in zip(children, weights, strict=True)}
