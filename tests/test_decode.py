"""Memory while decoding (issue 10): the decode budget, what each decode reserves and what it really
costs, fewer full-size copies, and the small decoding items (MPO, truncated JPEGs, /health's model).

Budgets here are tiny (a few MB) and images small, so the tests are fast; peaks are VmHWM-based
(tests/helpers.py). Concurrency is driven with threads and events, never fixed sleeps.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

import detect
import imaging
from helpers import assert_problem, b64, jpeg, peak_rss_mb, reset_peak_rss, rss_mb

MB = imaging.MB
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The 34-byte lossless WebP of 7000x7000 from the issue: libwebp needs ~750 MB to decode it.
WEBP_BOMB = bytes.fromhex("524946461a000000574542505650384c0e0000002f57dbd5060710111fd0f444ff03")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_of_zeros(width: int, height: int, colour_type: int = 2, extra_chunks: bytes = b"") -> bytes:
    """A complete PNG of black pixels (8 bits per sample), made without Pillow: quick even at 24 MP."""
    samples = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour_type]
    row = b"\x00" * (1 + width * samples)
    z = zlib.compressobj(1)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    plte = _chunk(b"PLTE", b"\x00\x00\x00") if colour_type == 3 else b""
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + plte + extra_chunks + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def gif_disposal_bomb(side: int) -> bytes:
    """A 43-byte GIF: a 1x1 screen whose first frame claims side x side pixels and 'restore to background'
    disposal, for which Pillow allocates a side x side canvas as soon as it opens the file."""
    head = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    control = b"\x21\xf9\x04" + bytes([2 << 2]) + b"\x00\x00\x00\x00"
    descriptor = b"\x2c" + struct.pack("<HHHHB", 0, 0, side, side, 0)
    return head + control + descriptor + b"\x02\x02\x44\x01\x00" + b";"


def rle8_bmp(width: int, height: int) -> bytes:
    """A run-length (RLE8) BMP of one colour: 2 bytes per 255 pixels."""
    row = b"".join(bytes((min(255, width - x), 1)) for x in range(0, width, 255)) + b"\x00\x00"
    pixels = row * height + b"\x00\x01"
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def encoded(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def gradient(width: int, height: int) -> Image.Image:
    """A smooth picture: quick to encode and decode at any size, unlike noise."""
    x, y = np.arange(width, dtype=np.uint32)[None, :], np.arange(height, dtype=np.uint32)[:, None]
    channels = [(x * 255 // width + y * 0).astype(np.uint8), (y * 255 // height + x * 0).astype(np.uint8),
                ((x + y) * 255 // (width + height)).astype(np.uint8)]
    return Image.fromarray(np.dstack(channels))


class Recording(imaging.DecodeBudget):
    """A real budget that also remembers what each decode asked for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked: list[int] = []

    def reserve(self, n, wait_s=None, what="this image", **kw):
        self.asked.append(n)
        return super().reserve(n, wait_s, what, **kw)


