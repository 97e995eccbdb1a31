"""`petbreed train`: LoRA fine-tuning of Gemma 4 as a breed classifier, in one readable loop.

Recipe: load data -> load base + processor -> LoRA (fresh, from a parent adapter, or from the
newest checkpoint) -> AdamW with warmup and linear decay -> loss on the answer tokens only ->
checkpoint every N steps -> evaluate base and adapter by scoring the label set -> publish.
Accelerate handles devices, mixed precision and several GPUs (`accelerate launch`/`torchrun`).
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from adapter_contract.labels import LabelSet
from adapter_contract.prompt import ClassificationPrompt
from adapter_contract.storage import Storage, open_storage
from finetune import checkpoints, evaluate
from finetune.data import Dataset, Example, load_image
from finetune.model import add_lora, load_adapter, load_base, load_processor, pick_device
from finetune.scoring import training_batch
from finetune.settings import TrainSettings

log = logging.getLogger("petbreed.train")


@dataclass
class TrainResult:
    adapter_dir: Path
    report: evaluate.EvalReport
    base_report: evaluate.EvalReport
    steps: int
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


class Collator:
    """Runs in DataLoader workers: decode images and build the padded, masked batch."""

    def __init__(self, examples: list[Example], processor: Any, prompt: ClassificationPrompt, labels: LabelSet):
        self.examples, self.processor, self.prompt = examples, processor, prompt
        self.texts = {label.id: label.text for label in labels.labels}

    def __call__(self, indices: list[list[int]]) -> dict[str, Any]:
        batch = [self.examples[i] for i in indices[0]]
        images = [load_image(ex.path) for ex in batch]
        return training_batch(
            self.processor, self.prompt, images, [ex.label for ex in batch], self.texts, torch.device("cpu")
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(settings: TrainSettings, dataset: Dataset, parent_adapter: Path | None = None) -> TrainResult:
    seed_everything(settings.seed)
    accelerator = Accelerator(
        cpu=pick_device(settings.device).type == "cpu",
        mixed_precision="bf16" if torch.cuda.is_available() and settings.device != "cpu" else "no",
    )
    run = open_storage(settings.output)
    model_path = settings.base_model
    processor = load_processor(model_path)
    prompt = ClassificationPrompt.build(processor, dataset.labels)
    base = load_base(model_path, accelerator.device)
    ckpt = checkpoints.latest(run, settings.cache_dir / "resume" / _slug(settings.output))
    start_from = ckpt.folder if ckpt else parent_adapter
    model = load_adapter(base, start_from, trainable=True) if start_from else add_lora(base, settings.lora)
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
    loader = _loader(settings, dataset, processor, prompt, start, accelerator)
    metrics = _MetricsLog(run, settings, accelerator.is_main_process, start)
    _loop(settings, accelerator, model, optimizer, scheduler, loader, start, run, metrics, dataset, processor, prompt)
    return _finish(settings, accelerator, model, base, processor, prompt, dataset, metrics, start)


def _loader(
    settings: TrainSettings, dataset: Dataset, processor: Any, prompt: ClassificationPrompt, start: int,
    accelerator: Accelerator,
) -> DataLoader:
    # Each process takes its own slice of every global batch (plain DDP data parallelism).
    per_process = settings.batch_size // accelerator.num_processes
    sampler = BatchOrder(
        len(dataset.train), settings.batch_size, settings.seed, start * settings.grad_accum,
        (settings.max_steps - start) * settings.grad_accum,
    )
    shard = _Shard(sampler, accelerator.process_index, per_process)
    return DataLoader(
        shard, batch_size=1, collate_fn=Collator(dataset.train, processor, prompt, dataset.labels),
        num_workers=settings.num_workers, persistent_workers=settings.num_workers > 0,
    )


class _Shard(torch.utils.data.IterableDataset):
    def __init__(self, order: BatchOrder, rank: int, size: int) -> None:
        self.order, self.rank, self.size = order, rank, size

    def __iter__(self):  # type: ignore[no-untyped-def]
        for batch in self.order:
            yield batch[self.rank * self.size : (self.rank + 1) * self.size]


def _loop(
    settings: TrainSettings, accelerator: Accelerator, model: Any, optimizer: Any, scheduler: Any,
    loader: DataLoader, start: int, run: Storage, metrics: _MetricsLog, dataset: Dataset, processor: Any,
    prompt: ClassificationPrompt,
) -> None:
    model.train()
    batches = iter(loader)
    bar = tqdm(range(start, settings.max_steps), desc="train", unit="step", disable=not accelerator.is_main_process)
    for step in bar:
        t0, loss_sum, samples = time.perf_counter(), 0.0, 0
        for _ in range(settings.grad_accum):
            batch = {k: v.to(accelerator.device) for k, v in next(batches).items()}
            with accelerator.autocast():
                loss = model(**batch).loss / settings.grad_accum
            accelerator.backward(loss)
            loss_sum += loss.item()
            samples += batch["input_ids"].shape[0]
        accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        record = {"step": done, "loss": loss_sum, "lr": scheduler.get_last_lr()[0],
                  "samples_per_s": samples * accelerator.num_processes / (time.perf_counter() - t0)}
        if settings.eval_every and done % settings.eval_every == 0 and done < settings.max_steps:
            record["eval_accuracy"] = _accuracy(settings, accelerator, model, processor, prompt, dataset)
            model.train()
        metrics.add(record)
        bar.set_postfix(loss=f"{loss_sum:.3f}")
        if done % settings.checkpoint_every == 0 and done < settings.max_steps and accelerator.is_main_process:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "rng": checkpoints.rng_state(), "step": done}
            checkpoints.save(run, done, accelerator.unwrap_model(model), state, settings.keep_checkpoints)
            metrics.flush()


def _accuracy(
    settings: TrainSettings, accelerator: Accelerator, model: Any, processor: Any, prompt: ClassificationPrompt,
    dataset: Dataset,
) -> float:
    probs = evaluate.predict(model, processor, prompt, dataset.test, settings.eval_batch_size, accelerator.device)
    return evaluate.report("adapter", dataset.labels, dataset.test, probs).accuracy


def _finish(
    settings: TrainSettings, accelerator: Accelerator, model: Any, base: Any, processor: Any,
    prompt: ClassificationPrompt, dataset: Dataset, metrics: _MetricsLog, start: int,
) -> TrainResult:
    out = settings.cache_dir / "adapters" / _slug(settings.output)
    model = accelerator.unwrap_model(model)
    model.save_pretrained(out)
    probs = evaluate.predict(model, processor, prompt, dataset.test, settings.eval_batch_size, accelerator.device)
    adapter_report = evaluate.report(f"{settings.name} (LoRA)", dataset.labels, dataset.test, probs)
    with model.disable_adapter():
        probs = evaluate.predict(model, processor, prompt, dataset.test, settings.eval_batch_size,
                                 accelerator.device, desc="eval base")
    base_report = evaluate.report("base model", dataset.labels, dataset.test, probs)
    evaluate.write(adapter_report, out / "eval")
    evaluate.write(base_report, out / "eval", prefix="base_")
    metrics.finish(out)
    (out / "eval" / "data_report.json").write_text(json.dumps({"skipped": dataset.report.skipped}, indent=2))
    return TrainResult(out, adapter_report, base_report, settings.max_steps, start)


def _slug(uri: str) -> str:
    return uri.replace("gs://", "gs_").replace("/", "_").strip("_.")


class _MetricsLog:
    """metrics.jsonl in the run folder, saved with each checkpoint (so after a resume it holds
    each step once), and TensorBoard when configured."""

    def __init__(self, run: Storage, settings: TrainSettings, enabled: bool, start: int) -> None:
        self.run, self.enabled = run, enabled
        self.records: list[dict[str, float]] = []
        if enabled and run.exists("metrics.jsonl"):
            text = run.read_bytes("metrics.jsonl").decode()
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
            self.records = [r for r in records if r["step"] <= start]
        self.tb = None
        if enabled and settings.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(settings.tensorboard_dir)

    def add(self, record: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        log.info(json.dumps(record))
        if self.tb:
            for key, value in record.items():
                if key != "step":
                    self.tb.add_scalar(key, value, int(record["step"]))

    def flush(self) -> None:
        # Rewritten whole: GCS has no append, and a few hundred lines cost nothing.
        if self.enabled:
            self.run.write_bytes("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.records).encode())

    def finish(self, out: Path) -> None:
        from finetune.plots import learning_curve_png

        self.flush()
        if self.records:
            learning_curve_png(self.records, out / "eval" / "learning_curve.png")
        if self.tb:
            self.tb.close()
