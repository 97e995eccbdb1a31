"""Tunes vLLM's LoRA kernels (Triton `lora_shrink` and `lora_expand`) for this GPU and a Gemma 4
model's projections, and writes the result where vLLM looks for it: `VLLM_TUNED_CONFIG_FOLDER`,
files `{GPU}_SHRINK.json` and `{GPU}_EXPAND_TRUE.json` (petbreed ships the H200's in
serve/lora_kernel_configs/).

Without such files vLLM runs one default configuration for every shape ("Using default LoRA kernel
configs"). At a saturated H200 step of ~14,000 tokens its expand kernel took 19 % of the GPU's busy
time, several times what rewriting the projections' outputs costs in memory traffic
(docs/performance.md, 2026-12-04).

For each kernel, projection shape and token count, every candidate configuration is timed through
vLLM's own op (the op reads its configuration from `get_lora_op_configs`, which is replaced here by
one returning the candidate), beside vLLM's default, measured the same way in the same run. The
file keys are the arguments vLLM itself passed to `get_lora_op_configs`, so the files fit the
installed version. Prints JSON: per shape and token count the default's and the best candidate's
time and their ratio, and per kernel the time of one forward pass of the model (every layer's
projections) at each token count.

    python bench/tune_lora_kernels.py --config /root/models/e4b/config.json --out /tmp/lora --json tune.json
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Largest first: if the time budget runs out, the steps left untuned are the small ones, which
# run from CUDA graphs and spend little in LoRA kernels.
TOKENS = (16384, 8192, 4096, 2048, 1024, 512, 128, 16)


@dataclass(frozen=True)
class Projection:
    """One LoRA'd projection group as vLLM runs it: `slices` output widths from `in_dim` inputs
    (q, k, v fused into one layer are three slices), in `layers` layers of the model."""

    name: str
    in_dim: int
    slices: tuple[int, ...]
    layers: int


def projections(config: dict[str, Any]) -> list[Projection]:
    """Gemma 4's language-model projections, which `all-linear` adapters cover and vLLM serves with
    LoRA (the vision tower's are ignored by vLLM 0.24)."""
    text = config.get("text_config", config)
    hidden, heads, kv_heads = text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"]
    types = text.get("layer_types") or ["sliding_attention"] * text["num_hidden_layers"]
    full, sliding = types.count("full_attention"), types.count("sliding_attention")
    per_layer = text.get("hidden_size_per_layer_input") or 0
    groups = []
    for name, head_dim, layers in (("sliding", text["head_dim"], sliding),
                                   ("full", text.get("global_head_dim") or text["head_dim"], full)):
        if layers:
            q, kv = heads * head_dim, kv_heads * head_dim
            groups += [Projection(f"qkv_{name}", hidden, (q, kv, kv), layers),
                       Projection(f"o_{name}", q, (hidden,), layers)]
    layers = full + sliding
    groups += [Projection("gate_up", hidden, (text["intermediate_size"],) * 2, layers),
               Projection("down", text["intermediate_size"], (hidden,), layers)]
    if per_layer:
        groups += [Projection("per_layer_gate", hidden, (per_layer,), layers),
                   Projection("per_layer_projection", per_layer, (hidden,), layers)]
    return groups


def candidates(op: str, rank: int) -> list[dict[str, int]]:
    """The search space. Both kernels are memory-bound at a LoRA rank: expand reads and rewrites the
    projection's whole output, shrink reads its whole input, so larger tiles and fewer CTAs are
    tried; block sizes along the rank never exceed it."""
    if op == "expand":
        space = dict(block_m=(32, 64, 128, 256), block_n=(64, 128, 256), block_k=(min(rank, 64),),
                     num_warps=(4, 8), num_stages=(2,))
    else:
        space = dict(block_m=(32, 64, 128), block_n=(min(rank, 64),), block_k=(64, 128, 256),
                     split_k=(1, 4, 8), num_warps=(4, 8), num_stages=(2,))
    return [dict(zip(space, values, strict=True)) for values in itertools.product(*space.values())]


class OpRunner:
    """Runs vLLM's shrink or expand op on one projection shape, with a chosen configuration."""

    def __init__(self, op: str, rank: int) -> None:
        from vllm.lora.ops.triton_ops import lora_expand_op, lora_shrink_op

        self.op, self.rank = op, rank
        self.module = lora_expand_op if op == "expand" else lora_shrink_op
        self.default_configs = self.module.get_lora_op_configs
        self.choice: dict[str, Any] | None = None  # None: vLLM's default
        # The last call's: the key vLLM looked its configuration up by, and its default there.
        self.asked: tuple[Any, ...] = ()
        self.default: dict[str, Any] = {}
        setattr(self.module, "get_lora_op_configs", self._configs)  # noqa: B010 (mypy: not in the stubs)

    def _configs(self, op_type: str, max_loras: int, batch: int, hidden_size: int, rank: int,
                 num_slices: int, add_inputs: bool | None = None, **more: Any) -> dict[str, Any]:
        k_n = (rank, hidden_size) if op_type == "expand" else (hidden_size, rank)
        self.asked = (max_loras, num_slices, batch, *k_n)
        self.default = self.default_configs(op_type, max_loras, batch, hidden_size, rank, num_slices, add_inputs,
                                            **more)
        return self.default if self.choice is None else {**self.default, **self.choice}

    @staticmethod
    def _meta_args(tokens: int) -> tuple[Any, ...]:
        """vLLM's kernel metadata for `tokens` tokens, all of them for the one adapter."""
        from vllm.lora.ops.triton_ops import LoRAKernelMeta

        meta = LoRAKernelMeta.make(1, tokens, "cuda")
        meta.prepare_tensors(torch.zeros(tokens, dtype=torch.int32, device="cuda"))
        # vLLM >= 0.32 also asks whether to launch for the active adapters only.
        extra = (False,) if len(inspect.signature(meta.meta_args).parameters) > 1 else ()
        return tuple(meta.meta_args(tokens, *extra))

    def call(self, projection: Projection, tokens: int) -> tuple[Callable[[], None], torch.Tensor]:
        """A closure that runs the op once on tensors made here, and the tensor it adds its result to."""
        from vllm.lora.ops.triton_ops import lora_expand, lora_shrink

        cuda, bf16, fp32 = "cuda", torch.bfloat16, torch.float32
        n = len(projection.slices)
        meta = self._meta_args(tokens)
        if self.op == "shrink":
            x = torch.randn(tokens, projection.in_dim, dtype=bf16, device=cuda)
            a = [torch.randn(1, 1, self.rank, projection.in_dim, dtype=bf16, device=cuda) for _ in range(n)]
            out = torch.zeros(n, tokens, self.rank, dtype=fp32, device=cuda)
            return (lambda: lora_shrink(x, a, out, *meta, 1.0)), out
        x = torch.randn(n, tokens, self.rank, dtype=fp32, device=cuda)
        b = [torch.randn(1, 1, width, self.rank, dtype=bf16, device=cuda) for width in projection.slices]
        y = torch.zeros(tokens, sum(projection.slices), dtype=bf16, device=cuda)
        return (lambda: lora_expand(x, b, y, *meta, offset_start=0, add_inputs=True)), y


def result_of(run: Callable[[], None], out: torch.Tensor) -> torch.Tensor:
    """What one run adds to a zeroed output; synchronised, so a faulting kernel fails here."""
    out.zero_()
    run()
    torch.cuda.synchronize()
    return out.clone()


def timed_us(run: Callable[[], None], repeat: int) -> float:
    """GPU microseconds of one run: `repeat` runs replayed from a CUDA graph, as the engine replays
    small steps, so that launching from Python does not hide a short kernel's time. Median of 3."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            run()
    graph.replay()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(1000 * start.elapsed_time(end) / repeat)
    return sorted(times)[1]


def tune_op(op: str, rank: int, groups: list[Projection], tokens: list[int], repeat: int, deadline: float,
            done: set[tuple[str, int, int]], faulty: set[int], progress: Path) -> None:
    """Runs in a child process, since a configuration may fault (see `run_op`). Appends to
    `progress` a line before each candidate is tried and one with its time (None: a wrong result),
    candidate -1 being vLLM's default. Each projection, and within it each token count, gets an
    equal share of the time left.
    `done`: (projection, tokens, candidate) already in `progress`; `faulty`: candidates that
    faulted once, which are not tried again."""
    runner = OpRunner(op, rank)
    with progress.open("a") as log:
        def note(**row: Any) -> None:
            log.write(json.dumps(row) + "\n")
            log.flush()

        for number, projection in enumerate(groups):
            share = time.monotonic() + (deadline - time.monotonic()) / (len(groups) - number)
            for position, count in enumerate(tokens):
                until = time.monotonic() + (share - time.monotonic()) / (len(tokens) - position)
                run, out = runner.call(projection, count)
                runner.choice = None
                expected = result_of(run, out)
                if not runner.asked:
                    raise SystemExit("this vLLM's LoRA ops do not take their configuration from get_lora_op_configs")
                where = dict(projection=projection.name, tokens=count)
                if (projection.name, count, -1) not in done:
                    note(**where, candidate=-1, us=timed_us(run, repeat), key=runner.asked, default=runner.default)
                for index, choice in enumerate(candidates(op, rank)):
                    if time.monotonic() > until or index in faulty or (projection.name, count, index) in done:
                        continue
                    note(**where, trying=index)
                    runner.choice = choice
                    right = torch.allclose(result_of(run, out), expected, rtol=2e-2, atol=2e-2)
                    note(**where, candidate=index, us=timed_us(run, repeat) if right else None)


def run_op(op: str, rank: int, groups: list[Projection], tokens: list[int], repeat: int,
           deadline: float) -> list[dict[str, Any]]:
    """`tune_op` in child processes: where a candidate faults (vLLM 0.24 has configurations that
    do), its process dies, the candidate is noted as faulting and a new process goes on."""
    import multiprocessing
    import tempfile

    progress = Path(tempfile.mkdtemp()) / f"progress_{op}.jsonl"
    progress.write_text("")
    while True:
        lines = lines_of(progress)
        done = {(row["projection"], row["tokens"], row.get("candidate", row.get("trying"))) for row in lines}
        faulty = {row["candidate"] for row in lines if row.get("faulted")}
        child = multiprocessing.get_context("spawn").Process(
            target=tune_op, args=(op, rank, groups, tokens, repeat, deadline, done, faulty, progress))
        child.start()
        child.join()
        lines = lines_of(progress)
        if child.exitcode == 0:
            return lines
        last = lines[-1] if lines else {}
        if "trying" not in last:
            raise SystemExit(f"tuning {op}: a worker died outside a candidate (exit code {child.exitcode})")
        with progress.open("a") as log:
            log.write(json.dumps(dict(projection=last["projection"], tokens=last["tokens"], candidate=last["trying"],
                                      us=None, faulted=True)) + "\n")


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def best_of(op: str, rank: int, projection: Projection, lines: list[dict[str, Any]]
            ) -> tuple[list[dict[str, Any]], dict[tuple[Any, ...], dict[str, Any]]]:
    """Rows (vLLM's default against the best candidate, per token count) and file entries."""
    space = candidates(op, rank)
    rows, entries = [], {}
    mine = [row for row in lines if row["projection"] == projection.name]
    for default in (row for row in mine if row.get("candidate") == -1):
        count = default["tokens"]
        timed = [row for row in mine if row["tokens"] == count and row.get("candidate", -1) >= 0]
        good = [row for row in timed if row["us"] is not None]
        best = min(good, key=lambda row: row["us"], default=None)
        if best is None or best["us"] >= default["us"]:
            best = None
        else:
            entries[tuple(default["key"])] = {**default["default"], **space[best["candidate"]]}
        tuned = best["us"] if best else default["us"]
        rows.append(dict(op=op, projection=projection.name, layers=projection.layers, tokens=count,
                         default_us=round(default["us"], 1), tuned_us=round(tuned, 1),
                         speedup=round(default["us"] / tuned, 2), config=space[best["candidate"]] if best else None,
                         tried=len(timed), wrong=sum(row["us"] is None and not row.get("faulted") for row in timed),
                         faulted=[space[row["candidate"]] for row in timed if row.get("faulted")]))
    return rows, entries


def write_configs(folder: Path, gpu: str, op: str, entries: dict[tuple[Any, ...], dict[str, Any]]) -> Path:
    """vLLM's layout: config[max_loras][num_slices][m][k][n], every key a string, in a file named
    for the GPU as `torch.cuda.get_device_name()` has it."""
    tree: dict[str, Any] = {}
    for key, config in sorted(entries.items()):
        node = tree
        for part in key[:-1]:
            node = node.setdefault(str(part), {})
        node[str(key[-1])] = config
    gpu = gpu.replace(" ", "_").replace("-", "_")
    path = folder / f"{gpu}_{op.upper()}{'_TRUE' if op == 'expand' else ''}.json"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tree, indent=1, sort_keys=True) + "\n")
    return path


