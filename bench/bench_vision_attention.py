"""Gemma 4's vision encoder on a batch of images as vLLM 0.24 runs it (every image padded to the
budget's patch count, so attention needs a padding mask) against the same images without their
padding patches (no mask: PyTorch may pick its flash kernel).

At 280 soft tokens a 448 px square image is 2,304 patches padded to 2,520. Random weights with the
vision shapes of the given config; eager transformers modules, bf16 on CUDA (float32 on CPU).
Prints one JSON object; `ratio` is padded time over unpadded time, measured in the same run.

    python bench/bench_vision_attention.py --config docs/results/h200_e4b_config.json --images 32
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch


def timed_ms(work: Callable[[], torch.Tensor], repeat: int) -> float:
    """Median wall time of `work`, the GPU finished each time."""
    for _ in range(2):
        work()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def grid_positions(images: int, side: int, total: int, device: torch.device) -> torch.Tensor:
    """(x, y) of a side x side patch grid per image, then -1 up to `total` patches (Gemma 4's padding)."""
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    grid = torch.stack([xs.flatten(), ys.flatten()], dim=-1)
    padded = torch.cat([grid, torch.full((total - side * side, 2), -1)])
    return padded.expand(images, -1, -1).contiguous().to(device)


def main() -> None:
    from transformers import Gemma4VisionConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionEncoder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, required=True, help="a Gemma 4 config.json (its vision_config is used)")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--side", type=int, default=48, help="valid patches per image side (448 px at 280 tokens: 48)")
    ap.add_argument("--patches", type=int, default=2520, help="patches per image after padding")
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = Gemma4VisionConfig(**json.loads(args.config.read_text())["vision_config"])
    config._attn_implementation = "sdpa"
    encoder = Gemma4VisionEncoder(config).to(device, dtype).eval()
    valid = args.side**2
    positions = grid_positions(args.images, args.side, args.patches, device)
    embeds = torch.randn(args.images, args.patches, config.hidden_size, device=device, dtype=dtype)
    keep = ~(positions == -1).all(dim=-1)

    def padded() -> torch.Tensor:
        return encoder(inputs_embeds=embeds, attention_mask=keep, pixel_position_ids=positions).last_hidden_state

    def unpadded() -> torch.Tensor:
        return encoder(inputs_embeds=embeds[:, :valid], attention_mask=keep[:, :valid],
                       pixel_position_ids=positions[:, :valid]).last_hidden_state

    with torch.inference_mode():
        same = torch.allclose(padded()[:, :valid].float(), unpadded().float(), atol=5e-2, rtol=5e-2)
        padded_ms, unpadded_ms = timed_ms(padded, args.repeat), timed_ms(unpadded, args.repeat)
    print(json.dumps({
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "images": args.images, "valid_patches": valid, "padded_patches": args.patches, "same_features": same,
        "padded_ms_per_image": round(padded_ms / args.images, 3),
        "unpadded_ms_per_image": round(unpadded_ms / args.images, 3), "ratio": round(padded_ms / unpadded_ms, 2),
    }))


if __name__ == "__main__":
    main()
