"""`petbreed train`: LoRA fine-tuning of Gemma 4 as a breed classifier, in one readable loop.

Recipe: load data -> load base + processor -> LoRA (fresh, from a parent adapter, or from the
newest checkpoint) -> AdamW with warmup and linear decay -> loss on the answer tokens only ->
checkpoint every N steps -> evaluate base and adapter by scoring the label set.
Accelerate handles devices, mixed precision and several GPUs (`accelerate launch`/`torchrun`).
"""

from __future__ import annotations

import json
import logging
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from peft.helpers import disable_input_dtype_casting
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from adapter_contract.labels import LabelSet
from adapter_contract.prompt import ClassificationPrompt
from adapter_contract.storage import Storage, open_storage
from finetune import checkpoints, evaluate
from finetune.data import DataError, Dataset, Example, load_image
from finetune.image_features import ImageFeatureCache, tower_is_frozen
from finetune.model import add_lora, compile_blocks, load_adapter, load_base, load_processor, pick_device
from finetune.scoring import answer_loss, training_batch
from finetune.settings import TrainSettings

log = logging.getLogger("petbreed.train")


@dataclass
class TrainResult:
    adapter_dir: Path
    report: evaluate.EvalReport
    base_report: evaluate.EvalReport
    resumed_from: int


class BatchOrder(torch.utils.data.Sampler[list[int]]):
    """Seeded shuffles, epoch after epoch, starting at any micro-batch: resuming at step N
    sees exactly the batches an uninterrupted run would have seen."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, count: int) -> None:
        self.n, self.batch_size, self.seed, self.start, self.count = n, batch_size, seed, start, count

    def __iter__(self):  # type: ignore[no-untyped-def]
        per_epoch = max(1, self.n // self.batch_size)
        for i in range(self.start, self.start + self.count):
            epoch, offset = divmod(i, per_epoch)
            order = list(range(self.n))
            random.Random(self.seed * 100_003 + epoch).shuffle(order)
            yield order[offset * self.batch_size : (offset + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.count


class _Shard(torch.utils.data.IterableDataset):
    """This process's slice of every global batch (plain data parallelism)."""

    def __init__(self, order: BatchOrder, rank: int, size: int) -> None:
        self.order, self.rank, self.size = order, rank, size

    def __iter__(self):  # type: ignore[no-untyped-def]
        for batch in self.order:
            yield batch[self.rank * self.size : (self.rank + 1) * self.size]


class Collator:
    """Runs in DataLoader workers: decode images and build the padded, masked batch, with each
    row's example index as `image_ids` (the key of its cached soft tokens)."""

    def __init__(self, examples: list[Example], processor: Any, prompt: ClassificationPrompt, labels: LabelSet):
        self.examples, self.processor, self.prompt = examples, processor, prompt
        self.texts = {label.id: label.text for label in labels.labels}

    def __call__(self, indices: list[list[int]]) -> dict[str, Any]:
        batch = [self.examples[i] for i in indices[0]]
        images = [load_image(ex.path) for ex in batch]
        rows = training_batch(
            self.processor, self.prompt, images, [ex.label for ex in batch], self.texts, torch.device("cpu")
        )
        rows["image_ids"] = torch.tensor(indices[0])
        return rows


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Run:
    """Everything one training run holds, from start (or resume) to the final adapter."""

    settings: TrainSettings
    dataset: Dataset
    accelerator: Accelerator
    storage: Storage
    processor: Any
    prompt: ClassificationPrompt
    model: Any
    optimizer: Any
    scheduler: Any
    start: int
    features: ImageFeatureCache | None
    records: list[dict[str, float]] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def train(settings: TrainSettings, dataset: Dataset, parent_adapter: Path | None = None) -> TrainResult:
    run = prepare(settings, dataset, parent_adapter)
    fit(run)
    return finish(run)


