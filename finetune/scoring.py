"""Batches for transformers: training batches with the loss on the answer only, and the label
distribution of a batch of images (the reference for what vLLM serves).

Prompts are left-padded, so every row ends at the last position: the answer is the last tokens
of a training row, and the next-token distribution is read at the last position. Nothing here
depends on how many soft tokens an image became.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from adapter_contract.prompt import ClassificationPrompt

IGNORE = -100


def _encode(processor: Any, texts: list[str], images: Sequence[Image.Image], device: torch.device) -> dict[str, Any]:
    batch = processor(text=texts, images=[[img] for img in images], padding=True, return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items()}


def training_batch(
    processor: Any, prompt: ClassificationPrompt, images: Sequence[Image.Image], label_ids: Sequence[str],
    label_texts: dict[str, str], device: torch.device,
) -> dict[str, Any]:
    texts = [prompt.text + label_texts[lid] + prompt.terminator for lid in label_ids]
    batch = _encode(processor, texts, images, device)
    targets = torch.full_like(batch["input_ids"], IGNORE)
    for row, lid in enumerate(label_ids):
        answer = torch.tensor(prompt.answers[lid], device=device)
        n = len(answer)
        if not torch.equal(batch["input_ids"][row, -n:], answer):
            raise ValueError(f"answer tokens for {lid!r} not found at the end of the training sequence")
        targets[row, -n:] = answer
    batch["labels"] = targets
    return batch


def answer_loss(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens, computing logits only where answers are.

    The answers sit at the end of every (left-padded) row, so only the last few positions need
    the vocabulary projection; with Gemma's 262k vocabulary that saves memory and time.
    """
    targets = batch["labels"]
    first = int((targets != IGNORE).any(dim=0).nonzero()[0])
    keep = targets.shape[1] - first + 1
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets[:, -(keep - 1) :].flatten(), ignore_index=IGNORE
    )


@torch.no_grad()
def label_distributions(
    model: Any, processor: Any, prompt: ClassificationPrompt, images: Sequence[Image.Image], device: torch.device
) -> list[list[float]]:
    """P(label | image) under label-constrained decoding, one list per image, in label order."""
    batch = _encode(processor, [prompt.text] * len(images), images, device)
    per_image: list[dict[tuple[int, ...], dict[int, float]]] = [{} for _ in images]
    for node in prompt.trie.branches:
        logprobs = _next_token_logprobs(model, batch, node.prefix)
        children = list(node.children)
        for row in range(len(images)):
            values = logprobs[row, children].tolist()
            per_image[row][node.prefix] = dict(zip(children, values, strict=True))
    return [prompt.trie.distribution(branches) for branches in per_image]


def _next_token_logprobs(model: Any, batch: dict[str, Any], prefix: tuple[int, ...]) -> torch.Tensor:
    if prefix:
        rows = batch["input_ids"].shape[0]
        extra = torch.tensor(prefix, device=batch["input_ids"].device).expand(rows, -1)
        batch = dict(batch)
        batch["input_ids"] = torch.cat([batch["input_ids"], extra], dim=1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(extra)], dim=1)
        if "mm_token_type_ids" in batch:
            batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(extra)], dim=1)
    logits = model(**batch, use_cache=False).logits[:, -1].float()
    return torch.log_softmax(logits, dim=-1)
