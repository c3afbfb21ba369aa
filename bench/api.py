"""Benchmark of the HTTP API through the real server process: uploads, listing 100,000 and 1,000,000 images, memory.

    python bench/api.py [--runs N] [--queries N] [--rows N] [--uploads N] [--big-rows N] [--db URL [--drivers]]
                                             (DETECT_MODEL and TESTDATA_DIR as for the tests)

Starts `python server.py --port 0 --db <temp> --model $DETECT_MODEL` (a fresh database for each part)
and talks to it over one keep-alive connection (http.client):

1. POST /images {"image": <base64>, "detect": true} of cat_1080p.jpg re-encoded with one pixel changed
   per request (distinct bytes, so the stored-detections cache is not hit), timed alternately with
   `detect.Detector.detect()` on the same bytes in this process (DETECT_THREADS / DETECT_THRESHOLD as the
   server resolves them). Also: re-posting identical bytes (the cached path) and detect=false.
   1b. The same with fresh 4000x3000 JPEG bytes (a 1080p photo enlarged, with noise: ~3 MB, as a camera's).
2. 100,000 synthetic images (1-5 detections each, COCO names, 'dog' in about 10% of images) written
   straight into the SQLite file before the server starts; then GET /images?objects=dog, GET /images/{id}
   for random ids and a few other listings, round-robin so noise falls on all alike.
3. The server's VmRSS after 10 and after 1,000 uploads of distinct 64x64 JPEGs with detect=true.
4. 1,000,000 synthetic images (~3,000,000 detections, as in 2: no image holds a person and a car, no
   person reaches 0.95) filled through Store.add_many into a temporary file (its fill time reported, the
   file deleted afterwards); the first page of each search of issue 15, GET /objects and GET /images/{id},
   round-robin; POST /images detect=false of distinct 64x64 JPEGs, alternately to it and to a server whose
   database held 10 images. `--big-rows 0` skips it.
5. `--db postgresql://...`: only this part. Part 4's searches, GET /images/{id} and POST /images detect=false
   (at N images and at 10) at --rows and at --big-rows images, on SQLite and on PostgreSQL side by side:
   each filled the same way through Store.add_many (PostgreSQL: then VACUUM ANALYZE, as autovacuum would
   soon after), every request round-robin over the servers. The bench creates its databases on that server
   (bench_api_<pid>_*, synchronous_commit on) and drops them at the end. `--drivers` adds a column per
   driver (psycopg2-binary, psycopg 3), each with a database it filled.

Prints one markdown table of medians (ms) / values against the issue's targets, one line of context,
then part 4's table (ok/FAIL).
Progress goes to stderr. It reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import io
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from PIL import Image, JpegImagePlugin  # noqa: E402

import detect  # noqa: E402
import imgur  # noqa: E402
import ingest  # noqa: E402
import store  # noqa: E402
from serverproc import ServerProcess, server_detector, testdata_paths  # noqa: E402  (bench/serverproc.py)


def median_ms(values: list[float]) -> float:
    return statistics.median(values)


def progress(text: str) -> None:
    print(f"[bench/api] {text}", file=sys.stderr, flush=True)


def server(db: str, model: str) -> ServerProcess:
    """`python server.py` on a free port with its own database; one keep-alive connection to it."""
    return ServerProcess(["--db", db, "--model", model], timeout=120)


# ---------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------


def jpeg(img: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **options)
    return buf.getvalue()


def variants(photo: bytes, n: int) -> list[bytes]:
    """`n` re-encodings of JPEG `photo` with its own quantisation tables and chroma subsampling, each with
    one pixel changed: distinct sha256, about the same size and the same work for the model."""
    original = Image.open(io.BytesIO(photo))
    options = {"qtables": original.quantization, "subsampling": JpegImagePlugin.get_sampling(original)}
    base = original.convert("RGB")
    out, seen, block = [], set(), 0
    while len(out) < n:  # one pixel of the next 8x8 block set to the far extreme; skip one lost to quantisation
        xy = (8 * block % base.width, 8 * block // base.width * 8)
        block += 1
        img = base.copy()
        img.putpixel(xy, tuple(0 if c >= 128 else 255 for c in base.getpixel(xy)))
        data = jpeg(img, **options)
        if hashlib.sha256(data).digest() not in seen:
            seen.add(hashlib.sha256(data).digest())
            out.append(data)
    return out


def small_jpegs(n: int, seed: int = 7) -> list[bytes]:
    """`n` distinct 64x64 JPEGs (noise; each also carries its index in the first pixels)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        pixels[0, 0] = (i >> 16 & 255, i >> 8 & 255, i & 255)
        out.append(jpeg(Image.fromarray(pixels), quality=85))
    return out


BIG = (4000, 3000)


