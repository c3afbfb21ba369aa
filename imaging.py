"""Everything that decodes pixels: the format allow-list and sniffing, the pixel limit, EXIF orientation,
the decode memory budget, `inspect` (check that bytes decode completely) and `preprocess` (the model's input).

Functions of bytes; no model, no HTTP, no database. Decoding memory is bounded by a `DecodeBudget`
shared by every decode of the process: a decode reserves what it will need, estimated from the header,
before it starts. They raise the errors below, which server.py maps to HTTP statuses. Thumbnails and
annotated renders belong here too.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import heapq
import io
import itertools
import logging
import math
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, JpegImagePlugin, PngImagePlugin, UnidentifiedImageError

log = logging.getLogger(__name__)

# Formats we decode. Everything else (EPS needs Ghostscript, TIFF/PSD/PDF parsers are large attack
# surfaces) is refused before a decoder runs. Pillow names a JPEG with a multi-picture index (what many
# cameras write) MPO; it is a JPEG all the same.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")
CONTENT_TYPES = {
    "JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp",
    "BMP": "image/bmp",
}
# 50 megapixels: a 48 MP phone photo fits, a 30000x30000 decompression bomb (900 MP, 2.7 GB as RGB) does not.
MAX_PIXELS = 50_000_000
MB = 1024 * 1024
# Memory all decodes together may hold, and how long one waits for room (DECODE_MEMORY_MB, DECODE_WAIT_MS).
DECODE_MEMORY = 256 * MB
DECODE_WAIT = 2.0

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


class TooLargeToDecode(ImageError):
    """Decoding the image would need more memory than the whole decode budget (DECODE_MEMORY_MB)."""


class DecodeBusy(ImageError):
    """Other decodes hold the budget and no room came within the wait; `retry_after` is in seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Decoded:
    """An image ready for the model, and what we learnt about it."""

    format: str  # Pillow's name: JPEG, MPO, PNG, ...
    content_type: str
    width: int  # as displayed, after EXIF orientation
    height: int
    pixels: np.ndarray | None  # [1, H, W, 3] uint8 at the model's input size; None from inspect()
    orientation: int = 1  # the EXIF orientation applied (1: none); maps boxes back to the grid as sent


# ---------------------------------------------------------------------------------------------------------
# The decode budget
# ---------------------------------------------------------------------------------------------------------


def _mb(n: int) -> str:
    return f"{n / MB:,.0f}" if n >= 10 * MB else f"{n / MB:,.1f}"


