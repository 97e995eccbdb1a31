"""The adapter manifest: everything a server needs to know to serve an adapter correctly."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field

from adapter_contract.image import SoftTokens
from adapter_contract.labels import LabelSet

MANIFEST_FILE = "manifest.json"


class BaseModelRef(BaseModel):
    """Which base model an adapter belongs to. The hash is of the model's config.json, so a
    renamed copy of the same checkpoint still matches and a different one never does."""

    id: str
    config_sha256: str


class AdapterManifest(BaseModel):
    name: str
    version: int = Field(ge=1)
    base_model: BaseModelRef
    labels: LabelSet
    prompt_version: str
    instruction: str
    answer_terminator: str
    data_fingerprint: str
    image_soft_tokens: SoftTokens | None = Field(
        None, description="the image token budget it was trained with; None (manifests before it): the base model's"
    )
    metrics: dict[str, float] = Field(default_factory=dict)
    parent: str | None = None
    previous_labels: list[str] | None = None
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256 of its bytes")
    training: dict[str, object] = Field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def config_sha256(config_json: Path) -> str:
    """Hash of a model's config.json with keys sorted, so formatting differences don't matter."""
    config = json.loads(config_json.read_text())
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