def big_photo(source: Image.Image, seed: int) -> bytes:
    """`source` enlarged to 4000x3000 with noise of its own (distinct bytes, camera-like size: 2.6-3.3 MB)."""
    rng = np.random.default_rng(seed)
    pixels = np.asarray(source.convert("RGB").resize(BIG, Image.Resampling.BICUBIC), dtype=np.int16)
    pixels = pixels + rng.normal(0, 6, size=pixels.shape).astype(np.int16)
    return jpeg(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), quality=92)


def post_body(data: bytes, want_detect: bool) -> bytes:
    return json.dumps({"image": base64.b64encode(data).decode("ascii"), "detect": want_detect}).encode()


# Relative frequency of COCO names among detections: people everywhere, some household objects, pets.
# Other names weigh 1. With 1-5 detections per image, 'dog' (3.7% of detections) is in about 10% of images.
WEIGHTS = {
    "person": 30, "car": 6, "chair": 5, "dog": 5, "cat": 3.5, "cup": 4, "bottle": 4, "dining table": 3, "tv": 2, "book": 2,
}
# Searches that must not walk a whole name: no image holds a person and a car (a car drawn beside a person
# becomes a truck), and no person reaches 0.95 (people's confidences are drawn from 0.5-0.94, the rest 0.5-0.99).
APART = ("person", "car", "truck")
PERSON_MAX = 0.94


def fill(path: str, rows: int, model: str, seed: int = 1, chunk: int = 10_000) -> dict[str, float]:
    """Write `rows` synthetic images (8 shared blobs) with their detections into a new database at `path`,
    through Store.add_many (the store's bulk load: the same tables, indexes and counts as an upload).

    Drawn with numpy a chunk at a time, labels memoised: 1,000,000 images take about 1.5 minutes here."""
    t0 = time.perf_counter()
    names = [n for n in dict.fromkeys(detect.load_labels(model)) if n not in ("", "???")]
    weights = np.array([WEIGHTS.get(n, 1) for n in names], dtype=float)
    rng = np.random.default_rng(seed)
    person, car, truck = (names.index(n) for n in APART)
    blobs = []
    for i in range(8):
        data = jpeg(Image.new("RGB", (32, 32), (30 * i, 255 - 30 * i, 128)), quality=90)
        blobs.append((hashlib.sha256(data).hexdigest(), data))
    detected_with = "0123456789abcdef@0.5"
    start_ms = int(time.time() * 1000) - rows * 60_000
    counted = {"detections": 0, "with_dog": 0}
    labels: dict[tuple[str, ...], str | None] = {}  # describe() of the names as found, memoised
    dog = names.index("dog")

    def images():
        for first in range(1, rows + 1, chunk):
            n = min(chunk, rows + 1 - first)
            k = rng.integers(1, 6, n)  # detections per image
            total = int(k.sum())
            which = rng.choice(len(names), total, p=weights / weights.sum())
            owner = np.repeat(np.arange(n), k)
            has_person = np.zeros(n, bool)
            has_person[owner[which == person]] = True
            which[(which == car) & has_person[owner]] = truck
            conf = rng.uniform(0.5, 0.99, total)
            conf = np.round(np.where(which == person, 0.5 + (conf - 0.5) * (PERSON_MAX - 0.5) / 0.49, conf), 4)
            xy = rng.random((total, 2)) * 0.6
            # Boxes rounded to 4 places as detect.postprocess rounds them (full floats made pages 40% longer).
            xy = np.round(np.concatenate([xy, xy + 0.3], axis=1), 4)
            has_dog = np.zeros(n, bool)
            has_dog[owner[which == dog]] = True
            counted["with_dog"] += int(has_dog.sum())
            counted["detections"] += total
            which_l, conf_l, xy_l, ends = which.tolist(), conf.tolist(), xy.tolist(), np.cumsum(k).tolist()
            lo = 0
            for i in range(n):
                hi = ends[i]
                order = sorted(range(lo, hi), key=conf_l.__getitem__, reverse=True)  # highest first, as detected
                lo = hi
                found = tuple(names[which_l[j]] for j in order)
                if found not in labels:
                    labels[found] = ingest.describe(found)
                boxes = tuple(
                    store.Found(name, conf_l[j], *xy_l[j])
                    for name, j in zip(found, order, strict=True)
                )
                image_id = first + i
                sha, data = blobs[image_id % len(blobs)]
                yield store.NewImage(
                    data, sha, "image/jpeg", 640, 480, labels[found], True, True, boxes, detected_with,
                    None, start_ms + image_id * 60_000,
                )

    images_store = store.Store(path)  # creates the schema
    postgres = is_postgres(path)
    try:
        with images_store.connection():
            sql = images_store.database.execute_sql
            if not postgres:
                # A bigger page cache for this connection only: the indexes of a large fill stay in memory.
                sql("PRAGMA cache_size = -262144")
            # 100,000 a transaction: each commit writes every page it changed to the WAL, and the
            # (name, confidence) index changes pages all over; 10,000 took 104 s for 1,000,000 images, this 91 s.
            images_store.add_many(images(), batch=100_000)  # the store's public bulk load, ids 1..rows in order
            loaded = time.perf_counter()
            if postgres:
                # What autovacuum does within a minute or two of a bulk load (statistics for the planner, the
                # visibility map for index-only scans), done now so the searches see the steady state.
                images_store.database.execute_sql("VACUUM ANALYZE")
                mb = sql("SELECT pg_database_size(current_database())").fetchone()[0] / 2**20
            else:
                sql("PRAGMA wal_checkpoint(TRUNCATE)")
                mb = os.path.getsize(path) / 2**20
    finally:
        images_store.shutdown()
    detections, with_dog = counted["detections"], counted["with_dog"]
    return {"seconds": time.perf_counter() - t0, "load_seconds": loaded - t0, "detections": detections,
            "dog_share": with_dog / rows, "mb": mb}


