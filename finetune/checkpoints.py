"""Checkpoints in the run folder (local or gs://), so a preempted job resumes where it stopped.

`checkpoints/step-000150/` holds the adapter, the optimizer/scheduler state and the RNG state.
A `COMPLETE` marker is written last; a checkpoint without it (the job died while writing) is
ignored, so resuming never reads half a checkpoint.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapter_contract.storage import Storage, download_tree, upload_tree

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.pt"
_STEP = re.compile(r"^checkpoints/step-(\d+)/" + MARKER + "$")


@dataclass
class Checkpoint:
    step: int
    folder: Path  # local copy: a PEFT adapter folder plus trainer_state.pt

    def state(self) -> dict[str, Any]:
        return dict(torch.load(self.folder / STATE_FILE, weights_only=False))


def _key(step: int) -> str:
    return f"checkpoints/step-{step:06d}"


def completed_steps(run: Storage) -> list[int]:
    return sorted(int(m.group(1)) for key in run.list("checkpoints") if (m := _STEP.match(key)))


def latest(run: Storage, cache: Path) -> Checkpoint | None:
    steps = completed_steps(run)
    if not steps:
        return None
    local = cache / f"step-{steps[-1]:06d}"
    if not local.exists():
        download_tree(run, _key(steps[-1]), local)
    return Checkpoint(steps[-1], local)


def save(run: Storage, step: int, model: Any, state: dict[str, Any], keep: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model.save_pretrained(folder)
        torch.save(state, folder / STATE_FILE)
        upload_tree(folder, run, _key(step))
    run.write_bytes(f"{_key(step)}/{MARKER}", b"")
    for old in completed_steps(run)[:-keep]:
        run.delete_prefix(_key(old))


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state()}


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
