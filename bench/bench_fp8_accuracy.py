"""What fp8 weights cost a trained adapter: a published adapter's held-out accuracy with the base
model's language-model weights as trained (bf16/fp32), then with them rounded as vLLM's online
`fp8_per_channel` quantization rounds them (`PETBREED_VLLM__QUANTIZATION`), in transformers+PEFT;
with --tower, then also the vision tower's encoder layers (`quantize_vision_tower`).
Prints JSON; each way's agreement with the unrounded answers is bench/compare_answers.py's.

  python bench/bench_fp8_accuracy.py --registry REG --adapter pets --model MODEL --data DATA [--tower]

The rounding is emulated, in float arithmetic: each output channel's weights and each token's
activations scaled to fp8 e4m3's range, cast to it and back. vLLM's kernels then multiply in fp8
and accumulate in fp32; the emulation multiplies the rounded values in the model's dtype, so it
measures the rounding, not the kernels. The adapter's own weights stay unrounded, as in vLLM (a
merged adapter's are rounded with the base weights there).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
# What each way rounds, cumulatively: the language model (vLLM's fp8_per_channel), then with --tower
# the vision tower's encoder layers as well (`quantize_vision_tower`).
WAYS = {"fp8_per_channel": "language_model", "fp8_with_tower": "vision_tower.encoder"}


def fp8_rounded(x: torch.Tensor) -> torch.Tensor:
    """x rounded to fp8 e4m3 with one scale per row (last dimension), as a per-channel weight or a
    per-token activation."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return ((x.float() / scale).to(FP8).float() * scale).to(x.dtype)


def round_linears(model: Any, part: str) -> int:
    """Rounds every linear layer whose name contains `part` (the base layers under an adapter, not
    LoRA's own), weights now and inputs on each call; returns how many."""
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or part not in name or "lora_" in name:
            continue
        with torch.no_grad():
            module.weight.copy_(fp8_rounded(module.weight))
        module.register_forward_pre_hook(lambda _module, args: (fp8_rounded(args[0]), *args[1:]))
        count += 1
    return count


def main() -> None:
    from adapter_contract.prompt import ClassificationPrompt
    from bench.compare_answers import compare
    from finetune import evaluate
    from finetune.data import load_dataset
    from finetune.model import load_published, pick_device

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--registry", default="artifacts/registry")
    ap.add_argument("--adapter", default="pets", help="NAME or NAME@VERSION")
    ap.add_argument("--model", default="artifacts/tiny-gemma4", help="base model: folder, Hugging Face id or gs://")
    ap.add_argument("--data", required=True, help="dataset, any layout `petbreed train` reads (its test split)")
    ap.add_argument("--cache-dir", type=Path, default=Path(".cache/petbreed"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tower", action="store_true", help="then the vision tower's encoder layers in fp8 too")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    device = pick_device("auto")
    model, processor, manifest = load_published(args.registry, args.adapter, args.model, args.cache_dir, device)
    test = load_dataset(args.data, args.cache_dir).test
    prompt = ClassificationPrompt.build(processor, manifest.labels)
    result: dict[str, Any] = {"adapter": manifest.ref, "model": args.model, "data": args.data, "images": len(test)}
    probs = {}
    for way in ("as_trained", *list(WAYS)[: 2 if args.tower else 1]):
        rounded = round_linears(model, WAYS[way]) if way in WAYS else 0
        t0 = time.perf_counter()
        probs[way] = evaluate.predict(model, processor, prompt, test, args.batch_size, device, desc=way)
        report = evaluate.report(manifest.ref, manifest.labels, test, probs[way])
        result[way] = {"accuracy": report.accuracy, "macro_f1": round(report.macro_f1, 4), "rounded_layers": rounded,
                       "seconds": round(time.perf_counter() - t0, 1)}
        if way in WAYS:
            result[way]["agreement"] = compare(np.array(probs["as_trained"]), np.array(probs[way]))
    result["chance"] = round(1 / len(manifest.labels.ids), 4)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
