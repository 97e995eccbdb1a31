"""A fix to transformers' processors, applied in the serving front-end, where vLLM runs Gemma 4's
processor for every image.

After tokenising, `ProcessorMixin._check_special_mm_tokens` counts the image tokens in the ids to
catch truncated prompts. Before transformers 5.19 it counted with `list(ids).count(token_id)` on the
tensor vLLM asks for, comparing a few hundred one-element tensors in Python: about 3.5 ms an image,
the largest single cost of the front-end's one thread in a py-spy profile on an H200 (25 % of it at
concurrency 1, 32 % at 256; vLLM 0.24 needs transformers 5.14). Later versions count over
`ids.tolist()`; this does the same on the versions before, with the same result and error.
"""

from __future__ import annotations

from typing import Any


def patch_mm_token_check() -> None:
    from transformers.processing_utils import ProcessorMixin

    original = ProcessorMixin._check_special_mm_tokens
    if getattr(original, "_petbreed_patched", False):
        return

    def _check_special_mm_tokens(self: Any, text: list[str], text_inputs: Any, modalities: list[str]) -> None:
        ids = text_inputs["input_ids"]
        if hasattr(ids, "tolist"):
            text_inputs = {**text_inputs, "input_ids": ids.tolist()}
        original(self, text, text_inputs, modalities)

    _check_special_mm_tokens._petbreed_patched = True  # type: ignore[attr-defined]
    ProcessorMixin._check_special_mm_tokens = _check_special_mm_tokens  # type: ignore[method-assign]
