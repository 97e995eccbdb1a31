"""The vLLM engine, used as a classifier: P(label | image) for an adapter's label set.

For each image and each branch node of the adapter's label trie (usually only the root) the
engine is asked for ONE next token and the log-probabilities of the node's children:

    SamplingParams(max_tokens=1, temperature=0, logprob_token_ids=children)

These are the model's full-vocabulary log-probabilities; `LabelTrie.resolve` renormalises them
over the children. The product over branch nodes is the label's probability under
label-constrained decoding, the quantity `finetune.scoring.label_distributions` computes with
transformers + PEFT. (An `allowed_token_ids` mask gives the same numbers, but vLLM keeps that
mask as a max_num_seqs x vocabulary tensor and rewrites a 262k row for every request: over half
of the engine core's time on an H200.) vLLM returns at most 128 ids per request, so a node with
more children is asked in chunks; full-vocabulary log-probabilities of one prefix combine exactly.

When the caller wants only the top k labels, deeper nodes are asked only where the root leaves
them a chance: a subtree reached with probability p holds no label above p, so one whose p is
not above the k-th largest label probability the root already decides is skipped. The top k and
their probabilities are exact; labels that cannot be among them may be reported as 0.

Only API that vLLM 0.24 (CUDA), 0.32 (CPU) and the current release share is used: AsyncLLM via
`AsyncEngineArgs`, its renderer's `render_cmpl_async` (the way vLLM's deprecation notices ask
prompts to be passed) or `renderer_from_config` + `render_cmpl` in render processes
(serve/render_pool.py), SamplingParams and LoRARequest; with `merged_adapter`, `collective_rpc`,
`reset_prefix_cache` and the worker's `reload_weights` (serve/adapter_merge.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from adapter_contract.labels import BranchNode
from adapter_contract.modules import AUDIO_MODULES, TOWER_MODULES
from finetune.model import config_path
from serve.adapter_merge import MergedAdapter
from serve.adapters import AdapterEntry
from serve.processor_compat import patch_mm_token_check
from serve.render_pool import RenderPool
from serve.settings import ServeSettings, VllmSettings
from serve.vllm_compat import (
    ATTENTION_ENV,
    COMPILE_VISION_ENV,
    GRAPH_IMAGES_ENV,
    IMAGES_APART_ENV,
    PIXEL_SCALE_ENV,
    TUNED_CONFIG_ENV,
    tower_lora_supported,
    uint8_pixels_supported,
)

log = logging.getLogger("petbreed.serve.engine")

# vLLM runs the image processor in this process, for every image.
patch_mm_token_check()

MAX_IDS_PER_REQUEST = 128  # vLLM's cap on `logprob_token_ids` (MAX_LOGPROB_TOKEN_IDS)


class RequestAborted(RuntimeError):
    """vLLM ended a request unanswered (finish reason `abort`). A stopping engine core does that to
    the requests it holds, and to new ones (an image's next trie round) while it stops."""


class Classifier(Protocol):
    """What the API needs from an engine (the real one below; the benchmark calls it directly)."""

    async def classify(
        self, images: Sequence[Image.Image], entry: AdapterEntry, top_k: int | None = None
    ) -> list[list[float]]:
        """P(label | image) per image. With top_k, labels that cannot be among the top_k may be 0."""
        ...
    async def load_adapter(self, entry: AdapterEntry) -> None: ...
    async def warm_up(self, entry: AdapterEntry, images: int) -> bool:
        """Pay what a first image at `entry`'s image budget costs (processors, compiles) before
        clients do; whether it ran (once per budget)."""
        ...
    def dead(self) -> bool: ...
    def shutdown(self) -> None: ...


def set_vllm_environment(settings: ServeSettings, pixel_scale: float | None = None) -> None:
    """Process-wide variables vLLM reads at import/start. Explicit values in the environment win.
    `pixel_scale`: what the workers multiply 8-bit pixels by (`raw_pixel_scale`)."""
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.vllm.cpu_kvcache_space_gib))
    _limit_cpu_threads(settings.vllm.cpu_threads)
    if settings.vllm.lora_kernel_configs is not None:
        os.environ.setdefault(TUNED_CONFIG_ENV, str(settings.vllm.lora_kernel_configs.resolve()))
    # The engine may be built off the main thread (so /healthz answers during start-up); forking
    # a threaded process is unsafe, so the engine core is spawned. Entry points have a main guard.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    if not _inductor_cache_chosen():
        # The compiled vision tower costs minutes of every start, most of it inductor's work, which
        # its cache skips (H200: 188 s to 84-100 s). Beside the downloads it survives where they
        # do, e.g. on a volume mounted at the cache folder, not in /tmp.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(settings.cache_dir.resolve() / "inductor")
    # Triton compiles each LoRA kernel configuration the first time a step of its size runs eagerly
    # (H200, tuned configurations: a fresh server's first saturated level 55.6-58.0 instead of 83-84 img/s);
    # its cache keeps them for the next start on the same terms. Unset, it is in the home folder.
    os.environ.setdefault("TRITON_CACHE_DIR", str(settings.cache_dir.resolve() / "triton"))
    # vLLM's own compile cache goes there too: with torch_compile, compiling the language model
    # adds about 140 s to a start (H100, docs/performance.md). Unset, it is in the home folder.
    os.environ.setdefault("VLLM_CACHE_ROOT", str(settings.cache_dir.resolve() / "vllm"))
    # Not user-facing variables (the settings are): they carry the settings to the spawned workers.
    compile_vision = settings.vllm.compile_vision_tower
    os.environ[COMPILE_VISION_ENV] = str(int(_has_cuda() if compile_vision is None else compile_vision))
    os.environ[IMAGES_APART_ENV] = str(int(not settings.vllm.stack_images_on_cpu))
    os.environ[GRAPH_IMAGES_ENV] = str(settings.vllm.vision_graph_images)
    os.environ[PIXEL_SCALE_ENV] = repr(pixel_scale or 0.0)
    os.environ[ATTENTION_ENV] = settings.vllm.vision_attention


