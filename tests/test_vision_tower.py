"""The vision tower as the engine runs it (serve/vision_tower.py), on transformers' tiny Gemma 4:
after vLLM's start-up profile no batch of images may make torch compile it again, and the attention
setting changes no soft token where its kernel cannot run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from finetune.model import load_base, load_processor
from serve.vision_tower import (
    VLLM_FLASH,
    compile_for_one_and_several,
    compile_tower,
    encode_group,
    encode_images,
    use_vllm_flash_attention,
)


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """No compiled code from other tests, and none left for them."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def images(processor: Any, sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = processor.image_processor(images=[Image.new("RGB", size, (90, 60, 30)) for size in sizes],
                                      return_tensors="pt")
    return batch["pixel_values"], batch["image_position_ids"]


@pytest.mark.usefixtures("fresh_dynamo")
def test_after_the_start_up_call_no_batch_of_images_compiles_the_tower_again(tiny_model: Path) -> None:
    model = load_base(str(tiny_model), torch.device("cpu")).model
    model.model_dtype = torch.float32  # what vLLM's Gemma 4 has and transformers' lacks
    compile_tower(model.vision_tower)
    processor = load_processor(str(tiny_model))
    with torch.no_grad():
        pixels, positions = images(processor, [(64, 64)] * 3)  # the start-up profile's batch
        compile_for_one_and_several(model, pixels, positions)
        encode_images(model, pixels, positions, lambda p, q: encode_group(model, p, q))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for sizes in ([(64, 64)], [(64, 64)] * 2, [(96, 48)], [(96, 48)] * 5):  # other patch counts too
                pixels, positions = images(processor, sizes)
                assert encode_images(model, pixels, positions, lambda p, q: encode_group(model, p, q)) is not None


def test_vllms_flash_attention_falls_back_to_sdpa_where_it_cannot_run(tiny_model: Path) -> None:
    """`vision_attention=vllm` names petbreed's attention function in the tower's config, and on a
    CPU (no FlashAttention build) that function gives SDPA's soft tokens. The kernel itself is
    checked on a GPU against vLLM's padded tower (bench/bench_vision_tower.py --vllm-flash)."""
    model = load_base(str(tiny_model), torch.device("cpu")).model
    model.model_dtype = torch.float32
    pixels, positions = images(load_processor(str(tiny_model)), [(64, 64)] * 2)
    with torch.no_grad():
        expected = encode_images(model, pixels, positions, lambda p, q: encode_group(model, p, q))
        use_vllm_flash_attention(model.vision_tower)
        got = encode_images(model, pixels, positions, lambda p, q: encode_group(model, p, q))
    assert all(layer.self_attn.config._attn_implementation == VLLM_FLASH for layer in model.vision_tower.encoder.layers)
    assert expected is not None and got is not None
    torch.testing.assert_close(torch.stack(got), torch.stack(expected), rtol=0, atol=0)