def prepare(settings: TrainSettings, dataset: Dataset, parent_adapter: Path | None = None) -> Run:
    seed_everything(settings.seed)
    on_gpu = pick_device(settings.device).type == "cuda"
    accelerator = Accelerator(cpu=not on_gpu, mixed_precision="bf16" if on_gpu else "no")
    storage = open_storage(settings.output)
    _claim_run_folder(storage, settings)
    processor = load_processor(settings.base_model, settings.image_soft_tokens)
    base = load_base(settings.base_model, accelerator.device)
    ckpt = checkpoints.latest(storage, settings.cache_dir / "resume" / _slug(settings.output))
    start_from = ckpt.folder if ckpt else parent_adapter
    model = load_adapter(base, start_from, trainable=True) if start_from else add_lora(base, settings.lora)
    features = None
    if settings.cache_image_features and tower_is_frozen(model):
        features = ImageFeatureCache(model, int(settings.image_cache_gib * 2**30))
    log.info("vision tower: %s", "frozen: no autograd, soft tokens kept" if features else "runs in every step")
    if on_gpu if settings.compile is None else settings.compile:
        log.info("compiling %d blocks on first use", compile_blocks(model))
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=settings.lr, weight_decay=settings.weight_decay
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, settings.warmup_steps, settings.max_steps)
    start = 0
    if ckpt:
        state = ckpt.state()
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoints.restore_rng(state["rng"])
        start = ckpt.step
        log.info("resuming from checkpoint at step %d", start)
    model, optimizer = accelerator.prepare(model, optimizer)
    prompt = ClassificationPrompt.build(processor, dataset.labels)
    run = Run(settings, dataset, accelerator, storage, processor, prompt, model, optimizer, scheduler, start, features)
    run.records = _load_records(run)
    return run


_RUN_IDENTITY = {"data", "base_model", "parent", "max_steps", "lr", "batch_size", "grad_accum", "seed", "lora"}


def _claim_run_folder(storage: Storage, settings: TrainSettings) -> None:
    """Resuming is only right for the same run: refuse a folder that holds a different one. An
    explicit image token budget is part of the run (left out when unset, so folders written before
    the setting existed still resume)."""
    budget = {"image_soft_tokens"} if settings.image_soft_tokens is not None else set()
    identity = settings.model_dump_json(include=_RUN_IDENTITY | budget)
    if storage.exists("run.json") and storage.read_bytes("run.json").decode() != identity:
        raise DataError(f"output {settings.output} holds a different training run; choose a new --output")
    storage.write_bytes("run.json", identity.encode())


def fit(run: Run) -> None:
    s = run.settings
    run.model.train()
    batches = iter(_loader(run))
    main = run.accelerator.is_main_process
    bar = tqdm(range(run.start, s.max_steps), desc="train", unit="step", disable=not main)
    for step in bar:
        record = _step(run, batches)
        done = step + 1
        record["step"] = done
        if s.eval_every and done % s.eval_every == 0 and done < s.max_steps:
            record["eval_accuracy"] = _accuracy(run)
            run.model.train()
        run.records.append(record)
        log.info(json.dumps(record))
        bar.set_postfix(loss=f"{record['loss']:.3f}")
        if done % s.checkpoint_every == 0 and done < s.max_steps and main:
            _checkpoint(run, done)


