"""petbreed's changes to vLLM internals (serve/vllm_compat.py), on the installed vLLM itself.
The served answers with them in place are checked against transformers + PEFT in test_serve_api."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from serve import engine, vllm_compat
from serve.engine import raw_pixel_scale, set_vllm_environment
from serve.settings import TUNED_LORA_KERNELS, ServeSettings, VllmSettings
from serve.vllm_compat import (
    ATTENTION_ENV,
    COMPILE_VISION_ENV,
    IMAGES_APART_ENV,
    PIXEL_SCALE_ENV,
    PetbreedWorkerExtension,
    model_pixels,
)


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
def engine_environment() -> Iterator[None]:
    """The variables `set_vllm_environment` writes, unset for the test; the whole environment put
    back after it. (Not through monkeypatch, whose undo puts back what the code under test set.)"""
    saved = dict(os.environ)
    for name in (IMAGES_APART_ENV, COMPILE_VISION_ENV, PIXEL_SCALE_ENV, ATTENTION_ENV, "TORCHINDUCTOR_CACHE_DIR",
                 "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK", "VLLM_CPU_KVCACHE_SPACE", "VLLM_WORKER_MULTIPROC_METHOD",
                 "OMP_NUM_THREADS", "VLLM_TUNED_CONFIG_FOLDER", "TRITON_CACHE_DIR", "VLLM_CACHE_ROOT"):
        os.environ.pop(name, None)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.usefixtures("engine_environment")
@pytest.mark.parametrize(("stack", "apart"), [(True, "0"), (False, "1")])
def test_the_setting_reaches_the_engine_process_environment(stack: bool, apart: str) -> None:
    set_vllm_environment(ServeSettings(vllm=VllmSettings(stack_images_on_cpu=stack)))
    assert os.environ[IMAGES_APART_ENV] == apart


@pytest.mark.usefixtures("engine_environment")
@pytest.mark.parametrize("attention", ["flash", "cudnn"])
def test_the_towers_attention_choice_reaches_the_engine_process_environment(attention: str) -> None:
    set_vllm_environment(ServeSettings(merged_adapter="pets", vllm=VllmSettings(vision_attention=attention)))
    assert os.environ[ATTENTION_ENV] == attention


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


@pytest.mark.usefixtures("engine_environment")
@pytest.mark.parametrize(("variable", "folder"), [("TRITON_CACHE_DIR", "triton"), ("VLLM_CACHE_ROOT", "vllm")])
def test_tritons_and_vllms_caches_go_to_the_cache_folder_unless_the_operator_chose_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str, folder: str
) -> None:
    set_vllm_environment(ServeSettings(cache_dir=tmp_path / "cache"))
    assert os.environ[variable] == str(tmp_path / "cache" / folder)
    monkeypatch.setenv(variable, "/mnt/warm")
    set_vllm_environment(ServeSettings(cache_dir=tmp_path / "cache"))
    assert os.environ[variable] == "/mnt/warm"


@pytest.mark.usefixtures("engine_environment")
def test_lora_kernel_configs_reach_vllm_only_when_chosen_and_the_operators_variable_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    set_vllm_environment(ServeSettings())
    assert "VLLM_TUNED_CONFIG_FOLDER" not in os.environ  # vLLM's defaults
    tuned = ServeSettings(vllm=VllmSettings(lora_kernel_configs=TUNED_LORA_KERNELS))
    set_vllm_environment(tuned)
    assert os.environ["VLLM_TUNED_CONFIG_FOLDER"] == str(TUNED_LORA_KERNELS)
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(tmp_path))
    set_vllm_environment(tuned)
    assert os.environ["VLLM_TUNED_CONFIG_FOLDER"] == str(tmp_path)


@pytest.fixture
def on_an_h200(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """vLLM's LoRA config lookup as on an H200, with the shipped files; no other test sees them."""
    from vllm.lora.ops.triton_ops import utils

    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(TUNED_LORA_KERNELS))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H200")
    caches = (utils.load_lora_op_config, utils.get_lora_op_configs)
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()


