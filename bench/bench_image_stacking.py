"""The copy of one engine step's images into one (pinned, with CUDA) CPU tensor: vLLM's
`torch.stack` on one thread against petbreed's copy on several (`serve/vllm_compat.py`).

Each image is what vLLM's engine core receives for one 448 px image at 280 soft tokens: 2,520
patches of 768 bf16 values (3.9 MB), in its own buffer. Prints one JSON object; `ratio` is the
one-thread time over petbreed's, measured in the same run.

    python bench/bench_image_stacking.py --images 58 --repeat 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def received_images(count: int, patches: int, values: int) -> list[torch.Tensor]:
    """Per-image tensors over their own byte buffers, as vLLM decodes them from its messages."""
    one = torch.rand(patches, values).to(torch.bfloat16)
    return [torch.frombuffer(bytearray(one.view(torch.uint8).numpy().tobytes()), dtype=torch.bfloat16)
            .view(patches, values) for _ in range(count)]


def median_ms(work: Callable[[], torch.Tensor], repeat: int) -> float:
    work()  # the pinned allocator's first block
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 2)


def main() -> None:
    from serve.vllm_compat import _stack_in_threads

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=58, help="images in the step (58: 16,384 tokens / 280)")
    ap.add_argument("--patches", type=int, default=2520)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    batch = received_images(args.images, args.patches, 768)
    pin = torch.cuda.is_available()

    def one_thread() -> torch.Tensor:
        out = torch.empty((len(batch), *batch[0].shape), dtype=batch[0].dtype, pin_memory=pin)
        return torch.stack(batch, out=out)

    assert torch.equal(one_thread(), _stack_in_threads(batch, pin))
    vllm_ms = median_ms(one_thread, args.repeat)
    petbreed_ms = median_ms(lambda: _stack_in_threads(batch, pin), args.repeat)
    mb = len(batch) * batch[0].numel() * batch[0].element_size() / 1e6
    print(json.dumps({"images": len(batch), "megabytes": round(mb, 1), "pinned": pin,
                      "one_thread_ms": vllm_ms, "petbreed_threads_ms": petbreed_ms,
                      "one_thread_gb_per_s": round(mb / vllm_ms, 2), "petbreed_gb_per_s": round(mb / petbreed_ms, 2),
                      "ratio": round(vllm_ms / petbreed_ms, 2), "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
