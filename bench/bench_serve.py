"""Benchmark: /v1/predict over HTTP against calling the engine directly, in the same process.

One vLLM engine serves both: first `VllmClassifier.classify` is called directly (images already
decoded), then the same engine answers `POST /v1/predict` through uvicorn on loopback, driven by
an httpx client. Both run a bounded loop: `--concurrency` workers, `--requests` requests each
mode, after a warm-up. Every request carries images never seen before (the encoder cache would
otherwise flatter the numbers). Prints JSON with requests/s, p50/p99 latency and the ratio.

    .venv/bin/python bench/bench_serve.py --requests 200 --concurrency 8

Without --base-model/--registry it builds the tiny Gemma 4 and a random LoRA adapter in a
temporary folder (the CPU case). With them it benchmarks a real base and registry.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TypeVar

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_tiny_registry(root: Path) -> tuple[str, str]:
    """Tiny Gemma 4 + one random all-linear LoRA adapter `pets@1` (6 breeds)."""
    from adapter_contract.labels import LabelSet
    from finetune.model import LoraSettings
    from finetune.synthetic import BREEDS
    from finetune.tiny_model import TinyModelConfig, make_tiny_model, publish_random_adapter

    model = make_tiny_model(root / "tiny-gemma4", TinyModelConfig())
    publish_random_adapter(model, str(root / "registry"), LabelSet(labels=BREEDS[:6]), LoraSettings(), std=0.3)
    return str(model), str(root / "registry")


def images(n: int, seed: int, size: int) -> list[bytes]:
    """Distinct JPEGs: a coloured square on noise."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        img = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
        box = (size // 5, size // 5, size * 4 // 5, size * 4 // 5)
        ImageDraw.Draw(img).rectangle(box, fill=tuple(rng.randbytes(3)))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


T = TypeVar("T")
TOP_K = 5


async def bounded_loop(
    call: Callable[[T], Awaitable[None]], indices: Iterable[T], concurrency: int
) -> tuple[float, list[float]]:
    """`concurrency` workers take request inputs (or indices) until all are done: (wall seconds, latencies)."""
    latencies: list[float] = []
    counter = iter(indices)

    async def worker() -> None:
        for i in counter:
            start = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies


def summarise(wall: float, latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "requests": len(ordered), "seconds": round(wall, 3), "requests_per_s": round(len(ordered) / wall, 2),
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 2),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    import httpx
    import uvicorn

    from serve.app import create_app
    from serve.engine import VllmClassifier
    from serve.images import decode_image
    from serve.settings import ServeSettings, VllmSettings
    from serve.state import load_base

    settings = ServeSettings(
        base_model=args.base_model, registry=args.registry, cache_dir=workdir / "cache", poll_interval_s=0,
        queue_size=max(64, args.concurrency * args.images), max_images=args.images,
        vllm=VllmSettings(dtype=args.dtype, max_model_len=args.max_model_len),
    )
    base = await asyncio.to_thread(load_base, settings)
    started = time.perf_counter()
    engine = await asyncio.to_thread(VllmClassifier.start, settings, base.path)
    engine_start_s = time.perf_counter() - started

    app = create_app(settings, engine)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    serving = asyncio.create_task(server.serve())
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=64)) as client:
        while (await _ready(client)) is False:
            await asyncio.sleep(0.2)
        entry = app.state.server.tables().resolve(None)
        total = args.requests + args.warmup
        per_mode = {mode: images(total * args.images, seed, args.size) for seed, mode in enumerate(("direct", "http"))}
        decoded = [decode_image(data, settings.max_pixels) for data in per_mode["direct"]]

        # Both modes ask for the same answer (the API's default top 5), so they do the same work.
        async def direct(i: int) -> None:
            await engine.classify(decoded[i * args.images : (i + 1) * args.images], entry, TOP_K)

        async def http(i: int) -> None:
            batch = per_mode["http"][i * args.images : (i + 1) * args.images]
            files = [("file", (f"{k}.jpg", data, "image/jpeg")) for k, data in enumerate(batch)]
            response = await client.post("/v1/predict", files=files, data={"top_k": str(TOP_K)})
            response.raise_for_status()

        calls = {"direct": direct, "http": http}
        for call in calls.values():
            await bounded_loop(call, range(args.warmup), args.concurrency)
        # Rounds in A-B-B-A order, so drift (caches, allocator, CPU clocks) hits both modes alike.
        totals: dict[str, tuple[float, list[float]]] = {name: (0.0, []) for name in calls}
        per_round = args.requests // args.rounds
        for r in range(args.rounds):
            for name in (("direct", "http") if r % 2 == 0 else ("http", "direct")):
                start = args.warmup + r * per_round
                wall, lat = await bounded_loop(calls[name], range(start, start + per_round), args.concurrency)
                totals[name] = (totals[name][0] + wall, totals[name][1] + lat)
    server.should_exit = True
    await serving
    engine.shutdown()
    direct_r, http_r = summarise(*totals["direct"]), summarise(*totals["http"])
    return {
        "benchmark": "serve", "base_model": args.base_model, "adapter": entry.ref,
        "labels": len(entry.prompt.label_ids), "branch_nodes": len(entry.prompt.trie.branches),
        "images_per_request": args.images, "rounds": args.rounds, "image_size": args.size,
        "concurrency": args.concurrency,
        "cpu_count": os.cpu_count(), "engine_start_s": round(engine_start_s, 1),
        "direct": direct_r, "http": http_r,
        "ratio_rps_http_over_direct": round(http_r["requests_per_s"] / direct_r["requests_per_s"], 3),
        "p50_overhead_ms": round(http_r["p50_ms"] - direct_r["p50_ms"], 2),
    }


async def _ready(client: object) -> bool:
    import httpx

    assert isinstance(client, httpx.AsyncClient)
    try:
        return (await client.get("/readyz")).status_code == 200
    except httpx.TransportError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", help="default: build the tiny Gemma 4")
    parser.add_argument("--registry", help="default: a random LoRA adapter pets@1 on the tiny model")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4, help="alternating direct/http rounds")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        workdir = Path(tmp)
        if not (args.base_model and args.registry):
            args.base_model, args.registry = make_tiny_registry(workdir)
        result = asyncio.run(run(args, workdir))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
