"""How a rendered image gets from a render process back to the API process (serve/render_pool.py),
and what that costs the API process: its CPU per image, and images/s. CPU only, no model.

  python bench/bench_render_transport.py --processes 4 --images 400 --concurrency 64

Each worker returns the same rendered prompt, shaped as Gemma 4 E4B's at 280 soft tokens (2,520
patches of 768 8-bit values: 1.9 MB, and their positions), in one of two ways, alternating rounds:
- pipe: pickled bytes as the worker's result, through the pool's pipe, as before 2026-12-06;
- shared_memory: the bytes in a shared-memory block, the block's name as the result
  (`to_shared_memory` / `from_shared_memory`, what the server does now).
The API process's CPU time (every thread: the event loop, the pool's manager and feeder threads)
is what the server's event loop competes with for the interpreter lock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve.render_pool import dumps, from_shared_memory, to_shared_memory

_rendered: bytes = b""  # the worker's one rendered prompt, pickled


def _start_worker() -> None:
    global _rendered
    _rendered = dumps({
        "type": "multimodal",
        "prompt_token_ids": list(range(305)),
        "mm_kwargs": {"pixel_values": torch.randint(0, 255, (1, 2520, 768), dtype=torch.uint8),
                      "image_position_ids": torch.zeros(1, 2520, 2, dtype=torch.int64)},
    })


def through_pipe(_: int) -> bytes:
    return _rendered


def through_shared_memory(_: int) -> tuple[str, int] | bytes:
    return to_shared_memory(_rendered)


WAYS: dict[str, tuple[Callable[[int], Any], Callable[[Any], Any]]] = {
    "pipe": (through_pipe, pickle.loads),
    "shared_memory": (through_shared_memory, lambda block: from_shared_memory(*block)),  # /dev/shm has room
}


async def run(pool: ProcessPoolExecutor, way: str, images: int, concurrency: int) -> dict[str, float]:
    send, receive = WAYS[way]
    loop, slots = asyncio.get_running_loop(), asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with slots:
            receive(await loop.run_in_executor(pool, send, i))

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(images)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"images_per_s": round(images / wall, 1), "api_cpu_ms_per_image": round(1000 * cpu / images, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--images", type=int, default=400, help="per way and round")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    pool = ProcessPoolExecutor(args.processes, mp_context=get_context("spawn"), initializer=_start_worker)
    rows: list[dict[str, Any]] = []
    try:
        for round_ in range(args.rounds + 1):  # round 0 warms up: the workers start, pages fault in
            for way in WAYS if round_ % 2 else reversed(WAYS):
                row = {"way": way, "round": round_, **asyncio.run(run(pool, way, args.images, args.concurrency))}
                if round_:
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        pool.shutdown()

    def mean(way: str, key: str) -> float:
        return sum(r[key] for r in rows if r["way"] == way) / args.rounds

    result = {
        "bench": "render_transport", "cpus": os.cpu_count(), "processes": args.processes, "images": args.images,
        "concurrency": args.concurrency, "rounds": args.rounds, "rows": rows,
        "api_cpu_ratio_pipe_over_shared_memory": round(
            mean("pipe", "api_cpu_ms_per_image") / mean("shared_memory", "api_cpu_ms_per_image"), 2),
        "throughput_ratio_shared_memory_over_pipe": round(
            mean("shared_memory", "images_per_s") / mean("pipe", "images_per_s"), 2),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
