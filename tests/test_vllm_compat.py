"""petbreed's changes to vLLM internals (serve/vllm_compat.py), on the installed vLLM itself.
The served answers with them in place are checked against transformers + PEFT in test_serve_api."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from serve.engine import set_vllm_environment
from serve.settings import ServeSettings, VllmSettings
from serve.vllm_compat import COMPILE_VISION_ENV, IMAGES_APART_ENV, PetbreedWorkerExtension


@pytest.fixture
def batched_field() -> Iterator[object]:
    from vllm.multimodal.inputs import MultiModalFieldConfig

    yield MultiModalFieldConfig.batched("image").field
    PetbreedWorkerExtension().petbreed_batch_images_on_cpu(True)  # the default


def test_by_default_vllm_stacks_a_steps_images(batched_field: object) -> None:
    pixels = [torch.rand(6, 4), torch.rand(6, 4)]
    assert torch.equal(batched_field._reduce_data(pixels, pin_memory=False), torch.stack(pixels))  # type: ignore[attr-defined]


def test_images_kept_apart_reach_the_model_uncopied_and_scalars_are_still_stacked(batched_field: object) -> None:
    PetbreedWorkerExtension().petbreed_batch_images_on_cpu(False)
    pixels = [torch.rand(6, 4), torch.rand(6, 4)]
    out = batched_field._reduce_data(pixels, pin_memory=False)  # type: ignore[attr-defined]
    assert isinstance(out, list) and all(a is b for a, b in zip(out, pixels, strict=True))
    counts = batched_field._reduce_data([torch.tensor(1), torch.tensor(2)], pin_memory=False)  # type: ignore[attr-defined]
    assert torch.equal(counts, torch.tensor([1, 2]))


@pytest.fixture
def engine_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variables `set_vllm_environment` writes, unset here and restored after the test."""
    for name in (IMAGES_APART_ENV, COMPILE_VISION_ENV, "TORCHINDUCTOR_CACHE_DIR", "VLLM_NO_USAGE_STATS",
                 "DO_NOT_TRACK", "VLLM_CPU_KVCACHE_SPACE", "VLLM_WORKER_MULTIPROC_METHOD"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("engine_environment")
@pytest.mark.parametrize(("stack", "apart"), [(True, "0"), (False, "1")])
def test_the_setting_reaches_the_engine_process_environment(stack: bool, apart: str) -> None:
    set_vllm_environment(ServeSettings(vllm=VllmSettings(stack_images_on_cpu=stack)))
    assert os.environ[IMAGES_APART_ENV] == apart


@pytest.mark.usefixtures("engine_environment")
def test_inductors_cache_goes_to_the_cache_folder_unless_the_operator_chose_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    settings = ServeSettings(cache_dir=tmp_path / "cache")
    ours = str(tmp_path / "cache" / "inductor")
    set_vllm_environment(settings)  # unset
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == ours
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing torch's compiler writes
    set_vllm_environment(settings)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == ours
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/mnt/warm")
    set_vllm_environment(settings)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/mnt/warm"
