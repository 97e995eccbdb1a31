"""Retraining: add two breeds to pets@1 without forgetting the six it knows."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import cast

from adapter_contract.registry import Registry
from tests.conftest import petbreed, summary


def test_new_breeds_are_learned_and_old_ones_kept(
    trained_run: dict[str, object], tiny_model: Path, tmp_path: Path
) -> None:
    registry = tmp_path / "registry"
    shutil.copytree(str(trained_run["registry"]), registry)
    new_data = tmp_path / "new-breeds"
    petbreed("make-synthetic-data", str(new_data), "--breeds", "2", "--first", "6")

    run = summary(petbreed(
        "train", "--parent", "pets", "--data", str(new_data), "--base-model", str(tiny_model),
        "--output", str(tmp_path / "run"), "--registry", str(registry), "--cache-dir", str(tmp_path / "cache"),
        "--max-steps", "150", "--eval-every", "0",
    ))

    assert float(str(run["new_breeds_accuracy"])) >= 0.85
    parent_accuracy = float(str(run["parent_accuracy"]))
    assert parent_accuracy == trained_run["accuracy"]
    assert float(str(run["old_breeds_accuracy"])) >= parent_accuracy - 0.03
    manifest = Registry(str(registry)).manifest("pets", 2)
    parent = Registry(str(registry)).manifest("pets", 1)
    assert manifest.parent == "pets@1"
    assert manifest.image_soft_tokens == parent.image_soft_tokens
    assert manifest.previous_labels == parent.labels.ids
    assert manifest.labels.ids[:6] == parent.labels.ids, "old breeds keep their indices"
    assert set(manifest.labels.ids[6:]) == {"Bombay", "beagle"}
    assert manifest.training["data_sources"] == [*cast(list[str], parent.training["data_sources"]), str(new_data)]
    assert {"old_breeds_accuracy", "new_breeds_accuracy"} <= set(manifest.metrics)