def until(condition, timeout: float = 10.0) -> None:
    """Wait until `condition()` holds (another thread's state), failing after `timeout` s."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the other thread"
        pause.wait(0.002)


# --------------------------------------------------------------------------------------------------------
# The budget
# --------------------------------------------------------------------------------------------------------


def test_a_reservation_is_held_for_its_block_and_given_back():
    budget = imaging.DecodeBudget(10 * MB, wait_s=0)
    with budget.reserve(6 * MB):
        assert budget.used == 6 * MB
        with budget.reserve(4 * MB):
            assert budget.used == 10 * MB
    assert budget.used == 0
    with pytest.raises(RuntimeError), budget.reserve(3 * MB):
        raise RuntimeError("a failed decode gives its reservation back too")
    assert budget.used == 0 and budget.waiting == 0


def test_more_than_the_whole_budget_is_too_large_at_once():
    budget = imaging.DecodeBudget(10 * MB, wait_s=30)
    started = time.monotonic()
    with pytest.raises(imaging.TooLargeToDecode, match=r"about 11 MB.*at most 10 MB \(DECODE_MEMORY_MB\)"):
        with budget.reserve(11 * MB, what="this 7000x7000 WEBP image"):
            pass
    assert time.monotonic() - started < 1, "an image that can never fit must not wait"
    assert budget.used == 0 and budget.waiting == 0


def test_no_room_within_the_wait_is_busy_with_retry_after():
    budget = imaging.DecodeBudget(10 * MB, wait_s=0)
    with budget.reserve(8 * MB):
        with pytest.raises(imaging.DecodeBusy, match="DECODE_MEMORY_MB.*try again in 1 s") as e:
            with budget.reserve(3 * MB):
                pass
        assert e.value.retry_after == 1
        with budget.reserve(2 * MB):  # what fits still goes
            pass
    assert budget.used == 0 and budget.waiting == 0


def test_a_background_decode_never_waits_and_never_stands_in_a_requests_way():
    """Thumbnails made ahead reserve in the background: only half the budget, only while no one waits,
    refused at once otherwise (they are made when asked for instead)."""
    budget = imaging.DecodeBudget(10 * MB, wait_s=30)
    with budget.reserve(5 * MB, background=True):
        assert budget.used == 5 * MB
        started = time.monotonic()
        with pytest.raises(imaging.DecodeBusy), budget.reserve(1 * MB, background=True):  # past half
            pass
        assert time.monotonic() - started < 1
        with budget.reserve(5 * MB):  # a request finds the other half
            assert budget.used == 10 * MB
    assert budget.used == 0
    got, done = threading.Event(), threading.Event()

    def request():
        with budget.reserve(3 * MB):
            got.set()
            done.wait(10)

    with budget.reserve(9 * MB):
        waiter = threading.Thread(target=request)
        waiter.start()
        until(lambda: budget.waiting == 1)
        with pytest.raises(imaging.DecodeBusy), budget.reserve(1, background=True):  # someone waits: not now
            pass
    assert got.wait(10) and budget.used == 3 * MB  # the request got its room
    done.set()
    waiter.join(10)


def test_a_waiter_times_out_after_its_wait():
    budget = imaging.DecodeBudget(10 * MB, wait_s=0.05)
    with budget.reserve(8 * MB):
        started = time.monotonic()
        with pytest.raises(imaging.DecodeBusy), budget.reserve(3 * MB):
            pass
        assert 0.04 < time.monotonic() - started < 5
    assert budget.waiting == 0


def test_the_smallest_waiter_is_served_first():
    """A holds all 10 MB. B (6 MB) starts waiting, then C (3 MB). When A ends, C goes first although B
    came first: bombs are the largest images, so ordinary ones are not held up behind them. D (1 MB),
    which fits beside B and C, does not wait at all."""
    budget = imaging.DecodeBudget(10 * MB, wait_s=30)
    entered: list[str] = []
    release = {name: threading.Event() for name in "ABC"}

    def hold(name: str, n: int) -> None:
        with budget.reserve(n * MB):
            entered.append(name)
            if name in release:
                assert release[name].wait(30)

    threads = {name: threading.Thread(target=hold, args=(name, n)) for name, n in (("A", 10), ("B", 6), ("C", 3))}
    threads["A"].start()
    until(lambda: entered == ["A"])
    threads["B"].start()
    until(lambda: budget.waiting == 1)
    threads["C"].start()
    until(lambda: budget.waiting == 2)
    release["A"].set()
    until(lambda: len(entered) == 3)
    assert entered == ["A", "C", "B"] and budget.used == 9 * MB
    hold("D", 1)  # fits now: no wait
    for name in "BC":
        release[name].set()
        threads[name].join(30)
    threads["A"].join(30)
    assert entered == ["A", "C", "B", "D"] and budget.used == 0 and budget.waiting == 0


def test_a_waiter_that_gives_up_leaves_the_line():
    """A holds 8 of 10 MB; L (5 MB) waits; S (3 MB, first in line as the smallest) gives up after its
    wait. When A ends, L goes: S is not left at the head of the line."""
    budget = imaging.DecodeBudget(10 * MB, wait_s=30)
    entered = threading.Event()

    def large() -> None:
        with budget.reserve(5 * MB):
            entered.set()

    with budget.reserve(8 * MB):
        t = threading.Thread(target=large)
        t.start()
        until(lambda: budget.waiting == 1)
        with pytest.raises(imaging.DecodeBusy), budget.reserve(3 * MB, wait_s=0.05):
            pass
        assert budget.waiting == 1 and not entered.is_set()
    assert entered.wait(30)
    t.join(30)
    assert budget.used == 0 and budget.waiting == 0


def test_freed_decode_memory_goes_back_to_the_system(tmp_path, model_path):
    """build_parts has malloc map large blocks on their own. Without that, glibc keeps the 16 MB image
    blocks that decoding threads freed, and the process keeps the RSS of past decodes (measured by the
    bench: 660 MB after two rounds of bombs under a 256 MB budget). In a fresh process, so the
    allocator starts as it does in the server."""
    script = f"""