def _step(run: Run, batches: Any) -> dict[str, float]:
    s, accelerator = run.settings, run.accelerator
    t0, loss_sum, samples, tokens, waited = time.perf_counter(), 0.0, 0, 0, 0.0
    for _ in range(s.grad_accum):
        t_wait = time.perf_counter()
        batch = next(batches)
        image_ids = batch.pop("image_ids").tolist()
        batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
        waited += time.perf_counter() - t_wait
        loss = batch_loss(run, batch, image_ids) / s.grad_accum
        accelerator.backward(loss)
        loss_sum += loss.item()
        samples += batch["input_ids"].shape[0]
        tokens += int(batch["attention_mask"].sum())
    accelerator.clip_grad_norm_(run.model.parameters(), s.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    world = accelerator.num_processes
    return {"loss": loss_sum, "lr": run.scheduler.get_last_lr()[0],
            "samples_per_s": samples * world / seconds, "tokens_per_s": tokens * world / seconds,
            "data_wait_s": waited}


def batch_loss(run: Run, batch: dict[str, Any], image_ids: list[int] | None = None) -> torch.Tensor:
    """The answer loss of one batch; with the rows' example indices, the vision tower's output
    for images seen before comes from the cache."""
    cached = run.features.images(image_ids) if run.features and image_ids is not None else nullcontext()
    # Autocast runs the LoRA matmuls in bf16 already; PEFT's own upcast of each LoRA input to the
    # fp32 adapter weights would only add a copy of every LoRA input to fp32 and back.
    with run.accelerator.autocast(), disable_input_dtype_casting(run.model), cached:
        return answer_loss(run.model, batch)


def _loader(run: Run) -> DataLoader:
    s, accelerator = run.settings, run.accelerator
    order = BatchOrder(len(run.dataset.train), s.batch_size, s.seed, run.start * s.grad_accum,
                       (s.max_steps - run.start) * s.grad_accum)
    shard = _Shard(order, accelerator.process_index, s.batch_size // accelerator.num_processes)
    return DataLoader(
        shard, batch_size=1, collate_fn=Collator(run.dataset.train, run.processor, run.prompt, run.dataset.labels),
        num_workers=s.num_workers, persistent_workers=s.num_workers > 0, pin_memory=run.device.type == "cuda",
    )


def _accuracy(run: Run) -> float:
    probs = evaluate.predict(run.model, run.processor, run.prompt, run.dataset.test, run.settings.eval_batch_size,
                             run.device)
    return evaluate.report("adapter", run.dataset.labels, run.dataset.test, probs).accuracy


def _checkpoint(run: Run, step: int) -> None:
    state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
             "rng": checkpoints.rng_state(), "step": step}
    # Metrics first: a kill between the two then leaves a resumable checkpoint whose steps are all
    # logged (the other order lost the log of every step before it).
    _save_records(run)
    checkpoints.save(run.storage, step, run.accelerator.unwrap_model(run.model), state, run.settings.keep_checkpoints)


def finish(run: Run) -> TrainResult:
    s = run.settings
    out = s.cache_dir / "adapters" / _slug(s.output)
    model = run.accelerator.unwrap_model(run.model)
    model.save_pretrained(out)
    test = run.dataset.test
    probs = evaluate.predict(model, run.processor, run.prompt, test, s.eval_batch_size, run.device)
    adapter_report = evaluate.report(f"{s.name} (LoRA)", run.dataset.labels, test, probs)
    with model.disable_adapter():
        probs = evaluate.predict(model, run.processor, run.prompt, test, s.eval_batch_size, run.device, "eval base")
    base_report = evaluate.report("base model", run.dataset.labels, test, probs)
    evaluate.write(adapter_report, out / "eval")
    evaluate.write(base_report, out / "eval", prefix="base_")
    (out / "eval" / "data_report.json").write_text(json.dumps({"skipped": run.dataset.report.skipped}, indent=2))
    _save_records(run)
    if run.records:
        from finetune.plots import learning_curve_png

        learning_curve_png(run.records, out / "eval" / "learning_curve.png")
    if s.tensorboard_dir and run.accelerator.is_main_process:
        _tensorboard(run.records, s.tensorboard_dir)
    return TrainResult(out, adapter_report, base_report, run.start)


def _load_records(run: Run) -> list[dict[str, float]]:
    """metrics.jsonl up to the resumed step, so after a resume each step is logged once."""
    if not run.storage.exists("metrics.jsonl"):
        return []
    lines = run.storage.read_bytes("metrics.jsonl").decode().splitlines()
    return [r for r in map(json.loads, filter(str.strip, lines)) if r["step"] <= run.start]


def _save_records(run: Run) -> None:
    # Rewritten whole: GCS has no append, and a few hundred lines cost nothing.
    if run.accelerator.is_main_process:
        run.storage.write_bytes("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in run.records).encode())


def _tensorboard(records: list[dict[str, float]], folder: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(folder) as writer:
        for record in records:
            for key, value in record.items():
                if key != "step":
                    writer.add_scalar(key, value, int(record["step"]))


def _slug(uri: str) -> str:
    return uri.replace("gs://", "gs_").replace("/", "_").strip("_.")