def _limit_cpu_threads(threads: int | None) -> None:
    """torch's CPU threads for this process and, through OMP_NUM_THREADS, the engine core it spawns.
    On an H200 at saturation, with every parallel op of both processes (four renderer threads among
    them) fanning out over all 16 cores, stacking a step's images (a 2 ms copy alone) took a third
    of the engine core's time; with 1 thread, 6 % (docs/performance.md, 2026-12-03)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    if threads is None:
        if not _has_cuda():
            return
        threads = 1
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    # torch hands this count to each thread at its first parallel operation, renderer threads too.
    torch.set_num_threads(threads)


def raw_pixel_scale(settings: ServeSettings, processor: Any) -> float | None:
    """The factor that turns 8-bit pixels into what the image processor would have sent, where
    images travel unscaled (`uint8_pixels`); None where the processor's own output travels: the
    setting is off, this vLLM's Gemma 4 has nothing for the workers to rescale in, or the processor
    normalises, which they do not redo."""
    image = processor.image_processor
    if not settings.vllm.uint8_pixels or not uint8_pixels_supported() or not image.do_rescale or image.do_normalize:
        return None
    return float(image.rescale_factor)


def render_processes(settings: ServeSettings) -> int:
    """How many render processes the engine gets (see `VllmSettings.render_processes`)."""
    processes = settings.vllm.render_processes
    if processes is None:
        return 4 if _has_cuda() else 0
    return processes


def tower_lora(settings: ServeSettings) -> bool:
    """Whether adapters' vision tower and projector weights are applied: merged into the weights,
    or as LoRA where vLLM's Gemma 4 implements it."""
    return settings.merged_adapter is not None or (settings.vllm.tower_lora and tower_lora_supported())


