"""Evaluation by scoring the label set (the mechanism serving uses), never by parsing free text."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from tqdm import tqdm

from adapter_contract.labels import LabelSet
from adapter_contract.prompt import ClassificationPrompt
from finetune.data import Example, load_image
from finetune.scoring import label_distributions


class ClassScore(BaseModel):
    precision: float
    recall: float
    f1: float
    support: int


class EvalReport(BaseModel):
    model: str
    n: int
    accuracy: float
    macro_f1: float
    labels: list[str]
    per_class: dict[str, ClassScore]
    confusion: list[list[int]]

    def subset_accuracy(self, label_ids: Sequence[str]) -> float:
        """Accuracy on the images whose true label is in `label_ids` (e.g. old vs new breeds)."""
        rows = [self.labels.index(i) for i in label_ids if i in self.labels]
        total = sum(sum(self.confusion[r]) for r in rows)
        return sum(self.confusion[r][r] for r in rows) / total if total else 0.0


def predict(
    model: Any, processor: Any, prompt: ClassificationPrompt, examples: Sequence[Example], batch_size: int,
    device: torch.device, desc: str = "eval",
) -> list[list[float]]:
    model.eval()
    out: list[list[float]] = []
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, unit="batch", leave=False):
        images = [load_image(ex.path) for ex in examples[start : start + batch_size]]
        out += label_distributions(model, processor, prompt, images, device)
    return out


def report(model_name: str, labels: LabelSet, examples: Sequence[Example], probs: list[list[float]]) -> EvalReport:
    # Imported here: only reports need scikit-learn, not the training loop (lean GPU images).
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    ids = labels.ids
    y_true = [ids.index(ex.label) for ex in examples]
    y_pred = [max(range(len(p)), key=p.__getitem__) for p in probs]
    index = list(range(len(ids)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=index, zero_division=0
    )
    return EvalReport(
        model=model_name,
        n=len(examples),
        accuracy=sum(t == p for t, p in zip(y_true, y_pred, strict=True)) / max(1, len(examples)),
        macro_f1=float(f1_score(y_true, y_pred, labels=index, average="macro", zero_division=0)),
        labels=ids,
        per_class={
            label: ClassScore(precision=precision[i], recall=recall[i], f1=f1[i], support=int(support[i]))
            for i, label in enumerate(ids)
        },
        confusion=confusion_matrix(y_true, y_pred, labels=index).tolist(),
    )


def write(report_: EvalReport, folder: Path, prefix: str = "") -> None:
    """`{prefix}report.json` and `{prefix}confusion.png` in `folder`."""
    from finetune.plots import confusion_png

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{prefix}report.json").write_text(report_.model_dump_json(indent=2))
    title = f"{report_.model}: accuracy {report_.accuracy:.3f}, macro-F1 {report_.macro_f1:.3f}"
    confusion_png(report_.confusion, report_.labels, title, folder / f"{prefix}confusion.png")
