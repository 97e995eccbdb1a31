"""Serving one adapter merged into the base model's weights (`merged_adapter`).

Served as LoRA, an adapter costs every engine step its own kernels: on an H200 with the E4B-shaped
model they were 23 % of a saturated step's GPU time and 120-150 ms of CPU launching them in each
eager step, and the base model alone answered 1.23x faster at concurrency 1 (docs/performance.md).
Merged, W + scale * B @ A, it costs nothing per step, at the price of serving that one adapter.

The merge is done on the checkpoint's own tensors, by name (`merged_weights`, in the engine's
worker), and handed to vLLM's in-place weight reload, which maps names to its fused layers and
quantizes (fp8) as a fresh load would, and keeps each weight's storage, so CUDA graphs and the
compiled tower stay valid. A new version is merged from the base checkpoint again, so nothing of
the old one remains. `MergedAdapter` does that in the front-end while no image is in flight: an
image's requests span rounds, and all of them must see the weights its labels belong to.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from serve.adapters import AdapterEntry

log = logging.getLogger("petbreed.serve.merge")
PEFT_PREFIX = "base_model.model."
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # weight name -> (scale * B, A)


def lora_factors(adapter_dir: Path) -> Factors:
    """The checkpoint weight name -> (scale * B, A) of the adapter's update scale * B @ A. The
    low-rank factors, not their product: the products of every projection of an E4B model would be
    a second copy of its weights, in float32."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    extras = ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "lora_bias", "trainable_token_indices")
    if any(config.get(key) for key in extras) or config.get("bias", "none") != "none":
        raise ValueError("only plain LoRA adapters (no DoRA, biases, saved modules or per-module rank or alpha) "
                         "can be merged")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    factors = {}
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as fh:
        for key in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
            if key.endswith(".lora_A.weight"):
                module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
                b = fh.get_tensor(key.replace(".lora_A.", ".lora_B.")).float()
                factors[f"{module}.weight"] = (scale * b, fh.get_tensor(key).float())
    return factors


def merged_weights(base_dir: Path, adapter_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the base checkpoint, with the adapter merged in, one at a time. Raises
    before yielding anything if the adapter cannot be merged: a reload that fails halfway leaves no
    model."""
    factors = lora_factors(adapter_dir)
    files = sorted(base_dir.glob("*.safetensors"))
    names: set[str] = set()
    for path in files:
        with safe_open(str(path), "pt") as fh:
            names.update(fh.keys())
    missing = sorted(set(factors) - names)
    if missing:
        raise ValueError(f"the adapter updates weights the base checkpoint in {base_dir} lacks, e.g. {missing[0]}")
    return _merged(files, factors)


def _merged(files: list[Path], factors: Factors) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(str(path), "pt") as fh:
            for name in fh.keys():  # noqa: SIM118
                tensor = fh.get_tensor(name)
                if name in factors:
                    scaled_b, a = factors[name]
                    tensor = torch.addmm(tensor.float(), scaled_b, a).to(tensor.dtype)
                yield name, tensor


class AdapterReplaced(RuntimeError):
    """A request's adapter version was replaced by a newer one before the request's turn came."""


@dataclass
class MergedAdapter:
    """Which version is merged into the engine's weights, and swapping it for another."""

    base_dir: Path
    entry: AdapterEntry | None = None
    broken: bool = False  # a merge failed and so did merging the served version back
    _users: int = 0  # classifications running on the merged weights
    _swapping: bool = False
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @asynccontextmanager
    async def serving(self, entry: AdapterEntry) -> AsyncIterator[None]:
        """Held while a classification runs: a swap waits for it, and it waits for a swap."""
        async with self._changed:
            await self._changed.wait_for(lambda: not self._swapping)
            if self.broken:
                raise RuntimeError("the merged weights are unusable: a merge failed halfway")
            if self.entry is None or entry.ref != self.entry.ref:
                served = self.entry.ref if self.entry else "none"
                raise AdapterReplaced(f"{entry.ref} is not the merged adapter (merged: {served}); ask again")
            self._users += 1
        try:
            yield
        finally:
            async with self._changed:
                self._users -= 1
                self._changed.notify_all()

    async def swap(self, engine: Any, entry: AdapterEntry) -> None:
        """Merge `entry` in place of the current version, once no classification is running. If
        the merge fails, the current version is merged again and the error raised; if that fails
        too, the weights are `broken`. An adapter that cannot be merged is refused before anything
        is reloaded."""
        await asyncio.to_thread(merged_weights, self.base_dir, entry.path)  # checks only: reads no base tensor
        async with self._changed:
            await self._changed.wait_for(lambda: not self._swapping)
            self._swapping = True
            await self._changed.wait_for(lambda: self._users == 0)
        started = time.perf_counter()
        try:
            try:
                await self._merge(engine, entry)
            except Exception:
                await self._restore(engine)
                raise
            self.entry = entry
            log.info("adapter merged", extra={"adapter": entry.ref, "seconds": round(time.perf_counter() - started, 2)})
        finally:
            async with self._changed:
                self._swapping = False
                self._changed.notify_all()

    async def _restore(self, engine: Any) -> None:
        # The reload may have failed halfway, so the served version is merged again in any case.
        if self.entry is None:
            return
        try:
            await self._merge(engine, self.entry)
        except Exception:
            self.broken = True
            log.exception("merging the served adapter back failed", extra={"adapter": self.entry.ref})

    async def _merge(self, engine: Any, entry: AdapterEntry) -> None:
        await engine.collective_rpc("petbreed_merge_adapter", args=(str(self.base_dir), str(entry.path)))
        await engine.reset_prefix_cache()  # its KV blocks were computed with the old weights