def lora_on_tower(settings: ServeSettings) -> bool:
    """Whether vLLM applies the tower and projector weights as LoRA (`enable_tower_connector_lora`),
    not merged into the base weights."""
    return settings.merged_adapter is None and tower_lora(settings)


def image_budget_limit(settings: ServeSettings, processor: Any) -> int | None:
    """The largest image budget an adapter's manifest may name. With LoRA on the vision tower, vLLM
    sizes the tower's inputs for the engine's budget, and a larger image ends its engine core (vLLM
    0.32: "exceeds the MM LoRA patch limit"). None where nothing limits it: one budget for every
    adapter (`max_soft_tokens`), or no LoRA on the tower."""
    if settings.vllm.max_soft_tokens is not None or not lora_on_tower(settings):
        return None
    return int(processor.image_processor.max_soft_tokens)


def _inductor_cache_chosen() -> bool:
    """Whether TORCHINDUCTOR_CACHE_DIR was set by someone: importing torch's compiler fills in its
    own default (a folder in /tmp), which is not a choice."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    value = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return value is not None and os.path.abspath(value) != os.path.abspath(default_cache_dir())


def engine_args(settings: ServeSettings, model_path: str) -> Any:
    from vllm import AsyncEngineArgs

    v = settings.vllm
    as_lora = settings.merged_adapter is None
    eager = v.enforce_eager if v.enforce_eager is not None else not _has_cuda()
    kwargs: dict[str, Any] = dict(
        model=model_path, dtype=v.dtype, enforce_eager=eager, max_model_len=v.max_model_len,
        quantization=v.quantization, max_num_batched_tokens=v.max_num_batched_tokens,
        # No audio: vLLM then skips the audio tower of E2B/E4B checkpoints, and sizes the encoder's
        # memory by images (it profiles the modality with the most tokens per item: audio's 750).
        limit_mm_per_prompt={"image": 1, "video": 0, "audio": 0}, enable_lora=as_lora, max_loras=v.max_loras,
        max_lora_rank=v.max_lora_rank, max_cpu_loras=v.max_cpu_loras,
        # Without it vLLM ignores the LoRA weights of the vision tower and projector. Only where
        # Gemma 4 implements it: vLLM 0.24 would accept the flag and then fail to start.
        enable_tower_connector_lora=lora_on_tower(settings), kv_sharing_fast_prefill=v.fast_prefill,
        enable_prefix_caching=v.enable_prefix_caching, gpu_memory_utilization=v.gpu_memory_utilization,
        tensor_parallel_size=v.tensor_parallel_size, disable_log_stats=True,
        # The classifier processes each image once for all its requests (`VllmClassifier.render`), so
        # vLLM's processor cache would only copy it, and with it on vLLM 0.24 allows one renderer thread.
        mm_processor_cache_gb=0, renderer_num_workers=v.renderer_workers,
        # Runs serve/vllm_compat.py in the worker processes: petbreed's changes to vLLM's Gemma 4.
        worker_extension_cls="serve.vllm_compat.PetbreedWorkerExtension",
    )
    if v.quantization is not None:
        kwargs["quantization_config"] = {"ignore": unquantized_modules(v.quantize_vision_tower)}
    if v.max_num_seqs is not None:
        kwargs["max_num_seqs"] = v.max_num_seqs
    if v.max_soft_tokens is not None:
        # Also the engine's default, not only each request's: vLLM then sizes its encoder profile
        # for this budget and loads the image processor once, for the kwargs requests carry.
        kwargs["mm_processor_kwargs"] = {"max_soft_tokens": v.max_soft_tokens}
    if not eager:
        # Full CUDA graphs: one ~300-token prefill at batch 1 is launch-bound in eager mode. Of the
        # uncompiled model by default (seconds of start-up, not minutes); steps above the largest
        # graph (a saturated server's) then run eagerly, which torch_compile (mode 3) compiles.
        kwargs["compilation_config"] = {"mode": 3 if v.torch_compile else 0, "cudagraph_mode": _graph_mode(v)}
        if v.graph_max_tokens:
            largest = min(v.graph_max_tokens, v.max_num_batched_tokens)
            kwargs["compilation_config"]["cudagraph_capture_sizes"] = graph_sizes(largest)
    return AsyncEngineArgs(**kwargs)


def _graph_mode(v: VllmSettings) -> str:
    """vLLM's cudagraph_mode. With fast prefill a step's KV-shared layers run on the positions it
    answers, whose attention metadata a full graph would replay from its capture: a step with a
    prompt then runs eagerly, or in vLLM's piecewise graphs of the compiled model."""
    if not v.fast_prefill:
        return "FULL"
    return "FULL_AND_PIECEWISE" if v.torch_compile else "FULL_DECODE_ONLY"


