"""Preemption: a training job killed with SIGKILL after a checkpoint resumes from it when rerun
(as a Cloud Run task retry would), on a local run folder and on gs:// (GCS emulator)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from adapter_contract.registry import Registry
from adapter_contract.storage import open_storage
from tests.conftest import BIN, petbreed, summary

STEPS, EVERY = 60, 20
TASK = {"CLOUD_RUN_TASK_INDEX": "0", "CLOUD_RUN_TASK_COUNT": "1"}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "data"
    petbreed("make-synthetic-data", str(out), "--breeds", "3", "--train-per-breed", "8", "--test-per-breed", "4")
    return out


def _args(data: Path, model: Path, output: str, registry: str, cache: Path) -> list[str]:
    return ["train", "--data", str(data), "--base-model", str(model), "--output", output, "--registry", registry,
            "--cache-dir", str(cache), "--max-steps", str(STEPS), "--checkpoint-every", str(EVERY),
            "--eval-every", "0", "--batch-size", "4"]


def _kill_after_checkpoint(args: list[str], output: str, step: int) -> None:
    proc = subprocess.Popen([str(BIN / "petbreed"), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **TASK, "CLOUD_RUN_TASK_ATTEMPT": "0"})
    marker = f"checkpoints/step-{step:06d}/COMPLETE"
    deadline = time.monotonic() + 300
    while not open_storage(output).exists(marker):
        assert proc.poll() is None, "training ended before it was killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_killed_job_resumes_from_its_checkpoint(
    where: str, small_data: Path, tiny_model: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    root = request.getfixturevalue("gcs_emulator") + f"/{tmp_path.name}" if where == "gcs" else str(tmp_path)
    output, registry = f"{root}/run", f"{root}/registry"
    args = _args(small_data, tiny_model, output, registry, tmp_path / "cache")
    _kill_after_checkpoint(args, output, EVERY)
    assert Registry(registry).index().adapters == {}, "a killed run must not publish"

    result = petbreed(*args, env={**TASK, "CLOUD_RUN_TASK_ATTEMPT": "1"})
    run = summary(result)
    assert int(str(run["resumed_from_step"])) >= EVERY
    assert run["task_attempt"] == 1
    lines = open_storage(output).read_bytes("metrics.jsonl").decode().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == list(range(1, STEPS + 1)), "each step is logged exactly once across the two attempts"
    assert Registry(registry).resolve("pets") == ("pets", 1)
    assert run["published"] == "pets@1"
