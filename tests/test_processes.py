"""Several `python server.py` processes on one database (issue 16), through the real processes and sockets.

Two processes with 25 writer threads each for a while, plus readers: every 2xx answer is a stored row and
nothing else is, no id comes twice, every acknowledged image reads back through the other process, both
answer searches, GET /objects and /v1/vision/detection alike, and the counts table equals a recount. Then
kill -9 of a process in the middle of writes: every acknowledged image is still there for the next one.

Each runs on both backends (`both_backends`, a database of its own from `new_db`): PostgreSQL, and two
processes on one SQLite file (its writers queue on the busy timeout).
"""

import base64
import collections
import contextlib
import hashlib
import http.client
import io
import json
import os
import random
import signal
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
from PIL import Image
from test_server import start_listening, stop_server

import imgur
import ingest
import store

WRITERS = 25  # writer threads per process
SECONDS = {"postgresql": 20.0, "sqlite": 10.0}  # how long they write (issue 16: 25 writers each for 20 s)
READERS = 2  # reader threads per process, reading what the other process acknowledged
DETECT_EVERY = 25  # every 25th post of a writer asks for detection (of a real photo)
PHOTOS = ("pets.jpg", "coupleanddog.jpeg", "cats_and_dogs.jpg")


# --------------------------------------------------------------------------------------------------------
# Databases and processes
# --------------------------------------------------------------------------------------------------------


pytestmark = pytest.mark.both_backends


@pytest.fixture
def shared_db(db_backend, new_db):
    """(backend name, IMAGES_DB for every process of the test)."""
    return db_backend, new_db()


def start(db: str, model_path: str):
    """`python server.py` on a free port on `db`, one interpreter of one thread (the cores are shared)."""
    env = {**os.environ, "MIN_FREE_DISK_MB": "0", "DETECT_THREADS": "1", "DETECT_INTERPRETERS": "1"}
    env.pop("IMAGES_DB", None)
    proc, base, lines = start_listening(["server.py", "--port", "0", "--db", db, "--model", model_path], env, "server")
    return proc, base


@contextlib.contextmanager
def servers(db: str, model_path: str, n: int):
    """`n` server processes on `db`: [(process, base URL)]; each stopped at the end (SIGTERM), and its log
    checked for tracebacks and errors."""
    started = []
    try:
        for _ in range(n):
            started.append(start(db, model_path))
        yield started
    finally:
        logs = [stop_server(proc) for proc, _ in started if proc.poll() is None]
    for log in logs:
        assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