def unquantized_modules(vision_encoder_too: bool) -> list[str]:
    """vLLM's `ignore` patterns (prefixes of layer names) of the towers' layers that stay as the
    checkpoint has them: all of them, or all but the vision tower's encoder layers. The patch
    embedder stays either way: transformers' tower casts pixels to its first linear layer's weight
    dtype, fp8 once quantized (vLLM 0.24's plain fp8 died so at start-up)."""
    if not vision_encoder_too:
        return [f"re:(.*\\.)?{TOWER_MODULES}"]
    return [f"re:(.*\\.)?({AUDIO_MODULES}|embed_vision)\\.", "re:(.*\\.)?vision_tower\\.(?!encoder\\.)"]


def merged_adapter(settings: ServeSettings, model_path: str) -> MergedAdapter | None:
    """Where adapters are merged, with `merged_adapter`: the checkpoint's folder (a hub id's in the
    Hugging Face cache)."""
    return MergedAdapter(config_path(model_path).parent) if settings.merged_adapter else None


def graph_sizes(max_tokens: int) -> list[int]:
    """Engine-step sizes (tokens) to capture up to `max_tokens`: vLLM's own ladder to 512, then
    sparser, since a step is padded up to the next size and every size costs start-up."""
    ladder = [1, 2, 4, *range(8, 256, 8), *range(256, 512, 16), *range(512, max_tokens, 128)]
    return [size for size in ladder if size < max_tokens] + [max_tokens]


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@dataclass
class VllmClassifier:
    engine: Any  # vllm AsyncLLM
    # Image token budget for every adapter (None: each adapter's own, from its manifest). Per
    # request rather than per engine, so one engine serves adapters trained with different budgets
    # (and a benchmark can compare them).
    soft_tokens: int | None = None
    # Set: images go to the engine as 8-bit pixels, which its workers multiply by this (see
    # serve/vllm_compat.py). None: as the image processor makes them, in the model's dtype.
    pixel_scale: float | None = None
    # Set: prompts are rendered in these processes, not in the renderer's threads.
    render_pool: RenderPool | None = None
    # Set: told each image's time per stage (render or render_process, round1, round2), in seconds.
    observe: Callable[[str, float], None] | None = None
    # Set: adapters are merged into the base weights, one version at a time (`merged_adapter`),
    # not applied as LoRA.
    merged: MergedAdapter | None = None
    _rendering: int = field(default=0, init=False)  # images being rendered now, either way
    _warm_budgets: set[int | None] = field(default_factory=set, init=False)  # budgets warm_up has run for

    @classmethod
    def start(
        cls, settings: ServeSettings, model_path: str, pixel_scale: float | None = None,
        observe: Callable[[str, float], None] | None = None,
    ) -> VllmClassifier:
        """Build the engine (blocking, tens of seconds); call it off the event loop."""
        set_vllm_environment(settings, pixel_scale)
        from vllm import AsyncLLMEngine

        engine = AsyncLLMEngine.from_engine_args(engine_args(settings, model_path))
        processes, pool = render_processes(settings), None
        if processes:
            try:
                pool = RenderPool(engine.vllm_config, processes)
                pool.warm_up()
            except Exception:
                engine.shutdown()  # no classifier will own the engine core, so stop it here
                raise
            log.info("render processes started", extra={"processes": processes})
        merged = merged_adapter(settings, model_path)
        return cls(engine, settings.vllm.max_soft_tokens, pixel_scale, pool, observe, merged)

    async def load_adapter(self, entry: AdapterEntry) -> None:
        """Load the LoRA now, so a bad adapter is refused at load time, not on a client's request;
        or merge it in place of the merged one."""
        if self.merged is not None:
            await self.merged.swap(self.engine, entry)
        else:
            await self.engine.add_lora(lora_request(entry))

    async def warm_up(self, entry: AdapterEntry, images: int) -> bool:
        """Once per image budget, since vLLM loads the image processor for each budget's kwargs and
        the tower's kernels are compiled for its shapes, whatever the adapter. Each render process
        renders its first image (the pool hands images that arrive together to whichever process is
        free, so classifying several reached only some of them: a c=8 level on the H200 machine
        then waited 28 s), then `images` images go through the engine at once."""
        budget = self.budget(entry)
        if budget in self._warm_budgets:
            return False
        image = Image.new("RGB", (64, 64))
        if self.render_pool is not None:
            await self.render_pool.render_in_every_process(self.prompt(image, entry))
        await self.classify([image] * images, entry)
        self._warm_budgets.add(budget)
        return True

    async def classify(
        self, images: Sequence[Image.Image], entry: AdapterEntry, top_k: int | None = None
    ) -> list[list[float]]:
        async with self.merged.serving(entry) if self.merged is not None else nullcontext():
            return list(await asyncio.gather(*(self._one(image, entry, top_k) for image in images)))

    async def _one(self, image: Image.Image, entry: AdapterEntry, top_k: int | None) -> list[float]:
        trie = entry.prompt.trie
        if not trie.branches:  # a single label: nothing to choose
            return [1.0] * len(trie.sequences)
        started = time.perf_counter()
        rendered, stage = await self.render(image, entry)
        rendered_at = self._lap(stage, started)
        root = trie.branches[0]
        found = {root.prefix: await self._next_token(rendered, entry, root)}
        root_at = self._lap("round1", rendered_at)
        # Deeper nodes only after the root: their prompts extend the root's, so prefix caching can
        # reuse the image's KV blocks (and the encoder cache its vision features). And only the
        # subtrees that can still hold one of the top k labels: the root decides the rest. Asking
        # every node at once saves no round: the requests reach the engine core one by one and the
        # first starts a step alone (H200, docs/performance.md 2026-12-03).
        probs, pending = trie.resolve(found)
        bound = _kth_largest([p for p in probs if p is not None], top_k)
        deeper = [node for prefix, mass in pending.items() if mass > bound for node in trie.branches_under(prefix)]
        if deeper:
            rest = await asyncio.gather(*(self._next_token(rendered, entry, node) for node in deeper))
            found.update({node.prefix: lp for node, lp in zip(deeper, rest, strict=True)})
            self._lap("round2", root_at)
        return [0.0 if p is None else p for p in trie.resolve(found)[0]]

    def _lap(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        if self.observe is not None:
            self.observe(stage, now - since)
        return now

    async def render(self, image: Image.Image, entry: AdapterEntry) -> tuple[dict[str, Any], str]:
        """The adapter's prompt with this image, processed for the engine by vLLM's renderer, and
        the stage that did it: `render_process` in a render process, `render` in the renderer's own
        threads (`renderer_workers`; inside `generate` it would run on the event loop that every
        request shares). Each request about the image extends this one with its answer prefix, so
        the image is processed once.

        An image that arrives while no other is rendering stays in this process: alone, it holds
        the interpreter lock against nobody, and the trip to a process and back cost about 3 ms at
        concurrency 1 on an H200. Under load the processes take the rest."""
        prompt = self.prompt(image, entry)
        busy, self._rendering = self._rendering, self._rendering + 1
        try:
            if self.render_pool is not None and busy:
                return await self.render_pool.render(prompt), "render_process"
            (rendered,) = await self.engine.renderer.render_cmpl_async([prompt])
            return dict(rendered), "render"
        finally:
            self._rendering -= 1

    def prompt(self, image: Image.Image, entry: AdapterEntry) -> dict[str, Any]:
        return {"prompt_token_ids": list(entry.prompt_token_ids), **self.image_input(image, entry)}

    def image_input(self, image: Image.Image, entry: AdapterEntry) -> dict[str, Any]:
        """The image part of a prompt. A fresh id names the image to vLLM, which then neither hashes
        its pixels nor matches it with another image in its encoder and prefix caches."""
        image_input: dict[str, Any] = {
            "multi_modal_data": {"image": image}, "multi_modal_uuids": {"image": [uuid.uuid4().hex]}
        }
        processing: dict[str, Any] = {}
        budget = self.budget(entry)
        if budget is not None:
            processing["max_soft_tokens"] = budget
        if self.pixel_scale is not None:
            processing["do_rescale"] = False
        if processing:
            image_input["mm_processor_kwargs"] = processing
        return image_input

    def budget(self, entry: AdapterEntry) -> int | None:
        """The image token budget `entry`'s requests carry (None: the model's default)."""
        return self.soft_tokens or entry.manifest.image_soft_tokens

    async def _next_token(self, rendered: dict[str, Any], entry: AdapterEntry, node: BranchNode) -> dict[int, float]:
        # The answer prefix as token ids, after the image's soft tokens (so their positions hold).
        prompt = {**rendered, "prompt_token_ids": [*rendered["prompt_token_ids"], *node.prefix]}
        step = MAX_IDS_PER_REQUEST
        chunks = [node.children[i : i + step] for i in range(0, len(node.children), step)]
        found: dict[int, float] = {}
        for part in await asyncio.gather(*(self._logprobs(prompt, entry, chunk) for chunk in chunks)):
            found.update(part)
        return found

    async def _logprobs(
        self, prompt: dict[str, Any], entry: AdapterEntry, token_ids: tuple[int, ...]
    ) -> dict[int, float]:
        from vllm import SamplingParams

        # Token ids are all petbreed reads: no text for the sampled token or the up to 128 asked-for
        # ones, which vLLM would otherwise decode on its one front-end thread for every request.
        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(token_ids), detokenize=False)
        final = None
        lora = lora_request(entry) if self.merged is None else None
        async for output in self.engine.generate(prompt, params, request_id=uuid.uuid4().hex, lora_request=lora):
            final = output
        if final is None or (final.outputs and final.outputs[0].finish_reason == "abort"):
            raise RequestAborted("the engine ended the request without an answer; it may be shutting down")
        if not final.outputs or not final.outputs[0].logprobs:
            raise RuntimeError("vLLM returned no logprobs")
        return {int(token): float(lp.logprob) for token, lp in final.outputs[0].logprobs[0].items()}

    def dead(self) -> bool:
        pool_broken = self.render_pool is not None and self.render_pool.broken
        weights_broken = self.merged is not None and self.merged.broken
        return self.engine is None or bool(getattr(self.engine, "errored", False)) or pool_broken or weights_broken

    def shutdown(self) -> None:
        if self.render_pool is not None:
            self.render_pool.shutdown()
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()
            # Drop the last reference now: AsyncLLM.__del__ shuts down again, which fails noisily
            # if it only runs at interpreter exit.
            del engine


def _kth_largest(values: list[float], k: int | None) -> float:
    """A label below a node reached with probability <= this cannot enter the top k."""
    if k is None or len(values) < k:
        return 0.0
    return sorted(values, reverse=True)[k - 1]


def lora_request(entry: AdapterEntry) -> Any:
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=entry.ref, lora_int_id=entry.lora_id, lora_path=str(entry.path))
