"""Upload decoding (serve/images.py) on real files of every accepted and some refused formats.
The same cases also go through the running server in tests/test_serve_api.py."""

from __future__ import annotations

import base64
import io
import random

import pytest
from PIL import Image

from serve.images import ImageError, decode_base64, decode_image

LIMIT = 1_000_000


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def noise(size: tuple[int, int] = (64, 48), mode: str = "RGB") -> Image.Image:
    # Seeded random pixels: they do not compress, so a cut file really is truncated.
    return Image.frombytes("RGB", size, random.Random(0).randbytes(size[0] * size[1] * 3)).convert(mode)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
def test_accepted_formats_decode_to_rgb(fmt: str) -> None:
    out = decode_image(encode(noise(), fmt), LIMIT)
    assert out.mode == "RGB" and out.size == (64, 48)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1"])
def test_every_colour_mode_becomes_rgb(mode: str) -> None:
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    assert decode_image(encode(noise(mode=mode), fmt), LIMIT).mode == "RGB"


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = encode(noise((64, 48)), "JPEG", exif=exif.tobytes())
    assert decode_image(data, LIMIT).size == (48, 64)


def test_gif_first_frame_only() -> None:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(data, LIMIT).getpixel((5, 5)) == (255, 0, 0)


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = encode(Image.new("L", (2000, 2000)), "PNG")  # 4 Mpx in a few kilobytes
    assert len(bomb) < 20_000
    with pytest.raises(ImageError) as err:
        decode_image(bomb, LIMIT)
    assert (err.value.status, err.value.code) == (413, "image_too_large")


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"", 400, "invalid_image"),
        (b"hello, I am not an image", 400, "invalid_image"),
        (encode(noise((200, 200)), "PNG")[:2000], 400, "invalid_image"),  # truncated
        (encode(noise((200, 200)), "JPEG")[:1500], 400, "invalid_image"),  # truncated
        (encode(noise(), "TIFF"), 415, "unsupported_format"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", 415, "unsupported_format"),
        (encode(noise(), "ICO"), 415, "unsupported_format"),
    ],
    ids=["empty", "text", "truncated-png", "truncated-jpeg", "tiff", "svg", "ico"],
)
def test_bad_images_get_the_right_status(data: bytes, status: int, code: str) -> None:
    with pytest.raises(ImageError) as err:
        decode_image(data, LIMIT)
    assert (err.value.status, err.value.code) == (status, code)


def test_base64_is_strict_and_accepts_data_urls() -> None:
    png = encode(noise(), "PNG")
    assert decode_base64(base64.b64encode(png).decode()) == png
    assert decode_base64("data:image/png;base64," + base64.b64encode(png).decode()) == png
    for bad in ("!!!not base64", "abc", ""):
        with pytest.raises(ImageError) as err:
            decode_base64(bad)
        assert err.value.status == 400
