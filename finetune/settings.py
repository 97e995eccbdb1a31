"""Training settings: one typed object, filled from flags (`--lr 0.01`, `--lora.r 8`), then
environment variables (`PETBREED_LR`), then defaults. Cloud Run's CLOUD_RUN_TASK_* and Vertex AI's
AIP_* variables are read here too, so the same entry point runs as a job task unchanged."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from adapter_contract.image import SoftTokens
from finetune.model import LoraSettings


def _env(name: str, *others: str) -> AliasChoices:
    return AliasChoices(name, f"PETBREED_{name.upper()}", *others)


class TrainSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PETBREED_", env_nested_delimiter="__", cli_kebab_case=True)

    data: str = Field(
        description="dataset: Oxford-IIIT Pet folder, class-per-folder tree, CSV/JSONL manifest, or gs:// of one"
    )
    base_model: str = Field("artifacts/tiny-gemma4", description="Hugging Face id, local folder or gs:// prefix")
    output: str = Field(
        "runs/pets", validation_alias=_env("output", "AIP_CHECKPOINT_DIR"),
        description="run folder (checkpoints, metrics, reports); local or gs://. A rerun resumes from it.",
    )
    registry: str = Field("artifacts/registry", description="adapter registry: local folder or gs://bucket/prefix")
    name: str = Field("pets", description="adapter name in the registry")
    parent: str | None = Field(None, description="NAME[@VERSION] to continue from: retraining with new breeds")
    # 20 let the tiny model's old breeds fall from 1.0 to 0.958 in one of two seeds (150 steps, 2 new
    # breeds); 40 kept 1.0 in 3 of 3 (README, "Measured").
    replay_per_breed: int = Field(40, ge=0, description="retraining: old training images replayed per old breed")
    publish: bool = True
    cache_dir: Path = Path(".cache/petbreed")
    tensorboard_dir: str | None = Field(None, validation_alias=_env("tensorboard_dir", "AIP_TENSORBOARD_LOG_DIR"))

    image_soft_tokens: SoftTokens | None = Field(
        None, description="image token budget: 70, 140, 280, 560 or 1120 soft tokens per image; fewer trains and "
        "serves faster and may cost accuracy (docs/performance.md). None: the parent's when retraining, else the "
        "base model's. Recorded in the manifest, so the adapter is served with it"
    )
    lora: LoraSettings = LoraSettings()
    lr: float = 1e-2
    warmup_steps: int = Field(10, ge=0)
    # The tiny demo model leaves a plateau at chance after 100-400 steps, depending on the seed and
    # the CPU's kernels (AVX2 or AMX): after 300 steps it was at 0.33-1.0, after 600 at 1.0 in 4 of
    # 4 runs (README, "Measured"). The learning rate decays over all of them.
    max_steps: int = Field(600, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    eval_every: int = Field(100, ge=0, description="held-out accuracy every N steps for the learning curve; 0: off")
    eval_batch_size: int = Field(32, ge=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    num_workers: int = Field(0, ge=0, description="DataLoader workers doing image decoding and preprocessing")
    seed: int = 0
    device: str = "auto"
    cache_image_features: bool = Field(
        True, description="where the vision tower is frozen (LoRA on the language model only), compute each training "
        "image's soft tokens without autograd and keep them for later epochs; no effect where the tower trains"
    )
    image_cache_gib: float = Field(
        2.0, ge=0, description="memory on the training device for kept soft tokens (430 KB an image at 280 soft "
        "tokens: 2 GiB holds about 4,900 images); images past it are recomputed every epoch"
    )
    compile: bool | None = Field(
        None, description="torch.compile the decoder and vision-encoder layers (fuses the element-wise work that "
        "dominates an eager step; the compiling happens in the first steps); None: on GPUs"
    )

    # A Cloud Run Job retries a preempted task with the same index and a higher attempt; the
    # attempt is reported, and resuming comes from the checkpoints in `output`, whatever it is.
    task_index: int = Field(0, validation_alias=AliasChoices("CLOUD_RUN_TASK_INDEX", "PETBREED_TASK_INDEX"))
    task_count: int = Field(1, validation_alias=AliasChoices("CLOUD_RUN_TASK_COUNT", "PETBREED_TASK_COUNT"))
    task_attempt: int = Field(0, validation_alias=AliasChoices("CLOUD_RUN_TASK_ATTEMPT", "PETBREED_TASK_ATTEMPT"))

    @field_validator("task_count")
    @classmethod
    def _one_task(cls, count: int) -> int:
        if count != 1:
            raise ValueError(
                "training runs as one Cloud Run task (several GPUs: accelerate launch); "
                "shard batch prediction with `petbreed batch-predict` instead"
            )
        return count
