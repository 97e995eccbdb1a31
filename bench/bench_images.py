"""Front-end image cost per upload: decode + Gemma 4's image processor, the way serving did it
before (full decode) against `adapter_contract.image.to_model_input`, and that decode with the
processor's float output against the 8-bit pixels serving sends now (`do_rescale=False`, rescaled
in the engine's workers: serve/vllm_compat.py), in one run.

  python bench/bench_images.py [--repeats 9] [--json OUT]

The processor has the E4B shape (16-pixel patches, 3x3 pooling, 280 soft tokens). Uploads: a
12-megapixel phone-sized JPEG and PNG, and the 448-pixel JPEG the GPU serving benchmark sends.
Medians of `--repeats` runs each, one CPU thread of work per image (as in vLLM's front-end).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_serve_gpu import photo_like
from finetune.data import load_image


def full_decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return ImageOps.exif_transpose(img).convert("RGB")


def petbreed_decode(data: bytes) -> Image.Image:
    return load_image(io.BytesIO(data))  # adapter_contract.image.to_model_input, as serving decodes


def median_ms(decode: Callable[[bytes], Image.Image], processor: Any, data: bytes, repeats: int,
              **processing: Any) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        processor(images=[decode(data)], return_tensors="pt", **processing)
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 1)


def upload(size: tuple[int, int], fmt: str) -> bytes:
    buf = io.BytesIO()
    options = {"quality": 90} if fmt == "JPEG" else {}
    photo_like(0, 1024).resize(size, Image.Resampling.BICUBIC).save(buf, format=fmt, **options)
    return buf.getvalue()


def main() -> None:
    import torch
    from transformers import Gemma4ImageProcessor

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    processor = Gemma4ImageProcessor(patch_size=16, pooling_kernel_size=3, max_soft_tokens=280)
    rows = []
    for name, size, fmt in [("12 MP JPEG", (4032, 3024), "JPEG"), ("12 MP PNG", (4032, 3024), "PNG"),
                            ("448 px JPEG", (448, 448), "JPEG")]:
        data = upload(size, fmt)
        before = median_ms(full_decode, processor, data, args.repeats)
        after = median_ms(petbreed_decode, processor, data, args.repeats)
        uint8 = median_ms(petbreed_decode, processor, data, args.repeats, do_rescale=False)
        rows.append({"upload": name, "bytes": len(data), "full_decode_ms": before, "petbreed_ms": after,
                     "speedup": round(before / after, 2), "petbreed_uint8_ms": uint8,
                     "uint8_speedup": round(after / uint8, 2)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"bench": "images", "processor": "Gemma4ImageProcessor(16, 3x3, 280 tokens)", "threads": 1,
              "repeats": args.repeats, "rows": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
