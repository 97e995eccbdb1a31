"""The adapter registry: `ROOT/NAME/VERSION/` folders plus `ROOT/index.json`.

Publishing writes every file of a version first and the index last, and readers only trust
versions the index lists, so a reader never sees a half-published adapter. Each file's sha256 is
in the manifest and checked on download.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from pydantic import BaseModel, Field

from adapter_contract.manifest import MANIFEST_FILE, AdapterManifest, file_sha256
from adapter_contract.storage import LocalStorage, Storage, StorageError, download_tree, open_storage, upload_tree

INDEX_FILE = "index.json"


class RegistryIndex(BaseModel):
    adapters: dict[str, list[int]] = Field(default_factory=dict)


class Registry:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.storage: Storage = open_storage(uri)

    def index(self) -> RegistryIndex:
        if not self.storage.exists(INDEX_FILE):
            return RegistryIndex()
        return RegistryIndex.model_validate_json(self.storage.read_bytes(INDEX_FILE))

    def resolve(self, ref: str) -> tuple[str, int]:
        """`NAME` (newest version) or `NAME@VERSION` -> (name, version)."""
        name, _, version = ref.partition("@")
        versions = self.index().adapters.get(name)
        if not versions:
            raise StorageError(f"adapter {name!r} is not in the registry {self.uri}")
        if not version:
            return name, max(versions)
        if not version.isdigit() or int(version) not in versions:
            raise StorageError(f"adapter {name!r} has no version {version!r} (has {sorted(versions)})")
        return name, int(version)

    def manifest(self, name: str, version: int) -> AdapterManifest:
        return AdapterManifest.model_validate_json(self.storage.read_bytes(f"{name}/{version}/{MANIFEST_FILE}"))

    def next_version(self, name: str) -> int:
        return max(self.index().adapters.get(name, [0])) + 1

    def publish(self, adapter_dir: Path, manifest: AdapterManifest) -> AdapterManifest:
        """Copy a finished adapter folder in as `manifest.name`'s next version and list it."""
        manifest = manifest.model_copy(update={"version": self.next_version(manifest.name)})
        manifest.files = {
            str(p.relative_to(adapter_dir)): file_sha256(p)
            for p in sorted(adapter_dir.rglob("*"))
            if p.is_file() and p.name != MANIFEST_FILE
        }
        (adapter_dir / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
        final = f"{manifest.name}/{manifest.version}"
        if isinstance(self.storage, LocalStorage):
            staging = f".staging/{uuid.uuid4().hex}"
            upload_tree(adapter_dir, self.storage, staging)
            self.storage.rename_dir(staging, final)
        else:
            upload_tree(adapter_dir, self.storage, final)
        self._list_version(manifest.name, manifest.version)
        return manifest

    def _list_version(self, name: str, version: int) -> None:
        index = self.index()
        index.adapters[name] = sorted({*index.adapters.get(name, []), version})
        self.storage.write_bytes(INDEX_FILE, index.model_dump_json(indent=2).encode())

    def download(self, name: str, version: int, dest: Path) -> AdapterManifest:
        """Fetch a listed version into `dest` and verify every file against its manifest."""
        manifest = self.manifest(name, version)
        if not (dest / MANIFEST_FILE).exists():
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}")
            download_tree(self.storage, f"{name}/{version}", tmp)
            _verify(tmp, manifest)
            tmp.rename(dest)
        return manifest


def _verify(folder: Path, manifest: AdapterManifest) -> None:
    for rel, digest in manifest.files.items():
        path = folder / rel
        if not path.exists() or file_sha256(path) != digest:
            raise StorageError(f"{manifest.ref}: file {rel} is missing or corrupt")


