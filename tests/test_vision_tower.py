"""The compiled vision tower as the engine runs it (serve/vision_tower.py), on transformers' tiny
Gemma 4: after vLLM's start-up profile no batch of images may make torch compile it again."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from finetune.model import load_base, load_processor
from serve.vision_tower import compile_for_one_and_several, compile_tower, encode_group, encode_images


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
