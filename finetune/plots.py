"""Pictures people would rather look at than read: the confusion matrix and the learning curve."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def confusion_png(matrix: list[list[int]], names: list[str], title: str, path: Path) -> None:
    size = max(5.0, 0.35 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(names) <= 20:
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                if count:
                    ax.text(j, i, str(count), ha="center", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def learning_curve_png(records: list[dict[str, float]], path: Path) -> None:
    fig, loss_ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in records if "loss" in r]
    loss_ax.plot(steps, [r["loss"] for r in records if "loss" in r], color="tab:blue", label="train loss")
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("train loss", color="tab:blue")
    evals = [r for r in records if "eval_accuracy" in r]
    if evals:
        acc_ax = loss_ax.twinx()
        acc_ax.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", color="tab:orange")
        acc_ax.set_ylabel("held-out accuracy", color="tab:orange")
        acc_ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
