"""The render processes' plumbing (serve/render_pool.py). That prompts rendered there give the
served answers transformers + PEFT give is checked in test_serve_api (the GPU defaults' parity test)."""

from __future__ import annotations

import asyncio
import errno
import os
import pickle
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from serve import engine
from serve.engine import engine_args, render_processes
from serve.render_pool import RenderPool, dumps, from_shared_memory, to_shared_memory
from serve.settings import ServeSettings, VllmSettings


def test_tensors_and_images_cross_unchanged() -> None:
    pixels = torch.randint(0, 255, (6, 8), dtype=torch.uint8)
    rendered: dict[str, Any] = {
        "prompt_token_ids": [2, 7, 9],
        "pixels": pixels,
        "strided": torch.arange(12.0).reshape(3, 4).T,  # not contiguous
        "bf16": torch.rand(5, 3).to(torch.bfloat16),
        "scalar": torch.tensor(3, dtype=torch.int64),
        "positions": [torch.zeros(0, 2, dtype=torch.int64)],
    }
    back = pickle.loads(dumps(rendered))
    assert back["prompt_token_ids"] == [2, 7, 9]
    for key in ("pixels", "strided", "bf16", "scalar"):
        assert back[key].dtype == rendered[key].dtype and torch.equal(back[key], rendered[key]), key
    assert back["positions"][0].shape == (0, 2)
    back["pixels"][0, 0] += 1  # the receiver owns its copy
    assert not torch.equal(back["pixels"], pixels)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16"])
def test_images_of_every_mode_cross_unchanged(mode: str) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (7, 5, 3), dtype=np.uint8)).convert(mode)
    back = pickle.loads(dumps(image))
    assert back.mode == image.mode and back.size == image.size
    assert back.tobytes() == image.tobytes() and back.getpalette() == image.getpalette()


def test_render_processes_are_on_with_cuda_off_on_cpu_and_the_operators_choice_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert render_processes(ServeSettings()) == 0  # the CPU build: the model needs the cores
    monkeypatch.setattr(engine, "_has_cuda", lambda: True)
    assert render_processes(ServeSettings()) == 4
    assert render_processes(ServeSettings(vllm=VllmSettings(render_processes=0))) == 0
    assert render_processes(ServeSettings(vllm=VllmSettings(render_processes=2))) == 2


def _prompt() -> dict[str, Any]:
    """A prompt with an image never seen before, as the engine hands it to `RenderPool.render`."""
    return {"prompt_token_ids": [2, 7, 9], "multi_modal_data": {"image": Image.new("RGB", (64, 64))},
            "multi_modal_uuids": {"image": [uuid.uuid4().hex]}}


def test_every_process_renders_a_first_image_even_one_that_starts_late(tiny_model: Path) -> None:
    """No `warm_up()` first: the processes start while the prompts wait, and whichever is ready
    first would otherwise render them all (a process's first image is the slow one)."""
    pool = RenderPool(engine_args(ServeSettings(), str(tiny_model)).create_engine_config(), 2)
    try:
        assert len(asyncio.run(pool.render_in_every_process(_prompt()))) == 2
    finally:
        pool.shutdown()


def _shared_blocks() -> set[str]:
    return set(os.listdir("/dev/shm"))


def test_a_block_is_read_once_into_memory_of_its_own_and_is_gone_after() -> None:
    pixels = torch.randint(0, 255, (2520, 768), dtype=torch.uint8)
    before = _shared_blocks()
    block = to_shared_memory(dumps({"pixels": pixels}))
    assert isinstance(block, tuple)  # /dev/shm had room
    name, size = block
    assert _shared_blocks() - before == {name}
    back = from_shared_memory(name, size)
    assert torch.equal(back["pixels"], pixels) and _shared_blocks() == before
    with pytest.raises(FileNotFoundError):
        from_shared_memory(name, size)


def test_without_room_in_dev_shm_the_data_itself_comes_back_for_the_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full /dev/shm (Docker's default 64 MB) cannot be made here: the reservation that would find
    it full is made to fail as it would (ENOSPC), instead of the write that would kill the process."""

    def no_room(fd: int, offset: int, size: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    data = dumps({"pixels": torch.zeros(2520, 768, dtype=torch.uint8)})
    before = _shared_blocks()
    assert to_shared_memory(data) is data
    assert _shared_blocks() == before


def test_renders_leave_no_shared_memory_behind_even_when_the_caller_gives_up(tiny_model: Path) -> None:
    """A client that disconnects cancels its render while a process is already rendering it: the
    block that process fills is freed when it arrives, not left in /dev/shm."""
    pool = RenderPool(engine_args(ServeSettings(), str(tiny_model)).create_engine_config(), 1)
    pool.warm_up()

    async def give_up_on_one_then_render_one() -> dict[str, Any]:
        abandoned = asyncio.create_task(pool.render(_prompt()))
        await asyncio.sleep(0.05)  # submitted, and running in the one process
        abandoned.cancel()
        return await pool.render(_prompt())  # the one process finishes the abandoned render first

    before = _shared_blocks()
    try:
        rendered = asyncio.run(give_up_on_one_then_render_one())
    finally:
        pool.shutdown()
    assert {"prompt_token_ids", "mm_kwargs", "mm_hashes"} <= set(rendered)  # vLLM's rendered multimodal prompt
    assert _shared_blocks() == before
