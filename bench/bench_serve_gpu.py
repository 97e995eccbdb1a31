"""GPU serving benchmark: petbreed's classifier path against the reference pipeline's way, on
the same vLLM engine, in one run (H200; runs on CPU with the tiny model for a smoke test).

  python bench/bench_serve_gpu.py engine --model DIR [--soft-tokens 280] --json OUT
  python bench/bench_serve_gpu.py http   --model DIR --json OUT

- engine: petbreed's engine module in-process (`serve.state.ServerState`, the object `petbreed
  serve` runs): one image per call, answered with the label distribution. Then, on the same
  engine and adapter, the reference way: a prompt listing all 37 breed names, greedy free text
  (8 tokens with ignore_eos standing for a fine-tuned answer, and the 128-token worst case),
  mapped to a breed by case-insensitive substring, longest name first.
- http: `petbreed serve` (serve.cli) as a subprocess, driven over loopback by httpx clients in
  --client-processes processes posting multipart JPEGs to /v1/predict.
Every request carries an image never seen before, so no cache flatters the numbers. A 37-breed
rank-16 LoRA adapter (random weights) is published first with petbreed's own registry code.

engine --anatomy N first times the parts of ONE classification at concurrency 1, N times each
(see `anatomy`): where the single-image latency goes, and the floors under it.
engine --torch-profile DIR first records the engine under vLLM's torch profiler (see
`torch_profiles`); `bench/gpu/trace_top.py DIR/c1` summarises a window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any, get_args

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")

LM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# --ab: other ways of the engine, switched while it runs (ab_variants)
AB = ("cpu_threads", "image_path", "images_apart", "lora", "lora_kernels", "pixels", "render_processes")
ANSWER_SEEDS = 900_000_000  # --answers: the first fixed image's seed
PEAK_FLOPS = 790e12  # the H200 bf16 figure the performance issue uses for the compute bound


def photo_like(seed: int, size: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = Image.fromarray((rng.random((6, 6, 3)) * 255).astype("uint8")).resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(base).astype("int16") + rng.integers(-25, 25, (size, size, 3))
    return Image.fromarray(arr.clip(0, 255).astype("uint8"))


Images = Callable[[int], Image.Image]


def folder_images(folder: Path) -> Images:
    """Images from a folder (e.g. a synthetic test split), each request's copy made unique by one
    pixel so that no vLLM cache recognises it."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not files:
        raise SystemExit(f"no images under {folder}")

    def image(seed: int) -> Image.Image:
        # A multiplicative hash, so consecutive seeds mix the folder's classes in every sweep.
        img = Image.open(files[seed * 2654435761 % len(files)]).convert("RGB")
        img.putpixel((0, 0), (seed % 256, seed // 256 % 256, seed // 65536 % 256))
        return img

    return image


def progress(message: str) -> None:
    """A timestamped line on stderr (stdout carries only result rows)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def publish_bench_adapter(model: Path, root: Path) -> str:
    """A rank-16 LoRA on the language model with a 37-breed manifest, in a fresh local registry."""
    from adapter_contract.labels import LabelSet
    from finetune.model import LoraSettings
    from finetune.synthetic import BREEDS
    from finetune.tiny_model import publish_random_adapter

    registry = str(root / "registry")
    lora = LoraSettings(r=16, alpha=16, targets=LM_TARGETS)
    publish_random_adapter(model, registry, LabelSet(labels=BREEDS), lora, std=0.01)
    return registry


# Runs calls on these inputs, this many at a time: (wall seconds, each call's latency).
Load = Callable[[list[Any], int], Awaitable[tuple[float, list[float]]]]


def in_process(call: Callable[[Any], Awaitable[Any]]) -> Load:
    from bench.bench_serve import bounded_loop

    return partial(bounded_loop, call)


async def measure(load: Load, make: Callable[[int], Any], concurrency: int, requests: int,
                  first: int) -> dict[str, Any]:
    """`requests` calls, `concurrency` at a time; images/s and latency. Each call's input (an image,
    an upload) is made from seeds first.. before the clock starts, as a real client has it already."""
    inputs = [make(seed) for seed in range(first, first + requests)]
    cpu = host_cpu_time()
    elapsed, latencies = await load(inputs, concurrency)
    latencies.sort()
    return {"concurrency": concurrency, "requests": requests, "images_per_s": round(requests / elapsed, 1),
            "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
            "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 1),
            "host_cpu_busy": host_cpu_busy(cpu)}


def requests_for(args: argparse.Namespace) -> Callable[[int], int]:
    """Requests per concurrency level."""
    return lambda concurrency: max(args.min_requests, int(concurrency * 3 * args.scale))


Variants = dict[str, Callable[[], Awaitable[Any]]]  # way-name suffix -> what switches the engine to it


async def sweep(name: str, load: Load, make: Callable[[int], Any], levels: list[int],
                count: Callable[[int], int], seed0: int, variants: Variants | None = None,
                stats: Callable[[], dict[str, Any]] = dict) -> list[dict[str, Any]]:
    """Every level in turn. With variants, each level runs once per variant, one after the other
    after switching to it, so that drift during a run favours none of them; the first variant (the
    default) is switched on again at the end. Each variant is warmed up first: a way's first
    requests compile the vision tower for its shapes (seconds each, which would land in one row),
    and with CUDA, Triton compiles each LoRA kernel configuration the first time a step of its size
    runs eagerly (an H200's first saturated level: 55.6-58.0 instead of 83-97 images/s). `stats`
    returns what happened since it was last called, and joins each row."""
    variants = variants or {"": _nothing}
    rows, seed = [], seed0
    top = max(levels)
    for switch in reversed(variants.values()):  # ends on the default
        await switch()
        for concurrency, requests in sorted({(1, 2), (min(8, top), 8), (top, max(8, top))}):
            progress(f"{name}: warm-up, {requests} requests {concurrency} at a time")
            await measure(load, make, concurrency, requests, seed)
            seed += requests  # new images: a cached image's soft tokens would skip the tower
    for level in levels:
        n = count(level)
        for suffix, switch in variants.items():
            await switch()
            stats()  # from here on
            row = await measure(load, make, level, n, seed)
            rows.append({"way": name + suffix, **row, **stats()})
            seed += n
            print(json.dumps(rows[-1]), flush=True)
    await next(iter(variants.values()))()
    return rows


def host_cpu_time() -> tuple[int, int]:
    """The host's (busy, all) CPU time so far, from /proc/stat's first line (user to steal)."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def host_cpu_busy(since: tuple[int, int]) -> float:
    """The share of all the host's cores busy since `since`, load generator included: near 1, the
    host's CPU held the level, not the GPU (2026-12-06: one H100's host held HTTP to 100 images/s).
    Until the ninth session of 2026-12-06 it also counted the making of the level's images (one
    core, about as long as a saturated level), which lowered it."""
    busy, total = host_cpu_time()
    return round((busy - since[0]) / max(total - since[1], 1), 3)


async def _nothing() -> None:
    pass


def serve_settings(args: argparse.Namespace, registry: str, cache: Path) -> Any:
    from serve.settings import ServeSettings, VllmSettings

    # The first budget is the engine's own, as start_server makes it, so that the server's warm-up
    # loads the image processor for the kwargs the requests carry. Without it, the first requests of
    # every in-process run waited 17-20 s (2026-12-04/05), likely for that; over HTTP 1 s.
    vllm = VllmSettings(dtype=args.dtype, enforce_eager=not args.graphs, max_model_len=1024, max_loras=1,
                        max_lora_rank=args.max_lora_rank, max_num_seqs=256, gpu_memory_utilization=0.85,
                        max_num_batched_tokens=args.max_batched_tokens, compile_vision_tower=args.compile_vision,
                        vision_graph_images=args.graph_images, render_processes=args.render_processes,
                        torch_compile=args.torch_compile, graph_max_tokens=args.graph_max_tokens,
                        lora_kernel_configs=args.lora_kernel_configs, quantization=args.quantization,
                        quantize_vision_tower=args.quantize_tower, vision_attention=args.vision_attention,
                        tower_lora=args.vision_attention == "flash", max_soft_tokens=budgets(args)[0],
                        fast_prefill=args.fast_prefill)
    return ServeSettings(base_model=str(args.model), registry=registry, cache_dir=cache, poll_interval_s=0,
                         queue_size=4096, max_images=8, merged_adapter="pets" if args.merged else None, vllm=vllm)


def budgets(args: argparse.Namespace) -> list[int | None]:
    """Image token budgets to sweep; None is the model's own."""
    return [int(x) for x in args.soft_tokens.split(",")] if args.soft_tokens else [None]


def top_ks(args: argparse.Namespace) -> list[int | None]:
    """How many labels each petbreed answer must get exactly; None: the whole distribution."""
    return [None if x == "all" else int(x) for x in args.top_k.split(",")]


def reference_prompt(processor: Any, labels: list[str]) -> str:
    """The public recipe's prompt: the image plus an instruction listing every breed."""
    instruction = ("Identify the breed of the pet in this image. Answer with exactly one of: "
                   + ", ".join(labels) + ", or Unknown.")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    return str(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def parse_reference(text: str, labels: list[str]) -> str:
    lowered = text.lower()
    return next((label for label in sorted(labels, key=len, reverse=True) if label.lower() in lowered), "Unknown")


async def engine_mode(args: argparse.Namespace, registry: str, cache: Path, images: Images) -> dict[str, Any]:
    from serve.metrics import Metrics
    from serve.state import ServerState

    settings = serve_settings(args, registry, cache)
    t0 = time.perf_counter()
    classifier = await asyncio.to_thread(profiled_classifier, args, settings) if args.torch_profile else None
    state = ServerState(settings, Metrics(), classifier)
    await state.start()
    progress(f"engine ready after {time.perf_counter() - t0:.0f} s")
    try:
        if not state.ready:
            raise RuntimeError(state.failed)
        return await engine_sweeps(args, state, images, time.perf_counter() - t0)
    finally:
        await state.stop()  # the engine core is a child process: never leave it behind
        if classifier is not None:
            classifier.shutdown()


def profiled_classifier(args: argparse.Namespace, settings: Any) -> Any:
    """petbreed's engine, built as `VllmClassifier.start` builds it, plus vLLM's torch profiler
    (off until `start_profile`), whose traces and kernel table go to --torch-profile."""
    from transformers import AutoProcessor
    from vllm import AsyncLLMEngine
    from vllm.config import ProfilerConfig

    from serve.engine import VllmClassifier, engine_args, merged_adapter, raw_pixel_scale, set_vllm_environment

    scale = raw_pixel_scale(settings, AutoProcessor.from_pretrained(str(args.model)))
    set_vllm_environment(settings, scale)
    engine = engine_args(settings, str(args.model))
    # No Python stacks and no front-end trace: both would slow the processes being measured.
    engine.profiler_config = ProfilerConfig(profiler="torch", torch_profiler_dir=str(args.torch_profile.resolve()),
                                            torch_profiler_with_stack=False, ignore_frontend=True,
                                            torch_profiler_dump_cuda_time_total=False)
    return VllmClassifier(AsyncLLMEngine.from_engine_args(engine), settings.vllm.max_soft_tokens, scale,
                          merged=merged_adapter(settings, str(args.model)))


async def torch_profiles(args: argparse.Namespace, state: Any, images: Images) -> dict[str, float]:
    """Three windows of the engine under vLLM's torch profiler, each moved into its own folder of
    --torch-profile: `c1`, 12 classifications one at a time; `c8`, 24 of them 8 at a time (where
    throughput was no better than at c=1 on 2026-12-03); and `saturated`, 2 s in the middle of a
    load at concurrency 256, long enough for several steps and the gaps between them. Returns the
    wall time of each window."""
    from bench.bench_serve import bounded_loop

    entry = state.resolve(None)
    classifier = replace(state.engine(), soft_tokens=budgets(args)[0])
    top_k = top_ks(args)[0]

    async def call(image: Image.Image) -> None:
        await classifier.classify([image], entry, top_k)

    async def window(name: str, work: Awaitable[Any]) -> float:
        progress(f"profile {name}: starting")
        await classifier.engine.start_profile()
        t0 = time.perf_counter()
        await work
        seconds = time.perf_counter() - t0
        progress(f"profile {name}: {seconds:.2f} s recorded, writing the trace")
        await classifier.engine.stop_profile()
        folder = args.torch_profile / name
        folder.mkdir()
        for made in args.torch_profile.iterdir():
            if made.is_file():
                made.rename(folder / made.name)
        return round(seconds, 3)

    await bounded_loop(call, [images(seed) for seed in range(500_000, 500_003)], 1)
    walls = {"c1": await window("c1", bounded_loop(call, [images(seed) for seed in range(500_003, 500_015)], 1)),
             "c8": await window("c8", bounded_loop(call, [images(seed) for seed in range(500_015, 500_039)], 8))}
    load = asyncio.create_task(bounded_loop(call, [images(seed) for seed in range(510_000, 511_024)], 256))
    await asyncio.sleep(5)
    walls["saturated"] = await window("saturated", asyncio.sleep(2.0))
    await load
    return walls


async def engine_sweeps(args: argparse.Namespace, state: Any, images: Images, start_s: float) -> dict[str, Any]:
    from vllm import SamplingParams

    from serve.engine import lora_request

    entry = state.resolve(None)
    engine = state.engine()
    levels = [int(x) for x in args.levels.split(",")]
    result: dict[str, Any] = {"engine_start_s": round(start_s, 1)}
    if args.anatomy:
        result["anatomy"] = await anatomy(args, state, images)
    if args.torch_profile:
        result["torch_profile_windows_s"] = await torch_profiles(args, state, images)
    if args.answers:
        result["answers"] = await answers(args, engine, entry, images)
    rows = []
    # Every sweep gets its own images (seeds), so no sweep finds the previous one's in a cache.
    seed0 = 0
    stages: dict[str, tuple[float, float]] = {}  # (seconds, count) per stage since the last row

    def observe(stage: str, seconds: float) -> None:
        total, count = stages.get(stage, (0.0, 0.0))
        stages[stage] = (total + seconds, count + 1)

    def per_row() -> dict[str, Any]:
        """The classifier's mean time per stage, as HTTP rows have the server's, and the share of
        images whose answer needed a second round (deeper trie nodes): it depends on the answers, so
        ways that change them (--ab lora) can differ in work per image."""
        means = stage_means({}, stages)
        stages.clear()
        share = means.get("round2_n", 0) / max(1, means.get("round1_n", 0))
        return {"second_round_share": round(share, 3), **means}

    for budget in budgets(args):
        classifier = replace(engine, soft_tokens=budget, observe=observe)
        for top_k in top_ks(args):

            async def petbreed(image: Image.Image, classifier: Any = classifier, top_k: int | None = top_k) -> None:
                await classifier.classify([image], entry, top_k)

            name = f"petbreed_engine_{budget or 'default'}" + (f"_top{top_k}" if top_k else "")
            variants = ab_variants(classifier, args)
            rows += await sweep(name, in_process(petbreed), images, levels, requests_for(args), seed0, variants,
                                per_row)
            seed0 += 1_000_000

    if args.no_reference:
        return {**result, "rows": rows, "gpu_memory_gib": gpu_memory_gib()}
    texts = [label.text for label in entry.manifest.labels.labels]
    prompt = reference_prompt(state.tables().processor, texts)

    def reference(max_tokens: int) -> Callable[[Image.Image], Awaitable[None]]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

        async def call(image: Image.Image) -> None:
            request = {"prompt": prompt, "multi_modal_data": {"image": image}}
            final = None
            # With --merged the reference runs on the same merged weights: its fine-tuned model.
            lora = None if args.merged else lora_request(entry)
            async for out in engine.engine.generate(request, params, request_id=uuid.uuid4().hex, lora_request=lora):
                final = out
            assert final is not None
            parse_reference(final.outputs[0].text, texts)

        return call

    rows += await sweep("reference_8_tokens", in_process(reference(8)), images, levels, requests_for(args), 100_000)
    # The worst case decodes 128 tokens per image: one small wave per level says enough.
    for level in sorted({levels[0], levels[max(0, len(levels) - 2)]}):
        row = await measure(in_process(reference(128)), images, level, max(4, level), 200_000)
        rows.append({"way": "reference_128_tokens", **row})
        print(json.dumps(rows[-1]), flush=True)
    ours = rows[0]["way"]  # a sweep's first way is petbreed's default
    return {**result, "rows": rows, "gpu_memory_gib": gpu_memory_gib(), "ratios": ratios(rows, levels, ours)}


async def answers(args: argparse.Namespace, engine: Any, entry: Any, images: Images) -> list[list[float]]:
    """The whole label distribution of N fixed images at the first budget, one at a time:
    bench/compare_answers.py compares two runs' (e.g. fp8 against bf16 weights). Their seeds lie
    far from the sweeps', whose images must be new to the engine."""
    classifier = replace(engine, soft_tokens=budgets(args)[0])
    return [[round(p, 5) for p in (await classifier.classify([images(seed)], entry))[0]]
            for seed in range(ANSWER_SEEDS, ANSWER_SEEDS + args.answers)]


def ab_ways(name: str, args: argparse.Namespace) -> tuple[str, dict[str, tuple[Any, ...]]]:
    """A worker method and, per way, the suffix its rows carry and the method's arguments. The first
    way ("") is the engine's as started (for image_path, `graphs`: its vision_graph_images, then the
    tower's graphs off, or on for single images if the engine started without them; for
    lora_kernels, its --lora-kernel-configs, then vLLM's defaults in the steps that run eagerly)."""
    graphs, kernels = args.graph_images, args.lora_kernel_configs
    other_graphs = ("_no_graphs", (True, 0)) if graphs else ("_graphs_1", (True, 1))
    ways: dict[str, tuple[str, dict[str, tuple[Any, ...]]]] = {
        "images_apart": ("petbreed_batch_images_on_cpu", {"": (True,), "_images_apart": (False,)}),
        # The first way assumes the default cpu_threads (1 with CUDA).
        "cpu_threads": ("petbreed_cpu_threads", {"": (1,), "_all_cores": (os.cpu_count(),)}),
        "image_path": ("petbreed_image_path", {"": (True, graphs), other_graphs[0]: other_graphs[1],
                                               "_vllm_image_path": (False, 0)}),
        "lora_kernels": ("petbreed_lora_kernel_configs", {"": (kernels and str(kernels.resolve()),),
                                                          "_vllm_lora_kernels": (None,)}),
    }
    return ways[name]


def ab_variants(classifier: Any, args: argparse.Namespace) -> Variants | None:
    """The ways of --ab (a key of AB): for "pixels", 8-bit pixels (the default) or the image
    processor's floats, and for "render_processes", prompts rendered in the render processes (the
    default with CUDA) or in vLLM's renderer threads, both chosen per request; for "lora", requests
    with the adapter (the default) or with the base model alone, whose steps cost what the adapter
    merged into the weights would (the answers differ, so compare at --top-k all, where every image
    asks the same trie nodes); for the others, switched in the engine's workers."""
    other = args.ab
    if other is None:
        return None
    if other == "lora":
        import serve.engine

        return {"": _set(serve.engine, "lora_request", serve.engine.lora_request),
                "_no_lora": _set(serve.engine, "lora_request", lambda entry: None)}
    if other == "pixels":
        return {"": _set(classifier, "pixel_scale", classifier.pixel_scale),
                "_float_pixels": _set(classifier, "pixel_scale", None)}
    if other == "render_processes":
        return {"": _set(classifier, "render_pool", classifier.render_pool),
                "_renderer_threads": _set(classifier, "render_pool", None)}
    method, ways = ab_ways(other, args)

    def switch(method_args: tuple[Any, ...]) -> Callable[[], Awaitable[Any]]:
        return lambda: classifier.engine.collective_rpc(method, args=method_args)

    return {suffix: switch(method_args) for suffix, method_args in ways.items()}


def _set(classifier: Any, field: str, value: Any) -> Callable[[], Awaitable[None]]:
    async def switch() -> None:
        setattr(classifier, field, value)
    return switch


async def anatomy(args: argparse.Namespace, state: Any, images: Images) -> list[dict[str, Any]]:
    """Where one classification's time goes at concurrency 1 (first image budget): its parts and
    the floors under it, each timed alone, `args.anatomy` times in a row after 3 warm-up calls.

    hf_image_processor  the Hugging Face image processor alone, in this process
    text_only           one root request with no image, as long as an image prompt: the LM floor
    root_same_image     the root request on one image processed once: vLLM's encoder and prefix
                        caches hit, so what is left is the per-request overhead
    root_fresh_image    the root request on a new image, processed: one full first round
    classify            petbreed's classify on a new image (root, then the deeper nodes)
    classify_top1       the same with top_k=1
    """
    from vllm import SamplingParams

    from bench.bench_serve import bounded_loop
    from serve.engine import MAX_IDS_PER_REQUEST, lora_request

    entry = state.resolve(None)
    budget = budgets(args)[0]
    classifier = replace(state.engine(), soft_tokens=budget)
    processor = state.tables().processor
    root = entry.prompt.trie.branches[0]
    root_ids = [*entry.prompt_token_ids, *root.prefix]
    # The image processor's arguments as the classifier sends them (budget, 8-bit pixels).
    processing = classifier.image_input(images(0), entry).get("mm_processor_kwargs", {})
    params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(root.children[:MAX_IDS_PER_REQUEST]))

    async def generate(prompt: dict[str, Any]) -> None:
        async for _ in classifier.engine.generate(prompt, params, request_id=uuid.uuid4().hex,
                                                  lora_request=lora_request(entry)):
            pass

    async def root_request(image: Image.Image) -> dict[str, Any]:
        """The root request as `VllmClassifier._one` makes it: the image processed, then the root's prefix."""
        rendered, _ = await classifier.render(image, entry)
        return {**rendered, "prompt_token_ids": [*rendered["prompt_token_ids"], *root.prefix]}

    async def fresh_image(image: Image.Image) -> None:
        await generate(await root_request(image))

    # The text-only prompt puts ordinary tokens where vLLM would expand the image placeholder
    # (<boi>, one token per soft token, <eoi>), led by a number unique to the call: an identical
    # prompt would be a prefix-cache hit, not a prefill.
    tokenizer = processor.tokenizer
    first = processor.image_processor(images=[images(399_999)], return_tensors="pt", **processing)
    expanded = int(first["num_soft_tokens_per_image"][0]) + 2
    placeholders = {processor.image_token_id, *tokenizer.convert_tokens_to_ids([processor.boi_token,
                                                                                processor.eoi_token])}
    at = next(i for i, t in enumerate(root_ids) if t in placeholders)
    text_ids = [t for t in root_ids if t not in placeholders]
    filler = tokenizer.encode(" the", add_special_tokens=False)[-1]

    def text_prompt(seed: int) -> dict[str, Any]:
        unique = tokenizer.encode(f" {seed:07d}", add_special_tokens=False)
        return {"prompt_token_ids": [*text_ids[:at], *unique, *[filler] * (expanded - len(unique)), *text_ids[at:]]}

    async def hf_image_processor(image: Image.Image) -> None:
        # Called directly, blocking the event loop: at concurrency 1 nothing else waits on it.
        processor.image_processor(images=[image], return_tensors="pt", **processing)

    same = await root_request(images(399_998))
    parts: list[tuple[str, Callable[[Any], Awaitable[Any]], Callable[[int], Any]]] = [
        ("hf_image_processor", hf_image_processor, images),
        ("text_only", generate, text_prompt),
        ("root_same_image", generate, lambda seed: same),
        ("root_fresh_image", fresh_image, images),
        ("classify", lambda image: classifier.classify([image], entry, None), images),
        ("classify_top1", lambda image: classifier.classify([image], entry, 1), images),
    ]
    rows = []
    for i, (name, call, make) in enumerate(parts):
        # Inputs made before the clock starts, each part from its own seeds: no cache hit but the one meant.
        seed0 = 400_000 + 10_000 * i
        await bounded_loop(call, [make(seed) for seed in range(seed0, seed0 + 3)], 1)
        _, latencies = await bounded_loop(call, [make(seed) for seed in range(seed0 + 3, seed0 + 3 + args.anatomy)], 1)
        latencies.sort()
        rows.append({"part": name, "budget": budget, "calls": len(latencies),
                     "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
                     "p90_ms": round(1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.9))], 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def ratios(rows: list[dict[str, Any]], levels: list[int], ours_way: str) -> dict[str, float]:
    """petbreed (model's own image budget) against the reference (8-token answer) at concurrency 1
    and at the top level."""
    def row(way: str, level: int) -> dict[str, Any]:
        return next(r for r in rows if r["way"] == way and r["concurrency"] == level)

    one, top = levels[0], levels[-1]
    ours, ref = row(ours_way, one), row("reference_8_tokens", one)
    return {f"p50_latency_speedup_at_{one}": round(ref["p50_ms"] / ours["p50_ms"], 2),
            f"throughput_speedup_at_{one}": round(ours["images_per_s"] / ref["images_per_s"], 2),
            f"throughput_speedup_at_{top}": round(row(ours_way, top)["images_per_s"]
                                                 / row("reference_8_tokens", top)["images_per_s"], 2)}


def nvidia_smi(field: str) -> str | None:
    """The first GPU's `field` as nvidia-smi reports it, or None where there is none."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


@contextlib.contextmanager
def gpu_busy() -> Iterator[dict[str, float | None]]:
    """Yields a dict whose "gpu_busy" is set on exit: the mean of nvidia-smi's utilization.gpu (the
    share of time a kernel ran) sampled every 250 ms meanwhile, or None where there is no GPU.
    Beside the CPU by part it tells a CPU-held level (the GPU waits) from a GPU-held one."""
    result: dict[str, float | None] = {"gpu_busy": None}
    try:
        sampler = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                    "-lms", "250"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    except OSError:
        yield result
        return
    try:
        yield result
    finally:
        sampler.terminate()
        samples = [int(line) for line in sampler.communicate()[0].split() if line.isdigit()]
        result["gpu_busy"] = round(sum(samples) / len(samples) / 100, 3) if samples else None


def gpu_memory_gib() -> float | None:
    used = nvidia_smi("memory.used")
    return round(int(used) / 1024, 1) if used and used.isdigit() else None


def host() -> dict[str, Any]:
    """The GPU and the CPU beside it. Lent H100s differ in CPU: rendering, the API's decoding and eager
    launches follow it, so figures from two machines compare only with this beside them."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), None)
    return {"gpu": nvidia_smi("name"), "cpu": cpu, "cpus": os.cpu_count()}


async def http_mode(args: argparse.Namespace, registry: str, cache: Path, images: Images) -> dict[str, Any]:
    """`petbreed serve` as subprocesses, JPEG uploads over loopback from --client-processes load
    generators. With --servers N, N of them share the GPU (each 1/N of the memory) and every level
    runs twice: all requests to the first server, then round-robin over all N (more front-end
    processes, one GPU)."""
    import httpx

    t0 = time.perf_counter()
    servers = [start_server(args, registry, cache / f"server{i}", args.servers) for i in range(args.servers)]
    clients = ProcessPoolExecutor(args.client_processes, mp_context=get_context("spawn"))
    try:
        async with httpx.AsyncClient(timeout=120) as client:
            for proc, url in servers:
                await wait_ready(client, url, proc)
        start_s = time.perf_counter() - t0
        targets = [servers[0][1]]
        stages: list[dict[str, Any]] = []  # per level (warm-ups too), the first server's time per stage, CPU by part

        def upload(seed: int) -> bytes:
            buf = io.BytesIO()
            images(seed).save(buf, format="JPEG", quality=90)
            return buf.getvalue()

        async def load(bodies: list[Any], concurrency: int) -> tuple[float, list[float]]:
            """The requests shared out over the client processes, as is the concurrency (fewer
            processes than --client-processes below that many at once)."""
            count = min(args.client_processes, concurrency)
            shares = [(list(targets), bodies[i::count], concurrency // count + (i < concurrency % count))
                      for i in range(count)]
            loop = asyncio.get_running_loop()
            before = await asyncio.to_thread(stage_totals, targets[0])
            cpu_before, clock = server_cpu_seconds(servers[0][0].pid), time.monotonic()
            with gpu_busy() as gpu:
                runs = await asyncio.gather(*(loop.run_in_executor(clients, post_all, *share) for share in shares))
            cores = cores_busy(cpu_before, server_cpu_seconds(servers[0][0].pid), time.monotonic() - clock)
            stages.append({"concurrency": concurrency, "requests": len(bodies),
                           **stage_means(before, await asyncio.to_thread(stage_totals, targets[0])),
                           "cpu_cores": cores, **gpu})
            wall = max(end for _, end, _ in runs) - min(begin for begin, _, _ in runs)
            return wall, [latency for *_, latencies in runs for latency in latencies]

        def use(count: int) -> Callable[[], Awaitable[None]]:
            async def switch() -> None:
                targets[:] = [url for _, url in servers[:count]]
            return switch

        variants = {"": use(1), f"_{len(servers)}_servers": use(len(servers))} if len(servers) > 1 else None
        levels = [int(x) for x in args.levels.split(",")]
        rows = await sweep("petbreed_http", load, upload, levels, requests_for(args), 300_000, variants)
        return {"engine_start_s": round(start_s, 1), "rows": rows, "gpu_memory_gib": gpu_memory_gib(),
                "client_processes": args.client_processes, "server_stages": stages}
    finally:
        clients.shutdown()
        for proc, _ in servers:
            proc.terminate()
        for proc, _ in servers:
            proc.wait(60)


def server_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds so far of a `petbreed serve` process tree, by part: the API process's event loop
    (its main thread, which runs every request's Python and vLLM's output handler), the API
    process's other threads (image decoding, the render pool's manager thread), the engine core's
    main thread (its busy loop: scheduling, and on one GPU the model's steps), its other threads
    and its workers (vLLM's CPU build runs the model in a worker process), and the API process's
    other children (the render processes, and multiprocessing's resource tracker). Read from /proc:
    the device has no psutil of its own to rely on."""
    seconds = {"api_event_loop": _proc_cpu_seconds(pid, f"task/{pid}/stat")}
    seconds["api_other_threads"] = _proc_cpu_seconds(pid, "stat") - seconds["api_event_loop"]
    seconds["engine_core_main_thread"] = seconds["engine_core_other"] = seconds["render_processes"] = 0.0
    tree = _children()
    for child in tree.get(pid, []):
        with contextlib.suppress(OSError):  # it ended meanwhile
            title = Path(f"/proc/{child}/cmdline").read_bytes() + Path(f"/proc/{child}/comm").read_bytes()
            total = sum(_proc_cpu_seconds(p, "stat") for p in _subtree(tree, child))
            if b"EngineCore" in title:
                main = _proc_cpu_seconds(child, f"task/{child}/stat")
                seconds["engine_core_main_thread"] += main
                seconds["engine_core_other"] += total - main
            else:
                seconds["render_processes"] += total
    return seconds


def cores_busy(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    """Each part's CPU seconds between two readings per second of wall time: 1.0 is one core busy
    all the time (the most the event loop can give)."""
    return {part: round((after[part] - before.get(part, 0.0)) / wall, 3) for part in after}


def _proc_cpu_seconds(pid: int, stat: str) -> float:
    """utime + stime of /proc/PID/STAT. A process that has ended counts 0."""
    try:
        text = Path(f"/proc/{pid}/{stat}").read_text()
    except OSError:
        return 0.0
    # utime and stime are the 14th and 15th fields; the 2nd (the name, in brackets) may hold spaces.
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children() -> dict[int, list[int]]:
    """Every process's children, from each /proc/PID/stat's parent field."""
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            tree.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
    return tree


def _subtree(tree: dict[int, list[int]], pid: int) -> list[int]:
    return [pid] + [p for child in tree.get(pid, []) for p in _subtree(tree, child)]


def stage_totals(url: str) -> dict[str, tuple[float, float]]:
    """The server's petbreed_stage_duration_seconds: (sum, count) per stage."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples if family.name == "petbreed_stage_duration_seconds" else []:
            if sample.name.endswith(("_sum", "_count")):
                totals.setdefault(sample.labels["stage"], [0.0, 0.0])[sample.name.endswith("_count")] = sample.value
    return {stage: (total, count) for stage, (total, count) in totals.items()}


def stage_means(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Mean ms per stage between two scrapes, and how many times each stage ran (round2: images
    that needed a deeper trie node)."""
    means: dict[str, Any] = {}
    for stage, (total, count) in after.items():
        total0, count0 = before.get(stage, (0.0, 0.0))
        if count > count0:
            means[f"{stage}_ms"] = round(1000 * (total - total0) / (count - count0), 1)
            means[f"{stage}_n"] = int(count - count0)
    return means


def post_all(urls: list[str], bodies: list[bytes], concurrency: int) -> tuple[float, float, list[float]]:
    """In a client process: POST every body to /v1/predict (round-robin over urls), `concurrency`
    at a time. Returns the clock (time.monotonic, shared by the processes) at the start and at the
    end, and each request's latency. A client of its own per process: one httpx client's pool
    bookkeeping took half of its thread at 256 connections (2026-12-03 profile)."""
    import httpx

    from bench.bench_serve import bounded_loop

    turn = itertools.count()

    async def run() -> tuple[float, float, list[float]]:
        # Idle connections are dropped before uvicorn's 5 s keep-alive ends: reusing one the server is
        # closing fails the request (a server idle during the previous sweep did that to run 8).
        limits = httpx.Limits(max_connections=concurrency, keepalive_expiry=1)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:

            async def post(body: bytes) -> None:
                url = urls[next(turn) % len(urls)]
                response = await client.post(f"{url}/v1/predict", files={"file": ("pet.jpg", body)})
                response.raise_for_status()

            begin = time.monotonic()
            _, latencies = await bounded_loop(post, bodies, concurrency)
            return begin, time.monotonic(), latencies

    return asyncio.run(run())


Server = tuple[subprocess.Popen[bytes], str]  # the process and its URL


def start_server(args: argparse.Namespace, registry: str, cache: Path, sharing: int) -> Server:
    """One `petbreed serve` (its module) with the benchmark's engine settings and 1/sharing of the GPU."""
    from bench.bench_serve import free_port

    port = free_port()
    env = {**os.environ, "PETBREED_BASE_MODEL": str(args.model), "PETBREED_REGISTRY": registry,
           "PETBREED_CACHE_DIR": str(cache), "PETBREED_HOST": "127.0.0.1", "PETBREED_PORT": str(port),
           "PETBREED_QUEUE_SIZE": "4096", "PETBREED_POLL_INTERVAL_S": "0", "PETBREED_VLLM__DTYPE": args.dtype,
           "PETBREED_VLLM__ENFORCE_EAGER": str(not args.graphs).lower(), "PETBREED_VLLM__MAX_NUM_SEQS": "256",
           "PETBREED_VLLM__MAX_LORA_RANK": str(args.max_lora_rank),
           "PETBREED_VLLM__GPU_MEMORY_UTILIZATION": str(round(0.85 / sharing, 3)),
           "PETBREED_VLLM__MAX_NUM_BATCHED_TOKENS": str(args.max_batched_tokens),
           "PETBREED_VLLM__VISION_GRAPH_IMAGES": str(args.graph_images),
           "PETBREED_VLLM__TORCH_COMPILE": str(args.torch_compile).lower(),
           "PETBREED_VLLM__FAST_PREFILL": str(args.fast_prefill).lower(),
           "PETBREED_VLLM__GRAPH_MAX_TOKENS": str(args.graph_max_tokens),
           "PETBREED_VLLM__LORA_KERNEL_CONFIGS": str(args.lora_kernel_configs or "null"),
           "PETBREED_VLLM__QUANTIZATION": args.quantization or "null",
           "PETBREED_VLLM__QUANTIZE_VISION_TOWER": str(args.quantize_tower).lower(),
           "PETBREED_VLLM__VISION_ATTENTION": args.vision_attention,
           "PETBREED_VLLM__TOWER_LORA": str(args.vision_attention == "flash").lower(),
           "PETBREED_MERGED_ADAPTER": "pets" if args.merged else "null"}
    if budgets(args)[0]:
        env["PETBREED_VLLM__MAX_SOFT_TOKENS"] = str(budgets(args)[0])
    if args.render_processes is not None:
        env["PETBREED_VLLM__RENDER_PROCESSES"] = str(args.render_processes)
    proc = subprocess.Popen([sys.executable, "-m", "serve.cli"], env=env, stdout=sys.stderr, stderr=sys.stderr)
    return proc, f"http://127.0.0.1:{port}"


async def wait_ready(client: Any, url: str, proc: subprocess.Popen[bytes], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if (await client.get(f"{url}/readyz")).status_code == 200:
                return
            health = await client.get(f"{url}/healthz")
        except Exception:
            health = None
        if health is not None and health.status_code == 503:  # start-up failed; the server stays up to say so
            raise RuntimeError(f"server start-up failed: {health.json()['error']['message']}")
        await asyncio.sleep(1)
    raise RuntimeError("server not ready")


def compute_bound(model: Path, soft_tokens: int, fast_prefill: bool = False) -> dict[str, float]:
    """FLOPs per image from the config: 2 x matmul parameters x tokens, for the vision tower
    (over its patches: Gemma 4 resizes every image to fill the budget, soft tokens x pooling
    kernel area) and the language model (over the prompt; with fast prefill its KV-shared layers
    over the one answered position)."""
    import torch
    from transformers import AutoConfig, Gemma4ForConditionalGeneration

    from bench.bench_train import matmul_param_counts

    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        meta = Gemma4ForConditionalGeneration._from_config(config)
    counts = matmul_param_counts(meta)
    shared = kv_shared_params(meta, config.text_config) if fast_prefill else 0
    patches = soft_tokens * config.vision_config.pooling_kernel_size**2
    prompt_tokens = soft_tokens + 25
    flops = 2 * counts["vision"] * patches + 2 * (counts["text"] - shared) * prompt_tokens + 2 * shared
    return {"flops_per_image": flops, "vision_patches": patches, "bound_images_per_s": round(PEAK_FLOPS / flops, 1),
            "text_params": counts["text"], "vision_params": counts["vision"], "prompt_tokens": prompt_tokens,
            "kv_shared_params_on_one_position": shared}


def kv_shared_params(model: Any, text_config: Any) -> int:
    """Parameters of the language model's layers that reuse earlier layers' KV cache (its last
    num_kv_shared_layers), which fast prefill runs on each prompt's answered position only."""
    first = text_config.num_hidden_layers - (getattr(text_config, "num_kv_shared_layers", 0) or 0)
    layers = model.model.language_model.layers[first:]
    return sum(p.numel() for p in layers.parameters())


def main() -> None:
    from serve.jsonlog import configure_logging
    from serve.settings import Quantization, VllmSettings

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["engine", "http"])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--registry", help="existing registry with pets@1; default: publish a bench adapter")
    ap.add_argument("--levels", default="1,8,64,256")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="requests per level = max(MIN_REQUESTS, 3 x level x scale)")
    ap.add_argument("--min-requests", type=int, default=8, help="at least this many requests per level")
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--images", type=Path, help="take images from this folder instead of generating them")
    ap.add_argument("--soft-tokens", default="", help="image token budgets to sweep, e.g. 280,140,70 (http: first)")
    ap.add_argument("--top-k", default="all", help="engine: top-k values to sweep, e.g. all,5,1 (HTTP: the API's 5)")
    ap.add_argument("--graphs", action="store_true", help="CUDA graphs (petbreed's GPU default) instead of eager")
    ap.add_argument("--torch-compile", action="store_true",
                    help="with --graphs: full graphs of the torch.compiled model (torch_compile)")
    ap.add_argument("--anatomy", type=int, default=0, metavar="N",
                    help="engine: first time each part of one classification N times at concurrency 1 (0: off)")
    ap.add_argument("--compile-vision", action=argparse.BooleanOptionalAction, default=None,
                    help="engine: compile the vision tower (default: petbreed's, on with CUDA)")
    ap.add_argument("--torch-profile", type=Path, metavar="DIR",
                    help="engine: first record three windows with vLLM's torch profiler into DIR (see torch_profiles)")
    ap.add_argument("--ab", choices=sorted(AB), help="engine: every petbreed level once per way, the default "
                    "first: images_apart (stack_images_on_cpu off), image_path (no CUDA graphs; vLLM's own), "
                    "pixels (the processor's floats instead of 8-bit pixels), lora (the base model alone, "
                    "without the adapter), lora_kernels (vLLM's default LoRA kernel "
                    "configurations at saturation instead of --lora-kernel-configs), cpu_threads (the engine core's "
                    "torch threads on every core instead of 1), render_processes (vLLM's renderer threads "
                    "instead of processes)")
    ap.add_argument("--graph-images", type=int, default=VllmSettings().vision_graph_images,
                    help="vision_graph_images: CUDA graphs of the tower for steps of up to N images (0: off)")
    ap.add_argument("--servers", type=int, default=1, help="http: petbreed processes sharing the GPU (see http_mode)")
    ap.add_argument("--client-processes", type=int, default=4, help="http: load generator processes")
    ap.add_argument("--render-processes", type=int, help="render_processes (default: petbreed's, 4 with CUDA)")
    ap.add_argument("--no-reference", action="store_true", help="engine: petbreed only (e.g. under a profiler)")
    ap.add_argument("--max-batched-tokens", type=int, default=VllmSettings().max_num_batched_tokens)
    ap.add_argument("--graph-max-tokens", type=int, default=VllmSettings().graph_max_tokens,
                    help="with --graphs: graph_max_tokens (0: vLLM's own sizes, to 512)")
    ap.add_argument("--max-lora-rank", type=int, default=16,
                    help="the width of vLLM's LoRA buffers: the bench adapter's rank (training's default r), "
                         f"not serving's default {VllmSettings().max_lora_rank}, unless asked")
    ap.add_argument("--lora-kernel-configs", type=lambda value: Path(value) if value else None,
                    default=VllmSettings().lora_kernel_configs,
                    help="folder of LoRA kernel configurations, e.g. serve/lora_kernel_configs (default or '': "
                         "vLLM's own)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantization", choices=get_args(Quantization),
                    help="quantization: vLLM's online quantization of the language model (default: none)")
    ap.add_argument("--quantize-tower", action="store_true",
                    help="quantize_vision_tower: with --quantization, the vision tower's encoder layers too")
    ap.add_argument("--vision-attention", choices=["flash", "cudnn"], default=VllmSettings().vision_attention,
                    help="vision_attention: the tower's attention kernel (then without tower LoRA: the bench adapter "
                         "has none)")
    ap.add_argument("--merged", action="store_true",
                    help="merged_adapter: the bench adapter merged into the base weights, an engine without LoRA")
    ap.add_argument("--fast-prefill", action="store_true",
                    help="fast_prefill (with --merged): the KV-shared layers only on each prompt's answered position")
    ap.add_argument("--answers", type=int, default=0, metavar="N",
                    help="engine: first record the label distribution of N fixed images (bench/compare_answers.py)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.ab == "lora_kernels" and args.lora_kernel_configs is None:
        ap.error("--ab lora_kernels compares --lora-kernel-configs FOLDER with vLLM's own: give the folder")
    if args.fast_prefill and not args.merged:
        ap.error("--fast-prefill needs --merged (fast_prefill needs a merged_adapter)")
    if args.merged and args.ab == "lora":
        ap.error("--ab lora compares the adapter as LoRA with the base alone: not with --merged")
    if args.torch_profile:
        args.torch_profile.mkdir(parents=True, exist_ok=True)
    configure_logging("WARNING")
    logging.getLogger("petbreed").setLevel(logging.INFO)  # its start-up lines, e.g. the warm-up's seconds
    with tempfile.TemporaryDirectory() as tmp:
        registry = args.registry or publish_bench_adapter(args.model, Path(tmp))
        run = engine_mode if args.mode == "engine" else http_mode
        images = folder_images(args.images) if args.images else partial(photo_like, size=args.image_size)
        result = asyncio.run(run(args, registry, Path(tmp) / "cache", images))
    default = json.loads((args.model / "config.json").read_text())["vision_config"]["default_output_length"]
    result.update(host=host(), mode=args.mode, model=str(args.model), image_size=args.image_size, merged=args.merged,
                  graphs=args.graphs, torch_compile=args.torch_compile, fast_prefill=args.fast_prefill,
                  max_batched_tokens=args.max_batched_tokens,
                  graph_max_tokens=args.graph_max_tokens, max_lora_rank=args.max_lora_rank,
                  quantization=args.quantization, quantize_tower=args.quantize_tower,
                  vision_attention=args.vision_attention, render_processes=args.render_processes,
                  lora_kernel_configs=args.lora_kernel_configs and str(args.lora_kernel_configs),
                  compute_bound={b or default: compute_bound(args.model, b or default, args.fast_prefill)
                                 for b in budgets(args)})
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
