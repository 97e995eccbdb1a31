"""`adapter_contract.image.to_model_input`: how training, evaluation and serving prepare a photo.
Small images are untouched; very large ones come out at most 2 x MAX_SIDE on the long side,
upright, with their aspect ratio and content."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from adapter_contract.image import MAX_SIDE, to_model_input
from serve.images import decode_image


def photo(width: int, height: int) -> Image.Image:
    """Smooth, photo-like content, so a reduced decode can be compared with a full one."""
    rng = np.random.default_rng(0)
    coarse = Image.fromarray((rng.random((6, 8, 3)) * 255).astype("uint8"))
    return coarse.resize((width, height), Image.Resampling.BICUBIC)


def encoded(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def plain_decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return ImageOps.exif_transpose(img).convert("RGB")


def test_a_small_image_is_decoded_exactly_as_before() -> None:
    data = encoded(photo(448, 320), "JPEG", quality=90)
    with Image.open(io.BytesIO(data)) as img:
        out = to_model_input(img)
    assert np.array_equal(np.asarray(out), np.asarray(plain_decode(data)))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_phone_sized_photo_comes_out_smaller_with_its_aspect_and_content(fmt: str) -> None:
    data = encoded(photo(4032, 3024), fmt)
    with Image.open(io.BytesIO(data)) as img:
        out = to_model_input(img)
    assert MAX_SIDE <= out.width < 2 * MAX_SIDE
    assert abs(out.width / out.height - 4 / 3) < 0.01
    reference = plain_decode(data).resize(out.size, Image.Resampling.BOX)
    difference = np.abs(np.asarray(out, dtype=float) - np.asarray(reference, dtype=float))
    assert difference.mean() < 2.0  # out of 255: the same picture


def test_serving_decodes_a_large_rotated_upload_upright_and_reduced() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    data = encoded(photo(4032, 3024), "JPEG", exif=exif.tobytes())
    out = decode_image(data, max_pixels=40_000_000)
    assert out.mode == "RGB"
    assert out.height > out.width >= MAX_SIDE // 2
    assert out.height < 2 * MAX_SIDE
