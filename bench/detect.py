"""Benchmark of detect.py: where the time of one detection goes, and how two callers share two cores.

    python bench/detect.py [--runs N]        (`make bench`; DETECT_MODEL and TESTDATA_DIR as for the tests)
    taskset -c 0 python bench/detect.py --layouts 1x1,2x1,2x2,4x4   (interpreters x threads, any cores)

Prints medians (ms) of preprocess (decode + resize), invoke, postprocess and end-to-end `detect()` for
cat_1080p.jpg and a 4000x3000 JPEG made here, for three ways to spend the cores: one interpreter with
all threads, a pool of one-thread interpreters, a pool of interpreters with all threads each. Then
images per second with two concurrent callers against the target of issue 2. It reports; it asserts
nothing.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from PIL import Image  # noqa: E402

import detect  # noqa: E402
from serverproc import rate, testdata_paths  # noqa: E402  (bench/serverproc.py, beside this file)


def median_ms(values: list[float]) -> float:
    return statistics.median(values)


def photos(images_dir: str) -> dict[str, bytes]:
    with open(os.path.join(images_dir, "cat_1080p.jpg"), "rb") as f:
        cat = f.read()
    big = Image.open(io.BytesIO(cat)).convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=90)
    return {"cat_1080p.jpg": cat, "4000x3000.jpg": buf.getvalue()}


def one_caller(det: detect.Detector, data: bytes, runs: int) -> dict[str, float]:
    for _ in range(3):
        det.detect(data)  # warm up caches and the interpreter
    rows: dict[str, list[float]] = {"preprocess": [], "invoke": [], "postprocess": [], "end_to_end": []}
    for _ in range(runs):
        t = time.perf_counter()
        result = det.detect(data)
        rows["end_to_end"].append((time.perf_counter() - t) * 1000)
        for k in ("preprocess", "invoke", "postprocess"):
            rows[k].append(result.timings[k])
    return {k: median_ms(v) for k, v in rows.items()}


def callers(det: detect.Detector, data: bytes, n_callers: int, per_caller: int) -> float:
    """Images per second with `n_callers` threads calling detect() back to back."""
    return rate(n_callers, per_caller, lambda: lambda: det.detect(data))


def usable_cores() -> int:
    """The cores this process may run on (taskset / cgroups), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def layouts(model: str, images: dict[str, bytes], specs: list[str], runs: int) -> int:
    """One caller's end-to-end median and 1/2/4 callers' images per second for each PxT layout."""
    cat = images["cat_1080p.jpg"]
    print(f"model: {os.path.basename(model)}, usable cores: {usable_cores()}, photo cat_1080p.jpg, runs: {runs}\n")
    print("| interpreters x threads | threads in all | 1 caller e2e ms | 1 caller img/s | 2 callers img/s | 4 callers img/s |")
    print("|---|---|---|---|---|---|")
    for spec in specs:
        pool, threads = (int(v) for v in spec.lower().split("x"))
        det = detect.Detector(model, threads=threads, pool=pool)
        one = one_caller(det, cat, runs)
        rates = [callers(det, cat, n, max(4, runs // n)) for n in (1, 2, 4)]
        print(f"| {pool} x {threads} | {pool * threads} | {one['end_to_end']:.1f} | " + " | ".join(f"{r:.0f}" for r in rates) + " |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="timed calls per measurement (default 40)")
    parser.add_argument("--layouts", help="only compare these interpreter layouts, e.g. 1x1,2x1,2x2,4x4")
    args = parser.parse_args()
    testdata, model = testdata_paths()
    cores = usable_cores()
    images = photos(os.path.join(testdata, "images"))
    if args.layouts:
        return layouts(model, images, args.layouts.split(","), args.runs)
    print(f"model: {model}\ncores: {cores}, runs: {args.runs} per median\n")

    configs = [
        (f"1 interpreter x {cores} threads", 1, cores),
        (f"{cores} interpreters x 1 thread", cores, 1),
        (f"{cores} interpreters x {cores} threads", cores, cores),
    ]
    baseline = detect.Detector(model, threads=1, pool=1)  # "one-thread preprocess + invoke"
    base = {name: one_caller(baseline, data, args.runs) for name, data in images.items()}

    print("| configuration | photo | preprocess | invoke | postprocess | end-to-end | e2e / (pre+inv) | 2 callers img/s | target img/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = {}
    for label, pool, threads in [("1 interpreter x 1 thread", 1, 1)] + configs:
        det = baseline if (pool, threads) == (1, 1) else detect.Detector(model, threads=threads, pool=pool)
        for name, data in images.items():
            one = base[name] if det is baseline else one_caller(det, data, args.runs)
            ratio = one["end_to_end"] / (one["preprocess"] + one["invoke"])
            rate = callers(det, data, 2, args.runs)
            target = 0.8 * 2 / ((base[name]["preprocess"] + base[name]["invoke"]) / 1000)
            results[(label, name)] = (one, ratio, rate, target)
            print(
                f"| {label} | {name} | {one['preprocess']:.1f} | {one['invoke']:.1f} | {one['postprocess']:.2f} "
                f"| {one['end_to_end']:.1f} | {ratio:.2f} | {rate:.0f} | {target:.0f} |"
            )

    default = f"{cores} interpreters x {cores} threads"
    d_one, d_ratio, d_rate, d_target = results[(default, "cat_1080p.jpg")]
    big = results[(default, "4000x3000.jpg")][0]
    print(f"\nTargets (issue 2), default configuration '{default}', cat_1080p.jpg unless named:")
    checks = [
        ("invoke median, one caller", f"{d_one['invoke']:.1f} ms", "<= 10 ms", d_one["invoke"] <= 10),
        ("end-to-end / (preprocess + invoke)", f"{d_ratio:.2f}", "<= 1.2", d_ratio <= 1.2),
        ("4000x3000 JPEG preprocess", f"{big['preprocess']:.1f} ms", "<= 25 ms", big["preprocess"] <= 25),
        ("two callers, images/s", f"{d_rate:.0f}", f">= {d_target:.0f}", d_rate >= d_target),
    ]
    for what, got, want, ok in checks:
        print(f"- {what}: {got} (target {want}) {'ok' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