# ---------------------------------------------------------------------------------------------------------
# The three parts
# ---------------------------------------------------------------------------------------------------------


def alternately(srv: ServerProcess, detector: detect.Detector, photos: list[bytes], bodies: list[bytes], warm: int,
                content_types: list[str] | None = None):
    """(POST ms, detect() ms, the last answer): POST /images of bodies[i] (as content_types[i], else JSON)
    and detect() of photos[i] in this process, after `warm` of each untimed; which goes first alternates,
    so drift falls on both alike."""
    post, bare, body = [], [], b""

    def timed_detect(i: int) -> None:
        t = time.perf_counter()
        detector.detect(photos[i])
        bare.append((time.perf_counter() - t) * 1000)

    kinds = content_types or ["application/json"] * len(bodies)
    for i in range(warm):
        detector.detect(photos[i])
        srv.request("POST", "/images", bodies[i], kinds[i])
    for i in range(warm, len(bodies)):
        if i % 2:
            timed_detect(i)
        ms, _, body = srv.request("POST", "/images", bodies[i], kinds[i])
        post.append(ms)
        if not i % 2:
            timed_detect(i)
    return post, bare, body


def part_upload(tmp: str, model: str, cat: bytes, detector: detect.Detector, runs: int) -> dict:
    warm = 3
    vs = variants(cat, warm + 2 * runs)
    detect_bodies = [post_body(v, True) for v in vs[: warm + runs]]
    plain_bodies = [post_body(v, False) for v in vs[warm + runs:]]
    progress(f"part 1: {len(vs)} variants of cat_1080p.jpg ({len(cat):,} bytes; variants ~{len(vs[0]):,}), {runs} runs")
    out: dict[str, list[float]] = {"post": [], "detect": [], "cached": [], "plain": []}
    with server(os.path.join(tmp, "upload.db"), model) as srv:
        out["post"], out["detect"], body = alternately(srv, detector, vs, detect_bodies, warm)
        detected = json.loads(body)["objects"]
        for _ in range(runs):
            out["cached"].append(srv.request("POST", "/images", detect_bodies[warm])[0])
        for b in plain_bodies:
            out["plain"].append(srv.request("POST", "/images", b)[0])
    return {k: median_ms(v) for k, v in out.items()} | {"objects": detected, "server": srv}


def part_upload_big(tmp: str, model: str, cat: bytes, detector: detect.Detector, runs: int) -> dict:
    """POST /images of fresh 4000x3000 JPEG bytes with detection, alternately with detect() on the same
    bytes in this process (as part 1 does for the 1080p photo)."""
    warm = 2
    vs = variants(big_photo(Image.open(io.BytesIO(cat)), 1), 2 * (warm + runs))
    progress(f"part 1b: {len(vs)} variants of a 4000x3000 JPEG (~{len(vs[0]):,} bytes), {runs} runs as JSON, {runs} as a file")
    json_photos, file_photos = vs[: warm + runs], vs[warm + runs:]
    files = [imgur._multipart({"detect": "true"}, "image", v, "camera.jpg", "image/jpeg") for v in file_photos]
    with server(os.path.join(tmp, "upload-big.db"), model) as srv:
        post, bare, _ = alternately(srv, detector, json_photos, [post_body(v, True) for v in json_photos], warm)
        as_file, bare_file, _ = alternately(srv, detector, file_photos, [b for b, _ in files], warm, [c for _, c in files])
    return {"post": median_ms(post), "detect": median_ms(bare), "file": median_ms(as_file),
            "detect_file": median_ms(bare_file), "bytes": len(vs[0]), "server": srv}