def looked_up(op: str, tokens: int, in_out: tuple[int, int], slices: int) -> dict[str, Any]:
    """The config vLLM's `op` uses for a projection of `in_out` features at `tokens` tokens, looked
    up as the ops do (max_loras 4 keeps 5 slots)."""
    from vllm.lora.ops.triton_ops import utils

    k, n = in_out
    hidden, rank = (n, k) if op == "expand" else (k, n)
    return utils.get_lora_op_configs(op, 5, tokens, hidden, rank, slices, True if op == "expand" else None)


GATE_UP_SATURATED = ("expand", 14104, (16, 10240), 2)


@pytest.mark.usefixtures("on_an_h200")
@pytest.mark.parametrize(("projection", "tuned"), [
    (GATE_UP_SATURATED, dict(block_m=64, block_n=128, block_k=16)),
    (("shrink", 14104, (2560, 16), 3), dict(block_m=128, block_k=128, split_k=1)),  # q, k, v
    (("shrink", 300, (10240, 16), 1), dict(block_m=64, block_k=256, split_k=8)),  # down, one image
])
def test_vllm_finds_the_h200_lora_kernels_for_gemma_4_e4b(
    projection: tuple[str, int, tuple[int, int], int], tuned: dict[str, int]
) -> None:
    """The shipped files are in vLLM's own format and key order, so an H200 runs the tuned
    configurations, not vLLM's defaults."""
    assert tuned.items() <= looked_up(*projection).items()


@pytest.mark.usefixtures("on_an_h200")
def test_a_running_engine_switches_between_the_tuned_and_vllms_lora_kernels() -> None:
    """What `bench_serve_gpu.py --ab lora_kernels` relies on: the worker method reaches past vLLM's
    caches, which its engine core fills once it has started."""
    from vllm import envs

    tuned = looked_up(*GATE_UP_SATURATED)
    worker = PetbreedWorkerExtension()
    envs.enable_envs_cache()
    try:
        worker.petbreed_lora_kernel_configs(None)
        default = looked_up(*GATE_UP_SATURATED)
        worker.petbreed_lora_kernel_configs(str(TUNED_LORA_KERNELS))
        again = looked_up(*GATE_UP_SATURATED)
    finally:
        envs.disable_envs_cache()
    assert default != tuned and default["block_n"] != 128
    assert again == tuned


@pytest.fixture
def torch_threads() -> Iterator[int]:
    """This process's torch threads, restored after the test."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


@pytest.mark.usefixtures("engine_environment")
def test_cpu_threads_are_limited_with_cuda_left_alone_on_cpu_and_the_operators_choice_wins(
    monkeypatch: pytest.MonkeyPatch, torch_threads: int
) -> None:
    set_vllm_environment(ServeSettings())  # no CUDA here: vLLM's CPU build runs the model on these threads
    assert "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() == torch_threads
    with monkeypatch.context() as gpu:
        gpu.setattr(engine, "_has_cuda", lambda: True)
        set_vllm_environment(ServeSettings())
    assert os.environ["OMP_NUM_THREADS"] == "1" and torch.get_num_threads() == 1  # the engine core's, and ours
    monkeypatch.delenv("OMP_NUM_THREADS")
    set_vllm_environment(ServeSettings(vllm=VllmSettings(cpu_threads=2)))
    assert os.environ["OMP_NUM_THREADS"] == "2" and torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    set_vllm_environment(ServeSettings(vllm=VllmSettings(cpu_threads=1)))
    assert os.environ["OMP_NUM_THREADS"] == "3" and torch.get_num_threads() == 2


@pytest.fixture
def processor(tiny_model: Path) -> object:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_model))


def test_8_bit_pixels_become_exactly_what_the_image_processor_sends(
    processor: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workers' rescaling of unscaled images gives the tower the same bits as vLLM's cast of the
    processor's float output, images of several shapes kept apart or stacked."""
    import numpy as np
    from PIL import Image

    scale = raw_pixel_scale(ServeSettings(), processor)
    assert scale is not None
    monkeypatch.setattr(vllm_compat, "_pixel_scale", scale)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((37, 53), (64, 64))]
    image_processor = processor.image_processor  # type: ignore[attr-defined]
    sent = [image_processor(images=[im], return_tensors="pt")["pixel_values"][0].to(torch.bfloat16) for im in images]
    raw = [image_processor(images=[im], return_tensors="pt", do_rescale=False)["pixel_values"][0] for im in images]

    assert all(r.dtype == torch.uint8 for r in raw)
    for got, want in zip(model_pixels(raw, torch.bfloat16), sent, strict=True):
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert torch.equal(model_pixels(raw[1][None], torch.bfloat16), sent[1][None])
    assert model_pixels(sent[0], torch.bfloat16) is sent[0]  # the processor's floats pass as they are