import sys, threading
sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, "tests")!r}]
import imaging, server, settings
from helpers import rss_mb
from test_decode import png_of_zeros, rle8_bmp
parts = server.build_parts(settings.load([], {{}}, db={str(tmp_path / "images.db")!r}, model={model_path!r}))
images = [png_of_zeros(4000, 4000, colour_type=6), rle8_bmp(4000, 4000), png_of_zeros(3000, 3000, colour_type=3)]
before = rss_mb()
for _ in range(2):
    threads = [threading.Thread(target=imaging.preprocess, args=(d, (300, 300)), kwargs={{"budget": parts.ingest.budget}})
               for d in images]
    [t.start() for t in threads]
    [t.join() for t in threads]
print(rss_mb() - before)
parts.close()
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    kept = float(out.stdout.split()[-1])
    assert kept < 40, f"the process kept {kept:.0f} MB after its decodes ended"  # 70-110 MB without


def test_giving_memory_back_does_not_make_each_detection_fault_memory_in_again(detector, photo):
    """Fixing the mmap threshold alone left glibc's trim threshold at 128 KB: each detection gave 3 MB
    back and faulted it in again, 810 page faults and 5-10% slower."""
    if not imaging.free_large_blocks_promptly():
        pytest.skip("the C library is not glibc")
    data = photo("cat_1080p.jpg")
    for _ in range(3):
        detector.detect(data)

    def minor_faults() -> int:
        with open("/proc/self/stat", encoding="ascii") as f:
            return int(f.read().rpartition(")")[2].split()[7])

    before = minor_faults()
    for _ in range(20):
        detector.detect(data)
    assert (minor_faults() - before) / 20 < 200


def test_a_decode_waits_for_room_then_decodes():
    budget = imaging.DecodeBudget(32 * MB, wait_s=30)
    data = encoded(noise(1000, 800), "PNG")
    out: dict = {}
    with budget.reserve(30 * MB):
        t = threading.Thread(target=lambda: out.setdefault("decoded", imaging.preprocess(data, (300, 300), budget=budget)))
        t.start()
        until(lambda: budget.waiting == 1)
        assert "decoded" not in out
    t.join(30)
    assert out["decoded"].pixels.shape == (1, 300, 300, 3) and budget.used == 0


# --------------------------------------------------------------------------------------------------------
# What a decode reserves, against what it costs
# --------------------------------------------------------------------------------------------------------


def _peak_of(call) -> float:
    """MB the process grew by at its peak while `call()` ran."""
    reset_peak_rss()
    before = rss_mb()
    call()
    return peak_rss_mb() - before


