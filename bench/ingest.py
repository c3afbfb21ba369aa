"""Benchmark of the bulk commands of ingest.py against detect() in this process.

    python bench/ingest.py [--copies N] [--rounds N] [--photos N] [--only import|redetect]
                                                      (`make bench`; DETECT_MODEL and TESTDATA_DIR as for the tests)

Part `import` (import_part): the 12 shared photos, each in --copies versions (default 5: 60 files) whose
bytes differ by one pixel (decoded, one pixel changed, encoded again in its own format: JPEG with its own
quantisation tables, quality="keep", and its EXIF), in a folder with a subfolder. Each round runs
`python ingest.py import <folder> --db <fresh temp db> --model $DETECT_MODEL` with the server's default
settings and reads the files per second from its summary (the time from its first file to its last: not
the start of Python and the model load), alternated with two threads calling detect() back to back on the
same 60 files' bytes in this process (the same interpreters and threads as the server resolves them).
Target: the import's rate at least 85% of the two-caller detect() rate, the median of the rounds' ratios
(what it adds per file: reading, sha256, the look-up of the bytes, the fsync'd write of the image). As
rates move with the load of a shared machine, also the CPU a file takes in each (the import's CPU less
that of an import of an empty folder: Python, the imports, the model). Also one round with --no-detect,
and what a second run over the same folder (everything skipped as duplicates) takes.

Part `redetect` (redetect_part): --photos (default 60) distinct 1080p photos (the shared cat_1080p.jpg,
one pixel inverted in each, in a 16x16 block of its own, encoded again with its own tables) stored with
detection off in a temp database (Store.add_many, with the sizes imaging.inspect gives). Each round runs
`python ingest.py redetect --all --db <it> --model $DETECT_MODEL` (the first round finds them never
analysed, the later ones detect them again) and reads the images per second from its summary, alternated
with two threads calling detect() back to back on the same bytes in this process. Target: redetect's rate
at least 90% of the two-caller detect() rate, the median of the rounds' ratios; also the CPU an image
takes in each (redetect's less that of a `--stale` run that finds nothing to do: Python, the imports, the
model).

Prints markdown rows "| what | median or value | target | ok/FAIL |" and one line of context. Progress
goes to stderr. It reports; it asserts nothing (exit status 0 whatever the rows say, so that `make bench`
goes on: a rate on a shared machine is no verdict).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from PIL import Image  # noqa: E402

import detect  # noqa: E402
import imaging  # noqa: E402
import store  # noqa: E402
from serverproc import rate, server_detector, testdata_paths  # noqa: E402  (bench/serverproc.py)

PHOTOS = (
    "pets.jpg", "cat_1080p.jpg", "cats_and_dogs.jpg", "coupleanddog.jpeg", "kite_and_cold.jpg",
    "pasta_wine_test_image.jpg", "table.jpg", "bird.bmp", "cat.bmp", "dragonfly.bmp", "grace_hopper.bmp",
    "traffic_0001.bmp",
)
SUMMARY = re.compile(r"(\d+) added, (\d+) skipped.*?(\d+) failed; (\d+) files in .*?, ([\d.]+) files/s")


def progress(text: str) -> None:
    print(f"[bench/ingest] {text}", file=sys.stderr, flush=True)


def one_pixel_off(data: bytes, k: int) -> bytes:
    """`data` decoded, pixel (k, 0) changed, encoded again in the same format (JPEG: its own tables, EXIF kept)."""
    img = Image.open(io.BytesIO(data))
    fmt = img.format
    img.load()
    px = img.getpixel((k, 0))
    img.putpixel((k, 0), tuple(255 - c for c in px) if isinstance(px, tuple) else 255 - px)
    out = io.BytesIO()
    if fmt == "JPEG":
        img.save(out, "JPEG", quality="keep", exif=img.info.get("exif", b""))
    else:
        img.save(out, fmt)
    return out.getvalue()


def make_folder(images_dir: str, folder: str, copies: int) -> list[bytes]:
    """`copies` distinct versions of each photo under `folder` (half in a subfolder); their bytes."""
    files = []
    for i, name in enumerate(PHOTOS):
        with open(os.path.join(images_dir, name), "rb") as f:
            original = f.read()
        where = os.path.join(folder, "sub") if i % 2 else folder
        os.makedirs(where, exist_ok=True)
        stem, ext = os.path.splitext(name)
        for k in range(copies):
            data = one_pixel_off(original, k)
            with open(os.path.join(where, f"{stem}-{k}{ext}"), "wb") as f:
                f.write(data)
            files.append(data)
    assert len(set(files)) == len(files), "the versions must differ"
    return files


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_import(folder: str, db: str, model: str, *extra: str) -> tuple[float, float, tuple[int, int, int], float]:
    """(files/s from the summary, wall seconds of the whole process, (added, skipped, failed), its CPU seconds)."""
    env = {**os.environ, "MIN_FREE_DISK_MB": "0"}
    t, cpu = time.perf_counter(), children_cpu()
    done = subprocess.run(
        [sys.executable, "ingest.py", "import", folder, "--db", db, "--model", model, *extra],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
    )
    wall, cpu = time.perf_counter() - t, children_cpu() - cpu
    m = SUMMARY.search(done.stdout)
    if done.returncode != 0 or not m:
        raise RuntimeError(f"ingest.py import exited {done.returncode}:\n{done.stdout}\n{done.stderr[-2000:]}")
    added, skipped, failed, _, per_s = m.groups()
    return float(per_s), wall, (int(added), int(skipped), int(failed)), cpu


def import_part(images_dir: str, model: str, detector: detect.Detector, tmp: str, copies: int, rounds: int) -> list[tuple]:
    """The rows of part `import`."""
    folder = os.path.join(tmp, "photos")
    files = make_folder(images_dir, folder, copies)
    n = len(files)
    progress(f"import: {n} files ({len(PHOTOS)} photos x {copies}), {rounds} rounds of import and of two detect() callers")

    def two_callers() -> float:
        per = n // 2
        offsets = iter(range(2))

        def work():
            start = next(offsets) * per  # each thread its own half: the 60 files once between them
            it = iter(files[start:start + per])
            return lambda: detector.detect(next(it))

        return rate(2, per, work)

    for data in files[:4]:
        detector.detect(data)  # warm up
    empty = os.path.join(tmp, "empty")
    os.makedirs(empty)
    imports, walls, detects, import_cpu, detect_cpu = [], [], [], [], []
    for r in range(rounds):
        got, wall, counts, cpu = run_import(folder, os.path.join(tmp, f"round{r}.db"), model)
        if counts != (n, 0, 0):
            raise RuntimeError(f"round {r}: expected {n} added, got {counts}")
        start_up = run_import(empty, os.path.join(tmp, f"empty{r}.db"), model)[3]  # Python, imports, the model
        imports.append(got)
        walls.append(wall)
        import_cpu.append((cpu - start_up) / n * 1000)
        before = self_cpu()
        detects.append(two_callers())
        detect_cpu.append((self_cpu() - before) / n * 1000)
        progress(
            f"round {r + 1}: import {got:.1f} files/s ({wall:.1f} s with start-up, {import_cpu[-1]:.1f} ms CPU a file), "
            f"two detect() callers {detects[-1]:.1f}/s ({detect_cpu[-1]:.1f} ms CPU an image); load {os.getloadavg()[0]:.1f}"
        )
    again, again_wall, counts, _ = run_import(folder, os.path.join(tmp, "round0.db"), model)
    if counts != (0, n, 0):
        raise RuntimeError(f"the second run: expected {n} skipped, got {counts}")
    bare, bare_wall, _, _ = run_import(folder, os.path.join(tmp, "nodetect.db"), model, "--no-detect")
    imp, det = statistics.median(imports), statistics.median(detects)
    shares = [i / d for i, d in zip(imports, detects, strict=True)]
    share = statistics.median(shares)
    cpu_ratio = statistics.median(import_cpu) / statistics.median(detect_cpu)
    return [
        (f"import of {n} files with detection: files/s", f"{imp:.1f} (rounds: {'/'.join(f'{x:.1f}' for x in imports)})", "", None),
        ("two callers of detect() on the same bytes: images/s", f"{det:.1f} (rounds: {'/'.join(f'{x:.1f}' for x in detects)})", "", None),
        ("import / two detect() callers, median of the rounds' ratios", f"{share:.0%} ({'/'.join(f'{x:.0%}' for x in shares)})", ">= 85%", share >= 0.85),
        (
            "CPU a file: import (start-up taken off) / detect()",
            f"{cpu_ratio:.2f} ({statistics.median(import_cpu):.1f} / {statistics.median(detect_cpu):.1f} ms)", "", None,
        ),
        (f"the whole `python ingest.py import` process, {n} files", f"{statistics.median(walls):.1f} s", "", None),
        (f"a second run over the same {n} files (all skipped as duplicates)", f"{again:.0f} files/s ({again_wall:.1f} s in all)", "", None),
        (f"import of {n} files with --no-detect", f"{bare:.1f} files/s ({bare_wall:.1f} s in all)", "", None),
    ]


# -- redetect ----------------------------------------------------------------------------------------------

REDETECT_SUMMARY = re.compile(r"(\d+) re-detected, (\d+) skipped.*?(\d+) failed; (\d+) images in .*?, ([\d.]+) images/s")
PHOTO_1080P = "cat_1080p.jpg"


def distinct_versions(data: bytes, count: int) -> list[bytes]:
    """`count` versions of the JPEG `data`, each with one pixel inverted (in a 16x16 block of its own) and
    encoded again with the photo's own tables; a change that quantisation takes back is tried elsewhere."""
    out: dict[bytes, None] = {}
    k = 0
    while len(out) < count:
        img = Image.open(io.BytesIO(data))  # opened each time: quality="keep" needs the JPEG it came from
        img.load()
        x, y = (16 * k) % img.width, 16 * ((16 * k) // img.width) % img.height
        img.putpixel((x, y), tuple(255 - c for c in img.getpixel((x, y))))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality="keep", exif=img.info.get("exif", b""))
        out[buf.getvalue()] = None
        k += 1
        if k > 10 * count:
            raise RuntimeError(f"found only {len(out)} distinct versions of the photo")
    return list(out)


