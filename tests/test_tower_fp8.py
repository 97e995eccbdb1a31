"""The vision tower's fp8 linears (serve/tower_fp8.py) on transformers' tiny Gemma 4: they multiply
the fp8-rounded values that bench/bench_fp8_accuracy.py emulates, keep the names weight loading
uses, and follow a weight reload in their own buffers. The served counterpart, through vLLM, is
in tests/test_serve_api.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from bench.bench_fp8_accuracy import fp8_rounded
from finetune.model import load_base
from serve.tower_fp8 import Fp8Linear, to_fp8


@pytest.fixture
def tower(tiny_model: Path) -> Any:
    return load_base(str(tiny_model), torch.device("cpu")).model.vision_tower


def test_every_encoder_linear_multiplies_in_fp8_under_the_names_weight_loading_uses(tower: Any) -> None:
    names = [name for name, _ in tower.named_parameters()]
    linear = tower.encoder.layers[0].mlp.down_proj.linear
    x = torch.randn(5, 7, linear.in_features)
    unrounded = linear(x)
    assert to_fp8(tower) == 7 * len(tower.encoder.layers)  # q, k, v, o, gate, up, down
    assert [name for name, _ in tower.named_parameters()] == names
    assert not isinstance(tower.patch_embedder.input_proj, Fp8Linear)  # pixels are cast to its dtype
    expected = fp8_rounded(x) @ fp8_rounded(linear.weight).t()
    torch.testing.assert_close(linear(x), expected, rtol=1e-5, atol=1e-5)
    assert (linear(x) - unrounded).abs().max() > 1e-3  # the rounding shows: not the float product


def test_a_reloaded_weight_is_requantized_into_the_same_buffers(tower: Any) -> None:
    to_fp8(tower)
    linear = tower.encoder.layers[1].self_attn.q_proj.linear
    buffers = linear.weight_fp8.data_ptr(), linear.weight_scale.data_ptr()  # what CUDA graphs point at
    with torch.no_grad():
        linear.weight.copy_(torch.randn_like(linear.weight))  # as vLLM's in-place reload writes it
    to_fp8(tower)
    assert (linear.weight_fp8.data_ptr(), linear.weight_scale.data_ptr()) == buffers
    x = torch.randn(3, linear.in_features)
    torch.testing.assert_close(linear(x), fp8_rounded(x) @ fp8_rounded(linear.weight).t(), rtol=1e-5, atol=1e-5)
