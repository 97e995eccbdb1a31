"""Training throughput: petbreed's training loop against the reference recipe, same model, same
images, same LoRA, in one run.

  python bench/bench_train.py --model DIR --data DIR [--steps 8] [--batch 16] [--json OUT]

- petbreed: `finetune.train.prepare` + `fit` (the code `petbreed train` runs): batch B, answer-only
  logits, DataLoader workers doing the image preprocessing. Steps past the first epoch are timed
  apart (`later_epochs`): there the frozen vision tower's soft tokens come from the cache
  (`finetune.image_features`), so the first epoch and the later ones are an A/B on one model.
- reference: the public recipe's shape: per-device batch 1 x gradient accumulation B (so the same
  effective batch), padding per sample, full-sequence logits, through Hugging Face's Trainer
  (TRL's SFTTrainer is a subclass of it and is not installed on the GPU machine).
MFU counts 4 x N x tokens FLOPs per sample (LoRA on a frozen base: forward + input gradients),
N = the base's parameters outside embedding tables, against the H200's dense bf16 peak: the
performance issue's formula. `mfu_model_flops` counts what the model actually computes instead:
4 x the language model's parameters x tokens, plus the vision tower's forward alone (frozen and
without LoRA here, so no backward) over its patches, not the tokens, with its attention.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from finetune.data import Dataset, load_dataset, load_image
from finetune.image_features import vision_tower
from finetune.model import LoraSettings, add_lora, load_base, load_processor
from finetune.settings import TrainSettings
from finetune.train import Collator, batch_loss, fit, prepare

H200_BF16_FLOPS = 989e12
LM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def matmul_param_counts(model: Any) -> dict[str, int]:
    """Base parameters outside embedding tables (no LoRA), split into vision tower and the rest."""
    counts = {"vision": 0, "text": 0}
    for name, p in model.named_parameters():
        if "embed" not in name and "lora_" not in name:
            counts["vision" if "vision_tower" in name else "text"] += p.numel()
    return counts


def model_flops_per_sample(model: Any, tokens_per_sample: float) -> float:
    """Language model: forward + input gradients over the tokens. Vision tower: forward only, over
    its patches (Gemma 4 resizes every image to fill its budget: soft tokens x pooling area),
    matrix multiplies plus attention scores and values."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vision = base.config.vision_config
    patches = vision.default_output_length * vision.pooling_kernel_size**2
    counts = matmul_param_counts(model)
    attention = 4 * patches**2 * vision.hidden_size * vision.num_hidden_layers
    return 4 * counts["text"] * tokens_per_sample + 2 * counts["vision"] * patches + attention


def summarise(name: str, step_seconds: list[float], samples_per_step: int, tokens_per_sample: float,
              model: Any, tower_runs: bool = True) -> dict[str, Any]:
    seconds = statistics.median(step_seconds)
    samples_per_s = samples_per_step / seconds
    cuda = torch.cuda.is_available()

    def mfu(flops_per_sample: float) -> float | None:
        return round(samples_per_s * flops_per_sample / H200_BF16_FLOPS, 3) if cuda else None

    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {"way": name, "samples_per_s": round(samples_per_s, 2),
            "tokens_per_s": round(samples_per_s * tokens_per_sample), "step_s_median": round(seconds, 3),
            "mfu": mfu(4 * sum(matmul_param_counts(model).values()) * tokens_per_sample),
            "mfu_model_flops": mfu(model_flops_per_sample(model, tokens_per_sample) if tower_runs
                                   else 4 * matmul_param_counts(model)["text"] * tokens_per_sample),
            "peak_memory_gib": peak and round(peak, 1), "steps_timed": len(step_seconds)}


def petbreed_way(args: argparse.Namespace, dataset: Dataset, workdir: Path) -> dict[str, Any]:
    settings = TrainSettings(
        data=args.data, base_model=args.model, output=str(workdir / f"run-batch{args.batch}-compile{args.compile}"),
        cache_dir=workdir / "cache",
        max_steps=args.warmup + args.steps, eval_every=0, checkpoint_every=10**9, batch_size=args.batch,
        num_workers=args.workers, lr=5e-5, warmup_steps=0, lora=LoraSettings(r=16, alpha=16, targets=LM_TARGETS),
        compile=args.compile, cache_image_features=args.vision_cache,
    )
    run = prepare(settings, dataset)
    reset_peak()
    fit(run)
    per_epoch = len(dataset.train) // args.batch
    first, later = run.records[args.warmup : per_epoch], run.records[max(per_epoch, args.warmup) :]
    result = summarise_records("petbreed", first or later, args.batch, run.model)
    result.update(batch=args.batch, compile=args.compile, steps_per_epoch=per_epoch,
                  vision_cache=run.features is not None)
    if first and later:
        result["later_epochs"] = summarise_records("petbreed, later epochs", later, args.batch, run.model,
                                                   tower_runs=run.features is None)
    if args.profile:
        result["vision_tower_ms_per_batch"] = tower_ms(run, args.batch)
        print(profile_table(run, args.batch), file=sys.stderr, flush=True)
    run.accelerator.free_memory()  # the accelerator keeps references to the model and optimizer
    del run
    free()
    return result


def summarise_records(name: str, records: list[dict[str, float]], batch: int, model: Any,
                      tower_runs: bool = True) -> dict[str, Any]:
    step_seconds = [batch / r["samples_per_s"] for r in records]
    tokens = statistics.mean(r["tokens_per_s"] / r["samples_per_s"] for r in records)
    result = summarise(name, step_seconds, batch, tokens, model, tower_runs)
    result["data_wait_s_median"] = round(statistics.median(r["data_wait_s"] for r in records), 3)
    return result


