"""fp8 matrix multiplies for the vision tower's encoder layers (setting `vision_tower_fp8`).

vLLM's online fp8 quantization covers only the language model (serve/engine.py keeps the towers
out of it). At 280 soft tokens the tower runs 2,304 patches per image, about 0.7 TFLOP of its
linear layers per image beside the language model's 2.3 on ~300 tokens, so once the language
model is in fp8 the tower's bf16 multiplies are a large share of a saturated step's GPU time.

The same scheme as vLLM's `fp8_per_channel`: each output channel's weights scaled into e4m3's range
once, each token's activations scaled on every call, `torch._scaled_mm` accumulating in float32.
The bf16 weight stays where it was, under its own name, so vLLM's in-place weight reload (a merged
adapter's new version) still finds it; `refresh` then requantizes into the same buffers, which CUDA
graphs of the tower keep pointing at. Only the encoder layers' linears: the patch embedder's first
layer decides the dtype pixels are cast to.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def scaled_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x in fp8 with one float32 scale per row (last dimension), and those scales."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).to(FP8), scale


class Fp8Linear(nn.Linear):
    """An nn.Linear (no bias) that multiplies in fp8; made by `to_fp8` from a loaded one."""

    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor

    def refresh(self) -> None:
        """Requantize from `weight`, in place once the buffers exist. In inference mode, as vLLM's
        start-up profile (which makes them) runs: tensors made there can only change there."""
        with torch.inference_mode():
            quantized, scale = scaled_rows(self.weight)
            if hasattr(self, "weight_fp8"):
                self.weight_fp8.copy_(quantized)
                self.weight_scale.copy_(scale.t())
            else:
                # Not persistent: no checkpoint holds them, and weight loading must not look for them.
                self.register_buffer("weight_fp8", quantized, persistent=False)
                self.register_buffer("weight_scale", scale.t().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        quantized, scale = scaled_rows(rows)
        out = torch._scaled_mm(quantized, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale,
                               out_dtype=x.dtype)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def to_fp8(tower: Any) -> int:
    """Turns the encoder layers' linears into Fp8Linear (idempotent: already turned ones are
    refreshed) and returns how many there are."""
    linears = [m for layer in tower.encoder.layers for m in layer.modules() if isinstance(m, nn.Linear)]
    for linear in linears:
        if linear.bias is not None:
            raise ValueError("the vision tower's fp8 path takes linear layers without bias")
        linear.__class__ = Fp8Linear  # keeps the module's parameters and their names for weight loading
        linear.refresh()
    return len(linears)
