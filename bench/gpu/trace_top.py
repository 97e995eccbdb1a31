"""Summarise a torch-profiler window of the vLLM engine core (`bench_serve_gpu.py engine
--torch-profile DIR` writes DIR/c1, DIR/c8 and DIR/saturated): how busy the GPU was, which kernels held
it, how long each model-runner range took on the CPU and on the GPU, and each engine step.

  python bench/gpu/trace_top.py DIR/c1 [--top 25] [--steps 24]
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

GPU_WORK = {"kernel", "gpu_memcpy", "gpu_memset"}
STEP_MARKS = ("execute_context", "gpu_model_runner: preprocess")


def load(folder: Path) -> list[dict[str, Any]]:
    """The complete ('X') events of every trace in the folder, with times in ms."""
    events = []
    for path in sorted(folder.glob("*.json*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            trace = json.load(f)
        for e in trace.get("traceEvents", []):
            if e.get("ph") == "X" and "dur" in e:
                events.append({**e, "ts": float(e["ts"]) / 1000, "dur": float(e["dur"]) / 1000})
    return events


def union_ms(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def idle_gaps(spans: list[tuple[float, float]], longer_than: float) -> list[float]:
    """The GPU's idle stretches between work, longest last."""
    gaps, end = [], float("inf")
    for start, stop in sorted(spans):
        if start - end > longer_than:
            gaps.append(start - end)
        end = stop if end == float("inf") else max(end, stop)
    return sorted(gaps)


def totals(events: list[dict[str, Any]], top: int) -> list[str]:
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in events:
        by_name[e["name"]].append(e["dur"])
    rows = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    return [f"{sum(d):10.1f} ms {len(d):7d}x {sum(d) / len(d):8.3f} ms  {name[:110]}" for name, d in rows]


def self_times(events: list[dict[str, Any]], top: int) -> list[str]:
    """CPU ops by self time: each op's duration less its children's on the same thread."""
    own: dict[str, float] = defaultdict(float)
    by_thread: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    for ops in by_thread.values():
        stack: list[dict[str, Any]] = []
        for e in sorted(ops, key=lambda e: (e["ts"], -e["dur"])):
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            if stack:
                own[stack[-1]["name"]] -= e["dur"]
            own[e["name"]] += e["dur"]
            stack.append(e)
    rows = sorted(own.items(), key=lambda kv: -kv[1])[:top]
    return [f"{ms:10.1f} ms  {name[:110]}" for name, ms in rows]


def steps(events: list[dict[str, Any]], gpu: list[tuple[float, float]], limit: int) -> list[str]:
    """One line per engine step, from one step's model-runner range to the next: the range's CPU
    time, the GPU's busy time up to the next step, and the range's name (vLLM 0.24 names it
    `execute_context_<requests>(<new tokens>)_generation_<requests>(<tokens>)`)."""
    marks = sorted((e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith(STEP_MARKS)),
                   key=lambda e: e["ts"])
    lines = []
    for mark, after in list(itertools.pairwise(marks))[:limit]:
        begin, end = mark["ts"], after["ts"]
        busy = union_ms([(max(a, begin), min(b, end)) for a, b in gpu if b > begin and a < end])
        lines.append(f"at {begin - marks[0]['ts']:8.1f} ms  step {end - begin:7.1f} ms  cpu {mark['dur']:6.1f} ms  "
                     f"gpu busy {busy:6.1f} ms  {mark['name'][:70]}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--steps", type=int, default=24)
    args = ap.parse_args()
    events = load(args.folder)
    if not events:
        raise SystemExit(f"no trace events under {args.folder}")
    gpu = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_WORK]
    begin = min(e["ts"] for e in events)
    window = max(e["ts"] + e["dur"] for e in events) - begin
    busy = union_ms(gpu)
    gaps = idle_gaps(gpu, 1.0)
    print(f"window {window:.1f} ms; GPU busy {busy:.1f} ms ({100 * busy / window:.0f} %); "
          f"{len(gaps)} GPU gaps over 1 ms, {sum(gaps):.1f} ms in all, longest {gaps[-1] if gaps else 0:.1f} ms")
    by_cat: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        by_cat[e.get("cat", "")].append(e)
    for title, cat in (("kernels", "kernel"), ("GPU time of annotated ranges", "gpu_user_annotation"),
                       ("CPU time of annotated ranges", "user_annotation"), ("CUDA runtime calls", "cuda_runtime"),
                       ("memory copies", "gpu_memcpy")):
        print(f"\n--- {title} (total, count, mean)")
        print("\n".join(totals(by_cat[cat], args.top)))
    print("\n--- CPU ops by self time")
    print("\n".join(self_times(by_cat["cpu_op"], args.top)))
    print(f"\n--- the first {args.steps} engine steps")
    print("\n".join(steps(events, gpu, args.steps)))


if __name__ == "__main__":
    main()
