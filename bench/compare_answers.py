"""How far two serving runs' answers lie apart: the label distributions `bench_serve_gpu.py
--answers N` recorded for the same fixed images, e.g. with fp8 weights against bf16 ones. Prints JSON.

  python bench/compare_answers.py BASELINE.json OTHER.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def compare(baseline: np.ndarray, other: np.ndarray) -> dict[str, float | int]:
    """Top-1 agreement, and the total variation distance per image (half the L1 distance: the most
    probability any set of labels gains or loses)."""
    tv = 0.5 * np.abs(baseline - other).sum(axis=1)
    return {"images": len(baseline), "labels": baseline.shape[1],
            "top1_agreement": float((baseline.argmax(1) == other.argmax(1)).mean()),
            "mean_total_variation": round(float(tv.mean()), 5), "max_total_variation": round(float(tv.max()), 5),
            "baseline_mean_top1_probability": round(float(baseline.max(1).mean()), 5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("baseline", type=Path)
    ap.add_argument("other", type=Path)
    args = ap.parse_args()
    baseline, other = (np.array(json.loads(path.read_text())["answers"]) for path in (args.baseline, args.other))
    if baseline.shape != other.shape:
        raise SystemExit(f"answers differ in shape: {baseline.shape} against {other.shape}")
    print(json.dumps(compare(baseline, other), indent=2))


if __name__ == "__main__":
    main()
