"""petbreed's changes to vLLM internals (serve/vllm_compat.py), on the installed vLLM itself.
The served answers with them in place are checked against transformers + PEFT in test_serve_api."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def batched_field() -> Iterator[object]:
    from vllm.multimodal.inputs import MultiModalFieldConfig

    import serve.vllm_compat as compat

    yield MultiModalFieldConfig.batched("image").field
    compat.PetbreedWorkerExtension().petbreed_batch_images_on_cpu(False)


def test_a_steps_images_reach_the_model_uncopied_and_scalars_still_stacked(batched_field: object) -> None:
    pixels = [torch.rand(6, 4), torch.rand(6, 4)]
    out = batched_field._reduce_data(pixels, pin_memory=False)  # type: ignore[attr-defined]
    assert isinstance(out, list) and all(a is b for a, b in zip(out, pixels, strict=True))
    counts = batched_field._reduce_data([torch.tensor(1), torch.tensor(2)], pin_memory=False)  # type: ignore[attr-defined]
    assert torch.equal(counts, torch.tensor([1, 2]))


def test_vllms_own_stacking_can_be_switched_back_on(batched_field: object) -> None:
    from serve.vllm_compat import PetbreedWorkerExtension

    pixels = [torch.rand(6, 4), torch.rand(6, 4)]
    PetbreedWorkerExtension().petbreed_batch_images_on_cpu(True)
    assert torch.equal(batched_field._reduce_data(pixels, pin_memory=False), torch.stack(pixels))  # type: ignore[attr-defined]
