"""Everything that decodes pixels: the format allow-list and sniffing, the pixel limit, EXIF orientation,
`inspect` (check that bytes decode completely) and `preprocess` (the model's input).

Pure functions of bytes; no model, no HTTP, no database. They raise the errors below, which server.py
maps to HTTP statuses. Thumbnails and annotated renders belong here too.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

# Formats we decode. Everything else (EPS needs Ghostscript, TIFF/PSD/PDF parsers are large attack
# surfaces) is refused before a decoder runs.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")
CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp", "BMP": "image/bmp"}
# 50 megapixels: a 48 MP phone photo fits, a 30000x30000 decompression bomb (900 MP, 2.7 GB as RGB) does not.
MAX_PIXELS = 50_000_000

# Magic numbers of formats people send that we refuse, so the error can name them.
_KNOWN_OTHER_FORMATS = (
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%!PS", "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"%PDF", "PDF"),
    (b"8BPS", "Photoshop (PSD)"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"<svg", "SVG"),
    (b"<?xml", "SVG/XML"),
)
_ISO_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"avif": "AVIF", b"avis": "AVIF"}

# EXIF orientation -> the transpose that shows the picture upright (as PIL.ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112


class ImageError(Exception):
    """Base of this module's errors; the message says what was wrong and what to do."""


class NotAnImage(ImageError):
    """The bytes are not a decodable image (random bytes, truncated or corrupt data)."""


class UnsupportedFormat(NotAnImage):
    """A real image, but in a format we do not decode."""


class TooManyPixels(ImageError):
    """The image is larger than the pixel limit once decoded (decompression bomb or simply too big)."""


@dataclass
class Decoded:
    """An image ready for the model, and what we learnt about it."""

    format: str  # Pillow's name: JPEG, PNG, ...
    content_type: str
    width: int  # as displayed, after EXIF orientation
    height: int
    pixels: np.ndarray  # [1, H, W, 3] uint8 at the model's input size


def _sniff_other_format(head: bytes) -> str | None:
    for magic, name in _KNOWN_OTHER_FORMATS:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp":
        return _ISO_BRANDS.get(head[8:12], "ISO media (HEIC/AVIF/MP4)")
    return None


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open (not decode) `data` as one of ALLOWED_FORMATS and check its pixel count."""
    if not data:
        raise NotAnImage("the image is empty (0 bytes); send a JPEG, PNG, GIF, WebP or BMP file")
    other = _sniff_other_format(data[:16].lstrip())
    if other:
        raise UnsupportedFormat(f"{other} images are not supported; convert it to JPEG, PNG, GIF, WebP or BMP")
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:  # Pillow's own guard, for headers far past any sane size
        raise _too_many(None, None, max_pixels) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise NotAnImage(
            "these bytes are not an image we can read; send a JPEG, PNG, GIF, WebP or BMP file"
        ) from e
    width, height = img.size
    if width < 1 or height < 1:
        raise NotAnImage(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise _too_many(width, height, max_pixels)
    return img


def _too_many(width: int | None, height: int | None, max_pixels: int) -> TooManyPixels:
    size = f"{width}x{height} ({width * height:,} pixels)" if width else "far larger than that"
    return TooManyPixels(f"the image is {size}; the limit is {max_pixels:,} pixels. Scale it down and send it again.")


def orientation_of(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block should not make a good photo unusable
        log.debug("ignoring unreadable EXIF data", exc_info=True)
        return 1
    return value if value in _ORIENTATION else 1


def inspect(data: bytes, max_pixels: int = MAX_PIXELS) -> Decoded:
    """Check that `data` decodes completely, without running a model; `pixels` is a tiny thumbnail.

    For images stored without detection: a truncated or corrupt file is refused all the same.
    """
    return preprocess(data, (8, 8), max_pixels)


def preprocess(data: bytes, size: tuple[int, int], max_pixels: int = MAX_PIXELS) -> Decoded:
    """Decode `data` and produce the model input: upright, RGB, plain resize to `size` (width, height)."""
    img = open_image(data, max_pixels)
    fmt = img.format or "?"
    orientation = orientation_of(img)
    swap = orientation in (5, 6, 7, 8)
    width, height = (img.height, img.width) if swap else img.size
    # The frame we resize to is the stored one; transposing the small result is cheaper than the big one.
    target = (size[1], size[0]) if swap else size
    try:
        if fmt == "JPEG":
            # Decode at 1/2, 1/4 or 1/8 scale in libjpeg when the target is that small: 6x faster.
            img.draft("RGB", target)
        img.seek(0)  # first frame of an animation
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
        img = img.resize(target, Image.Resampling.BILINEAR, reducing_gap=3.0)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise NotAnImage(f"the image data is truncated or corrupt ({e}); send the complete file") from e
    if orientation != 1:
        img = img.transpose(_ORIENTATION[orientation])
    pixels = np.asarray(img, dtype=np.uint8)[np.newaxis, ...]
    return Decoded(fmt, CONTENT_TYPES.get(fmt, "application/octet-stream"), width, height, pixels)
