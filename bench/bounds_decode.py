"""The decode scenario of the hardening work against the real server process.

    python bench/bounds_decode.py      (or with the others: python bench/bounds.py --only decode)

Each scenario is a self-contained function that starts `python server.py --port 0 --db <temp> --model
$DETECT_MODEL` (bench/serverproc.py) with the default settings, and prints its own markdown table
"| target | measured | ok/FAIL |". Progress goes to stderr. It reports; it asserts nothing.

  decode   8 concurrent POST /images of distinct ~49 MP decompression bombs (2 lossless WebP of 34 bytes,
           2 PNG, 2 GIF, 2 run-length BMP) sent at once with one legitimate 24 MP PNG, twice: with
           detection, then without. The server's peak RSS (VmHWM, reset before each round) must stay under
           600 MB, the PNG answer 200, every bomb 200, 413 or 503, and the server serve normally afterwards.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import signal
import struct
import sys
import tempfile
import threading
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from serverproc import ServerProcess, testdata_paths  # noqa: E402  (bench/serverproc.py)


def progress(text: str) -> None:
    print(f"[bench/bounds] {text}", file=sys.stderr, flush=True)


def model_path() -> str:
    return testdata_paths()[1]


# ---------------------------------------------------------------------------------------------------------
# decode: decompression bombs at once, with one legitimate large photo
# ---------------------------------------------------------------------------------------------------------


def decode_scenario() -> None:
    """Issue 10, "Memory while decoding": peak RSS under 8 concurrent ~49 MP bombs and one 24 MP PNG."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    def png(width: int, height: int, colour_type: int, value: int) -> bytes:
        """A PNG of one value, made without Pillow (quick at 49 MP): colour type 2 = RGB, 6 = RGBA."""
        samples = {2: 3, 6: 4}[colour_type]
        row = b"\x00" + bytes([value]) * (width * samples)
        z = zlib.compressobj(9)
        idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
        ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")

    def photo_png(width: int, height: int) -> bytes:
        """A legitimate photo-sized PNG: smooth gradients, 8-bit RGB (about 1 MB at 24 MP)."""
        import numpy as np
        from PIL import Image

        x, y = np.arange(width, dtype=np.uint32)[None, :], np.arange(height, dtype=np.uint32)[:, None]
        pixels = np.dstack([(x * 255 // width + 0 * y), (y * 255 // height + 0 * x), (x + y) * 255 // (width + height)])
        buf = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    def webp_lossless(width: int, height: int) -> bytes:
        """The issue's 34-byte lossless WebP, with its size bits set to width x height."""
        bomb = bytearray(base64.b64decode("UklGRhoAAABXRUJQVlA4TA4AAAAvV9vVBgcQEf0PRET/Aw=="))
        bits = int.from_bytes(bomb[21:25], "little") & ~0x0FFFFFFF | (width - 1) | (height - 1) << 14
        bomb[21:25] = bits.to_bytes(4, "little")
        return bytes(bomb)

    def gif(width: int, height: int, colour: int) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        img = Image.new("P", (width, height), colour)
        img.putpalette([colour, 255 - colour, 128] * 256)
        img.save(buf, "GIF")
        return buf.getvalue()

    def rle8_bmp(width: int, height: int, index: int) -> bytes:
        row = b"".join(bytes((min(255, width - x), index)) for x in range(0, width, 255)) + b"\x00\x00"
        pixels = row * height + b"\x00\x01"
        palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
        offset = 14 + 40 + len(palette)
        info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
        return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels

    progress("decode: making the bombs and the 24 MP PNG")
    bombs = {
        "webp-1": webp_lossless(7000, 7000), "webp-2": webp_lossless(7000, 6999),
        "png-rgba": png(7000, 7000, 6, 0), "png-rgb": png(7000, 7000, 2, 7),
        "gif-1": gif(7000, 7000, 3), "gif-2": gif(7000, 6999, 9),
        "bmp-1": rle8_bmp(7000, 7000, 1), "bmp-2": rle8_bmp(6999, 7000, 2),
    }
    legit = photo_png(6000, 4000)
    sizes = ", ".join(f"{name} {len(data):,} B" for name, data in bombs.items())
    progress(f"decode: {sizes}; the 24 MP PNG {len(legit):,} B")

    def body(data: bytes, want_detect: bool) -> bytes:
        return json.dumps({"image": base64.b64encode(data).decode("ascii"), "detect": want_detect}).encode()

    def vm(pid: int, key: str) -> float:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024

    def at_once(srv: ServerProcess, requests: dict[str, bytes]) -> dict[str, tuple[int, float, str]]:
        """POST every body at the same moment, each on its own connection: name -> (status, ms, body)."""
        answers: dict[str, tuple[int, float, str]] = {}
        start = threading.Barrier(len(requests))

        def send(name: str, payload: bytes) -> None:
            conn = http.client.HTTPConnection(srv.host, srv.port, timeout=120)
            try:
                start.wait()
                t = time.perf_counter()
                conn.request("POST", "/images", body=payload, headers={"Content-Type": "application/json"})
                res = conn.getresponse()
                answers[name] = (res.status, (time.perf_counter() - t) * 1000, res.read().decode("utf-8", "replace"))
            except OSError as e:
                answers[name] = (0, 0.0, repr(e))
            finally:
                conn.close()

        threads = [threading.Thread(target=send, args=item) for item in requests.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        return answers

    rows: list[tuple[str, str, bool]] = []
    with tempfile.TemporaryDirectory(prefix="bench-bounds-") as tmp, ServerProcess(
        ["--db", os.path.join(tmp, "images.db"), "--model", model_path()], timeout=120
    ) as srv:
        pid = srv.proc.pid
        srv.request("POST", "/images", body(_small_jpeg(), True))  # warm: the model loaded, the database made
        idle = vm(pid, "VmRSS")
        for want_detect in (True, False):
            requests = {name: body(data, want_detect) for name, data in bombs.items()} | {"24 MP PNG": body(legit, want_detect)}
            with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # VmHWM starts again from the RSS now
            answers = at_once(srv, requests)
            peak = vm(pid, "VmHWM")
            label = "with detection" if want_detect else "without detection"
            progress(f"decode ({label}): " + ", ".join(f"{n} {s} {ms:.0f} ms" for n, (s, ms, _) in answers.items()))
            rows.append((f"peak RSS, 8 bombs + the 24 MP PNG at once {label}: < 600 MB", f"{peak:.0f} MB (idle {idle:.0f} MB)", peak < 600))
            status, ms, text = answers.get("24 MP PNG", (0, 0.0, "no answer"))
            rows.append((f"24 MP PNG {label}: 200", f"{status} in {ms:.0f} ms" + ("" if status == 200 else f": {text[:120]}"), status == 200))
            seen = ", ".join(f"{n} {answers.get(n, (0,))[0]}" for n in bombs)
            details = {n: json.loads(answers[n][2]).get("detail", "") for n in bombs if n in answers and answers[n][0] in (413, 503)}
            for n, detail in details.items():
                progress(f"  {n}: {detail}")
            rows.append((f"every bomb {label}: 200, 413 or 503", seen, all(answers.get(n, (0,))[0] in (200, 413, 503) for n in bombs)))
        ms, status, _ = srv.request("GET", "/health", ok=None)
        ms2, status2, _ = srv.request("POST", "/images", body(_small_jpeg((10, 200, 30)), True), ok=None)
        after = vm(pid, "VmRSS")
        rows.append((
            "afterwards: GET /health 200, POST /images 200",
            f"{status} ({ms:.1f} ms), {status2} ({ms2:.0f} ms); RSS {after:.0f} MB", status == 200 and status2 == 200,
        ))
    problem = srv.stop_problem()
    if problem:
        rows.append(("one SIGTERM stops the server", problem, False))
    print("| target | measured | ok/FAIL |")
    print("|---|---|---|")
    for target, measured, ok in rows:
        print(f"| {target} | {measured} | {'ok' if ok else 'FAIL'} |")


def _small_jpeg(colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buf, "JPEG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------

SCENARIOS = {"decode": decode_scenario}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(SCENARIOS), help="run only these scenarios")
    args = parser.parse_args()
    # SIGTERM (make, CI) unwinds like Ctrl-C, so servers are stopped and temp dirs removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    for name in args.only or SCENARIOS:
        SCENARIOS[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
