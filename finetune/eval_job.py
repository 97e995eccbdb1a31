"""`petbreed eval`: evaluate a published adapter (and its base model) on a dataset's test split.

The label space is the adapter's own (from its manifest); the dataset may hold a subset of it.
Writes report.json, confusion.png and the same for the base model into --output.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from adapter_contract.image import SoftTokens
from adapter_contract.prompt import ClassificationPrompt
from finetune import evaluate
from finetune.data import DataError, load_dataset
from finetune.model import load_published, pick_device


class EvalSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PETBREED_", cli_kebab_case=True)

    data: str = Field(description="dataset (any layout `petbreed train` reads); its test split is used")
    adapter: str = Field("pets", description="NAME or NAME@VERSION in the registry")
    registry: str = "artifacts/registry"
    base_model: str = "artifacts/tiny-gemma4"
    output: Path = Field(Path("artifacts/eval"), description="folder for the reports")
    cache_dir: Path = Path(".cache/petbreed")
    batch_size: int = Field(32, ge=1)
    image_soft_tokens: SoftTokens | None = Field(
        None, description="image token budget to evaluate with instead of the adapter's own: what serving it with "
        "PETBREED_VLLM__MAX_SOFT_TOKENS would answer"
    )
    test_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    device: str = "auto"


class EvalSummary(BaseModel):
    adapter: str
    n: int
    accuracy: float
    macro_f1: float
    base_accuracy: float
    image_soft_tokens: int
    output: str


def run_eval(settings: EvalSettings) -> EvalSummary:
    device = pick_device(settings.device)
    model, processor, manifest = load_published(
        settings.registry, settings.adapter, settings.base_model, settings.cache_dir, device, settings.image_soft_tokens
    )
    dataset = load_dataset(settings.data, settings.cache_dir, settings.test_fraction, settings.seed)
    unknown = sorted({e.label for e in dataset.test} - set(manifest.labels.ids))
    if unknown:
        raise DataError(f"{manifest.ref} does not know these labels of the dataset: {', '.join(unknown)}")
    prompt = ClassificationPrompt.build(processor, manifest.labels)
    probs = evaluate.predict(model, processor, prompt, dataset.test, settings.batch_size, device)
    adapter_report = evaluate.report(manifest.ref, manifest.labels, dataset.test, probs)
    with model.disable_adapter():
        probs = evaluate.predict(model, processor, prompt, dataset.test, settings.batch_size, device, "eval base")
    base_report = evaluate.report("base model", manifest.labels, dataset.test, probs)
    evaluate.write(adapter_report, settings.output)
    evaluate.write(base_report, settings.output, prefix="base_")
    return EvalSummary(adapter=manifest.ref, n=adapter_report.n, accuracy=adapter_report.accuracy,
                       macro_f1=adapter_report.macro_f1, base_accuracy=base_report.accuracy,
                       image_soft_tokens=processor.image_processor.max_soft_tokens, output=str(settings.output))