def first_batch(run: Any, batch_size: int) -> tuple[dict[str, Any], list[int]]:
    batch = Collator(run.dataset.train, run.processor, run.prompt, run.dataset.labels)([list(range(batch_size))])
    image_ids = batch.pop("image_ids").tolist()
    return {k: v.to(run.device) for k, v in batch.items()}, image_ids


def tower_ms(run: Any, batch_size: int) -> float:
    """The vision tower's forward alone on one batch (median of 5, after 2), as a step runs it."""
    batch, _ = first_batch(run, batch_size)
    tower = vision_tower(run.model)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        with torch.no_grad(), run.accelerator.autocast():
            tower(pixel_values=batch["pixel_values"], pixel_position_ids=batch["image_position_ids"])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times[2:]), 2)


def profile_table(run: Any, batch_size: int) -> str:
    """Where a training step's GPU time goes: two forward+backward passes on one batch under
    torch.profiler, after two unprofiled ones (kernel selection, allocator warm-up, and with the
    vision cache on, its soft tokens cached: the later epochs' steady state)."""
    from torch.profiler import ProfilerActivity, profile

    batch, image_ids = first_batch(run, batch_size)

    def step() -> None:
        batch_loss(run, batch, image_ids).backward()

    for _ in range(2):
        step()
    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(2):
            step()
        if cuda:
            torch.cuda.synchronize()
    run.optimizer.zero_grad(set_to_none=True)
    order = "cuda_time_total" if cuda else "cpu_time_total"
    return str(prof.key_averages().table(sort_by=order, row_limit=30, max_name_column_width=60))


def reference_way(args: argparse.Namespace, dataset: Dataset, workdir: Path) -> dict[str, Any]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    processor = load_processor(args.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = add_lora(load_base(args.model, device), LoraSettings(r=16, alpha=16, targets=LM_TARGETS))
    collate = Collator(dataset.train, processor, _prompt(processor, dataset), dataset.labels)
    times: list[float] = []
    tokens: list[int] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            times.append(time.perf_counter() - self.t0)

    def one_sample(rows: list[int]) -> dict[str, Any]:
        batch = collate([rows])
        del batch["image_ids"]
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    training_args = TrainingArguments(
        output_dir=str(workdir / "reference"), per_device_train_batch_size=1, gradient_accumulation_steps=args.batch,
        max_steps=args.warmup + args.reference_steps, learning_rate=5e-5, bf16=device.type == "cuda",
        use_cpu=device.type == "cpu",
        logging_steps=1000, save_strategy="no", report_to=[], remove_unused_columns=False, dataloader_num_workers=0,
    )
    reset_peak()
    Trainer(model=model, args=training_args, train_dataset=list(range(len(dataset.train))),
            data_collator=one_sample, callbacks=[Clock()]).train()
    result = summarise("reference", times[args.warmup :], args.batch, statistics.mean(tokens), model)
    del model
    free()
    return result


def other_run(args: argparse.Namespace, dataset: Dataset, workdir: Path, **changes: Any) -> dict[str, Any]:
    """petbreed alone with other settings (batch size, compile); out of memory is a result, not a crash."""
    try:
        return petbreed_way(argparse.Namespace(**{**vars(args), "profile": False, **changes}), dataset, workdir)
    except torch.cuda.OutOfMemoryError:
        pass
    free()  # outside the handler, once the traceback no longer holds the model
    return {"way": "petbreed", **changes, "error": "CUDA out of memory"}


def printed(result: dict[str, Any]) -> dict[str, Any]:
    """Each way's row as soon as it is measured: a run stopped by a time limit keeps what it got."""
    print(json.dumps(result), flush=True)
    return result


def _prompt(processor: Any, dataset: Dataset) -> Any:
    from adapter_contract.prompt import ClassificationPrompt

    return ClassificationPrompt.build(processor, dataset.labels)


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8, help="petbreed's timed steps (past one epoch: both timed)")
    ap.add_argument("--reference-steps", type=int, default=5, help="0: petbreed only")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step to stderr")
    ap.add_argument("--extra-batches", default="", help="also time petbreed alone at these batch sizes, e.g. 32,64")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="petbreed's `compile` setting (on by default on GPUs)")
    ap.add_argument("--vision-cache", action=argparse.BooleanOptionalAction, default=True,
                    help="petbreed's `cache_image_features` setting (on by default)")
    ap.add_argument("--uncached-too", action="store_true", help="also time petbreed with the vision cache off")
    ap.add_argument("--eager-too", action="store_true", help="also time petbreed with compile off")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = load_dataset(args.data, Path(tmp) / "cache")
        load_image(dataset.train[0].path)
        ours = printed(petbreed_way(args, dataset, Path(tmp)))
        reference = printed(reference_way(args, dataset, Path(tmp))) if args.reference_steps else None
        extra = [printed(other_run(args, dataset, Path(tmp), batch=int(b)))
                 for b in filter(None, args.extra_batches.split(","))]
        if args.uncached_too:
            extra.append(printed(other_run(args, dataset, Path(tmp), vision_cache=False)))
        if args.eager_too:
            extra.append(printed(other_run(args, dataset, Path(tmp), compile=False)))
    result = {"bench": "train", "model": args.model, "effective_batch": args.batch,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "petbreed": ours, "reference": reference,
              "speedup_samples_per_s": reference and round(ours["samples_per_s"] / reference["samples_per_s"], 2),
              "petbreed_other_runs": extra}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