class DecodeBudget:
    """Memory that decodes may hold at once, shared by every decode of the process (DECODE_MEMORY_MB).

    A decode reserves what it will need before it starts, `with budget.reserve(n): ...`, and gives it back
    when it ends. While there is no room it waits, up to `wait_s` (DECODE_WAIT_MS); the smallest waiting
    reservation is served first (ties in arrival order), so ordinary photos are not held up behind
    decompression bombs, which are the largest images there are. One budget per process:
    server.build_parts makes it and hands it to the Detector and to Ingest.
    """

    def __init__(self, limit_bytes: int = DECODE_MEMORY, wait_s: float = DECODE_WAIT):
        if limit_bytes < 1 or wait_s < 0:
            raise ValueError("a DecodeBudget needs limit_bytes >= 1 and wait_s >= 0")
        self.limit = limit_bytes
        self.wait_s = wait_s
        self._cond = threading.Condition()
        self._used = 0
        self._waiting: list[tuple[int, int]] = []  # a heap of (bytes, arrival number)
        self._arrivals = itertools.count()
        self.refusals = 0  # DecodeBusy raised since the start (GET /metrics)

    @property
    def used(self) -> int:
        """Bytes reserved now."""
        with self._cond:
            return self._used

    @property
    def waiting(self) -> int:
        """Decodes waiting for room now."""
        with self._cond:
            return len(self._waiting)

    @contextlib.contextmanager
    def reserve(
        self, n: int, wait_s: float | None = None, what: str = "this image", *, background: bool = False
    ) -> Iterator[None]:
        """Hold `n` bytes of the budget for the `with` block, waiting up to `wait_s` (default the
        budget's) for room. TooLargeToDecode when `n` is more than the whole budget; DecodeBusy when
        no room came in time. A `background` decode (work no one waits for: thumbnails made ahead) never
        waits and never stands in anyone's way: DecodeBusy at once unless nothing is waiting and it fits
        in half the budget, so a request always finds the other half."""
        if n > self.limit:
            raise TooLargeToDecode(
                f"decoding {what} needs about {_mb(n)} MB of memory and this server decodes with at most "
                f"{_mb(self.limit)} MB (DECODE_MEMORY_MB); scale it down (or send it as a JPEG) and try again"
            )
        if background:
            with self._cond:
                if self._waiting or self._used + n > self.limit // 2:
                    raise DecodeBusy(f"{what} waits for a quieter moment (DECODE_MEMORY_MB is in use)", 1)
                self._used += n
        else:
            self._wait_for_room(n, self.wait_s if wait_s is None else wait_s, what)
        try:
            yield
        finally:
            with self._cond:
                self._used -= n
                self._cond.notify_all()

    def _wait_for_room(self, n: int, wait_s: float, what: str) -> None:
        """Take `n` bytes once they fit and no smaller reservation waits ahead; DecodeBusy after `wait_s`."""
        with self._cond:
            me = (n, next(self._arrivals))
            heapq.heappush(self._waiting, me)
            try:
                if not self._cond.wait_for(lambda: self._waiting[0] == me and self._used + n <= self.limit, wait_s):
                    retry_after = max(1, math.ceil(wait_s))
                    self.refusals += 1
                    raise DecodeBusy(
                        f"the server is busy decoding other images: {what} needs about {_mb(n)} MB of its "
                        f"{_mb(self.limit)} MB for decoding (DECODE_MEMORY_MB) and no room came within "
                        f"{wait_s:g} s (DECODE_WAIT_MS); try again in {retry_after} s",
                        retry_after,
                    )
                self._used += n
            finally:
                self._waiting.remove(me)
                heapq.heapify(self._waiting)
                self._cond.notify_all()  # the next in line may be served now


def free_large_blocks_promptly(threshold: int = 8 * MB) -> bool:
    """Have the C library's malloc give every allocation of `threshold` bytes or more its own mapping,
    so that freeing it returns the memory to the system at once.

    glibc raises that threshold by itself (up to 32 MB) once a large block is freed; from then on
    Pillow's 16 MB image blocks come from the heap and, freed, stay in the process, so the RSS climbs to
    the sum of past decodes' peaks instead of following the decode budget (measured: 660 MB after two
    rounds of bombs under a 256 MB budget; about 300 MB with this). Process-wide. False where the C library
    has no mallopt (not glibc).
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # Fixing the mmap threshold also stops glibc adjusting the trim threshold (the free space at the top of
    # a heap kept for reuse), which then stays at 128 KB: every detection gave back and faulted in again
    # 3 MB (810 page faults, 5-10% slower). Keep as much as the threshold, per heap.
    # And at most MALLOC_ARENAS heaps: glibc makes up to 8 per core as threads allocate, and each keeps up
    # to the trim threshold free at its top; with the request threads, upload workers and interpreters
    # that was some 20 heaps holding freed memory (bench/bounds_jobs.py: RSS growth 105 MB with 12
    # request threads, 84 MB with 8). Python allocates under the GIL, so few heaps cost little.
    arenas = mallopt(_M_ARENA_MAX, MALLOC_ARENAS)
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold)) and bool(arenas)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's malloc.h
MALLOC_ARENAS = 2


# ---------------------------------------------------------------------------------------------------------
# Opening: format, pixel limit, orientation
# ---------------------------------------------------------------------------------------------------------


def _sniff_other_format(head: bytes) -> str | None:
    for magic, name in _KNOWN_OTHER_FORMATS:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp":
        return _ISO_BRANDS.get(head[8:12], "ISO media (HEIC/AVIF/MP4)")
    return None


# Magic numbers of ALLOWED_FORMATS, as Pillow's plugins accept them (JpegImagePlugin, PngImagePlugin, ...).
_OUR_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
)
# "BM" alone is no proof (a CSV whose first column is BMI starts so): a BMP's DIB header follows its
# 14-byte file header and starts with its own size, one of these (OS/2 1.x, BITMAPINFOHEADER, the V2/V3
# extensions, OS/2 2.x, V4, V5), as Pillow's BmpImagePlugin reads them.
_BMP_DIB_SIZES = frozenset((12, 40, 52, 56, 64, 108, 124))
SNIFF_BYTES = 18  # what sniff_format() and other_format() need of a file's start (a BMP's DIB header size)


def sniff_format(head: bytes) -> str | None:
    """Which of ALLOWED_FORMATS the bytes starting with `head` claim to be, by their magic number, or None.
    A claim only: whether they decode is for inspect() to say. For callers that choose files by content
    (`python ingest.py import`) before reading them whole."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _OUR_MAGIC:
        if head.startswith(magic):
            return name
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES:
        return "BMP"
    return None