def part_list(tmp: str, model: str, rows: int, queries: int) -> dict:
    path = os.path.join(tmp, "list.db")
    progress(f"part 2: writing {rows:,} synthetic images")
    filled = fill(path, rows, model)
    progress(f"part 2: wrote {filled['detections']:,} detections in {filled['seconds']:.1f} s; querying")
    deep = rows // 2
    paths = {
        "objects=dog": "/images?objects=dog",
        "no filter": "/images",
        "objects=dog,cat": "/images?objects=dog,cat",
        "objects=dog,person&match=all": "/images?objects=dog,person&match=all",
        f"before={deep}": f"/images?before={deep}",
        f"objects=dog&before={deep}": f"/images?objects=dog&before={deep}",
        # What issue 15 measured before the counts table and the bounded walks:
        "objects=person,car&match=all": "/images?objects=person,car&match=all",
        "objects=person&min_confidence=0.95": "/images?objects=person&min_confidence=0.95",
        "GET /objects": "/objects",
    }
    rng = random.Random(2)
    times: dict[str, list[float]] = {k: [] for k in paths} | {"by_id": []}
    counts: dict[str, int] = {}
    with server(path, model) as srv:
        for key, p in paths.items():  # warm up; check each answers a full page
            counts[key] = len(json.loads(srv.request("GET", p)[2]))
        for _ in range(5):
            srv.request("GET", f"/images/{rng.randint(1, rows)}")
        for _ in range(queries):
            for key, p in paths.items():
                times[key].append(srv.request("GET", p)[0])
            for _ in range(3):
                times["by_id"].append(srv.request("GET", f"/images/{rng.randint(1, rows)}")[0])
    return {k: median_ms(v) for k, v in times.items()} | {
        "filled": filled, "counts": counts, "server": srv, "n_by_id": len(times["by_id"]), "deep": deep,
    }


# The first pages part 4 times, with their targets (ms) where issue 15 sets one (None: shown for context).
SCALE_PATHS = {
    "one name: objects=dog": ("/images?objects=dog", 10),
    "three names: objects=dog,cat,car": ("/images?objects=dog,cat,car", 10),
    "match=all, images in common: objects=dog,person": ("/images?objects=dog,person&match=all", 10),
    "match=all, none in common: objects=person,car": ("/images?objects=person,car&match=all", 10),
    "min_confidence=0.95 with hits: objects=dog": ("/images?objects=dog&min_confidence=0.95", 10),
    "min_confidence=0.95, none there: objects=person": ("/images?objects=person&min_confidence=0.95", 10),
    "deep: before={deep}": ("/images?before={deep}", 10),
    "deep: objects=dog&before={deep}": ("/images?objects=dog&before={deep}", 10),
    "a category: objects=animal": ("/images?objects=animal", 10),
    "GET /objects": ("/objects", 2),
    "min_confidence=0.99, a few hits: objects=dog": ("/images?objects=dog&min_confidence=0.99", None),
    "match=all of two rare names: objects=toaster,hair drier": ("/images?objects=toaster,hair%20drier&match=all", None),
}


def part_scale(tmp: str, model: str, rows: int, queries: int, runs: int) -> dict:
    path, small = os.path.join(tmp, "scale.db"), os.path.join(tmp, "scale-10.db")
    progress(f"part 4: writing {rows:,} synthetic images")
    filled = fill(path, rows, model, seed=4)
    fill(small, 10, model, seed=4)
    progress(f"part 4: wrote {filled['detections']:,} detections in {filled['seconds']:.1f} s "
             f"({filled['mb']:,.0f} MB); querying")
    deep = rows // 10
    paths = {k.format(deep=deep): (p.format(deep=deep), target) for k, (p, target) in SCALE_PATHS.items()}
    rng = random.Random(3)
    times: dict[str, list[float]] = {k: [] for k in paths} | {"by_id": [], "post": [], "post_10": []}
    counts: dict[str, int] = {}
    bodies = [post_body(d, False) for d in small_jpegs(2 * (runs + 3), seed=11)]
    try:
        with server(path, model) as big, server(small, model) as ten:
            for key, (p, _) in paths.items():  # warm up; note the page sizes
                counts[key] = len(json.loads(big.request("GET", p)[2]))
            for _ in range(5):
                big.request("GET", f"/images/{rng.randint(1, rows)}")
            for _ in range(queries):
                for key, (p, _) in paths.items():
                    times[key].append(big.request("GET", p)[0])
                for _ in range(3):
                    times["by_id"].append(big.request("GET", f"/images/{rng.randint(1, rows)}")[0])
            for i in range(runs + 3):  # alternately, so drift falls on both alike; 3 to warm up
                a, b = big.request("POST", "/images", bodies[2 * i])[0], ten.request("POST", "/images", bodies[2 * i + 1])[0]
                if i >= 3:
                    times["post"].append(a)
                    times["post_10"].append(b)
    finally:
        for name in os.listdir(tmp):  # about 1 GB at 1,000,000 images: gone before part 3 runs
            if name.startswith("scale"):
                os.remove(os.path.join(tmp, name))
    return {k: median_ms(v) for k, v in times.items()} | {
        "filled": filled, "counts": counts, "servers": (big, ten), "paths": paths, "n_by_id": len(times["by_id"]),
    }


