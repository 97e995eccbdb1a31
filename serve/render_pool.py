"""vLLM's renderer (the image processor and the prompt's image placeholders) in worker processes.

vLLM renders a prompt with an image in the front-end process: the Hugging Face image processor,
then its own placeholder expansion, mostly Python. In threads (`renderer_workers`) that work holds
the front-end's interpreter lock against the event loop, which needs it for every request it
sends to the engine core: on an H200 at 256 requests at once over HTTP, no thread of the API
process was fully busy while the GPU idled between waves of work (docs/performance.md). In
processes it has locks of its own.

Each worker builds the renderer the engine built, from the engine's own VllmConfig, with
`renderer_from_config` and `render_cmpl`, which vLLM 0.24 and 0.32 share. So a prompt rendered
there is the one the engine's renderer makes (tests/test_serve_api.py compares the answers).
Images and tensors cross as raw bytes, not as torch's shared-memory handles: no file descriptors
held per tensor. A rendered image (2 MB of pixels at 280 soft tokens) comes back in a shared-memory
block of its own, not through the pool's pipe, where the pool's one manager thread read and
unpickled every image in turn: on an H200 over HTTP an image's wait for its render was then about
6x longer and the server served 0.91x the images/s (docs/performance.md, 2026-12-06, tenth
session).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import pickle
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context, shared_memory
from typing import Any, cast

import numpy as np
import torch
from PIL import Image

from serve.processor_compat import patch_mm_token_check

# Modes whose pixels an array holds completely (a palette image's would lose the palette).
_ARRAY_MODES = {"RGB", "RGBA", "L"}

_renderer: Any = None  # the worker process's vLLM renderer
_all_here: Any = None  # a barrier of every worker process (render_in_every_process)


class RenderPool:
    def __init__(self, vllm_config: Any, processes: int) -> None:
        self.processes = processes
        self.broken = False
        # Spawned, like vLLM's engine core: forking a process with threads (and maybe CUDA) is unsafe.
        context = get_context("spawn")
        self._pool = ProcessPoolExecutor(
            processes, mp_context=context, initializer=_start_worker, initargs=(vllm_config, context.Barrier(processes))
        )

    def warm_up(self) -> None:
        """Start every worker now (each loads the processor: seconds), not on a client's request."""
        for _ in self._pool.map(_ready, range(self.processes)):
            pass

    async def render_in_every_process(self, prompt: dict[str, Any]) -> set[int]:
        """Render `prompt` once in each process (its first image is the slow one: 13-16 s on the
        H200 machine); the process ids that did. A process that has rendered waits for the others,
        so none can take a second prompt while one has none."""
        loop, data = asyncio.get_running_loop(), dumps(prompt)
        rendered = [loop.run_in_executor(self._pool, _render_and_wait, data) for _ in range(self.processes)]
        return set(await asyncio.gather(*rendered))

    async def render(self, prompt: dict[str, Any]) -> dict[str, Any]:
        """`prompt` as vLLM's `render_cmpl` takes it, rendered for `AsyncLLM.generate`."""
        future = self._pool.submit(_render, dumps(prompt))
        try:
            returned = await asyncio.wrap_future(future)
        except BrokenProcessPool:
            self.broken = True  # a worker died: nothing more renders, the server must restart
            raise
        except asyncio.CancelledError:
            future.add_done_callback(_free_unread)  # a render already running still fills a block
            raise
        # bytes where /dev/shm had no room (`to_shared_memory`), else the block's name and size
        return pickle.loads(returned) if isinstance(returned, bytes) else from_shared_memory(*returned)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _start_worker(vllm_config: Any, all_here: Any) -> None:
    global _renderer, _all_here
    patch_mm_token_check()
    from vllm.renderers import renderer_from_config

    _renderer, _all_here = renderer_from_config(vllm_config), all_here


def _ready(_: int) -> bool:
    return _renderer is not None


def _render_and_wait(prompt: bytes) -> int:
    _rendered(prompt)
    _all_here.wait(timeout=600)
    return os.getpid()


def _render(prompt: bytes) -> tuple[str, int] | bytes:
    return to_shared_memory(_rendered(prompt))


def _rendered(prompt: bytes) -> bytes:
    (rendered,) = _renderer.render_cmpl([pickle.loads(prompt)])
    return dumps(dict(rendered))


def to_shared_memory(data: bytes) -> tuple[str, int] | bytes:
    """`data` in a new shared-memory block: its name and size. The reader unlinks it
    (`from_shared_memory`). Registered with multiprocessing's resource tracker, which the pool's
    processes share with the API process: a block nobody reads is unlinked when the server exits.
    Where /dev/shm has no room (Docker gives a container 64 MB unless told otherwise), `data`
    itself, to cross through the pool's pipe."""
    block = shared_memory.SharedMemory(create=True, size=len(data))
    try:
        _reserve(block.name, len(data))
    except OSError:
        block.close()
        block.unlink()
        return data
    cast(memoryview, block.buf)[: len(data)] = data  # buf is None only once closed
    block.close()
    return block.name, len(data)


def _reserve(name: str, size: int) -> None:
    """Writing into a full /dev/shm through a memory map kills the writer (SIGBUS, a broken pool);
    reserving the room first fails with an OSError instead. Linux keeps POSIX shared memory in
    /dev/shm, and vLLM runs on Linux only."""
    fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def from_shared_memory(name: str, size: int) -> Any:
    """What `to_shared_memory` wrote, unpickled into memory of its own; the block is gone after."""
    block = shared_memory.SharedMemory(name=name)
    try:
        with cast(memoryview, block.buf)[:size] as data:
            return pickle.loads(data)
    finally:
        block.close()
        block.unlink()


def _free_unread(future: Future[tuple[str, int] | bytes]) -> None:
    result = None if future.cancelled() or future.exception() else future.result()
    if isinstance(result, tuple):
        with contextlib.suppress(FileNotFoundError):
            block = shared_memory.SharedMemory(name=result[0])
            block.close()
            block.unlink()


def dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


class _Pickler(pickle.Pickler):
    """Tensors and images as one flat byte array each (torch's own pickling of a 2 MB tensor goes
    through torch.save: about 5x slower on this machine; PIL's converts through bytes twice)."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            tensor = obj.detach().contiguous()
            return _tensor, (tensor.reshape(-1).view(torch.uint8).numpy(), tensor.dtype, tuple(tensor.shape))
        if isinstance(obj, Image.Image) and obj.mode in _ARRAY_MODES:
            return Image.fromarray, (np.asarray(obj),)
        return NotImplemented


def _tensor(data: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(data).view(dtype).reshape(shape)
