"""One engine step's images from the engine core's receive buffers to the GPU, four ways. At 256
requests at once on an H200, a third of vLLM 0.24's engine core went to stacking a step's images
(`MultiModalBatchedField._reduce_data`, py-spy, docs/performance.md), about 5 ms an image: far
slower than copying 1.9 MB should be. This times the parts:

  vllm_pinned       a new pinned tensor, the images stacked into it, one copy to the GPU (vLLM's way)
  pageable_stack    the same into ordinary memory
  per_image         no stacking: each image copied to the GPU from its own buffer (stack_images_on_cpu off)
  reused_pinned     stacked into one pinned buffer allocated once, then one copy

Each image is a fresh tensor over its own bytes, as msgpack decoding leaves it. Medians of
`--repeat` steps, the GPU finished each time; the ratios are vLLM's way over each other way.

    python bench/bench_image_copy.py --images 54 --patches 2520 --json copy.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch


def received(images: int, patches: int) -> list[torch.Tensor]:
    """Images as the engine core's decoder hands them over: uint8 views of separate byte buffers."""
    return [torch.frombuffer(bytearray(torch.randint(0, 256, (patches * 768,), dtype=torch.uint8).numpy().tobytes()),
                             dtype=torch.uint8).view(patches, 768) for _ in range(images)]


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
        "reused_pinned": lambda batch: torch.stack(batch, out=reused).to(device, non_blocking=True),
    }


def timed_ms(work: Callable[[list[torch.Tensor]], object], batches: list[list[torch.Tensor]]) -> tuple[float, float]:
    """Median of (CPU time until `work` returns, wall time until the GPU has the images)."""
    cpu, wall = [], []
    for batch in batches:
        torch.cuda.synchronize()
        start = time.perf_counter()
        work(batch)
        cpu.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
    return 1000 * sorted(cpu)[len(cpu) // 2], 1000 * sorted(wall)[len(wall) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=54, help="images in one step (16384 tokens / ~305 a request)")
    ap.add_argument("--patches", type=int, default=2520, help="patches an image (280 soft tokens: 2,520)")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device = torch.device("cuda")
    rows = []
    for name, work in ways(device, args.images, args.patches).items():
        batches = [received(args.images, args.patches) for _ in range(args.repeat + 2)]
        timed_ms(work, batches[:2])  # warm-up: CUDA context, the pinned allocator's first blocks
        cpu_ms, wall_ms = timed_ms(work, batches[2:])
        rows.append({"way": name, "images": args.images, "mb": round(args.images * args.patches * 768 / 1e6, 1),
                     "cpu_ms": round(cpu_ms, 2), "wall_ms": round(wall_ms, 2)})
    base = rows[0]
    for row in rows:
        row["cpu_ratio"] = round(base["cpu_ms"] / row["cpu_ms"], 2)
        row["wall_ratio"] = round(base["wall_ms"] / row["wall_ms"], 2)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
