"""One small interface over a local folder and a `gs://bucket/prefix`, so every path in petbreed
(datasets, checkpoints, registry, base model) can live in either. The URI is the configuration."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol


class StorageError(Exception):
    """A storage location that cannot be used; the message is meant for the user."""


class Storage(Protocol):
    uri: str

    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def upload_file(self, local: Path, key: str) -> None: ...
    def download_file(self, key: str, local: Path) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...


def is_gcs(uri: str) -> bool:
    return uri.startswith("gs://")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p)])


def open_storage(uri: str) -> Storage:
    return GCSStorage(uri) if is_gcs(uri) else LocalStorage(uri)


class LocalStorage:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.root = Path(uri)

    def _path(self, key: str) -> Path:
        return self.root / key

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"not found: {self._path(key)}") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename: a reader sees the old bytes or the new ones, never half a file.
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, prefix=".tmp-") as fh:
            fh.write(data)
        os.replace(fh.name, path)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix)
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file())

    def upload_file(self, local: Path, key: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, path)

    def download_file(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(self._path(key), local)
        except FileNotFoundError:
            raise StorageError(f"not found: {self._path(key)}") from None

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    def rename_dir(self, src: str, dst: str) -> None:
        """Move a finished folder into place in one step (same filesystem)."""
        self._path(dst).parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._path(src), self._path(dst))


class GCSStorage:
    """`gs://bucket/prefix` through google-cloud-storage. With STORAGE_EMULATOR_HOST set the client
    talks to that emulator anonymously, which is how the tests run this exact class."""

    def __init__(self, uri: str) -> None:
        from google.cloud import storage

        self.uri = uri
        bucket_name, _, prefix = uri.removeprefix("gs://").partition("/")
        self.prefix = prefix.strip("/")
        client = _client(storage)
        self.bucket = client.bucket(bucket_name)
        if not self.bucket.exists():
            raise StorageError(f"GCS bucket gs://{bucket_name} does not exist or is not accessible")

    def _name(self, key: str) -> str:
        return "/".join(p for p in (self.prefix, key.strip("/")) if p)

    def read_bytes(self, key: str) -> bytes:
        from google.api_core.exceptions import NotFound

        try:
            return bytes(self.bucket.blob(self._name(key)).download_as_bytes())
        except NotFound:
            raise StorageError(f"not found: gs://{self.bucket.name}/{self._name(key)}") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        self.bucket.blob(self._name(key)).upload_from_string(data)

    def exists(self, key: str) -> bool:
        return bool(self.bucket.blob(self._name(key)).exists())

    def _blobs(self, prefix: str) -> Iterator[str]:
        full = self._name(prefix)
        for blob in self.bucket.list_blobs(prefix=full):
            yield blob.name

    def list(self, prefix: str = "") -> list[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(name[strip:] for name in self._blobs(prefix))

    def upload_file(self, local: Path, key: str) -> None:
        self.bucket.blob(self._name(key)).upload_from_filename(str(local))

    def download_file(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        self.bucket.blob(self._name(key)).download_to_filename(str(local))

    def delete_prefix(self, prefix: str) -> None:
        for name in list(self._blobs(prefix)):
            self.bucket.blob(name).delete()


def _client(storage_module):  # type: ignore[no-untyped-def]
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage_module.Client(project="emulator", credentials=AnonymousCredentials())
    return storage_module.Client()


def upload_tree(local_dir: Path, storage: Storage, prefix: str) -> None:
    for path in sorted(local_dir.rglob("*")):
        if path.is_file():
            storage.upload_file(path, f"{prefix}/{path.relative_to(local_dir)}")


def download_tree(storage: Storage, prefix: str, local_dir: Path) -> None:
    for key in storage.list(prefix):
        storage.download_file(key, local_dir / Path(key).relative_to(prefix))
