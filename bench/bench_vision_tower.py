"""Gemma 4's vision tower on a batch of images three ways: as vLLM 0.24 runs it (every image padded
to the budget's patch count, so attention needs a padding mask), petbreed's image path
(serve/vision_tower.py: the padding patches cut off, no mask), and the same replayed from a CUDA
graph (TowerGraphs, as the engine does for steps of up to `vision_graph_images` images: with
`--compile`, graphs of the compiled parts). `--cudnn` adds petbreed's image path with cuDNN's
attention first (`vision_attention`), on a copy of the tower with the same weights.

At 280 soft tokens a 448 px square image is 2,304 patches padded to 2,520. Random weights with the
vision shapes of the given config; transformers' modules (patch embedder, encoder, pooler), bf16 on
CUDA (float32 on CPU), without vLLM's projection into the language model. One JSON line per batch
size; the ratios are vLLM's way over each of petbreed's, measured in the same run.

    python bench/bench_vision_tower.py --config docs/results/h200_e4b_config.json --images 1,8,32 \
        --compile --cudnn
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed_ms(work: Callable[[], torch.Tensor], repeat: int) -> float:
    """Median wall time of `work`, the GPU finished each time."""
    for _ in range(3):
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


def relative_diff(expected: torch.Tensor, got: torch.Tensor) -> float | str:
    """Largest difference over the largest value (bf16 soft tokens reach the hundreds), or the shapes."""
    if expected.shape != got.shape:
        return f"shape {list(got.shape)} != {list(expected.shape)}"
    return round(((expected - got).abs().max() / expected.abs().max()).item(), 5)


def grid_positions(images: int, side: int, total: int, device: torch.device) -> torch.Tensor:
    """(x, y) of a side x side patch grid per image, then -1 up to `total` patches (Gemma 4's padding)."""
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    grid = torch.stack([xs.flatten(), ys.flatten()], dim=-1)
    padded = torch.cat([grid, torch.full((total - side * side, 2), -1)])
    return padded.expand(images, -1, -1).contiguous().to(device)


def tower_model(config_path: Path, device: torch.device, dtype: torch.dtype, compile_parts: bool) -> Any:
    """What serve/vision_tower.py reads from vLLM's Gemma 4 model, with the projection left out."""
    from transformers import Gemma4VisionConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionModel

    from serve.vision_tower import compile_tower

    config = Gemma4VisionConfig(**json.loads(config_path.read_text())["vision_config"])
    config._attn_implementation = "sdpa"
    tower: Any = Gemma4VisionModel(config)
    tower.to(device=device, dtype=dtype).eval()
    if compile_parts:
        compile_tower(tower)
    return SimpleNamespace(vision_tower=tower, config=SimpleNamespace(vision_config=config), model_dtype=dtype,
                           embed_vision=lambda inputs_embeds: inputs_embeds)


def cudnn_way(model: Any, args: argparse.Namespace, pixels: torch.Tensor,
              positions: torch.Tensor) -> Callable[[], torch.Tensor]:
    """petbreed's image path with cuDNN's attention first, on a copy of the tower with `model`'s
    weights (compiled apart, so the kernel choice is traced anew)."""
    from torch.nn.attention import sdpa_kernel

    from serve.vision_tower import encode_group
    from serve.vllm_compat import CUDNN_FIRST

    copy = tower_model(args.config, pixels.device, pixels.dtype, args.compile)
    copy.vision_tower.load_state_dict(model.vision_tower.state_dict())

    def run() -> torch.Tensor:
        with sdpa_kernel(CUDNN_FIRST, set_priority=True):
            return encode_group(copy, pixels, positions)

    return run


def vllm_way(model: Any, pixels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """vLLM 0.24's `_process_image_input` for one bucket: padded batch, mask, per-image pooling."""
    tower, k2 = model.vision_tower, model.config.vision_config.pooling_kernel_size ** 2
    pad = (positions == -1).all(dim=-1)
    embeds = tower.patch_embedder(pixels, positions, pad).to(model.model_dtype)
    hidden = tower.encoder(inputs_embeds=embeds, attention_mask=~pad, pixel_position_ids=positions).last_hidden_state
    pooled = []
    for i in range(len(pixels)):
        states, valid = tower.pooler(hidden_states=hidden[i : i + 1], pixel_position_ids=positions[i : i + 1],
                                     padding_positions=pad[i : i + 1], output_length=hidden.shape[1] // k2)
        pooled.append(states[valid])
    return torch.stack(pooled)


def three_ways(model: Any, graphs: Any, pixels: torch.Tensor, positions: torch.Tensor,
               valid: int) -> dict[str, Callable[[], torch.Tensor]]:
    from serve.vision_tower import encode_group

    unpadded = pixels[:, :valid], positions[:, :valid]
    return {
        "vllm_padded": lambda: vllm_way(model, pixels, positions),
        "unpadded": lambda: encode_group(model, *unpadded),
        "unpadded_graph": (lambda: graphs(*unpadded)) if pixels.is_cuda else (lambda: encode_group(model, *unpadded)),
    }


def main() -> None:
    from serve.vision_tower import TowerGraphs, encode_group

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, required=True, help="a Gemma 4 config.json (its vision_config is used)")
    ap.add_argument("--images", default="1,8,32", help="batch sizes")
    ap.add_argument("--side", type=int, default=48, help="valid patches per image side (448 px at 280 tokens: 48)")
    ap.add_argument("--patches", type=int, default=2520, help="patches per image after padding")
    ap.add_argument("--compile", action="store_true", help="torch.compile the parts (the engine's GPU default)")
    ap.add_argument("--cudnn", action="store_true", help="add petbreed's image path with cuDNN's attention first")
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = tower_model(args.config, device, dtype, args.compile)
    patch_pixels = 3 * model.config.vision_config.patch_size ** 2
    valid = args.side ** 2
    graphs = TowerGraphs(functools.partial(encode_group, model), max_images=max(int(n) for n in args.images.split(",")))
    for images in (int(n) for n in args.images.split(",")):
        positions = grid_positions(images, args.side, args.patches, device)
        pixels = torch.rand(images, args.patches, patch_pixels, device=device, dtype=dtype)
        ways = three_ways(model, graphs, pixels, positions, valid)
        if args.cudnn:
            ways["unpadded_cudnn"] = cudnn_way(model, args, pixels[:, :valid], positions[:, :valid])
        with torch.inference_mode():
            out = {name: way().float() for name, way in ways.items()}
            diff = {name: relative_diff(out["vllm_padded"], o) for name, o in out.items() if name != "vllm_padded"}
            ms = {name: timed_ms(way, args.repeat) for name, way in ways.items()}
        print(json.dumps({
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "compiled": args.compile, "images": images, "valid_patches": valid, "padded_patches": args.patches,
            **{f"rel_diff_{name}": d for name, d in diff.items()},
            **{f"{name}_ms": round(t, 3) for name, t in ms.items()},
            **{f"ratio_{name}": round(ms["vllm_padded"] / t, 2) for name, t in ms.items() if name != "vllm_padded"},
        }), flush=True)


if __name__ == "__main__":
    main()
