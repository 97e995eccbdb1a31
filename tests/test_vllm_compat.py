"""petbreed's changes to vLLM internals (serve/vllm_compat.py), on the installed vLLM itself.
The served answers with them in place are checked against transformers + PEFT in test_serve_api."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

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


@pytest.mark.parametrize(("stack", "apart"), [(True, "0"), (False, "1")])
def test_the_setting_reaches_the_engine_process_environment(
    monkeypatch: pytest.MonkeyPatch, stack: bool, apart: str
) -> None:
    for name in (IMAGES_APART_ENV, COMPILE_VISION_ENV):  # restored after the test
        monkeypatch.setenv(name, "unset")
    set_vllm_environment(ServeSettings(vllm=VllmSettings(stack_images_on_cpu=stack)))
    assert os.environ[IMAGES_APART_ENV] == apart


def test_a_steps_images_go_through_the_tower_and_pooler_once_with_vllms_embeddings(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three images of different shapes (so different valid soft-token counts) through vLLM's Gemma 4
    image method, petbreed's way and vLLM's own, on the tiny model's transformers modules."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor, Gemma4ForConditionalGeneration
    from vllm.model_executor.models.gemma4_mm import Gemma4ForConditionalGeneration as VllmGemma4

    hf = Gemma4ForConditionalGeneration.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((64, 40 + 12 * i, 3)) * 255).astype("uint8")) for i in range(3)]
    inputs = AutoProcessor.from_pretrained(str(tiny_model)).image_processor(images=images, return_tensors="pt")
    image_input = {"pixel_values": inputs["pixel_values"], "pixel_position_ids": inputs["image_position_ids"]}
    model = SimpleNamespace(vision_tower=hf.model.vision_tower, config=hf.config, model_dtype=torch.float32,
                            embed_vision=hf.model.embed_vision, _enable_mm_lora=False,
                            _encoder_chunk=VllmGemma4._encoder_chunk)
    # vLLM's own way reads the accelerator's free memory, which a CPU-only machine has none of. Free
    # memory for one image by vLLM's estimate, as on an H200 whose memory the KV cache holds.
    one_image = inputs["pixel_values"].shape[1] * 4 * 8 * hf.config.vision_config.position_embedding_size
    free_and_total = (2 * one_image, 100 * one_image)
    monkeypatch.setattr(torch.accelerator, "get_memory_info", lambda *_: free_and_total, raising=False)
    calls = {"encoder": 0, "pooler": 0}
    for part in calls:
        getattr(hf.model.vision_tower, part).register_forward_hook(
            lambda *_, part=part: calls.__setitem__(part, calls[part] + 1)
        )

    process: Any = VllmGemma4._process_image_input  # called on the tiny model's modules

    def encode(vllms_way: bool) -> tuple[list[torch.Tensor], dict[str, int]]:
        calls.update(encoder=0, pooler=0)
        PetbreedWorkerExtension().petbreed_use_vllm_image_path(vllms_way)
        try:
            with torch.inference_mode():
                return process(model, image_input), dict(calls)
        finally:
            PetbreedWorkerExtension().petbreed_use_vllm_image_path(False)

    ours, our_calls = encode(vllms_way=False)
    theirs, their_calls = encode(vllms_way=True)
    assert our_calls == {"encoder": 1, "pooler": 1} and their_calls == {"encoder": 3, "pooler": 3}
    assert len({len(t) for t in theirs}) > 1, "the images should keep different numbers of soft tokens"
    assert [t.shape for t in ours] == [t.shape for t in theirs]
    for mine, vllms in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, vllms, rtol=1e-5, atol=1e-5)
