"""Decoding uploaded images safely: bounded bytes, bounded pixels, a short list of formats.

The pixel count is read from the header and checked before any pixel data is decoded, so a small
file that would expand to gigabytes (a decompression bomb) is refused cheaply. Only the decoders
of the accepted formats are ever run on client bytes. The result is prepared exactly as training
prepares its images (`adapter_contract.image.to_model_input`): EXIF orientation applied, RGB,
and a very large photo decoded at a reduced size.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError

from adapter_contract.image import to_model_input

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")

# Common image formats we do not decode, recognised by their magic bytes so the client is told
# "unsupported format" (415) rather than "not an image" (400). Their decoders never run.
_OTHER_FORMATS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"II*\x00", "TIFF"), (0, b"MM\x00*", "TIFF"), (4, b"ftypheic", "HEIC"), (4, b"ftypheix", "HEIC"),
    (4, b"ftypmif1", "HEIF"), (4, b"ftypavif", "AVIF"), (0, b"\x00\x00\x01\x00", "ICO"), (0, b"8BPS", "PSD"),
    (0, b"%PDF", "PDF"), (0, b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (0, b"\xff\x4f\xff\x51", "JPEG 2000"),
    (0, b"qoif", "QOI"), (0, b"\x76\x2f\x31\x01", "OpenEXR"), (0, b"DDS ", "DDS"),
)


class ImageError(Exception):
    """A client image that cannot be used; `status` and `code` go into the JSON error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def decode_base64(text: str) -> bytes:
    """Strict base64 (a `data:image/...;base64,` prefix is allowed); errors are 400."""
    payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageError(400, "invalid_base64", f"image is not valid base64: {err}") from None
    if not data:
        raise ImageError(400, "invalid_image", "image is empty")
    return data


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes of an accepted format -> an RGB image, or ImageError (400/413/415)."""
    if not data:
        raise ImageError(400, "invalid_image", "image is empty")
    image = _open(data, max_pixels)
    try:
        with warnings.catch_warnings():
            # Our own pixel limit has been applied already; PIL's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.seek(0)  # GIF / animated WebP: the first frame only
            return to_model_input(image)
    except Exception as err:  # any decoder failure on client bytes is a bad image, never a 500
        raise ImageError(400, "invalid_image", f"image data is truncated or corrupt: {err}") from None
    finally:
        image.close()


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header only (PIL opens lazily) and check format and size."""
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as err:
        raise ImageError(413, "image_too_large", str(err)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        other = _other_format(data)
        if other:
            accepted = ", ".join(ACCEPTED_FORMATS)
            raise ImageError(415, "unsupported_format", f"{other} images are not accepted (use {accepted})") from None
        raise ImageError(
            400, "invalid_image", f"not a recognisable image (accepted: {', '.join(ACCEPTED_FORMATS)})"
        ) from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageError(
            413, "image_too_large", f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    if width < 1 or height < 1:
        image.close()
        raise ImageError(400, "invalid_image", f"image has no pixels ({width}x{height})")
    return image


def _other_format(data: bytes) -> str | None:
    for offset, magic, name in _OTHER_FORMATS:
        if data[offset : offset + len(magic)] == magic:
            return name
    head = data[:256].lstrip().lower()
    if head.startswith((b"<svg", b"<?xml")):
        return "SVG"
    return None