def print_scale(sc: dict, rows: int) -> None:
    print(f"\n| at {rows:,} images, {sc['filled']['detections']:,} detections | median | target | ok/FAIL |")
    print("|---|---|---|---|")
    for key, (_, target) in sc["paths"].items():
        got = sc[key]
        print(f"| {key} ({sc['counts'][key]} {'names' if key == 'GET /objects' else 'images'}) | {got:.2f} ms | {'<= %d ms' % target if target else '—'} | "
              f"{'—' if target is None else 'ok' if got <= target else 'FAIL'} |")
    print(f"| GET /images/{{id}}, random ids | {sc['by_id']:.2f} ms | <= 3 ms | {'ok' if sc['by_id'] <= 3 else 'FAIL'} |")
    ratio = sc["post"] / sc["post_10"]
    print(f"| POST /images 64x64 detect=false: at {rows:,} / at 10 images | {ratio:.2f} ({sc['post']:.1f} / "
          f"{sc['post_10']:.1f} ms) | <= 1.2 | {'ok' if ratio <= 1.2 else 'FAIL'} |")
    stops = [s.stop_problem() for s in sc["servers"] if s.stop_problem()]
    print(f"\nnotes: filled through Store.add_many in {sc['filled']['seconds']:.0f} s ({sc['filled']['mb']:,.0f} MB); "
          f"{sc['n_by_id']} GET by id; page size 100" + (f"; REGRESSION in SIGTERM handling: {'; '.join(stops)}" if stops else ""))


# ---------------------------------------------------------------------------------------------------------
# Part 5 (--db): the searches and uploads of part 4 on SQLite and on PostgreSQL, side by side
# ---------------------------------------------------------------------------------------------------------

# The drivers of the comparison (--drivers): named in the URL's scheme, postgresql+<driver>://, which
# store.PostgresBackend honours (plain postgresql:// is its default, psycopg 3).
DRIVERS = {"psycopg": "psycopg 3", "psycopg2": "psycopg2-binary"}  # the backend's default first


def is_postgres(target: str) -> bool:
    return store.is_url(target)


def with_driver(url: str, driver: str | None) -> str:
    """`url` with `driver` in its scheme (None: as it is)."""
    return url if driver is None else f"postgresql+{driver}://{url.split('://', 1)[1]}"


class PostgresDatabases:
    """Databases of the bench's own on the PostgreSQL server `url` names: `create(tag)` makes one, with
    synchronous_commit on whatever the server's default, and returns its URL; `drop(url)` and `close()`
    drop them. CREATE DATABASE fails on a name that exists, so the bench never touches data it did not make."""

    def __init__(self, url: str):
        self.url = "postgresql://" + url.split("://", 1)[1]  # what psycopg takes (no +driver)
        self.made: list[str] = []
        with self._admin() as admin:
            self.facts = {k: admin.execute(f"SHOW {k}").fetchone()[0]
                          for k in ("server_version", "fsync", "synchronous_commit", "shared_buffers")}

    def _admin(self):
        import psycopg

        return psycopg.connect(self.url, autocommit=True)

    def create(self, tag: str) -> str:
        name = f"bench_api_{os.getpid()}_{tag}"
        with self._admin() as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
            self.made.append(name)
            admin.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = on')
        return urllib.parse.urlsplit(self.url)._replace(path="/" + name).geturl()

    def drop(self, url: str) -> None:
        self._drop(urllib.parse.urlsplit(url).path.lstrip("/"))

    def _drop(self, name: str) -> None:
        with self._admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.made.remove(name)

    def close(self) -> None:
        for name in list(self.made):
            self._drop(name)


@dataclasses.dataclass
class Subject:
    """One database of the comparison: what its column is called, where it lives, which driver serves it."""

    label: str
    kind: str  # "sqlite" or "postgresql"
    driver: str | None = None  # the driver in its URLs (None: the backend's default)
    big: str = ""  # the filled database's target
    small: str = ""  # one holding 10 images
    filled: dict = dataclasses.field(default_factory=dict)
    times: dict = dataclasses.field(default_factory=dict)


def rotated(items: list, k: int) -> list:
    k %= len(items)
    return items[k:] + items[:k]


