"""The front-end's fix to transformers' image-token check (serve/processor_compat.py): same verdicts,
without walking the ids tensor element by element."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

import serve.engine  # noqa: F401  (applies the fix, as serving does)


class UnwalkableIds(torch.Tensor):
    """Ids that fail if iterated in Python: the slow way the fix removes."""

    def __iter__(self):  # type: ignore[override]
        raise AssertionError("the ids tensor was iterated element by element")


def check(ids: list[list[int]], text: list[str]) -> None:
    processor = SimpleNamespace(image_token="<img>", image_token_id=5)
    tensor = torch.tensor(ids).as_subclass(UnwalkableIds)
    method: Any = ProcessorMixin._check_special_mm_tokens  # on a stand-in with the two attributes it reads
    method(processor, text, BatchFeature({"input_ids": tensor}), ["image"])


def test_matching_image_token_counts_pass_without_walking_the_tensor() -> None:
    check([[1, 5, 5, 2], [5, 3, 3, 3]], ["a<img><img>b", "<img>c"])


def test_a_truncated_prompt_is_still_refused() -> None:
    with pytest.raises(ValueError, match="Mismatch in `image` token count"):
        check([[1, 5, 2, 2]], ["a<img><img>b"])
