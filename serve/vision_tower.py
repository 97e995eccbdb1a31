"""petbreed's image path through vLLM's Gemma 4 vision tower, used where the tower has no LoRA.

Gemma 4's processor pads every image's patches up to the budget's maximum (a 448 px square at
280 soft tokens: 2,304 real patches padded to 2,520), and vLLM runs the tower on the padded batch.
Padding needs an attention mask, and with a mask PyTorch cannot use its flash kernel. Here the
padding patches are cut off instead (they are at the end of each image, and the tower ignores
them), images are grouped by their real patch count, and each group goes through the tower in one
call with no mask: the same soft tokens as vLLM's way. On an H200 the eager tower alone ran
1.27-1.30x faster without the padding (8 and 32 images), and an engine 1.38x faster saturated
(docs/performance.md, 2026-12-02).

The encoder's layers are called here rather than the encoder itself: transformers builds a full
mask, even for no padding, whenever it cannot look at the tensors (under torch.compile or during
CUDA graph capture), and that mask keeps SDPA off its flash kernel. Captured that way the tower ran
4x slower than eagerly and held its masks in graph memory outside vLLM's budget (an engine ran out
of GPU memory at 64 requests at once).

At low concurrency the tower's time is mostly the CPU launching its kernels (a torch profile at
one request at a time: ~16 ms of a ~33 ms engine step for ~10 ms of GPU work). So small groups
(up to `graph_images` images) are replayed from CUDA graphs, one per (batch size rounded up to a
power of two, patch count), captured the first time that shape is seen; the unused rows hold an
earlier image and are dropped. The graphs capture the tower as the engine runs it, compiled where
compile_tower has run: on an H200 one image took 3.3 ms replayed from the compiled parts, 9.7 ms
from the uncompiled ones and 9.4 ms compiled without a graph (docs/performance.md, 2026-12-02).
The warm-up runs before each capture compile a new batch size, so no compiler work is captured.

With tower LoRA on (vLLM >= 0.32, `enable_tower_connector_lora`) vLLM's own path runs: its LoRA
kernels are sized for its padded batch.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger("petbreed.serve.vision_tower")

Encode = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (pixels, positions) -> soft tokens


def real_patch_counts(positions: torch.Tensor | Sequence[torch.Tensor]) -> list[int]:
    """Patches per image that are not padding (Gemma 4 pads with position (-1, -1)); one host sync."""
    if isinstance(positions, torch.Tensor):
        return [int(n) for n in (positions[..., 0] >= 0).sum(dim=-1).tolist()]
    return [int(n) for n in torch.stack([(p[..., 0] >= 0).sum() for p in positions]).tolist()]


def encode_group(model: Any, pixels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Soft tokens (images, patches / k^2, text hidden) of images that all have exactly these
    patches, none of them padding. What vLLM's `_process_image_input` computes per image."""
    tower = model.vision_tower
    k2 = model.config.vision_config.pooling_kernel_size ** 2
    no_padding = torch.zeros(positions.shape[:2], dtype=torch.bool, device=positions.device)
    hidden = tower.patch_embedder(pixels, positions, no_padding).to(model.model_dtype)
    encoder = tower.encoder
    rotary = encoder.rotary_emb(hidden, positions)
    for layer in encoder.layers[: encoder.config.num_hidden_layers]:  # what the encoder runs, minus its mask
        hidden = layer(hidden, attention_mask=None, position_embeddings=rotary, position_ids=positions)
    pooled, _ = tower.pooler(hidden_states=hidden, pixel_position_ids=positions, padding_positions=no_padding,
                             output_length=pixels.shape[1] // k2)
    if getattr(tower.config, "standardize", False):
        pooled = (pooled - tower.std_bias) * tower.std_scale
    return model.embed_vision(inputs_embeds=pooled.to(model.model_dtype))


def compile_tower(tower: Any) -> None:
    """torch.compile the tower's parts as encode_group and vLLM's own path both call them: the patch
    embedder and each encoder layer (one graph for all of them); dynamic shapes, so one graph serves
    every batch of images. transformers' mask building stays uncompiled, and so does the pooler (a
    few kernels): compiled on an H200 it marked every pooled token of a padded image as valid
    (280 soft tokens for a 256-token image, bench_vision_tower.py on 2026-12-02)."""
    for module in (tower.patch_embedder, *tower.encoder.layers):
        module.compile(dynamic=True)


def compile_for_one_and_several(model: Any, pixels: torch.Tensor | Sequence[torch.Tensor],
                                positions: torch.Tensor | Sequence[torch.Tensor]) -> None:
    """Run the compiled tower on the first of these images alone and twice over. Dynamic shapes
    or not, torch specialises a dimension of size 1, so the tower compiles once for one image and
    once for several; vLLM's start-up profile, which calls this, meets only one of the two, and a
    client would wait for the other (tests/test_vision_tower.py)."""
    encode = functools.partial(encode_group, model)
    for copies in (1, 2):
        encode_images(model, [pixels[0]] * copies, [positions[0]] * copies, encode)


def encode_images(model: Any, pixels: torch.Tensor | Sequence[torch.Tensor],
                  positions: torch.Tensor | Sequence[torch.Tensor], encode: Encode) -> list[torch.Tensor] | None:
    """Per-image soft tokens, one `encode` call per real patch count; None if an image's real
    patches do not pool evenly (not Gemma 4's processor: vLLM's own path handles it)."""
    k2 = model.config.vision_config.pooling_kernel_size ** 2
    counts = real_patch_counts(positions)
    if any(n == 0 or n % k2 for n in counts):
        return None
    groups: dict[int, list[int]] = {}
    for index, n in enumerate(counts):
        groups.setdefault(n, []).append(index)
    out: list[torch.Tensor] = [torch.empty(0)] * len(counts)
    for n, indices in groups.items():
        tokens = encode(torch.stack([pixels[i][:n] for i in indices]), torch.stack([positions[i][:n] for i in indices]))
        for row, index in enumerate(indices):
            out[index] = tokens[row]
    return out


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    pixels: torch.Tensor
    positions: torch.Tensor
    tokens: torch.Tensor


@dataclass
class TowerGraphs:
    """`encode` replayed from CUDA graphs for groups of up to `max_images` images, and called
    directly for larger groups and for shapes that could not be captured."""

    encode: Encode
    max_images: int
    _graphs: dict[tuple[int, int], _Graph | None] = field(default_factory=dict)
    _pool: Any = None  # one memory pool: graphs run one at a time, outputs are copied

    def __call__(self, pixels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        images = pixels.shape[0]
        size = 1 << (images - 1).bit_length()
        if size > self.max_images:
            return self.encode(pixels, positions)
        key = (size, pixels.shape[1])
        if key not in self._graphs:
            self._graphs[key] = self._capture(pixels, positions, size)
        captured = self._graphs[key]
        if captured is None:
            return self.encode(pixels, positions)
        captured.pixels[:images].copy_(pixels)
        captured.positions[:images].copy_(positions)
        captured.graph.replay()
        return captured.tokens[:images].clone()  # the next replay overwrites the graph's output

    def _capture(self, pixels: torch.Tensor, positions: torch.Tensor, size: int) -> _Graph | None:
        static_pixels = pixels[:1].expand(size, *pixels.shape[1:]).clone()
        static_positions = positions[:1].expand(size, *positions.shape[1:]).clone()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture
                for _ in range(2):
                    self.encode(static_pixels, static_positions)
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                tokens = self.encode(static_pixels, static_positions)
        except RuntimeError as err:  # e.g. an op that syncs with the host: this shape runs uncaptured
            log.warning("vision tower not captured in a CUDA graph",
                        extra={"shape": list(pixels.shape), "error": str(err)})
            return None
        log.info("vision tower captured in a CUDA graph", extra={"images": size, "patches": pixels.shape[1]})
        return _Graph(graph, static_pixels, static_positions, tokens)