def part_compare(tmp: str, model: str, rows: int, queries: int, runs: int, pg: PostgresDatabases,
                 drivers: bool) -> dict:
    """Part 4's first pages, GET /objects, GET by id and POST /images detect=false at `rows` images, on
    SQLite and on PostgreSQL (with `drivers`, on PostgreSQL through each driver: a database filled by each),
    every request round-robin over the servers so noise falls on all alike."""
    subjects = [Subject("SQLite", "sqlite")]
    if drivers:
        subjects += [Subject(f"PostgreSQL, {DRIVERS[d]}", "postgresql", d) for d in DRIVERS]
    else:
        subjects.append(Subject("PostgreSQL", "postgresql"))
    deep = rows // 10
    paths = {k.format(deep=deep): (p.format(deep=deep), target) for k, (p, target) in SCALE_PATHS.items()}
    started: list[ServerProcess] = []
    try:
        for n, s in enumerate(subjects):
            if s.kind == "sqlite":
                s.big, s.small = os.path.join(tmp, f"compare-{rows}.db"), os.path.join(tmp, "compare-10.db")
            else:
                s.big, s.small = (with_driver(pg.create(f"{rows}_{n}"), s.driver),
                                  with_driver(pg.create(f"10_{n}"), s.driver))
            progress(f"part 5: writing {rows:,} synthetic images into {s.label}")
            s.filled = fill(s.big, rows, model, seed=4)
            fill(s.small, 10, model, seed=4)
            progress(f"part 5: {s.label}: {s.filled['detections']:,} detections in {s.filled['seconds']:.1f} s "
                     f"({s.filled['mb']:,.0f} MB)")
        servers = {}
        for s in subjects:
            for which in ("big", "small"):
                started.append(ServerProcess(["--db", getattr(s, which), "--model", model], timeout=120))
                servers[s.label, which] = started[-1]
        rng = random.Random(3)
        counts: dict[str, dict[str, int]] = {s.label: {} for s in subjects}
        for s in subjects:
            s.times = {k: [] for k in paths} | {"by_id": [], "post": [], "post_10": []}
            big = servers[s.label, "big"]
            for key, (p, _) in paths.items():  # warm up; note the page sizes (the same on every backend)
                counts[s.label][key] = len(json.loads(big.request("GET", p)[2]))
            for _ in range(20):
                big.request("GET", f"/images/{rng.randint(1, rows)}")
        for q in range(queries):
            for key, (p, _) in paths.items():
                for s in rotated(subjects, q):
                    s.times[key].append(servers[s.label, "big"].request("GET", p)[0])
            for _ in range(3):
                image_id = rng.randint(1, rows)
                for s in rotated(subjects, q):
                    s.times["by_id"].append(servers[s.label, "big"].request("GET", f"/images/{image_id}")[0])
        bodies = iter([post_body(d, False) for d in small_jpegs(2 * len(subjects) * (runs + 3), seed=11)])
        for i in range(runs + 3):  # 3 to warm up
            for s in rotated(subjects, i):
                a = servers[s.label, "big"].request("POST", "/images", next(bodies))[0]
                b = servers[s.label, "small"].request("POST", "/images", next(bodies))[0]
                if i >= 3:
                    s.times["post"].append(a)
                    s.times["post_10"].append(b)
    finally:
        for srv in started:
            srv.stop()
        for s in subjects:
            for target in (s.big, s.small):
                if target and is_postgres(target):
                    pg.drop(target)
                elif target and os.path.exists(target):
                    os.remove(target)
    for s in subjects:
        s.times = {k: median_ms(v) for k, v in s.times.items()}
    return {"subjects": subjects, "paths": paths, "counts": counts[subjects[0].label], "rows": rows,
            "same_pages": all(c == counts[subjects[0].label] for c in counts.values()),
            "stops": [srv.stop_problem() for srv in started if srv.stop_problem()]}


def compare_rows(cmp: dict) -> list[tuple[str, str, str | None]]:
    """(what, time key or 'fill', target kind) of part 5's table."""
    rows = cmp["rows"]
    out = [(f"{key} ({cmp['counts'][key]} {'names' if key == 'GET /objects' else 'images'})", key, "search")
           for key in cmp["paths"]]
    out.append(("GET /images/{id}, random ids", "by_id", "search"))
    out.append((f"POST /images 64x64 detect=false, at {rows:,} images", "post", "post"))
    out.append(("POST /images 64x64 detect=false, at 10 images", "post_10", "post"))
    return out


def print_compare(cmp: dict) -> None:
    subjects, rows = cmp["subjects"], cmp["rows"]
    sqlite, pg = subjects[0], subjects[1]  # the first PostgreSQL column is the table's (the default driver)
    print(f"\n| at {rows:,} images, {sqlite.filled['detections']:,} detections | {sqlite.label} | {pg.label} | "
          "PostgreSQL / SQLite | target | ok/FAIL |")
    print("|---|---|---|---|---|---|")
    for what, key, kind in compare_rows(cmp):
        a, b = sqlite.times[key], pg.times[key]
        ratio = b / a
        if kind == "search":
            target, ok = "<= 2x and <= 20 ms", ratio <= 2 and b <= 20
        else:
            target, ok = "<= 1.5x", ratio <= 1.5
        print(f"| {what} | {a:.2f} ms | {b:.2f} ms | {ratio:.2f} | {target} | {'ok' if ok else 'FAIL'} |")
    a, b = sqlite.filled, pg.filled
    print(f"| fill through Store.add_many | {a['seconds']:.1f} s | {b['seconds']:.1f} s "
          f"(VACUUM ANALYZE {b['seconds'] - b['load_seconds']:.1f} s of it) | {b['seconds'] / a['seconds']:.2f} | — | — |")
    print(f"| size | {a['mb']:,.0f} MB | {b['mb']:,.0f} MB | {b['mb'] / a['mb']:.2f} | — | — |")
    if len(subjects) == 3:
        three, two = subjects[1], subjects[2]
        print(f"\n| at {rows:,} images, PostgreSQL | {two.label} | {three.label} | 3 / 2 |")
        print("|---|---|---|---|")
        for what, key, _ in compare_rows(cmp):
            print(f"| {what} | {two.times[key]:.2f} ms | {three.times[key]:.2f} ms | {three.times[key] / two.times[key]:.2f} |")
        for what, key in (("fill through Store.add_many (with VACUUM ANALYZE)", "seconds"),
                          ("of it add_many alone", "load_seconds")):
            x, y = two.filled[key], three.filled[key]
            print(f"| {what} | {x:.1f} s | {y:.1f} s | {y / x:.2f} |")
    if not cmp["same_pages"]:
        print("\nWARNING: the backends answered pages of different sizes (see the counts above): not comparable")
    if cmp["stops"]:
        print(f"\nREGRESSION in SIGTERM handling: {'; '.join(cmp['stops'])}")


