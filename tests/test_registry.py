"""Publishing to the registry, on a local folder and on GCS (the real client, the emulator)."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapter_contract.labels import Label, LabelSet
from adapter_contract.manifest import AdapterManifest, BaseModelRef
from adapter_contract.registry import Registry
from adapter_contract.storage import StorageError, open_storage


def _adapter(tmp_path: Path) -> tuple[Path, AdapterManifest]:
    folder = tmp_path / "adapter"
    (folder / "eval").mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights" * 1000)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "eval" / "report.json").write_text("{}")
    manifest = AdapterManifest(
        name="pets", version=1, base_model=BaseModelRef(id="tiny", config_sha256="abc"),
        labels=LabelSet(labels=[Label(id="pug", text="Pug")]), prompt_version="v", instruction="i",
        answer_terminator="<turn|>", data_fingerprint="f",
    )
    return folder, manifest


@pytest.fixture(params=["local", "gcs"])
def registry_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "registry")
    bucket = request.getfixturevalue("gcs_emulator")
    return f"{bucket}/registry-{tmp_path.name}"


def test_publish_versions_and_download_verifies(registry_uri: str, tmp_path: Path) -> None:
    folder, manifest = _adapter(tmp_path)
    registry = Registry(registry_uri)
    assert registry.publish(folder, manifest).version == 1
    assert registry.publish(folder, manifest).version == 2
    assert registry.resolve("pets") == ("pets", 2)
    assert registry.resolve("pets@1") == ("pets", 1)
    got = registry.download("pets", 2, tmp_path / "dl")
    assert (tmp_path / "dl" / "adapter_model.safetensors").read_bytes() == b"weights" * 1000
    assert got.files.keys() == {"adapter_model.safetensors", "adapter_config.json", "eval/report.json"}


def test_a_failed_publish_lists_nothing(registry_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, manifest = _adapter(tmp_path)
    registry = Registry(registry_uri)
    calls = {"n": 0}
    original = registry.storage.upload_file

    def flaky(local: Path, key: str) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("connection reset mid-upload")
        original(local, key)

    monkeypatch.setattr(registry.storage, "upload_file", flaky)
    with pytest.raises(OSError):
        registry.publish(folder, manifest)
    assert registry.index().adapters == {}


def test_corrupt_download_is_refused(registry_uri: str, tmp_path: Path) -> None:
    folder, manifest = _adapter(tmp_path)
    registry = Registry(registry_uri)
    registry.publish(folder, manifest)
    registry.storage.write_bytes("pets/1/adapter_model.safetensors", b"tampered")
    with pytest.raises(StorageError, match="missing or corrupt"):
        registry.download("pets", 1, tmp_path / "dl")
    assert not (tmp_path / "dl").exists()


def test_unknown_adapter_and_version(tmp_path: Path) -> None:
    registry = Registry(str(tmp_path / "r"))
    with pytest.raises(StorageError, match="not in the registry"):
        registry.resolve("pets")


def test_missing_bucket_is_a_clear_error(gcs_emulator: str) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        open_storage("gs://no-such-bucket-petbreed/x")
