"""The image token budget's accuracy trade-off: one adapter trained per budget, each evaluated on the
held-out split at its own budget and at the others' (what serving it with another
PETBREED_VLLM__MAX_SOFT_TOKENS would answer). Through petbreed's own `train` and `eval` code.

Prints one JSON line per (trained, evaluated) budget pair, then a summary: accuracy against the
largest budget's, and each budget's training time as a ratio to the largest's, from the same run.
On CPU with the tiny model this only shows the knob working and what it costs there; on a GPU with
a real checkpoint and real photos (--model google/gemma-4-E4B-it --data gs://.../oxford-pets) it
is the measurement the budget should be chosen by.

    python bench/bench_soft_tokens.py --model artifacts/tiny-gemma4 --data DIR --budgets 70,140 --max-steps 300

The rest of the recipe is TrainSettings' defaults and PETBREED_* variables (PETBREED_LR=1e-4 ...).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def train_at(args: argparse.Namespace, budget: int) -> dict[str, Any]:
    from finetune.pipeline import run_training
    from finetune.settings import TrainSettings

    settings = TrainSettings(
        data=args.data, base_model=args.model, output=str(args.out / f"run{budget}"),
        registry=str(args.out / "registry"), name=f"pets{budget}", image_soft_tokens=budget,
        max_steps=args.max_steps, eval_every=0, cache_dir=args.out / "cache", seed=args.seed,
    )
    start = time.perf_counter()
    summary = run_training(settings)
    return {"budget": budget, "train_s": round(time.perf_counter() - start, 1), "accuracy": summary.accuracy,
            "macro_f1": summary.macro_f1, "base_accuracy": summary.base_accuracy}


def evaluate_at(args: argparse.Namespace, trained: int, budget: int) -> dict[str, Any]:
    from finetune.eval_job import EvalSettings, run_eval

    result = run_eval(EvalSettings(
        data=args.data, adapter=f"pets{trained}", registry=str(args.out / "registry"), base_model=args.model,
        output=args.out / f"eval{trained}_at{budget}", cache_dir=args.out / "cache", image_soft_tokens=budget,
        seed=args.seed,
    ))
    return {"trained_at": trained, "evaluated_at": budget, "accuracy": result.accuracy, "macro_f1": result.macro_f1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="base model: folder, Hugging Face id or gs:// prefix")
    ap.add_argument("--data", required=True, help="dataset, any layout `petbreed train` reads")
    ap.add_argument("--budgets", default="70,140,280")
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("artifacts/bench-soft-tokens"))
    ap.add_argument("--json", type=Path, help="also write the summary here")
    args = ap.parse_args()

    budgets = sorted(int(b) for b in args.budgets.split(","))
    trained = [train_at(args, b) for b in budgets]
    rows = []
    for t in trained:
        rows.append({"trained_at": t["budget"], "evaluated_at": t["budget"], "accuracy": t["accuracy"],
                     "macro_f1": t["macro_f1"]})
        print(json.dumps({**t, **rows[-1]}), flush=True)
        for other in (b for b in budgets if b != t["budget"]):
            rows.append(evaluate_at(args, t["budget"], other))
            print(json.dumps(rows[-1]), flush=True)
    largest = trained[-1]
    summary = {
        "model": args.model, "data": args.data, "max_steps": args.max_steps, "rows": rows, "trained": trained,
        "accuracy_minus_largest_budgets": {t["budget"]: round(t["accuracy"] - largest["accuracy"], 4)
                                           for t in trained},
        "train_time_ratio_to_largest_budget": {t["budget"]: round(t["train_s"] / largest["train_s"], 3)
                                               for t in trained},
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
