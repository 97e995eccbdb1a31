"""The whole training job as one call: data -> train -> evaluate -> publish. The `petbreed train`
command and a Cloud Run Job task both run exactly this."""

from __future__ import annotations

from pydantic import BaseModel

from adapter_contract.prompt import answer_terminator
from finetune import retrain
from finetune.data import load_dataset
from finetune.model import config_path, load_processor, resolve_base_model
from finetune.publish import Lineage, build_manifest, publish
from finetune.settings import TrainSettings
from finetune.train import train


class RunSummary(BaseModel):
    accuracy: float
    macro_f1: float
    base_accuracy: float
    resumed_from_step: int
    task_attempt: int
    skipped_images: int
    adapter_dir: str
    published: str | None = None
    old_breeds_accuracy: float | None = None
    new_breeds_accuracy: float | None = None
    parent_accuracy: float | None = None


def run_training(settings: TrainSettings) -> RunSummary:
    model_path = resolve_base_model(settings.base_model, settings.cache_dir)
    dataset = load_dataset(settings.data, settings.cache_dir, settings.test_fraction, settings.seed)
    plan = retrain.plan(settings, dataset) if settings.parent else None
    if plan:
        dataset = plan.dataset
    inherited = plan.parent.image_soft_tokens if plan else None
    settings = settings.model_copy(update={"image_soft_tokens": settings.image_soft_tokens or inherited})
    result = train(settings.model_copy(update={"base_model": model_path}), dataset, plan.parent_dir if plan else None)
    summary = RunSummary(
        accuracy=result.report.accuracy, macro_f1=result.report.macro_f1,
        base_accuracy=result.base_report.accuracy, resumed_from_step=result.resumed_from,
        task_attempt=settings.task_attempt,
        skipped_images=len(dataset.report.skipped), adapter_dir=str(result.adapter_dir),
    )
    if plan:
        summary.old_breeds_accuracy = result.report.subset_accuracy(plan.old_labels)
        summary.new_breeds_accuracy = result.report.subset_accuracy(plan.new_labels)
        summary.parent_accuracy = plan.parent.metrics.get("accuracy")
    if settings.publish:
        processor = load_processor(model_path, settings.image_soft_tokens)
        # The budget it was trained with goes into the manifest explicitly, the model's default too.
        settings = settings.model_copy(update={"image_soft_tokens": processor.image_processor.max_soft_tokens})
        manifest = build_manifest(
            settings, config_path(model_path), dataset.labels, answer_terminator(processor),
            dataset.fingerprint(), result.report, result.base_report,
            Lineage(plan.data_sources, plan.parent.ref, plan.old_labels) if plan else Lineage([settings.data]),
        )
        manifest.metrics.update(
            {k: v for k, v in summary.model_dump().items() if k.endswith("breeds_accuracy") and v is not None}
        )
        summary.published = publish(settings.registry, result.adapter_dir, manifest).ref
    return summary
