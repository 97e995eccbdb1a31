"""How a photo becomes model input, identically in training, evaluation and serving: EXIF
orientation applied, RGB, and decoded at a reduced size when it is far larger than the model looks.

Gemma 4's image processor resizes every image to fit its soft-token budget (about 800 px on a
side at the default 280 tokens), so a 12-megapixel phone photo is mostly pixels it averages
away, after paying to decode and resize all of them on one CPU thread. Decoding a JPEG at a
reduced DCT scale, or box-reducing other formats by an integer factor, skips that work.
"""

from __future__ import annotations

import math
from typing import Annotated

from PIL import Image, ImageOps
from pydantic import AfterValidator

# Gemma 4's image token budgets (its processor's `max_soft_tokens`): an image becomes up to this many
# soft tokens, resized to fill budget x 9 patches. Fewer is faster to train and serve, and may cost
# accuracy: an adapter is served with the budget it was trained with (its manifest says which).
SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)


def _known_budget(value: int) -> int:
    if value not in SOFT_TOKEN_BUDGETS:
        raise ValueError(f"must be one of {', '.join(map(str, SOFT_TOKEN_BUDGETS))}, not {value}")
    return value


SoftTokens = Annotated[int, AfterValidator(_known_budget)]

# Twice what the default 280-token budget uses, and about what the largest (1120) uses.
MAX_SIDE = 1600


def to_model_input(image: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    """An opened, not yet loaded image -> RGB, upright, longest side under 2 x max_side."""
    width, height = image.size
    scale = max_side / max(width, height)
    if scale < 1:
        # JPEG only (a no-op for other formats): the smallest DCT scale that keeps both sides at
        # least this large, so the long side stays >= max_side.
        image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
    image.load()
    rgb = ImageOps.exif_transpose(image).convert("RGB")
    factor = max(rgb.size) // max_side
    return rgb.reduce(factor) if factor > 1 else rgb
