"""The frozen vision tower's soft tokens, computed without autograd and kept for later epochs.

With LoRA on the language model only (the usual recipe for real checkpoints), the vision tower
has no trainable weight and no dropout, so an image's soft tokens are the same in every epoch and
need no autograd. Measured on an H200 (E4B-shaped, batch 64, one run): 74.1 samples/s with the
cache against 59.7 without it in the first epoch, where every image is new, so most of the gain
is the tower running outside autograd; reusing the kept tokens in later epochs adds 1-4 %. Where
the tower trains (the tiny default's `all-linear` LoRA reaches its patch embedder) nothing changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling


def vision_tower(model: Any) -> Any:
    """Gemma 4's `Gemma4VisionModel` inside a (PEFT-wrapped) model."""
    return next(m for name, m in model.named_modules() if name.endswith("vision_tower"))


def tower_is_frozen(model: Any) -> bool:
    tower = vision_tower(model)
    no_dropout = all(m.p == 0 for m in tower.modules() if isinstance(m, torch.nn.Dropout))
    return no_dropout and not any(p.requires_grad for p in tower.parameters())


class ImageFeatureCache:
    """Wraps the tower's forward: inside `images(ids)` each image id's soft tokens are computed
    without autograd on first sight and, while they fit in `max_bytes`, kept and looked up after;
    outside it (evaluation) the tower runs as usual."""

    def __init__(self, model: Any, max_bytes: int) -> None:
        self.tower = vision_tower(model)
        self.pooling_area = self.tower.config.pooling_kernel_size ** 2
        self.max_bytes = max_bytes
        self.features: dict[int, torch.Tensor] = {}
        self.ids: list[int] | None = None
        self._forward = self.tower.forward
        # An instance attribute, not a wrapper module: parameter names and checkpoints stay as they are.
        self.tower.forward = self._cached_forward

    @property
    def bytes(self) -> int:
        return sum(t.nbytes for t in self.features.values())

    @contextmanager
    def images(self, ids: list[int]) -> Iterator[None]:
        self.ids = ids
        try:
            yield
        finally:
            self.ids = None

    def _cached_forward(self, pixel_values: torch.Tensor, pixel_position_ids: torch.Tensor,
                        **kwargs: Any) -> BaseModelOutputWithPooling:
        if self.ids is None:
            return self._forward(pixel_values=pixel_values, pixel_position_ids=pixel_position_ids, **kwargs)
        new = [row for row, i in enumerate(self.ids) if i not in self.features]
        computed = self._compute(pixel_values[new], pixel_position_ids[new])
        fresh = dict(zip([self.ids[row] for row in new], computed, strict=True))
        self._keep(fresh)
        tokens = torch.cat([self.features[i] if i in self.features else fresh[i] for i in self.ids])
        return BaseModelOutputWithPooling(last_hidden_state=cast(torch.FloatTensor, tokens))

    @torch.no_grad()
    def _compute(self, pixel_values: torch.Tensor, pixel_position_ids: torch.Tensor) -> list[torch.Tensor]:
        if pixel_values.shape[0] == 0:
            return []
        tokens = self._forward(pixel_values=pixel_values, pixel_position_ids=pixel_position_ids).last_hidden_state
        # The tower returns every image's valid soft tokens back to back, one per pooled cell of
        # real (not padding) patches: the same count Gemma 4 splits them by.
        counts = ((pixel_position_ids != -1).all(dim=-1).sum(dim=-1) // self.pooling_area).tolist()
        if sum(counts) != tokens.shape[0]:
            raise RuntimeError(f"vision tower gave {tokens.shape[0]} soft tokens for images of {counts}")
        return list(tokens.split(counts))

    def _keep(self, fresh: dict[int, torch.Tensor]) -> None:
        room = self.max_bytes - self.bytes
        for i, tokens in fresh.items():
            if tokens.nbytes <= room:
                # A copy of its own, so a kept image does not hold its whole batch's tensor.
                self.features[i] = tokens.clone()
                room -= tokens.nbytes
