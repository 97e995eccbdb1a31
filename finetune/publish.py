"""Turn a finished run into a registry version: manifest first, files next, index last."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapter_contract.labels import LabelSet
from adapter_contract.manifest import AdapterManifest, BaseModelRef, config_sha256
from adapter_contract.prompt import INSTRUCTION, PROMPT_VERSION
from adapter_contract.registry import Registry
from finetune.evaluate import EvalReport
from finetune.settings import TrainSettings


@dataclass
class Lineage:
    """Where an adapter comes from: every dataset it has seen, and the version it continued."""

    data_sources: list[str]
    parent: str | None = None
    previous_labels: list[str] | None = None


def build_manifest(
    settings: TrainSettings, config_json: Path, labels: LabelSet, terminator: str, fingerprint: str,
    report: EvalReport, base_report: EvalReport, lineage: Lineage,
) -> AdapterManifest:
    metrics = {"accuracy": report.accuracy, "macro_f1": report.macro_f1,
               "base_accuracy": base_report.accuracy, "base_macro_f1": base_report.macro_f1}
    return AdapterManifest(
        name=settings.name,
        version=1,
        base_model=BaseModelRef(id=settings.base_model, config_sha256=config_sha256(config_json)),
        labels=labels,
        prompt_version=PROMPT_VERSION,
        instruction=INSTRUCTION,
        answer_terminator=terminator,
        data_fingerprint=fingerprint,
        image_soft_tokens=settings.image_soft_tokens,
        metrics=metrics,
        parent=lineage.parent,
        previous_labels=lineage.previous_labels,
        training={"data_sources": lineage.data_sources, "max_steps": settings.max_steps, "lr": settings.lr,
                  "batch_size": settings.batch_size * settings.grad_accum, "lora": settings.lora.model_dump(),
                  "seed": settings.seed},
    )


def publish(registry_uri: str, adapter_dir: Path, manifest: AdapterManifest) -> AdapterManifest:
    return Registry(registry_uri).publish(adapter_dir, manifest)