def fill_undetected(db: str, photos: list[bytes], max_pixels: int) -> None:
    """A database holding `photos`, stored with detection off (as POST /images with detect=false stores them)."""
    images = store.Store(db)
    try:
        budget = imaging.DecodeBudget()
        new = []
        for data in photos:
            decoded = imaging.inspect(data, max_pixels, budget)
            sha256 = hashlib.sha256(data).hexdigest()
            new.append(store.NewImage(
                data, sha256, decoded.content_type, decoded.width, decoded.height, f"untitled {sha256[:8]}", True, False,
            ))
        images.add_many(new)
    finally:
        images.shutdown()


def run_redetect(db: str, model: str, *extra: str) -> tuple[float, tuple[int, int, int], float]:
    """(images/s from the summary, (re-detected, skipped, failed), CPU seconds) of `python ingest.py redetect`."""
    cpu = children_cpu()
    done = subprocess.run(
        [sys.executable, "ingest.py", "redetect", "--db", db, "--model", model, *extra],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "MIN_FREE_DISK_MB": "0"}, timeout=600,
    )
    m = REDETECT_SUMMARY.search(done.stdout)
    if done.returncode != 0 or not m:
        raise RuntimeError(f"ingest.py redetect exited {done.returncode}:\n{done.stdout}\n{done.stderr[-2000:]}")
    again, skipped, failed, _, per_s = m.groups()
    return float(per_s), (int(again), int(skipped), int(failed)), children_cpu() - cpu


