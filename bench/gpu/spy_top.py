"""Summarise a `py-spy record --subprocesses --threads --format raw` profile: per process and
thread, the share of samples and the frames that hold the most time (self and inclusive).

  python bench/gpu/spy_top.py serve.spy [--top 25]
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path


def read(path: Path) -> dict[str, list[tuple[list[str], int]]]:
    """Stacks (root first) grouped by 'process ... / thread ...'."""
    groups: dict[str, list[tuple[list[str], int]]] = defaultdict(list)
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        lead = 0
        while lead < len(frames) and frames[lead].startswith(("process ", "thread ")):
            lead += 1
        process = [f for f in frames[:lead] if f.startswith("process ")][-1:]
        thread = [f for f in frames[:lead] if f.startswith("thread ")][-1:]
        groups[" / ".join(f[:90] for f in process + thread)].append((frames[lead:], int(count)))
    return groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", type=Path)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    groups = read(args.profile)
    total = sum(n for stacks in groups.values() for _, n in stacks)
    for owner, stacks in sorted(groups.items(), key=lambda kv: -sum(n for _, n in kv[1])):
        samples = sum(n for _, n in stacks)
        if samples < 0.02 * total:
            continue
        own: Counter[str] = Counter()
        inclusive: Counter[str] = Counter()
        for frames, n in stacks:
            if frames:
                own[frames[-1]] += n
            for frame in set(frames):
                inclusive[frame] += n
        print(f"\n=== {owner}: {samples} samples ({100 * samples / total:.0f} %)")
        for title, counter in (("self", own), ("inclusive", inclusive)):
            print(f"--- {title}")
            for frame, n in counter.most_common(args.top):
                print(f"{100 * n / samples:5.1f} %  {frame[:200]}")


if __name__ == "__main__":
    main()
