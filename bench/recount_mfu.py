"""`mfu_model_flops` for training results recorded before bench_train.py reported it: the same
count (`bench_train.model_flops_per_sample`) from the model's config on the meta device and each
row's recorded samples/s and tokens per sample.

  python bench/recount_mfu.py --config docs/results/h200_e4b_config.json docs/results/h200_train_*.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, Gemma4ForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_train import H200_BF16_FLOPS, model_flops_per_sample


def rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [result["petbreed"], result["reference"], *result.get("petbreed_other_runs", [])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True, help="the benchmarked model's config.json")
    ap.add_argument("results", type=Path, nargs="+")
    args = ap.parse_args()
    config = AutoConfig.from_pretrained(args.config)
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration._from_config(config)
    out = []
    for path in args.results:
        for row in filter(lambda r: "samples_per_s" in r, rows(json.loads(path.read_text()))):
            tokens = row["tokens_per_s"] / row["samples_per_s"]
            flops = model_flops_per_sample(model, tokens)
            out.append({"file": path.name, "way": row["way"], "batch": row.get("batch"), "mfu": row["mfu"],
                        "model_tflop_per_sample": round(flops / 1e12, 2),
                        "mfu_model_flops": round(row["samples_per_s"] * flops / H200_BF16_FLOPS, 3)})
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