def forward_totals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per kernel and token count: one forward pass's time in that kernel (every layer's projections),
    vLLM's default against the tuned configurations."""
    totals: dict[tuple[str, int], list[float]] = {}
    for row in rows:
        total = totals.setdefault((row["op"], row["tokens"]), [0.0, 0.0])
        total[0] += row["layers"] * row["default_us"]
        total[1] += row["layers"] * row["tuned_us"]
    return [dict(op=op, tokens=tokens, default_ms=round(d / 1000, 3), tuned_ms=round(t / 1000, 3),
                 speedup=round(d / t, 2)) for (op, tokens), (d, t) in totals.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True, help="the model's config.json")
    ap.add_argument("--rank", type=int, default=16, help="vLLM's max_lora_rank, the width its LoRA buffers have")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="engine-step sizes to tune for")
    ap.add_argument("--ops", default="expand,shrink")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=600, help="stop trying candidates after this long")
    ap.add_argument("--out", type=Path, required=True, help="folder for the config files")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    deadline = time.monotonic() + args.budget_s
    groups = projections(json.loads(args.config.read_text()))
    tokens = [int(t) for t in args.tokens.split(",")]
    rows, files = [], []
    ops = args.ops.split(",")
    for op in ops:
        op_deadline = time.monotonic() + (deadline - time.monotonic()) / (len(ops) - ops.index(op))
        lines = run_op(op, args.rank, groups, tokens, args.repeat, op_deadline)
        op_rows, entries = [], {}
        for projection in groups:
            group_rows, group_entries = best_of(op, args.rank, projection, lines)
            op_rows += group_rows
            entries.update(group_entries)
        rows += op_rows
        files.append(str(write_configs(args.out, torch.cuda.get_device_name(), op, entries)))
        for row in op_rows:
            print(json.dumps(row), flush=True)
    result = dict(gpu=torch.cuda.get_device_name(), rank=args.rank, files=files, forward=forward_totals(rows),
                  rows=rows)
    print(json.dumps(result["forward"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