def redetect_part(images_dir: str, model: str, detector: detect.Detector, tmp: str, count: int, rounds: int) -> list[tuple]:
    """The rows of part `redetect`: `count` distinct 1080p photos (the shared cat_1080p.jpg, one pixel changed
    in each) stored with detection off; each round `python ingest.py redetect --all` on them (the first
    round finds them never analysed, the later ones detects them again), alternated with two threads
    calling detect() back to back on the same bytes in this process."""
    with open(os.path.join(images_dir, PHOTO_1080P), "rb") as f:
        original = f.read()
    photos = distinct_versions(original, count)
    db = os.path.join(tmp, "redetect.db")
    fill_undetected(db, photos, detector.max_pixels)
    progress(f"redetect: {count} 1080p photos stored without detection, {rounds} rounds of redetect and of two detect() callers")

    def two_callers() -> float:
        per = count // 2
        offsets = iter(range(2))

        def work():
            start = next(offsets) * per  # each thread its own half: the photos once between them
            it = iter(photos[start:start + per])
            return lambda: detector.detect(next(it))

        return rate(2, per, work)

    for data in photos[:4]:
        detector.detect(data)  # warm up
    redetects, detects, redetect_cpu, detect_cpu = [], [], [], []
    for r in range(rounds):
        got, counts, cpu = run_redetect(db, model, "--all")
        if counts != (count, 0, 0):
            raise RuntimeError(f"round {r}: expected {count} re-detected, got {counts}")
        start_up = run_redetect(db, model)[2]  # --stale after --all finds nothing: Python, imports, the model
        redetects.append(got)
        redetect_cpu.append((cpu - start_up) / count * 1000)
        before = self_cpu()
        detects.append(two_callers())
        detect_cpu.append((self_cpu() - before) / count * 1000)
        progress(f"round {r + 1}: redetect {got:.1f} images/s ({redetect_cpu[-1]:.1f} ms CPU an image), two detect() "
                 f"callers {detects[-1]:.1f}/s ({detect_cpu[-1]:.1f} ms CPU an image); load {os.getloadavg()[0]:.1f}")
    shares = [a / b for a, b in zip(redetects, detects, strict=True)]
    share = statistics.median(shares)
    cpu_ratio = statistics.median(redetect_cpu) / statistics.median(detect_cpu)
    return [
        (f"redetect --all of {count} 1080p photos: images/s", f"{statistics.median(redetects):.1f} "
         f"(rounds: {'/'.join(f'{x:.1f}' for x in redetects)})", "", None),
        ("two callers of detect() on the same bytes: images/s", f"{statistics.median(detects):.1f} "
         f"(rounds: {'/'.join(f'{x:.1f}' for x in detects)})", "", None),
        ("redetect / two detect() callers, median of the rounds' ratios", f"{share:.0%} "
         f"({'/'.join(f'{x:.0%}' for x in shares)})", ">= 90%", share >= 0.90),
        ("CPU an image: redetect (start-up taken off) / detect()",
         f"{cpu_ratio:.2f} ({statistics.median(redetect_cpu):.1f} / {statistics.median(detect_cpu):.1f} ms)", "", None),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=5, help="versions of each of the 12 photos (default 5: 60 files)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of import and of detect() (default 5)")
    parser.add_argument("--photos", type=int, default=60, help="distinct 1080p photos for part redetect (default 60)")
    parser.add_argument("--only", choices=("import", "redetect"), help="run one part (default: both)")
    args = parser.parse_args()
    # SIGTERM (make, CI) unwinds like Ctrl-C, so the temp dir is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    testdata, model = testdata_paths()
    detector = server_detector(model)  # laid out as the server lays its own out
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        rows = []
        if args.only in (None, "import"):
            rows += import_part(os.path.join(testdata, "images"), model, detector, tmp, args.copies, args.rounds)
        if args.only in (None, "redetect"):
            rows += redetect_part(os.path.join(testdata, "images"), model, detector, tmp, args.photos, args.rounds)
    print("| what | median or value | target | ok/FAIL |")
    print("|---|---|---|---|")
    for what, got, want, ok in rows:
        print(f"| {what} | {got} | {want or '—'} | {'—' if ok is None else ('ok' if ok else 'FAIL')} |")
    print(
        f"\ncores: {os.cpu_count()}, {detector.pool} interpreter(s) x {detector.threads} thread(s) in the commands and "
        f"in-process alike, model: {os.path.basename(model)}; {time.perf_counter() - started:.0f} s in all"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