class Client:
    """One keep-alive HTTP connection to a server (one per thread)."""

    def __init__(self, base: str, timeout: float = 60):
        parts = urllib.parse.urlsplit(base)
        self.http = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)

    def __call__(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"):
        """(status, headers, body)."""
        try:
            self.http.request(method, path, body=body, headers={"Content-Type": content_type} if body is not None else {})
            res = self.http.getresponse()
            return res.status, res.headers, res.read()
        except (OSError, http.client.HTTPException):
            self.http.close()
            raise

    def json(self, path: str):
        status, _, body = self(path=path, method="GET")
        assert status == 200, (path, status, body[:300])
        return json.loads(body)

    def close(self) -> None:
        self.http.close()


def noise_png() -> bytes:
    """A small picture of its own (16x16 noise): distinct bytes, next to nothing to decode."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (16, 16), os.urandom(16 * 16 * 3)).save(buf, "PNG")
    return buf.getvalue()


def post_body(data: bytes, detect: bool) -> bytes:
    return json.dumps({"image": base64.b64encode(data).decode("ascii"), "detect": detect}).encode()


@dataclass
class Acked:
    data: bytes
    process: int  # index of the process that answered 2xx
    objects: list[str]


@dataclass
class Tally:
    """What the clients saw, shared by their threads."""

    acked: dict[int, Acked] = field(default_factory=dict)
    ids: list[int] = field(default_factory=list)  # every id a 2xx answer gave, repeats included
    statuses: collections.Counter = field(default_factory=collections.Counter)
    problems: list[str] = field(default_factory=list)
    in_flight: int = 0  # posts sent whose answer never came (a killed server)
    reads: int = 0  # reads of another process's acknowledged image, during the writes
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answered(self, what: str, status: int, headers) -> bool:
        """Count an answer; True for a 2xx. A 503 must say when to come back; no other 5xx but 507."""
        with self.lock:
            self.statuses[status] += 1
            if status == 503 and not headers.get("Retry-After"):
                self.problems.append(f"{what}: 503 without Retry-After")
            elif status >= 500 and status not in (503, 507):
                self.problems.append(f"{what}: {status}")
            elif 300 <= status < 500:
                self.problems.append(f"{what}: {status}")
        return 200 <= status < 300

    def ack(self, image_id: int, acked: Acked) -> None:
        with self.lock:
            self.ids.append(image_id)
            self.acked[image_id] = acked

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)

    def acked_by(self, process: int) -> list[int]:
        with self.lock:
            return [i for i, a in self.acked.items() if a.process == process]


def writer(base: str, process: int, tally: Tally, until: float, photos: list[bytes], *,
           detect_every: int = DETECT_EVERY, stop_on_error: bool = False) -> None:
    """POST /images of distinct small pictures (detect=false) until `until`; every `detect_every`-th one one
    of `photos` with detection. A connection lost mid-request (the server was killed) counts in `in_flight`
    (and, unless `stop_on_error`, as a problem)."""
    client = Client(base)
    n = random.randrange(detect_every)
    try:
        while time.monotonic() < until:
            n += 1
            detect = n % detect_every == 0
            data = photos[random.randrange(len(photos))] if detect else noise_png()
            try:
                status, headers, body = client("POST", "/images", post_body(data, detect))
            except (OSError, http.client.HTTPException) as e:
                with tally.lock:
                    tally.in_flight += 1
                if not stop_on_error:
                    tally.problem(f"POST /images to process {process}: {e!r}")
                return
            if tally.answered(f"POST /images to process {process}", status, headers):
                answer = json.loads(body)
                if answer["sha256"] != hashlib.sha256(data).hexdigest():
                    tally.problem(f"POST /images {answer['id']}: another sha256 than sent")
                tally.ack(answer["id"], Acked(data, process, answer["objects"]))
    finally:
        client.close()


def reader(base: str, process: int, other: int, tally: Tally, until: float) -> None:
    """Until `until`: an image the other process acknowledged, by id (it must be there at once), a search
    and GET /objects, in turn."""
    client = Client(base)
    paths = ("/images?objects=dog&limit=20", "/objects", "/images?limit=20")
    turn = 0
    try:
        while time.monotonic() < until:
            turn += 1
            theirs = tally.acked_by(other)
            if turn % 2 and theirs:
                image_id = random.choice(theirs)
                status, headers, body = client("GET", f"/images/{image_id}")
                if tally.answered(f"GET /images/{image_id} from process {process}", status, headers):
                    with tally.lock:
                        tally.reads += 1
                    if json.loads(body)["sha256"] != hashlib.sha256(tally.acked[image_id].data).hexdigest():
                        tally.problem(f"GET /images/{image_id} from process {process}: another sha256")
            else:
                path = paths[turn // 2 % len(paths)]
                status, headers, _ = client("GET", path)
                tally.answered(f"GET {path} from process {process}", status, headers)
            time.sleep(0.005)  # readers look in; the writers are the load
    finally:
        client.close()


def run_threads(targets: list[tuple]) -> None:
    threads = [threading.Thread(target=f, args=args) for f, *args in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# --------------------------------------------------------------------------------------------------------
# Checks after the writes
# --------------------------------------------------------------------------------------------------------


def database_rows(db: str) -> dict:
    """What the database holds, read straight from it (a Store of this process, opened after the writes)."""
    images = store.Store(db)
    try:
        with images.connection():
            sql = images.database.execute_sql
            return {
                "ids": [row[0] for row in sql("SELECT id FROM image").fetchall()],
                "counts": dict(sql("SELECT name, images FROM object_count").fetchall()),
                "recount": dict(sql("SELECT name, COUNT(DISTINCT image_id) FROM detection GROUP BY name").fetchall()),
                "pairs": {(a, b): n for a, b, n in sql("SELECT a, b, images FROM object_pair").fetchall()},
                "pair_recount": {(a, b): n for a, b, n in sql(
                    "SELECT x.name, y.name, COUNT(DISTINCT x.image_id) FROM detection x "
                    "JOIN detection y ON y.image_id = x.image_id AND x.name < y.name GROUP BY x.name, y.name"
                ).fetchall()},
                "orphan_blobs": sql("SELECT COUNT(*) FROM blob WHERE sha256 NOT IN (SELECT sha256 FROM image)").fetchone()[0],
                "staged": sql("SELECT COUNT(*) FROM staged_blob").fetchone()[0],
            }
    finally:
        images.shutdown()


def check_counts(rows: dict) -> None:
    assert rows["counts"] == rows["recount"]
    assert rows["pairs"] == rows["pair_recount"]


def check_readable(tally: Tally, bases: list[str], through, by_id: int | None = None) -> None:
    """Every acknowledged image's /file bytes, and its record by id (GET /images/{id}; only `by_id` of them
    picked at random when given: all_records checks every record), through `through(acked)`: the index of
    the process asked (another than the one that acknowledged it)."""
    ids = sorted(tally.acked)
    records = set(ids if by_id is None else random.sample(ids, min(by_id, len(ids))))

    def check(ids: list[int]) -> list[str]:
        clients = [Client(b) for b in bases]
        wrong = []
        try:
            for image_id in ids:
                a = tally.acked[image_id]
                c = clients[through(a)]
                if image_id in records:
                    status, _, body = c("GET", f"/images/{image_id}")
                    record = json.loads(body) if status == 200 else None
                    if record is None or record_differs(record, a):
                        wrong.append(f"GET /images/{image_id}: {status} {body[:200]!r}")
                status, _, body = c("GET", f"/images/{image_id}/file")
                if status != 200 or body != a.data:
                    wrong.append(f"GET /images/{image_id}/file: {status}, {len(body)} bytes, not the {len(a.data)} sent")
        finally:
            for c in clients:
                c.close()
        return wrong

    with ThreadPoolExecutor(4) as pool:
        wrong = [w for part in pool.map(check, [ids[i::4] for i in range(4)]) for w in part]
    assert not wrong, wrong[:10]


def record_differs(record: dict, acked: Acked) -> bool:
    return record["sha256"] != hashlib.sha256(acked.data).hexdigest() or record["objects"] != acked.objects


def all_pages(client: Client, path: str) -> list[dict]:
    """Every record of a listing, page by page, following its Link: rel="next"."""
    records = []
    while path:
        status, headers, body = client("GET", path)
        assert status == 200, (path, status, body[:300])
        records += json.loads(body)
        link = headers.get("Link")
        path = link[1:link.index(">")] if link else None
    return records


# --------------------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------------------


def test_two_processes_with_25_writers_each_agree(shared_db, model_path, photo):
    backend, db = shared_db
    photos = [photo(name) for name in PHOTOS]
    with servers(db, model_path, 2) as procs:
        bases = [base for _, base in procs]
        tally = Tally()
        until = time.monotonic() + SECONDS[backend]
        run_threads(
            [(writer, bases[p], p, tally, until, photos) for p in (0, 1) for _ in range(WRITERS)]
            + [(reader, bases[p], p, 1 - p, tally, until) for p in (0, 1) for _ in range(READERS)]
        )
        assert not tally.problems, (tally.problems[:10], tally.statuses)
        assert len(tally.ids) == len(set(tally.ids)), "an id was handed out twice"
        by_process = collections.Counter(a.process for a in tally.acked.values())
        assert by_process[0] > 0 and by_process[1] > 0, tally.statuses
        assert tally.reads > 0
        detected = [a for a in tally.acked.values() if a.objects]
        assert detected, "no post with detection was acknowledged"

        # Every acknowledged image, through the process that did not take it.
        check_readable(tally, bases, through=lambda a: 1 - a.process, by_id=300)

        # Searches and GET /objects: both processes alike, and as the acknowledged answers say.
        clients = [Client(b) for b in bases]
        try:
            dog = set(ingest.search_names("dog"))
            want_dog = sorted((i for i, a in tally.acked.items() if dog & set(a.objects)), reverse=True)
            for c in clients:
                assert [r["id"] for r in all_pages(c, "/images?objects=dog&limit=1000")] == want_dog
            want_objects = collections.Counter(name for a in tally.acked.values() for name in set(a.objects))
            answers = [c.json("/objects") for c in clients]
            assert answers[0] == answers[1]
            assert {o["name"]: o["images"] for o in answers[0]} == want_objects
            # Every record, through each process: what was acknowledged, newest first.
            for c in clients:
                every = all_pages(c, "/images?limit=1000")
                assert [r["id"] for r in every] == sorted(tally.acked, reverse=True)
                assert not [r["id"] for r in every if record_differs(r, tally.acked[r["id"]])]

            # The detection API, served by either.
            body, content_type = imgur._multipart({}, "image", photos[0], "pets.jpg", "image/jpeg")
            found = []
            for c in clients:
                status, _, answer = c("POST", "/v1/vision/detection", body, content_type)
                assert status == 200, answer[:300]
                answer = json.loads(answer)
                assert answer["success"] is True
                found.append(sorted((p["label"], round(p["confidence"], 3)) for p in answer["predictions"]))
            assert found[0] == found[1] and found[0]
        finally:
            for c in clients:
                c.close()

    rows = database_rows(db)
    assert sorted(rows["ids"]) == sorted(tally.acked), "rows differ from the 2xx answers"
    check_counts(rows)
    print(f"\n{backend}: {len(tally.acked)} images acknowledged ({len(detected)} with detection), "
          f"{tally.reads} read across during the writes; answers {dict(tally.statuses)}")


def test_kill_9_mid_write_loses_no_acknowledged_image(shared_db, model_path, photo):
    backend, db = shared_db
    pets = Image.open(io.BytesIO(photo("pets.jpg"))).convert("RGB").resize((320, 240))

    def fresh_photo(i: int) -> bytes:  # distinct bytes: each runs the model, so some die mid-detection
        img = pets.copy()
        img.putpixel((i % 320, i // 320 % 240), (i & 255, 255 - (i & 255), 128))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        return buf.getvalue()

    tally = Tally()
    with servers(db, model_path, 1) as others:  # the other process, running all along
        proc, base = start(db, model_path)
        kill_mid_write(proc, base, tally, fresh_photo)
        check_readable(tally, [others[0][1]], through=lambda a: 0)
    assert not tally.problems, (tally.problems[:10], tally.statuses)
    assert len(tally.acked) >= 100 and tally.in_flight > 0, (len(tally.acked), tally.in_flight)
    assert len(tally.ids) == len(set(tally.ids))

    with servers(db, model_path, 1) as procs:  # a fresh process: its start takes away what the killed one staged
        check_readable(tally, [procs[0][1]], through=lambda a: 0)
    rows = database_rows(db)
    # The posts in flight at the kill may or may not have been stored; nothing else was, and nothing half.
    assert set(tally.acked) <= set(rows["ids"])
    assert len(rows["ids"]) <= len(tally.acked) + tally.in_flight
    check_counts(rows)
    assert rows["staged"] == 0 and rows["orphan_blobs"] == 0, rows
    print(f"\n{backend}: {len(tally.acked)} acknowledged before the kill, {tally.in_flight} in flight, "
          f"{len(rows['ids']) - len(tally.acked)} of those stored")


def kill_mid_write(proc, base: str, tally: Tally, fresh_photo) -> None:
    """10 writers against `proc`, one post in 5 with detection of a photo of its own (the model runs while
    its bytes are staged), until `proc` has acknowledged 300 images; then SIGKILL while they write."""
    try:
        until = time.monotonic() + 30  # a bound: the kill ends the writes long before
        photos = [fresh_photo(i) for i in range(100)]
        threads = [threading.Thread(target=writer, args=(base, 0, tally, until, photos),
                                    kwargs={"detect_every": 5, "stop_on_error": True}) for _ in range(10)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while len(tally.acked) < 300 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.drain.join(5)