def other_format(head: bytes) -> str | None:
    """The name of a known format we refuse (HEIC, TIFF, PDF, ...) that `head` starts, or None."""
    return _sniff_other_format(head.lstrip())


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise NotAnImage(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise _too_many(width, height, max_pixels)


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open (not decode) `data` as one of ALLOWED_FORMATS and check its pixel count.

    Opening reads no more than the file for JPEG and BMP; WebP, GIF and PNG may allocate much more here
    (see `_early_plan`), which `inspect` and `preprocess` reserve first.
    """
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
    _check_size(*img.size, max_pixels)
    return img


def _too_many(width: int | None, height: int | None, max_pixels: int) -> TooManyPixels:
    size = f"{width}x{height} ({width * height:,} pixels)" if width else "far larger than that"
    return TooManyPixels(
        f"the image is {size}; the limit is {max_pixels:,} pixels (MAX_PIXELS). Scale it down, or raise MAX_PIXELS"
    )


def orientation_of(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block should not make a good photo unusable
        log.debug("ignoring unreadable EXIF data", exc_info=True)
        return 1
    return value if value in _ORIENTATION else 1


# ---------------------------------------------------------------------------------------------------------
# What a decode costs
# ---------------------------------------------------------------------------------------------------------

# Pillow stores "1", L and P in a byte per pixel, the I;16 modes in two, every other mode (RGB included) in four.
_ONE_BYTE_MODES = ("1", "L", "P")
# Converting a non-RGB image works through tiles of about this many pixels, never the whole image at once.
_TILE_PIXELS = 1 << 20
_OVERHEAD = 4 * MB  # decoder state, tables, small intermediate images
# PNG (bit depth, colour type) -> the mode Pillow decodes it to (as PngImagePlugin._MODES).
_PNG_MODES = {
    (1, 0): "1", (2, 0): "L", (4, 0): "L", (8, 0): "L", (16, 0): "I;16", (8, 2): "RGB", (16, 2): "RGB",
    (1, 3): "P", (2, 3): "P", (4, 3): "P", (8, 3): "P", (8, 4): "LA", (16, 4): "RGBA", (8, 6): "RGBA",
    (16, 6): "RGBA",
}


def _bytes_per_pixel(mode: str) -> int:
    return 1 if mode in _ONE_BYTE_MODES else 2 if mode.startswith("I;16") else 4


@dataclass(frozen=True)
class _Plan:
    """What decoding an image will make, known from its header before any pixel is decoded."""

    format: str
    stored: tuple[int, int]  # width x height in the file
    decoded: tuple[int, int]  # what the decoder makes (a JPEG's draft scale)
    mode: str  # Pillow's mode of the decoded image
    extra: int  # bytes the decoder (and the opening) hold beside the decoded image

    def cost(self, target: tuple[int, int] | None) -> int:
        """Peak bytes of the whole decode, and of the model input at `target` when given."""
        width, height = self.decoded
        cost = width * height * _bytes_per_pixel(self.mode) + self.extra + _OVERHEAD
        return cost if target is None else cost + _resize_cost(self.decoded, self.mode, target)


def _early_plan(data: bytes) -> _Plan | None:
    """The plan of a WebP, GIF or PNG, read from its header by us: Pillow allocates when it merely opens
    these (libwebp's canvas, a GIF's disposal canvas, a PNG's decompressed text), so the memory is
    reserved before Pillow sees them. None for other formats (opening them reads no more than the file)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        size = _webp_size(data)
        # libwebp's canvas and its copy of the previous frame, and the frame handed to Pillow as bytes
        # (4 bytes a pixel each), plus Pillow's copy of the file.
        return _Plan("WEBP", size, size, "RGBA", 12 * size[0] * size[1] + len(data))
    if data[:6] in (b"GIF87a", b"GIF89a"):
        size = _gif_size(data)
        return _Plan("GIF", size, size, "P", size[0] * size[1])  # the first frame's disposal canvas
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if data[12:16] != b"IHDR" or len(data) < 26:
            raise NotAnImage("this PNG file does not start with its header (IHDR); send the complete file")
        size = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        mode = _PNG_MODES.get((data[24], data[25]), "RGBA")
        # Compressed text (zTXt, iTXt) decompresses to at most MAX_TEXT_CHUNK a chunk and MAX_TEXT_MEMORY in
        # all, an ICC profile to at most MAX_TEXT_CHUNK; other chunks are copied: at most the file's size.
        text = (data.count(b"zTXt") + data.count(b"iTXt")) * PngImagePlugin.MAX_TEXT_CHUNK
        profiles = data.count(b"iCCP") * PngImagePlugin.MAX_TEXT_CHUNK
        extra = min(PngImagePlugin.MAX_TEXT_MEMORY, text) + profiles + len(data)
        if b"acTL" in data:  # an animated PNG keeps a copy of its first frame for disposal
            extra += size[0] * size[1] * _bytes_per_pixel(mode)
        return _Plan("PNG", size, size, mode, extra)
    return None


def _webp_size(data: bytes) -> tuple[int, int]:
    """The canvas size a WebP's header declares, read as Pillow reads it (WebPImagePlugin._get_size)."""
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    raise NotAnImage("this WebP file's header is unreadable; send the complete file, or a JPEG or PNG")


def _gif_size(data: bytes) -> tuple[int, int]:
    """The canvas Pillow makes for a GIF: its logical screen, grown to hold the first frame."""
    width, height = int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    i = 13 + (3 << ((data[10] & 7) + 1) if len(data) > 10 and data[10] & 0x80 else 0)  # global colour table
    while i < len(data) and data[i] != 0x3B:  # the trailer
        if data[i] == 0x21:  # an extension: its label, then sub-blocks until an empty one
            i += 2
            while i < len(data) and data[i]:
                i += data[i] + 1
            i += 1
        elif data[i] == 0x2C:  # the first image descriptor
            x0, y0, w, h = (int.from_bytes(data[j:j + 2], "little") for j in range(i + 1, i + 9, 2))
            return max(width, x0 + w), max(height, y0 + h)
        else:
            i += 1  # Pillow skips a byte it does not know, and so do we
    return width, height


def _opened_plan(img: Image.Image, data: bytes, stored: tuple[int, int]) -> _Plan:
    """The plan of an opened JPEG (after draft) or BMP."""
    width, height = img.size
    extra = 0
    if isinstance(img, JpegImagePlugin.JpegImageFile):
        extra = _jpeg_coefficients(img, data, stored)
    elif img.format == "BMP" and img.info.get("compression") in (1, 2):
        # Pillow's run-length decoder builds the pixels in a bytearray (which grows by an eighth), then copies it.
        extra = width * height * 9 // 4
    return _Plan(img.format or "?", stored, img.size, img.mode, extra)


def _jpeg_coefficients(img: JpegImagePlugin.JpegImageFile, data: bytes, stored: tuple[int, int]) -> int:
    """Bytes libjpeg holds for a JPEG's DCT coefficients: the whole image's, at full size whatever the
    scale, when the file has more than one scan (progressive ones always do); 0 for a single scan."""
    if not (img.info.get("progressive") or _multiple_scans(data)):
        return 0
    layers = getattr(img, "layer", None) or [("", 1, 1, 0)] * len(img.getbands())
    h_max = max(h for _, h, _, _ in layers)
    v_max = max(v for _, _, v, _ in layers)
    total = 0
    for _, h, v, _ in layers:  # 8x8 blocks of 64 two-byte coefficients, each component at its sampling
        blocks_x = math.ceil(math.ceil(stored[0] * h / h_max) / 8)
        blocks_y = math.ceil(math.ceil(stored[1] * v / v_max) / 8)
        total += blocks_x * blocks_y * 128
    return total


def _multiple_scans(data: bytes) -> bool:
    """Whether libjpeg decodes this (sequential) JPEG as a multi-scan one, holding every DCT coefficient:
    its rule (jdinput.c, at the first scan) is that the first scan codes fewer components than the frame
    has; then the others come in later scans. Read from the headers alone: marker segments are skipped by
    their lengths up to the first scan (SOS), so an EXIF thumbnail does not count, and the 3 MB of a
    camera photo's entropy-coded data are never read (a scan of them for a second SOS took 3.5 ms)."""
    i, components = 2, None
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        start = i + 4
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and start + 6 <= len(data):
            components = data[start + 5]  # SOFn: precision, height, width, then the number of components
        if marker == 0xDA:
            return start < len(data) and components is not None and data[start] < components
        i = start - 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return False


def _factors(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The reduce() factors Pillow's resize(reducing_gap=3.0) would use from `size` to `target`."""
    return int(size[0] / target[0] / 3.0) or 1, int(size[1] / target[1] / 3.0) or 1


def _tile(size: tuple[int, int], factors: tuple[int, int]) -> tuple[int, int]:
    """Tile width and height for converting: whole multiples of the factors, about _TILE_PIXELS in all."""
    (width, height), (fx, fy) = size, factors
    tile_w = width if width * fy <= _TILE_PIXELS else max(fx, _TILE_PIXELS // fy // fx * fx)
    tile_h = min(height, max(fy, _TILE_PIXELS // tile_w // fy * fy))
    return tile_w, tile_h


def _resize_cost(size: tuple[int, int], mode: str, target: tuple[int, int]) -> int:
    """Bytes `_to_model_input` needs beside the decoded image, for `target` either way round (the EXIF
    orientation, which swaps it, may come after a PNG's pixels)."""
    return max(_resize_cost_to(size, mode, target), _resize_cost_to(size, mode, (target[1], target[0])))


def _resize_cost_to(size: tuple[int, int], mode: str, target: tuple[int, int]) -> int:
    out = target[0] * target[1] * (4 + 4 + 3)  # the resized image, its transposed copy, the array
    factors = _factors(size, target)
    if factors == (1, 1):
        return out + (0 if mode == "RGB" else size[0] * size[1] * 4)  # small: under 6x the target each way
    reduced = math.ceil(size[0] / factors[0]) * math.ceil(size[1] / factors[1]) * 4
    if mode == "RGB":
        return out + reduced
    tile_w, tile_h = _tile(size, factors)
    return out + reduced + tile_w * tile_h * (_bytes_per_pixel(mode) + 4)  # a tile cut out, and converted


# ---------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------


def inspect(data: bytes, max_pixels: int = MAX_PIXELS, budget: DecodeBudget | None = None) -> Decoded:
    """Check that `data` decodes completely, without running a model (`pixels` is None).

    For images stored without detection: a truncated or corrupt file is refused all the same. A JPEG is
    decoded at 1/8 scale (libjpeg still reads every coefficient of the file); other formats have no
    smaller decode, so they are decoded once at full size, in their own mode, and not converted.
    `budget`: the process's DecodeBudget (None: no limit beyond the pixel limit).
    """
    return _decode(data, None, max_pixels, budget)


def preprocess(
    data: bytes, size: tuple[int, int], max_pixels: int = MAX_PIXELS, budget: DecodeBudget | None = None
) -> Decoded:
    """Decode `data` and produce the model input: upright, RGB, plain resize to `size` (width, height).

    The pixels are those of Pillow's `convert("RGB").resize(size, BILINEAR, reducing_gap=3.0)`, made
    without a full-size RGB copy: the image is reduced straight from its own mode, tile by tile.
    """
    return _decode(data, size, max_pixels, budget)


def _decode(data: bytes, size: tuple[int, int] | None, max_pixels: int, budget: DecodeBudget | None) -> Decoded:
    plan = _early_plan(data)
    if plan is not None:
        _check_size(*plan.stored, max_pixels)
        with _reserved(budget, plan, size):
            img = open_image(data, max_pixels)
            if img.size != plan.stored or _bytes_per_pixel(img.mode) > _bytes_per_pixel(plan.mode):
                img.close()
                raise NotAnImage(
                    f"the {plan.format} header says {plan.stored[0]}x{plan.stored[1]} but the image is "
                    f"{img.size[0]}x{img.size[1]} {img.mode}; send an image written by an ordinary program"
                )
            decoded = _finish(img, plan.stored, size)
            del img  # a WebP's decoder (its canvases) goes with the object: before the reservation ends
            return decoded
    img = open_image(data, max_pixels)
    stored = img.size
    if isinstance(img, JpegImagePlugin.JpegImageFile):  # MPO included
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale when the target is that small: less memory, 6x faster.
        if size is None:
            img.draft("RGB", (1, 1))  # the smallest scale: every coefficient is still read
        else:
            swap = orientation_of(img) in (5, 6, 7, 8)
            img.draft("RGB", (size[1], size[0]) if swap else size)
    with _reserved(budget, _opened_plan(img, data, stored), size):
        decoded = _finish(img, stored, size)
        del img
        return decoded


@contextlib.contextmanager
def _reserved(budget: DecodeBudget | None, plan: _Plan, target: tuple[int, int] | None) -> Iterator[None]:
    if budget is None:
        yield
        return
    with budget.reserve(plan.cost(target), what=f"this {plan.stored[0]}x{plan.stored[1]} {plan.format} image"):
        yield


def _finish(img: Image.Image, stored: tuple[int, int], size: tuple[int, int] | None) -> Decoded:
    """Decode the opened `img` (first frame); the model input when `size` is given. Closes `img`, so its
    memory is given back before the reservation is."""
    fmt = img.format or "?"
    try:
        try:
            img.seek(0)  # first frame of an animation
            img.load()
            orientation = orientation_of(img)  # after load(): a PNG may keep its EXIF after the pixels
            swap = orientation in (5, 6, 7, 8)
            pixels = None if size is None else _to_model_input(img, (size[1], size[0]) if swap else size)
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise NotAnImage(f"the image data is truncated or corrupt ({e}); send the complete file") from e
    finally:
        img.close()
    if pixels is not None and orientation != 1:
        pixels = pixels.transpose(_ORIENTATION[orientation])
    width, height = (stored[1], stored[0]) if swap else stored
    array = None if pixels is None else np.asarray(pixels, dtype=np.uint8)[np.newaxis, ...]
    return Decoded(fmt, CONTENT_TYPES.get(fmt, "application/octet-stream"), width, height, array, orientation)


def _to_model_input(img: Image.Image, target: tuple[int, int]) -> Image.Image:
    """`img.convert("RGB").resize(target, BILINEAR, reducing_gap=3.0)`, pixel for pixel, without the
    full-size RGB copy: resize() first reduces by whole factors (reduce()), then resamples; here the
    reduction reads an RGB image in place and converts any other mode tile by tile. Tiles are whole
    multiples of the factors, so every block averages the same pixels as in one reduce() of the whole."""
    factors = _factors(img.size, target)
    if factors == (1, 1):  # under 6x the target each way: small
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        return rgb.resize(target, Image.Resampling.BILINEAR)
    width, height = img.size
    if img.mode == "RGB":
        reduced = img.reduce(factors)
    else:
        fx, fy = factors
        reduced = Image.new("RGB", (math.ceil(width / fx), math.ceil(height / fy)))
        tile_w, tile_h = _tile(img.size, factors)
        for y in range(0, height, tile_h):
            for x in range(0, width, tile_w):
                tile = img.crop((x, y, min(width, x + tile_w), min(height, y + tile_h))).convert("RGB")
                reduced.paste(tile.reduce(factors), (x // fx, y // fy))
    box = (0.0, 0.0, width / factors[0], height / factors[1])
    return reduced.resize(target, Image.Resampling.BILINEAR, box=box)


# ---------------------------------------------------------------------------------------------------------
# Thumbnails and annotated renders
# ---------------------------------------------------------------------------------------------------------

THUMBNAIL_SIZES = (160, 320, 640, 1280)  # the longest side, in pixels
THUMBNAIL_FORMATS = {"jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}
ANNOTATED_SIZE = 1280  # the longest side of an annotated render when no size is asked for
_JPEG_QUALITY = 82
_WEBP_QUALITY = 80
_WEBP_METHOD = 2  # libwebp's effort, 0-6: the first request of a thumbnail waits for it


@dataclass(frozen=True)
class Rendition:
    """Encoded pixels made from stored bytes: a thumbnail or an annotated render."""

    data: bytes
    width: int
    height: int
    content_type: str


def fitted(width: int, height: int, longest: int) -> tuple[int, int]:
    """(width, height) scaled so the longest side is `longest`, never larger than the picture itself."""
    scale = min(1.0, longest / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _upright(
    data: bytes, longest: int, max_pixels: int, budget: DecodeBudget | None, background: bool = False
) -> Image.Image:
    """The picture upright (EXIF orientation applied), its longest side at most `longest`, in RGB (RGBA
    when it has transparency), decoded inside the budget. A JPEG is decoded at the smallest draft scale
    (1/2, 1/4, 1/8) that is still at least the target: a 4000x3000 photo becomes 500x375 in the decoder."""
    plan = _early_plan(data)
    if plan is not None:
        _check_size(*plan.stored, max_pixels)
        img = None
    else:
        img = open_image(data, max_pixels)
        stored = img.size
        if isinstance(img, JpegImagePlugin.JpegImageFile):
            img.draft("RGB", fitted(*stored, longest))  # the scale does not depend on the orientation
        plan = _opened_plan(img, data, stored)
    width, height = plan.decoded
    target = fitted(width, height, longest)
    # Beside the decode: a converted copy (not for RGB); with transparency (possible in these modes) the
    # premultiplied copy resize() makes; the resized image, its transposed copy, the encoder's.
    converted = 0 if plan.mode == "RGB" else width * height * 4
    premultiplied = width * height * 4 if plan.mode in ("RGBA", "LA", "PA", "P") else 0
    # A JPEG is handed to the decoder whole (a copy of the file), in one call that releases the GIL once:
    # in 64 KB blocks a 3 MB photo took 50 hand-overs of the GIL, each a wait behind the server's other threads.
    whole = len(data) if plan.format == "JPEG" else 0
    extra = converted + premultiplied + whole + target[0] * target[1] * 4 * 3
    with _reserved_bytes(budget, plan.cost(None) + extra, plan, background):
        if img is None:
            img = open_image(data, max_pixels)
        try:
            try:
                img.seek(0)
                if whole:
                    img.decodermaxblock = whole + 1
                img.load()
                orientation = orientation_of(img)
                alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
                want = "RGBA" if alpha else "RGB"
                pic = img if img.mode == want else img.convert(want)
                size = fitted(*pic.size, longest)
                if size != pic.size:
                    pic = pic.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
                elif pic is img:
                    pic = img.copy()
            except (OSError, SyntaxError, ValueError, EOFError) as e:
                raise NotAnImage(f"the image data is truncated or corrupt ({e}); send the complete file") from e
        finally:
            img.close()
        if orientation != 1:
            pic = pic.transpose(_ORIENTATION[orientation])
        return pic


@contextlib.contextmanager
def _reserved_bytes(budget: DecodeBudget | None, n: int, plan: _Plan, background: bool = False) -> Iterator[None]:
    if budget is None:
        yield
        return
    with budget.reserve(n, what=f"this {plan.stored[0]}x{plan.stored[1]} {plan.format} image", background=background):
        yield


def _encode(pic: Image.Image, fmt: str) -> Rendition:
    name, content_type = THUMBNAIL_FORMATS[fmt]
    out = io.BytesIO()
    if name == "JPEG":
        if pic.mode != "RGB":
            pic = _on_white(pic)
        pic.save(out, "JPEG", quality=_JPEG_QUALITY, optimize=True, progressive=pic.width * pic.height > 200_000)
    else:
        # method 2, not libwebp's default 4: 9 ms instead of 27 for a 320 px photo, 2-4% more bytes (bench/page.py)
        pic.save(out, "WEBP", quality=_WEBP_QUALITY, method=_WEBP_METHOD)
    return Rendition(out.getvalue(), pic.width, pic.height, content_type)


def thumbnail(
    data: bytes, longest: int, fmt: str = "jpeg", max_pixels: int = MAX_PIXELS, budget: DecodeBudget | None = None,
    *, background: bool = False,
) -> Rendition:
    """`data` upright and scaled so its longest side is `longest` (never enlarged), as `fmt` ("jpeg" or
    "webp"). Decodes inside `budget` (DecodeBusy, TooLargeToDecode) like every decode; a `background`
    one only when no request waits for the budget (DecodeBudget.reserve)."""
    return _encode(_upright(data, longest, max_pixels, budget, background), fmt)


# Box colours by label (a hash of the label picks one): distinct on photos, each readable with black or white text.
_PALETTE = (
    ((255, 56, 56), (255, 255, 255)), ((255, 157, 151), (0, 0, 0)), ((255, 178, 29), (0, 0, 0)),
    ((207, 210, 49), (0, 0, 0)), ((72, 249, 10), (0, 0, 0)), ((26, 147, 52), (255, 255, 255)),
    ((0, 212, 187), (0, 0, 0)), ((44, 153, 168), (255, 255, 255)), ((0, 194, 255), (0, 0, 0)),
    ((52, 69, 147), (255, 255, 255)), ((100, 115, 255), (255, 255, 255)), ((203, 56, 255), (255, 255, 255)),
    ((255, 149, 200), (0, 0, 0)), ((255, 55, 199), (255, 255, 255)),
)


def _colours(label: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    return _PALETTE[int.from_bytes(label.encode("utf-8")[:8].ljust(8, b"\0"), "big") % len(_PALETTE)]


def annotate(
    data: bytes, detections: Iterable, longest: int = ANNOTATED_SIZE, max_pixels: int = MAX_PIXELS,
    budget: DecodeBudget | None = None,
) -> Rendition:
    """`data` upright, its longest side at most `longest`, with each detection drawn: its box and a tag
    "label 82%" (the confidence, rounded down). Detections are anything with `label`, `confidence` and
    a box `x_min`..`y_max` normalised 0..1 to the upright picture (store.Found). Lines and text scale with
    the picture, so a tag reads the same at 160 px as at 1280; a tag stays inside the picture's edges.
    A JPEG."""
    from PIL import ImageDraw, ImageFont

    pic = _upright(data, longest, max_pixels, budget)
    if pic.mode != "RGB":
        pic = _on_white(pic)
    width, height = pic.size
    side = max(width, height)
    line = max(1, round(side / 320))
    font = ImageFont.load_default(size=max(10, round(side / 45)))
    draw = ImageDraw.Draw(pic)
    pad = max(1, line)
    for d in sorted(detections, key=lambda d: d.confidence):  # the most confident drawn last, on top
        x0, y0 = round(d.x_min * width), round(d.y_min * height)
        x1, y1 = max(x0, round(d.x_max * width) - 1), max(y0, round(d.y_max * height) - 1)
        fill, ink = _colours(d.label)
        draw.rectangle((x0, y0, x1, y1), outline=fill, width=line)
        text = f"{d.label} {math.floor(d.confidence * 100)}%"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tag_w, tag_h = min(width, right - left + 2 * pad), min(height, bottom - top + 2 * pad)
        tx = min(max(0, x0), width - tag_w)
        ty = y0 - tag_h if y0 - tag_h >= 0 else min(max(0, y0), height - tag_h)  # above the box, else inside
        draw.rectangle((tx, ty, tx + tag_w - 1, ty + tag_h - 1), fill=fill)
        draw.text((tx + pad - left, ty + pad - top), text, fill=ink, font=font)
    out = io.BytesIO()
    pic.save(out, "JPEG", quality=85, optimize=True)
    return Rendition(out.getvalue(), width, height, "image/jpeg")


def _on_white(pic: Image.Image) -> Image.Image:
    """An RGBA picture on white, as a browser shows it on a white page (JPEG has no transparency)."""
    back = Image.new("RGB", pic.size, (255, 255, 255))
    back.paste(pic, mask=pic.getchannel("A"))
    return back
