"""One engine step's images from the engine core's receive buffers to the GPU, four ways. At 256
requests at once on an H200, a third of vLLM 0.24's engine core went to stacking a step's images
(`MultiModalBatchedField._reduce_data`, py-spy, docs/performance.md), about 5 ms an image: far
slower than copying 1.9 MB should be. With torch's CPU threads at 1 in the serving processes
(2026-12-03) it fell to 6 %. This times the parts:

  vllm_pinned       a new pinned tensor, the images stacked into it, one copy to the GPU (vLLM's way)
  pageable_stack    the same into ordinary memory
  per_image         no stacking: each image copied to the GPU from its own buffer (stack_images_on_cpu off)
  reused_pinned     stacked into one pinned buffer allocated once, then one copy

Each image is a fresh tensor over its own bytes, as msgpack decoding leaves it (`--pinned-sources`:
pinned, as vLLM's decoder pins what it receives). Medians of `--repeat` steps, the GPU finished each
time; the ratios are vLLM's way over each other way. `--busy-ms` keeps the GPU busy that long before
each step's copy and never waits for it, as in an engine at saturation, where a step's pinned
tensor may still be in use when the next is allocated; then only CPU times are meaningful, and
steps hold between half and all of `--images` images, as steps of an engine do.

    python bench/bench_image_copy.py --images 54 --patches 2520 --json copy.json
    python bench/bench_image_copy.py --busy-ms 60 --pinned-sources --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch


def received(images: int, patches: int, pinned: bool) -> list[torch.Tensor]:
    """Images as the engine core's decoder hands them over: uint8 views of separate byte buffers."""
    made = [torch.frombuffer(bytearray(torch.randint(0, 256, (patches * 768,), dtype=torch.uint8).numpy().tobytes()),
                             dtype=torch.uint8).view(patches, 768) for _ in range(images)]
    return [image.pin_memory() for image in made] if pinned else made


def ways(device: torch.device, images: int, patches: int) -> dict[str, Callable[[list[torch.Tensor]], object]]:
    reused = torch.empty((images, patches, 768), dtype=torch.uint8, pin_memory=True)

    def stacked(pin: bool) -> Callable[[list[torch.Tensor]], object]:
        def run(batch: list[torch.Tensor]) -> object:
            out = torch.empty((len(batch), *batch[0].shape), dtype=batch[0].dtype, pin_memory=pin)
            return torch.stack(batch, out=out).to(device, non_blocking=True)
        return run

    return {
        "vllm_pinned": stacked(True),
        "pageable_stack": stacked(False),
        "per_image": lambda batch: [image.to(device, non_blocking=True) for image in batch],
        "reused_pinned": lambda batch: torch.stack(batch, out=reused[: len(batch)]).to(device, non_blocking=True),
    }


def timed_ms(work: Callable[[list[torch.Tensor]], object], batches: list[list[torch.Tensor]],
             busy_cycles: int) -> tuple[float, float]:
    """Median of (CPU time until `work` returns, wall time until the GPU has the images); with
    `busy_cycles`, the GPU is kept busy before each step and the wall time is not measured (0)."""
    cpu, wall = [], []
    for batch in batches:
        if busy_cycles:
            torch.cuda._sleep(busy_cycles)
        else:
            torch.cuda.synchronize()
        start = time.perf_counter()
        work(batch)
        cpu.append(time.perf_counter() - start)
        if not busy_cycles:
            torch.cuda.synchronize()
            wall.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return 1000 * sorted(cpu)[len(cpu) // 2], 1000 * sorted(wall)[len(wall) // 2] if wall else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=54, help="images in one step (16384 tokens / ~305 a request)")
    ap.add_argument("--patches", type=int, default=2520, help="patches an image (280 soft tokens: 2,520)")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--pinned-sources", action="store_true", help="the received images pinned, as vLLM's decoder pins")
    ap.add_argument("--busy-ms", type=float, default=0, help="GPU work queued before each step, never waited for")
    ap.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's own)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda")
    busy_cycles = int(args.busy_ms * 1e-3 * 1.98e9)  # H200 SM clock, cycles of torch.cuda._sleep
    # Under load, steps hold different numbers of images: from half to all of --images.
    counts = [args.images - (i * 7) % (args.images // 2 + 1) if args.busy_ms else args.images
              for i in range(args.repeat + 2)]
    rows = []
    for name, work in ways(device, args.images, args.patches).items():
        batches = [received(n, args.patches, args.pinned_sources) for n in counts]
        timed_ms(work, batches[:2], busy_cycles)  # warm-up: CUDA context, the pinned allocator's first blocks
        cpu_ms, wall_ms = timed_ms(work, batches[2:], busy_cycles)
        rows.append({"way": name, "images": args.images, "mb": round(args.images * args.patches * 768 / 1e6, 1),
                     "pinned_sources": args.pinned_sources, "busy_ms": args.busy_ms, "threads": torch.get_num_threads(),
                     "cpu_ms": round(cpu_ms, 2), "wall_ms": round(wall_ms, 2)})
    base = rows[0]
    for row in rows:
        row["cpu_ratio"] = round(base["cpu_ms"] / row["cpu_ms"], 2)
        row["wall_ratio"] = round(base["wall_ms"] / row["wall_ms"], 2) if row["wall_ms"] else None
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