def test_8_bit_pixels_without_a_scale_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_compat, "_pixel_scale", 0.0)
    with pytest.raises(ValueError, match=PIXEL_SCALE_ENV):
        model_pixels(torch.zeros(1, 4, 3, dtype=torch.uint8), torch.bfloat16)


def test_images_travel_unscaled_only_where_the_workers_can_redo_the_processor(
    processor: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    image_processor = processor.image_processor  # type: ignore[attr-defined]
    assert raw_pixel_scale(ServeSettings(), processor) == image_processor.rescale_factor
    assert raw_pixel_scale(ServeSettings(vllm=VllmSettings(uint8_pixels=False)), processor) is None
    with monkeypatch.context() as patched:
        patched.setattr(vllm_compat, "_gemma4_class", lambda: None)  # a vLLM without Gemma 4's image code
        assert raw_pixel_scale(ServeSettings(), processor) is None
    image_processor.do_normalize = True  # a processor that also normalises: its floats travel
    assert raw_pixel_scale(ServeSettings(), processor) is None


@pytest.mark.usefixtures("engine_environment")
def test_the_pixel_scale_reaches_the_engine_process_environment() -> None:
    set_vllm_environment(ServeSettings(), 1 / 255)
    assert float(os.environ[PIXEL_SCALE_ENV]) == 1 / 255
    set_vllm_environment(ServeSettings(), None)
    assert float(os.environ[PIXEL_SCALE_ENV]) == 0.0


def _fast_prefill_step(query_lens: list[int], graph_pad: int) -> Any:
    """vLLM's metadata of a step that answers each request's last position, as its model runner
    arms it for fast prefill (logit positions padded to a CUDA graph's size)."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    answered = (starts[1:] - 1).long()
    reqs, tokens = len(query_lens), int(starts[-1])
    return CommonAttentionMetadata(
        query_start_loc=starts, query_start_loc_cpu=starts.clone(), seq_lens=torch.tensor(query_lens) + 7,
        num_reqs=reqs, num_actual_tokens=tokens, max_query_len=max(query_lens), max_seq_len=max(query_lens) + 7,
        block_table_tensor=torch.zeros(reqs, 4, dtype=torch.int32), slot_mapping=torch.arange(tokens),
        logits_indices_padded=torch.cat([answered, answered[-1:].repeat(graph_pad)]), num_logits_indices=reqs,
        max_logits_per_req=1)


def test_fast_prefill_metadata_without_host_syncs_is_vllms_own() -> None:
    """petbreed's stand-in for vLLM 0.24's syncing fast-prefill metadata gives what vLLM 0.32's own
    (sync-free) code gives for petbreed's steps: each request's query is its one answered position."""
    from vllm.v1.attention.backends.utils import make_kv_sharing_fast_prefill_common_attn_metadata

    step = _fast_prefill_step([300, 1, 17, 300], graph_pad=3)
    ours, vllms = vllm_compat.one_position_per_request(step), make_kv_sharing_fast_prefill_common_attn_metadata(step)
    assert ours.query_start_loc.tolist() == vllms.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert ours.query_start_loc_cpu.tolist() == vllms.query_start_loc_cpu.tolist()
    assert (ours.num_reqs, ours.num_actual_tokens, ours.max_query_len) == (
        vllms.num_reqs, vllms.num_actual_tokens, vllms.max_query_len) == (4, 4, 1)
    for name in ("seq_lens", "block_table_tensor", "slot_mapping", "max_seq_len"):
        assert getattr(ours, name) is getattr(vllms, name)


def test_a_vllm_whose_fast_prefill_waits_for_nothing_keeps_its_own_code() -> None:
    from vllm.v1.attention.backends import utils

    assert not getattr(utils.make_kv_sharing_fast_prefill_common_attn_metadata, "_petbreed_patched", False)
