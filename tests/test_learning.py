"""The model learns: held-out accuracy of `petbreed train` on the synthetic pets, far above chance."""

from __future__ import annotations

import json
from pathlib import Path

from adapter_contract.registry import Registry


def test_training_beats_chance_by_far(trained_run: dict[str, object]) -> None:
    chance = 1 / 6
    accuracy, base_accuracy = float(str(trained_run["accuracy"])), float(str(trained_run["base_accuracy"]))
    assert accuracy >= 0.85, trained_run
    assert base_accuracy < 0.5, "the untrained base should be near chance"
    assert accuracy > 5 * chance


def test_run_writes_reports_plots_and_a_learning_curve(trained_run: dict[str, object]) -> None:
    adapter = Path(str(trained_run["adapter_dir"]))
    report = json.loads((adapter / "eval" / "report.json").read_text())
    assert set(report) >= {"accuracy", "macro_f1", "per_class", "confusion", "labels"}
    assert len(report["confusion"]) == 6 and sum(map(sum, report["confusion"])) == report["n"]
    for png in ("confusion.png", "base_confusion.png", "learning_curve.png"):
        assert (adapter / "eval" / png).read_bytes()[:4] == b"\x89PNG"
    records = [json.loads(line) for line in (Path(str(trained_run["run"])) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 601))
    assert any("eval_accuracy" in r for r in records)


def test_published_manifest_describes_the_adapter(trained_run: dict[str, object], tiny_model: Path) -> None:
    registry = Registry(str(trained_run["registry"]))
    name, version = registry.resolve("pets")
    manifest = registry.manifest(name, version)
    assert (name, version) == ("pets", 1)
    assert len(manifest.labels) == 6
    assert manifest.metrics["accuracy"] == trained_run["accuracy"]
    assert manifest.base_model.id == str(tiny_model)
    assert manifest.image_soft_tokens == 70, "the budget it trained with (the tiny model's default), written down"
    assert {"adapter_model.safetensors", "adapter_config.json", "eval/report.json"} <= set(manifest.files)


def test_eval_command_reproduces_the_published_metrics(
    trained_run: dict[str, object], tiny_model: Path, synthetic_data: Path, tmp_path: Path
) -> None:
    from tests.conftest import petbreed, summary

    result = summary(petbreed(
        "eval", "--data", str(synthetic_data), "--registry", str(trained_run["registry"]), "--adapter", "pets@1",
        "--base-model", str(tiny_model), "--output", str(tmp_path / "eval"), "--cache-dir", str(tmp_path / "cache"),
    ))
    assert result["accuracy"] == trained_run["accuracy"]
    assert result["base_accuracy"] == trained_run["base_accuracy"]
    assert result["image_soft_tokens"] == 70  # the adapter's own
    assert (tmp_path / "eval" / "confusion.png").exists()
    other = summary(petbreed(
        "eval", "--data", str(synthetic_data), "--registry", str(trained_run["registry"]), "--adapter", "pets@1",
        "--base-model", str(tiny_model), "--output", str(tmp_path / "eval140"), "--cache-dir", str(tmp_path / "cache"),
        "--image-soft-tokens", "140",
    ))
    assert other["image_soft_tokens"] == 140