CASES = {
    "png-rgb": lambda: encoded(gradient(1600, 1200), "PNG", compress_level=1),
    "png-rgba": lambda: encoded(gradient(1600, 1200).convert("RGBA"), "PNG", compress_level=1),
    "png-palette": lambda: png_of_zeros(3000, 3000, colour_type=3),
    "gif": lambda: encoded(Image.new("P", (3000, 3000)), "GIF"),
    "gif-disposal": lambda: encoded(Image.new("P", (3000, 3000)), "GIF", disposal=2, transparency=0),
    "bmp-rle8": lambda: rle8_bmp(3000, 3000),
    "webp-lossless": lambda: encoded(Image.new("RGB", (1600, 1200), "olive"), "WEBP", lossless=True),
    "jpeg-progressive": lambda: encoded(gradient(1600, 1200), "JPEG", progressive=True),
    "jpeg-baseline": lambda: encoded(gradient(1600, 1200), "JPEG"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_what_a_decode_reserves_covers_what_it_costs(name):
    """For each kind of image the pipeline treats differently, the reservation (made from the header)
    is at least the peak memory of the decode, with detection (the model's input) and without."""
    data = CASES[name]()
    for call in (lambda b: imaging.inspect(data, budget=b), lambda b: imaging.preprocess(data, (300, 300), budget=b)):
        call(imaging.DecodeBudget(2**40))  # once first, so imports and caches are not counted
        budget = Recording(2**40)
        peak = _peak_of(lambda: call(budget))  # noqa: B023 - called at once
        (asked,) = budget.asked
        assert peak <= asked / MB + 1, f"{name}: reserved {asked / MB:.1f} MB, the peak was {peak:.1f} MB"


def test_a_progressive_jpeg_reserves_its_full_size_coefficients():
    """libjpeg keeps every DCT coefficient of a multi-scan JPEG at full size, whatever the draft scale:
    2 bytes per sample, 4:2:0 = 1.5 samples per pixel."""
    img = gradient(1600, 1200)
    baseline, progressive = Recording(2**40), Recording(2**40)
    imaging.inspect(encoded(img, "JPEG"), budget=baseline)
    imaging.inspect(encoded(img, "JPEG", progressive=True), budget=progressive)
    assert progressive.asked[0] - baseline.asked[0] == 1600 * 1200 * 3


def test_an_exif_thumbnail_is_not_a_second_scan():
    thumb = encoded(Image.new("RGB", (160, 120), "red"), "JPEG")
    exif = b"Exif\x00\x00" + thumb  # not a valid TIFF block, but a JPEG with an SOS inside APP1
    data = encoded(Image.new("RGB", (640, 480), "blue"), "JPEG")
    with_app1 = data[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + data[2:]
    assert not imaging._multiple_scans(with_app1)
    assert not imaging._multiple_scans(data + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00")  # after its end
    assert not imaging._multiple_scans(encoded(Image.new("L", (640, 480), 90), "JPEG"))  # one component, one scan


def test_a_first_scan_of_fewer_components_than_the_frame_is_multi_scan():
    """libjpeg's rule for a sequential JPEG: non-interleaved (the first scan codes one of three
    components) keeps every coefficient, as a progressive one does."""
    data = encoded(Image.new("RGB", (640, 480), "blue"), "JPEG")
    sos = data.index(b"\xff\xda")
    assert data[sos + 4] == 3  # interleaved: all three components in the one scan
    non_interleaved = data[:sos + 4] + b"\x01" + data[sos + 5:]
    assert imaging._multiple_scans(non_interleaved) and not imaging._multiple_scans(data)


# --------------------------------------------------------------------------------------------------------
# Fewer full-size copies
# --------------------------------------------------------------------------------------------------------

MODES = ["RGB", "RGBA", "L", "LA", "P", "1", "I;16", "CMYK"]


def before_issue_10(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """The model input as the pipeline made it before: a full-size RGB copy, then one resize."""
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG":
        img.draft("RGB", size)
    return np.asarray(img.convert("RGB").resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0))


@pytest.mark.parametrize("mode", MODES)
def test_the_model_input_is_the_same_as_convert_then_resize(mode, monkeypatch):
    """Reducing straight from the image's own mode, tile by tile, gives the very pixels of
    convert("RGB").resize(BILINEAR, reducing_gap=3.0), the pipeline before it had no full-size copy.
    Small tiles here, so that small images are cut into many, with partial blocks at the edges."""
    monkeypatch.setattr(imaging, "_TILE_PIXELS", 5000)
    for (width, height), size in [((641, 479), (60, 50)), ((190, 700), (64, 64)), ((150, 100), (60, 60))]:
        img = noise(width, height, seed=width)
        img = Image.fromarray(np.asarray(img)[..., 0].astype(np.uint16) * 200) if mode == "I;16" else img.convert(mode)
        data = encoded(img, "JPEG" if mode == "CMYK" else "PNG", compress_level=1)
        got = imaging.preprocess(data, size).pixels[0]
        assert np.array_equal(got, before_issue_10(data, size)), (mode, width, height)


def test_a_very_wide_image_is_converted_in_tiles_across_too(monkeypatch):
    monkeypatch.setattr(imaging, "_TILE_PIXELS", 5000)
    img = noise(30000, 2, seed=3).convert("P")
    data = encoded(img, "PNG", compress_level=1)
    assert imaging._tile(img.size, imaging._factors(img.size, (60, 60)))[0] < img.width
    assert np.array_equal(imaging.preprocess(data, (60, 60)).pixels[0], before_issue_10(data, (60, 60)))


def test_an_rgba_png_costs_one_full_size_copy():
    """A 9 MP RGBA PNG is 36 MB decoded. Converting it whole to RGB, then resizing, cost twice that."""
    data = png_of_zeros(3000, 3000, colour_type=6)
    imaging.preprocess(png_of_zeros(64, 64, colour_type=6), (300, 300))  # warm up
    peak = _peak_of(lambda: imaging.preprocess(data, (300, 300)))
    assert peak < 36 * 1.35, f"peak {peak:.0f} MB for a 36 MB image"


def test_inspect_decodes_a_jpeg_at_an_eighth():
    """Without detection a 12 MP JPEG (48 MB at full size) is decoded at 1/8 scale; every coefficient is
    still read, so a truncated one is refused all the same."""
    data = encoded(gradient(4000, 3000), "JPEG", quality=85)
    imaging.inspect(jpeg())  # warm up
    peak = _peak_of(lambda: imaging.inspect(data))
    assert peak < 12, f"peak {peak:.0f} MB"
    with pytest.raises(imaging.NotAnImage, match="truncated"):
        imaging.inspect(data[: len(data) * 9 // 10])


def test_inspect_of_a_png_does_not_convert_it():
    data = png_of_zeros(3000, 3000, colour_type=3)  # 9 MB as P, 36 MB as RGB
    imaging.inspect(png_of_zeros(64, 64, colour_type=3))
    peak = _peak_of(lambda: imaging.inspect(data))
    assert peak < 9 + 8, f"peak {peak:.0f} MB"
    assert imaging.inspect(data).pixels is None


# --------------------------------------------------------------------------------------------------------
# Formats that allocate when merely opened: refused or reserved before Pillow sees them
# --------------------------------------------------------------------------------------------------------


def test_the_webp_bomb_is_refused_before_libwebp_allocates():
    """The issue's 34-byte WebP: accepted before, at 837 MB of peak RSS in the server."""
    budget = imaging.DecodeBudget()  # the default 256 MB
    peak = _peak_of(lambda: pytest.raises(imaging.TooLargeToDecode, imaging.inspect, WEBP_BOMB, budget=budget))
    assert peak < 20, f"peak {peak:.0f} MB"
    with pytest.raises(imaging.TooLargeToDecode, match="7000x7000 WEBP.*DECODE_MEMORY_MB"):
        imaging.preprocess(WEBP_BOMB, (300, 300), budget=budget)


def test_a_gif_whose_opening_allocates_is_checked_before_it_is_opened():
    """Pillow allocates a 'restore to background' canvas for the first frame when it opens a GIF: 169 MB
    for these 43 bytes, before any pixel limit could look at the size."""
    peak = _peak_of(lambda: pytest.raises(imaging.TooManyPixels, imaging.inspect, gif_disposal_bomb(13000)))
    assert peak < 20, f"peak {peak:.0f} MB"
    budget = imaging.DecodeBudget(16 * MB, wait_s=0)  # 49 MP fits the pixel limit, not this budget
    peak = _peak_of(lambda: pytest.raises(imaging.TooLargeToDecode, imaging.inspect, gif_disposal_bomb(7000), budget=budget))
    assert peak < 20, f"peak {peak:.0f} MB"


def test_a_png_full_of_compressed_text_is_reserved_before_it_is_opened():
    """Pillow decompresses up to 64 MB of PNG text when it opens the file; 100 KB of zTXt chunks do that."""
    text = zlib.compress(b"a" * (1024 * 1024 - 16), 9)
    data = png_of_zeros(16, 16, extra_chunks=b"".join(_chunk(b"zTXt", b"k%d\x00\x00" % i + text) for i in range(70)))
    budget = imaging.DecodeBudget(16 * MB, wait_s=0)
    peak = _peak_of(lambda: pytest.raises(imaging.TooLargeToDecode, imaging.inspect, data, budget=budget))
    assert peak < 20, f"peak {peak:.0f} MB"


# --------------------------------------------------------------------------------------------------------
# Through the service
# --------------------------------------------------------------------------------------------------------


def post(service, data: bytes, want_detect: bool, status: int):
    return service.client.post_json("/images", {"image": b64(data), "detect": want_detect}, status=status)


def test_an_image_that_could_never_fit_is_413_naming_the_setting(make_service):
    service = make_service(decode_memory_mb=16)
    big = png_of_zeros(2200, 2000)  # 17.6 MB decoded
    for want in (False, True):
        detail = assert_problem(post(service, big, want, 413), 413)
        assert "2200x2000 PNG" in detail and "DECODE_MEMORY_MB" in detail and "at most 16 MB" in detail
        assert post(service, png_of_zeros(1000, 1000), want, 200).json["width"] == 1000
    assert service.counts() == (2, 1)


def test_no_room_in_time_is_503_with_retry_after(make_service):
    service = make_service(decode_memory_mb=16, decode_wait_ms=0)
    budget = service.parts.ingest.budget
    assert budget.limit == 16 * MB and budget.wait_s == 0
    with budget.reserve(12 * MB):  # another decode under way
        for want in (False, True):
            res = post(service, png_of_zeros(1000, 1000), want, 503)
            assert "try again in 1 s" in assert_problem(res, 503) and res.headers["Retry-After"] == "1"
        assert service.counts() == (0, 0)
    assert post(service, png_of_zeros(1000, 1000), True, 200).json["height"] == 1000
    assert budget.used == 0


def test_detection_and_inspection_share_the_services_budget(make_service):
    """One budget per service: build_parts makes it from the settings, and Ingest hands it to the
    detector for every detection (a shared Detector's own budget is not used)."""
    service = make_service(decode_memory_mb=40)
    budget = service.parts.ingest.budget
    assert budget is not service.detector.budget and budget.limit == 40 * MB
    recording = Recording(40 * MB)
    service.parts.ingest.budget = recording
    post(service, png_of_zeros(900, 900), True, 200)
    post(service, png_of_zeros(901, 900), False, 200)
    assert len(recording.asked) == 2 and recording.used == 0


def test_a_24_mp_png_and_a_48_mp_jpeg_are_accepted_by_default(make_service):
    """README's promise for the default DECODE_MEMORY_MB (256): the largest common photos still fit."""
    service = make_service()
    assert service.parts.ingest.budget.limit == 256 * MB
    png = png_of_zeros(6000, 4000)
    assert post(service, png, True, 200).json["width"] == 6000
    photo = encoded(Image.new("RGB", (8000, 6000), "teal"), "JPEG", quality=80)
    assert post(service, photo, True, 200).json["width"] == 8000
    progressive = encoded(Image.new("RGB", (8000, 6000), "navy"), "JPEG", quality=80, progressive=True)
    assert post(service, progressive, False, 200).json["height"] == 6000


def test_the_issues_webp_bomb_is_413_and_costs_nothing(make_service):
    service = make_service()
    post(service, jpeg(), False, 200)  # warm up
    reset_peak_rss()
    before = rss_mb()
    for want in (False, True):
        detail = assert_problem(post(service, WEBP_BOMB, want, 413), 413)
        assert "7000x7000 WEBP" in detail and "DECODE_MEMORY_MB" in detail
    assert peak_rss_mb() - before < 30
    assert service.counts() == (1, 1)


# --------------------------------------------------------------------------------------------------------
# Small items: MPO, truncated JPEGs, /health
# --------------------------------------------------------------------------------------------------------


def test_an_mpo_jpeg_is_stored_and_served_as_image_jpeg(service):
    """What many cameras write: a JPEG with a second picture after it, which Pillow calls MPO."""
    first, second = Image.new("RGB", (640, 480), "red"), Image.new("RGB", (640, 480), "blue")
    data = encoded(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    for want in (False, True):
        img = post(service, data, want, 200).json
        assert (img["content_type"], img["width"], img["height"]) == ("image/jpeg", 640, 480)
        res = service.client.get(img["file_url"])
        assert res.content_type == "image/jpeg" and res.body == data


def test_what_truncated_files_are_refused_covers(service):
    """README: a file cut short is refused in every format; a JPEG cut short that still ends with an end
    marker (FFD9) cannot be told apart (libjpeg fills the rest with grey, and Pillow reports nothing)."""
    img = gradient(640, 480)
    ends = {"JPEG": b"\xff\xd9", "PNG": _chunk(b"IEND", b""), "GIF": b";", "BMP": b"", "WEBP": b""}
    for fmt, end in ends.items():
        data = encoded(img, fmt)
        assert "truncated" in assert_problem(post(service, data[: len(data) // 2], False, 422), 422) or fmt == "WEBP"
        if fmt != "JPEG":
            assert_problem(post(service, data[: len(data) // 2] + end, False, 422), 422)
    data = encoded(img, "JPEG")
    for want in (False, True):
        assert post(service, data[: len(data) // 2] + b"\xff\xd9", want, 200).json["width"] == 640
        assert_problem(post(service, data[:-2], want, 422), 422)  # without its end marker: refused


def test_health_names_the_model_file_not_where_it_lives(make_service, tmp_path, model_path):
    body = make_service().client.get("/health").json["detector"]
    assert body["model"] == os.path.basename(model_path) and os.sep not in body["model"]
    missing = detect.Detector(str(tmp_path / "models" / "missing.tflite"), threads=1, pool=1)
    body = make_service(detector=missing).client.get("/health").json["detector"]
    assert body["model"] == "missing.tflite"
    assert str(tmp_path) not in body["error"] and "missing.tflite" in body["error"] and "make model" in body["error"]
