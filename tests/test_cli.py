"""`petbreed` answers user mistakes with one line on stderr and exit status 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import petbreed


def _one_line_error(args: list[str], expected: str) -> None:
    result = petbreed(*args, check=False)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("petbreed: error:")]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_the_subcommands() -> None:
    out = petbreed("--help").stdout
    for command in ("make-tiny-model", "make-synthetic-data", "train"):
        assert command in out


def test_missing_dataset(tmp_path: Path) -> None:
    _one_line_error(["train", "--data", str(tmp_path / "missing")], "does not exist")


def test_empty_dataset(tmp_path: Path) -> None:
    _one_line_error(["train", "--data", str(tmp_path)], "no images found")


def test_bad_setting_value(tmp_path: Path) -> None:
    _one_line_error(["train", "--data", str(tmp_path), "--max-steps", "zero"], "max_steps")


def test_base_model_that_does_not_exist(synthetic_data: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    _one_line_error(["train", "--data", str(synthetic_data), "--base-model", str(missing),
                     "--output", str(tmp_path / "run")], f"base model {missing} could not be opened")


@pytest.mark.usefixtures("gcs_emulator")
def test_bucket_that_does_not_exist(synthetic_data: Path) -> None:
    _one_line_error(["train", "--data", str(synthetic_data), "--output", "gs://no-such-bucket-petbreed/run"],
                    "gs://no-such-bucket-petbreed does not exist")


def test_output_folder_of_another_run_is_refused(
    trained_run: dict[str, object], tiny_model: Path, synthetic_data: Path
) -> None:
    _one_line_error(["train", "--data", str(synthetic_data), "--base-model", str(tiny_model), "--max-steps", "7",
                     "--output", str(trained_run["run"])], "holds a different training run")
    _one_line_error(["train", "--data", str(synthetic_data), "--base-model", str(tiny_model),
                     "--image-soft-tokens", "140", "--output", str(trained_run["run"])],
                    "holds a different training run")


def test_training_refuses_several_cloud_run_tasks(tmp_path: Path) -> None:
    result = petbreed("train", "--data", str(tmp_path), env={"CLOUD_RUN_TASK_COUNT": "4"}, check=False)
    assert result.returncode == 2 and "training runs as one Cloud Run task" in result.stderr
