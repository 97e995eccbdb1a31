"""The table of servable adapters, filled from the registry and refreshed while serving.

Every version the registry index lists is downloaded (each file checked against its manifest's
sha256), checked against the loaded base model, and given the prompt it was trained with. Entries
are immutable and a request holds its entry from start to end, so adding a newer version never
changes the adapter of a request already running.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter_contract.manifest import AdapterManifest
from adapter_contract.modules import AUDIO_MODULES, TOWER_MODULES
from adapter_contract.prompt import PROMPT_VERSION, ClassificationPrompt
from adapter_contract.registry import Registry
from adapter_contract.storage import StorageError

log = logging.getLogger("petbreed.serve.adapters")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_TOWER = re.compile(r"\." + TOWER_MODULES)
_AUDIO = re.compile(rf"\.{AUDIO_MODULES}\.")


@dataclass(frozen=True)
class AdapterEntry:
    """One servable version: its manifest, prompt, token ids and the engine's handle for it."""

    manifest: AdapterManifest
    prompt: ClassificationPrompt
    prompt_token_ids: tuple[int, ...]
    path: Path
    lora_id: int

    @property
    def ref(self) -> str:
        return self.manifest.ref


@dataclass(frozen=True)
class Refused:
    name: str
    version: int
    reason: str
    manifest: AdapterManifest | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class AdapterNotFound(LookupError):
    """An adapter reference nothing is served under; `refused` when it was refused at load."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class AdapterRefused(Exception):
    """A version that must not be served (wrong base, wrong prompt version, too large a rank)."""


class AdapterTable:
    def __init__(
        self, registry_uri: str, cache_dir: Path, processor: Any, base_config_sha256: str, max_lora_rank: int,
        default_name: str | None, tower_lora: bool = True, merged: bool = False,
        max_image_soft_tokens: int | None = None,
    ) -> None:
        self.registry = Registry(registry_uri)
        self.cache_dir = cache_dir / "adapters"
        self.processor = processor
        self.base_sha = base_config_sha256
        self.max_lora_rank = max_lora_rank
        self.tower_lora = tower_lora
        self.max_image_soft_tokens = max_image_soft_tokens  # the engine's `image_budget_limit`
        self.default_name = default_name
        # Merged into the base weights (`merged_adapter`): only the default adapter's newest version.
        self.merged = merged
        self.entries: dict[tuple[str, int], AdapterEntry] = {}
        self.refused: dict[tuple[str, int], Refused] = {}
        self._next_lora_id = 1

    def pending(self) -> list[tuple[str, int]]:
        """Versions the index lists that are neither served nor permanently refused (blocking I/O)."""
        index = self.registry.index()
        listed = [(name, v) for name, versions in sorted(index.adapters.items()) for v in sorted(versions)]
        if self.merged:
            listed = [key for key in listed if key[0] == self.default_name][-1:]
        return [key for key in listed if key not in self.entries and key not in self.refused]

    def prepare(self, name: str, version: int) -> AdapterEntry:
        """Download, verify and check one version (blocking I/O); raises AdapterRefused or StorageError."""
        if not _NAME.match(name):
            raise AdapterRefused(f"adapter name {name!r} is not a plain name")
        manifest = self.registry.manifest(name, version)
        self._check(manifest)
        dest = self.cache_dir / name / str(version)
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.registry.download(name, version, dest)
        if not self.merged:  # merged weights take any rank
            _check_rank(dest, self.max_lora_rank)
        _check_towers(dest, self.tower_lora)
        try:
            prompt = ClassificationPrompt.build(self.processor, manifest.labels)
        except ValueError as err:
            raise AdapterRefused(f"its labels cannot be scored with this tokenizer: {err}") from None
        # The unexpanded prompt tokens: vLLM expands the image placeholder itself.
        ids = tuple(self.processor.tokenizer.encode(prompt.text))
        entry = AdapterEntry(manifest, prompt, ids, dest, self._next_lora_id)
        self._next_lora_id += 1
        return entry

    def _check(self, manifest: AdapterManifest) -> None:
        if manifest.base_model.config_sha256 != self.base_sha:
            raise AdapterRefused(
                f"trained on base model {manifest.base_model.id!r} (config sha256 "
                f"{manifest.base_model.config_sha256[:12]}…), but the loaded base has config sha256 "
                f"{self.base_sha[:12]}…"
            )
        if manifest.prompt_version != PROMPT_VERSION:
            raise AdapterRefused(
                f"trained with prompt {manifest.prompt_version!r}; this server renders {PROMPT_VERSION!r}"
            )
        limit, budget = self.max_image_soft_tokens, manifest.image_soft_tokens
        if limit is not None and budget is not None and budget > limit:
            raise AdapterRefused(
                f"trained at {budget} soft tokens per image, more than the {limit} this engine takes with LoRA on "
                f"the vision tower; serve it from a server started with PETBREED_VLLM__MAX_SOFT_TOKENS={budget}"
            )

    def add(self, entry: AdapterEntry) -> None:
        if self.merged:  # the version it replaced in the weights is no longer served
            self.entries.clear()
        self.entries[(entry.manifest.name, entry.manifest.version)] = entry
        log.info("adapter loaded", extra={"adapter": entry.ref, "labels": len(entry.prompt.label_ids)})

    def refuse(self, name: str, version: int, reason: str) -> None:
        manifest = self._manifest_or_none(name, version)
        self.refused[(name, version)] = Refused(name, version, reason, manifest)
        log.error("adapter refused", extra={"adapter": f"{name}@{version}", "reason": reason})

    def _manifest_or_none(self, name: str, version: int) -> AdapterManifest | None:
        try:
            return self.registry.manifest(name, version)
        except Exception:  # a manifest that cannot be read is itself the refusal's reason
            return None

    def resolve(self, ref: str | None) -> AdapterEntry:
        """`NAME`, `NAME@VERSION` or None (the default adapter) -> the entry, fixed for the request."""
        ref = ref or self.default_name
        if not ref:
            raise AdapterNotFound("no adapter named and no default adapter configured")
        name, _, version = ref.partition("@")
        if version:
            if not version.isdigit():
                raise AdapterNotFound(f"adapter version must be a number, got {ref!r}")
            return self._exact(name, int(version))
        versions = [v for (n, v) in self.entries if n == name]
        if not versions:
            refused = [r for (n, _), r in self.refused.items() if n == name]
            if refused:
                raise AdapterNotFound(f"adapter {name!r} was refused: {refused[-1].reason}", refused=True)
            raise AdapterNotFound(f"adapter {name!r} is not served (served: {', '.join(self.names()) or 'none'})")
        return self.entries[(name, max(versions))]

    def _exact(self, name: str, version: int) -> AdapterEntry:
        entry = self.entries.get((name, version))
        if entry is not None:
            return entry
        refused = self.refused.get((name, version))
        if refused is not None:
            raise AdapterNotFound(f"adapter {refused.ref} was refused: {refused.reason}", refused=True)
        raise AdapterNotFound(f"adapter {name}@{version} is not served")

    def names(self) -> list[str]:
        return sorted({name for name, _ in self.entries})

    def default_ref(self) -> str | None:
        try:
            return self.resolve(None).ref
        except AdapterNotFound:
            return None


def _check_rank(folder: Path, max_rank: int) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    ranks = [int(config.get("r", 0)), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    if max(ranks) > max_rank:
        raise AdapterRefused(f"LoRA rank {max(ranks)} exceeds the server's max_lora_rank {max_rank}")


def _check_towers(folder: Path, tower_lora: bool) -> None:
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as fh:
        names = list(fh.keys())
    audio = sorted(k for k in names if _AUDIO.search(k))
    if audio:
        raise AdapterRefused(
            f"it has LoRA weights on the audio tower ({len(audio)} tensors, e.g. {audio[0]}), which the server "
            "does not load; train it again: `petbreed train` leaves the audio tower out of LoRA"
        )
    tower = sorted(k for k in names if _TOWER.search(k))
    if tower and not tower_lora:
        raise AdapterRefused(
            f"it has LoRA weights on the vision tower/projector ({len(tower)} tensors, e.g. {tower[0]}), which this "
            "vLLM cannot apply to Gemma 4; its answers would differ from the evaluated adapter"
        )


async def sync(
    table: AdapterTable, load: Callable[[AdapterEntry], Awaitable[None]], run_blocking: Callable[..., Awaitable[Any]]
) -> dict[str, list[str]]:
    """Add every new version the index lists. `load` hands an entry to the engine; `run_blocking`
    runs blocking registry I/O off the event loop. Storage errors may be transient (network,
    a version still uploading), so those versions are tried again on the next sync."""
    added: list[str] = []
    refused: list[str] = []
    failed: list[str] = []
    for name, version in await run_blocking(table.pending):
        try:
            entry = await run_blocking(table.prepare, name, version)
            await load(entry)
        except AdapterRefused as err:
            table.refuse(name, version, str(err))
            refused.append(f"{name}@{version}")
            continue
        except StorageError as err:
            log.warning("adapter not loaded yet", extra={"adapter": f"{name}@{version}", "reason": str(err)})
            failed.append(f"{name}@{version}")
            continue
        except Exception as err:  # the engine rejected it (e.g. unknown target modules)
            table.refuse(name, version, f"the engine could not load it: {err}")
            refused.append(f"{name}@{version}")
            continue
        table.add(entry)
        added.append(entry.ref)
    return {"added": added, "refused": refused, "failed": failed}