def compare_main(args, model: str) -> int:
    """--db: part 5 at --rows and at --big-rows images; nothing else (parts 1-3 do not depend on the database)."""
    pg = PostgresDatabases(args.db)
    started = time.perf_counter()
    load = os.getloadavg()
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
            for rows in (args.rows, args.big_rows):
                if rows:
                    results.append(part_compare(tmp, model, rows, args.queries, args.runs, pg, args.drivers))
    finally:
        pg.close()
    for cmp in results:
        print_compare(cmp)
    facts = pg.facts
    print(
        f"\nPostgreSQL {facts['server_version']} at {store.redact(args.db)} (fsync {facts['fsync']}, server default "
        f"synchronous_commit {facts['synchronous_commit']}, on in the bench's databases; shared_buffers "
        f"{facts['shared_buffers']}); cores: {os.cpu_count()}; load average at the start {load[0]:.2f}, at the end "
        f"{os.getloadavg()[0]:.2f}; {args.queries} requests per search median, {args.runs} per POST median, "
        f"{time.perf_counter() - started:.0f} s in all"
        + ("; WARNING: fsync is off on that server, so its commits cost less than they would on a real one"
           if facts["fsync"] != "on" else "")
    )
    return 0


def part_memory(tmp: str, model: str, uploads: int) -> dict:
    progress(f"part 3: {uploads} uploads of distinct 64x64 JPEGs")
    bodies = [post_body(d, True) for d in small_jpegs(uploads)]
    marks = sorted({min(10, uploads), uploads // 10, uploads // 4, uploads // 2, uploads} - {0})
    rss: dict[int, int] = {}
    times = []
    with server(os.path.join(tmp, "memory.db"), model) as srv:
        rss[0] = srv.rss_kb()
        for i, b in enumerate(bodies, 1):
            times.append(srv.request("POST", "/images", b)[0])
            if i in marks:
                rss[i] = srv.rss_kb()
    return {"rss": rss, "post": median_ms(times), "server": srv}


# ---------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=60, help="timed uploads per upload median (default 60)")
    parser.add_argument("--queries", type=int, default=100, help="timed requests per listing median (default 100)")
    parser.add_argument("--rows", type=int, default=100_000, help="synthetic images for the listings (default 100000)")
    parser.add_argument("--uploads", type=int, default=1000, help="uploads for the memory check (default 1000)")
    parser.add_argument("--big-rows", type=int, default=1_000_000,
                        help="synthetic images for part 4, the searches at scale (default 1000000; 0 skips it)")
    parser.add_argument("--db", metavar="URL",
                        help="a PostgreSQL server (postgresql://user:pass@host:port/dbname): run part 5 only, SQLite and "
                             "PostgreSQL side by side at --rows and --big-rows images, in databases the bench creates there "
                             "and drops")
    parser.add_argument("--drivers", action="store_true",
                        help="with --db: PostgreSQL through psycopg2-binary and through psycopg 3, side by side")
    args = parser.parse_args()
    if args.drivers and not args.db:
        parser.error("--drivers goes with --db")
    # SIGTERM (make, CI) unwinds like Ctrl-C, so servers are stopped and temp dirs removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    testdata, model = testdata_paths()
    if args.db:
        return compare_main(args, model)
    with open(os.path.join(testdata, "images", "cat_1080p.jpg"), "rb") as f:
        cat = f.read()
    detector = server_detector(model)  # laid out as the server lays its own out
    cores = os.cpu_count() or 1
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        up = part_upload(tmp, model, cat, detector, args.runs)
        big = part_upload_big(tmp, model, cat, detector, max(5, args.runs // 3))
        ls = part_list(tmp, model, args.rows, args.queries)
        sc = part_scale(tmp, model, args.big_rows, args.queries, args.runs) if args.big_rows else None
        mem = part_memory(tmp, model, args.uploads)

    ratio = up["post"] / up["detect"]
    rss10, rss_all = mem["rss"][min(10, args.uploads)], mem["rss"][args.uploads]
    growth = rss_all / rss10
    deep = ls["deep"]
    rows = [
        ("POST /images cat_1080p detect=true, distinct bytes", f"{up['post']:.1f} ms", "", "", None),
        ("detect() on the same bytes, in-process", f"{up['detect']:.1f} ms", "", "", None),
        ("POST / detect()", f"{ratio:.2f}", "<= 1.5", None, ratio <= 1.5),
        (f"POST /images 4000x3000 JPEG ({big['bytes'] / 2**20:.1f} MB) detect=true, distinct bytes", f"{big['post']:.1f} ms", "", "", None),
        ("detect() on the same bytes, in-process", f"{big['detect']:.1f} ms", "", "", None),
        ("POST / detect(), 4000x3000", f"{big['post'] / big['detect']:.2f}", "<= 1.5", None, big["post"] / big["detect"] <= 1.5),
        ("the same bytes as a file (multipart, as curl -F and the page send them)", f"{big['file']:.1f} ms", "", "", None),
        ("detect() on the same bytes, in-process", f"{big['detect_file']:.1f} ms", "", "", None),
        ("POST / detect(), 4000x3000 file", f"{big['file'] / big['detect_file']:.2f}", "<= 1.5", None,
         big["file"] / big["detect_file"] <= 1.5),
        (f"GET /images?objects=dog ({args.rows:,} images)", f"{ls['objects=dog']:.1f} ms", "<= 10 ms", None, ls["objects=dog"] <= 10),
        ("GET /images/{id}, random ids", f"{ls['by_id']:.2f} ms", "<= 3 ms", None, ls["by_id"] <= 3),
        (f"RSS after {args.uploads} uploads / after 10", f"{growth:.2f} ({rss_all / 1024:.0f} / {rss10 / 1024:.0f} MB)", "<= 1.3", None, growth <= 1.3),
        ("POST cat_1080p again, identical bytes (cached detections)", f"{up['cached']:.1f} ms", "—", "—", None),
        ("POST cat_1080p detect=false, distinct bytes", f"{up['plain']:.1f} ms", "—", "—", None),
        ("GET /images (no filter)", f"{ls['no filter']:.1f} ms", "—", "—", None),
        ("GET /images?objects=dog,cat", f"{ls['objects=dog,cat']:.1f} ms", "—", "—", None),
        ("GET /images?objects=dog,person&match=all", f"{ls['objects=dog,person&match=all']:.1f} ms", "—", "—", None),
        (f"GET /images?before={deep}", f"{ls[f'before={deep}']:.1f} ms", "—", "—", None),
        (f"GET /images?objects=dog&before={deep}", f"{ls[f'objects=dog&before={deep}']:.1f} ms", "—", "—", None),
        ("POST 64x64 JPEG detect=true", f"{mem['post']:.1f} ms", "—", "—", None),
        ("GET /images?objects=person,car&match=all, none in common (issue 15: 49 ms)",
         f"{ls['objects=person,car&match=all']:.1f} ms", "—", "—", None),
        ("GET /images?objects=person&min_confidence=0.95, none there (issue 15: 33 ms)",
         f"{ls['objects=person&min_confidence=0.95']:.1f} ms", "—", "—", None),
        (f"GET /objects ({args.rows:,} images; issue 15: 69 ms)", f"{ls['GET /objects']:.2f} ms", "—", "—", None),
    ]
    print("| what | median or value | target | ok/MISSED |")
    print("|---|---|---|---|")
    for what, got, want, status, ok in rows:
        if status is None:
            status = "ok" if ok else "MISSED"
        print(f"| {what} | {got} | {want or '—'} | {status or '—'} |")
    filled = ls["filled"]
    stops = [f"part {n}: {part['server'].stop_problem()}" for n, part in zip(("1", "1b", "2", "3"), (up, big, ls, mem), strict=True)
             if part["server"].stop_problem()]
    print(
        f"\ncores: {cores}, DETECT_THREADS {detector.threads} ({detector.pool} interpreter(s) x {detector.threads} "
        f"thread(s), server and in-process alike), model: {os.path.basename(model)}, runs: {args.runs} per upload "
        f"median, {args.queries} per listing median, {ls['n_by_id']} GET by id, {args.uploads} uploads; "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    print(
        f"notes: {args.rows:,} images / {filled['detections']:,} detections written in {filled['seconds']:.1f} s, "
        f"'dog' in {filled['dog_share']:.1%} of images; page sizes {ls['counts']}; "
        f"RSS (MB) by uploads {', '.join(f'{n}: {kb / 1024:.0f}' for n, kb in sorted(mem['rss'].items()))}; "
        f"cat_1080p found {up['objects']}; per server (parts 1-3): TCP connections opened "
        f"{'/'.join(str(p['server'].connects) for p in (up, ls, mem))}, SIGTERMs needed to stop "
        f"{'/'.join(str(p['server'].sigterms) + (' +SIGKILL' if p['server'].killed else '') for p in (up, ls, mem))}"
        + (f"; REGRESSION in server.py's SIGTERM handling: {'; '.join(stops)}" if stops else "")
    )
    if sc is not None:
        print_scale(sc, args.big_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
