"""What the PostgreSQL backend does beyond the suites that run on both backends (`both_backends`): the
password kept out of every line, a missing driver named in one line, a busy or unreachable database
answered 503 with Retry-After (SQLite too), a full disk 507, deadlocks run again, concurrent writers on
one library (the row locks that stand in for SQLite's one write lock), processes creating one schema at
once, and the ids a sequence hands out.

A real PostgreSQL server (tests/postgres.py: the session's throwaway cluster, or TEST_POSTGRES_URL's).
"""

import contextlib
import dataclasses
import hashlib
import io
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import pytest
from PIL import Image

import store
from helpers import assert_problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.both_backends


@pytest.fixture
def pg_only(request, db_backend):
    """For a PostgreSQL-only test: marks it so (tests/conftest.py then runs it as [postgresql] alone)."""
    assert request.node.get_closest_marker("postgresql_only"), "mark the test postgresql_only"


@pytest.fixture
def pg(pg_only, new_db):
    """A fresh PostgreSQL database's URL."""
    return new_db()


def admin(url: str):
    """A psycopg connection of the tests' own to the database of `url` (autocommit)."""
    import psycopg

    return psycopg.connect(url, autocommit=True)


def new_image(i: int, labels=("dog",), data: bytes | None = None) -> store.NewImage:
    data = data if data is not None else f"image {i}".encode()
    return store.NewImage(
        data=data, sha256=hashlib.sha256(data).hexdigest(), content_type="image/jpeg", width=10, height=10,
        label=f"image {i}", label_generated=False, detection_enabled=True,
        detections=[store.Found(name, 0.9, 0.1, 0.1, 0.5, 0.5) for name in labels],
        detected_with="abc@0.5", model_name="m",
    )


def jpeg(seed: int, size=(64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (seed % 256, (seed * 7) % 256, (seed * 13) % 256)).save(out, "JPEG")
    return out.getvalue()


def recount(s: store.Store) -> list[tuple[str, int]]:
    rows = s._sql("SELECT name, COUNT(DISTINCT image_id) FROM detection GROUP BY name ORDER BY name").fetchall()
    return [(n, int(k)) for n, k in rows]


def test_redact_hides_every_password():
    assert store.redact("postgresql://me:s3cret@db.lan:5432/images?sslmode=require") == (
        "postgresql://me:***@db.lan:5432/images?sslmode=require"
    )
    assert "s3cret" not in store.redact("postgresql://me@db.lan/images?password=s3cret&sslmode=disable")
    assert store.redact("postgresql://me@db.lan/images") == "postgresql://me@db.lan/images"
    assert store.redact("data/images.db") == "data/images.db"
    assert store.is_url("postgres://x@y/z") and not store.is_url("/data/images.db") and not store.is_url("C:/x.db")


def test_other_schemes_are_refused_in_one_line(tmp_path):
    with pytest.raises(store.StoreUnavailable, match="SQLite file path or a postgresql:// URL; mysql://"):
        store.Store("mysql://me:pw@host/db")


# -- the server process: the password never shown; a missing driver and an unreachable server are one line -------


def _server(args, env=None, timeout=30):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "server.py"), "--port", "0", *args],
        env={**os.environ, "MIN_FREE_DISK_MB": "0", **(env or {})}, capture_output=True, text=True, timeout=timeout,
    )


def test_missing_driver_is_one_line_naming_the_file(tmp_path):
    # peewee imports the drivers when they are there; a None in sys.modules makes that import fail.
    code = (
        "import sys; sys.modules['psycopg'] = None; sys.modules['psycopg2'] = None; "
        f"sys.path.insert(0, {ROOT!r}); import server; "
        "sys.exit(server.main(['--port', '0', '--db', 'postgresql://me:s3cretpw@127.0.0.1:1/images']))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "MIN_FREE_DISK_MB": "0"})
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert lines[-1] == ("server.py: IMAGES_DB names a PostgreSQL database but its driver (psycopg) is not installed: "
                         "pip install -r requirements-postgres.txt"), run.stderr
    assert "Traceback" not in run.stderr and "s3cretpw" not in run.stderr + run.stdout


def test_unreachable_server_at_start_is_one_line_without_the_password(model_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = _server(["--model", model_path, "--db", f"postgresql://me:s3cretpw@127.0.0.1:{port}/images"],
                  env={"DB_BUSY_TIMEOUT": "2"})
    assert run.returncode == 2, run.stderr
    assert "s3cretpw" not in run.stderr + run.stdout and "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"server.py: cannot open the database postgresql://me:***@127.0.0.1:{port}/images:"), last
    assert "PostgreSQL server runs" in last


@pytest.mark.postgresql_only
def test_the_password_never_appears_in_logs_health_metrics_or_errors(pg, tmp_path, model_path):
    from test_server import start_server, stop_server

    parts = urllib.parse.urlsplit(pg)
    # The session's cluster trusts loopback: a password is accepted and ignored, so it can be any.
    secret = "Sup3rS3cretPw"
    url = urllib.parse.urlunsplit(parts._replace(netloc=f"postgres:{secret}@{parts.hostname}:{parts.port}"))
    proc, base, _ = start_server(tmp_path, "--model", model_path, "--db", url)  # the last --db wins
    seen = []
    try:
        for path in ("/health", "/metrics", "/images/999", "/images?objects=dog", "/objects"):
            try:
                with urllib.request.urlopen(base + path, timeout=10) as res:
                    seen.append(res.read().decode())
            except urllib.error.HTTPError as e:
                seen.append(e.read().decode())
    finally:
        log = stop_server(proc)
    assert all(secret not in text for text in seen) and secret not in log
    assert '"detector"' in seen[0] and "imgsvc_database_bytes" in seen[1] and "there is no image 999" in seen[2]


# -- busy, unreachable, full -----------------------------------------------------------------------------------------


def test_a_busy_database_is_503_with_retry_after(make_service, db_backend, photo):
    """Another writer holds what a POST needs past DB_BUSY_TIMEOUT: 503 with Retry-After, nothing stored,
    and the next POST, once the writer is gone, is stored (both backends)."""
    service = make_service(db_busy_timeout=0.5)
    target = service.settings.db
    if db_backend == "sqlite":
        holder = sqlite3.connect(target, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # SQLite's one write lock
    else:
        holder = admin(target)
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE image IN EXCLUSIVE MODE")  # readers go on; writers of images wait
    try:
        began = time.monotonic()
        res = service.client.post("/images", upload_files=[("image", "a.jpg", jpeg(1))], expect_errors=True)
        waited = time.monotonic() - began
        detail = assert_problem(res, 503)
        assert res.headers["Retry-After"] == str(store.BUSY_RETRY_AFTER)
        assert "busy" in detail and "try again" in detail
        assert 0.4 <= waited < 5, waited
        assert service.client.get("/images").json == []  # reads go on, and nothing was stored
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert service.client.post("/images", upload_files=[("image", "a.jpg", jpeg(1))]).status_int == 200
    assert service.counts() == (1, 1)


class Proxy:
    """A TCP relay on loopback to the PostgreSQL server, which a test can cut (the server unreachable:
    restarted, the network gone) and open again on the same port."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.sockets: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for x in (a, b):
                with contextlib.suppress(OSError):
                    x.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.open = False
        for x in self.sockets:
            with contextlib.suppress(OSError):
                x.shutdown(socket.SHUT_RDWR)
        self.sockets.clear()

    def close(self) -> None:
        self.cut()
        self.listener.close()


@pytest.mark.postgresql_only
def test_an_unreachable_database_is_503_with_retry_after_and_served_again_after(pg, detector):
    """The PostgreSQL server goes away while the service runs: requests that need the database are 503
    with Retry-After (the pool's connections are checked before each use, so none fails later for
    having died meanwhile); when the server is back, the next request is served."""
    import server
    import settings
    from conftest import Service

    parts = urllib.parse.urlsplit(pg)
    proxy = Proxy(parts.hostname, parts.port)
    url = urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:pw@127.0.0.1:{proxy.port}"))
    s = settings.load([], {}, db=url, model=detector.model_path, min_free_disk_mb=0, db_busy_timeout=1)
    service = Service(s, server.build_parts(s, detector=detector, uploader=None))
    try:
        assert service.client.post("/images", upload_files=[("image", "a.jpg", jpeg(2))]).status_int == 200
        proxy.cut()
        for path in ("/images/1", "/images?objects=dog", "/objects"):
            res = service.client.get(path, expect_errors=True)
            detail = assert_problem(res, 503)
            assert res.headers["Retry-After"] == str(store.BUSY_RETRY_AFTER)
            assert "busy or unreachable" in detail and "pw@" not in detail and ":***@" in detail
        res = service.client.post("/images", upload_files=[("image", "b.jpg", jpeg(3))], expect_errors=True)
        assert_problem(res, 503)
        health = service.client.get("/health").json  # what needs no database goes on
        assert health["status"] == "ok" and health["database"] == "postgresql"
        proxy.open = True
        assert service.client.get("/images/1").status_int == 200
        assert [r["id"] for r in service.client.get("/images").json] == [1]  # the refused POST stored nothing
    finally:
        service.parts.close(jobs_timeout=5)
        proxy.close()


@pytest.mark.postgresql_only
def test_connections_the_server_cut_are_replaced_or_refused_with_retry_after(pg_only, make_service, monkeypatch):
    """PostgreSQL restarted, or an administrator ended our connections. A pooled connection idle for
    PING_AFTER is pinged before use and replaced when dead: no request fails. One handed back a moment ago
    is not pinged (a round trip per request): the request that meets it is 503 with Retry-After, and the
    next one gets a new connection."""
    service = make_service()
    pg = service.settings.db
    assert service.client.post("/images", upload_files=[("image", "a.jpg", jpeg(2))]).status_int == 200
    name = urllib.parse.urlsplit(pg).path.lstrip("/")

    def cut():
        with admin(pg) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                         [name])
        time.sleep(0.2)  # the backends have gone

    monkeypatch.setattr(store._PostgresDatabase, "PING_AFTER", 0.0)  # every connection counts as idle
    cut()
    assert service.client.get("/images/1").status_int == 200
    monkeypatch.setattr(store._PostgresDatabase, "PING_AFTER", 3600.0)  # none does
    cut()
    res = service.client.get("/images/1", expect_errors=True)
    assert_problem(res, 503)
    assert res.headers["Retry-After"] == str(store.BUSY_RETRY_AFTER)
    assert service.client.get("/images/1").status_int == 200


@pytest.mark.postgresql_only
def test_the_pool_exhausted_is_503_with_retry_after(pg):
    s = store.Store(pg, pool_size=1, busy_timeout_ms=500)
    held = threading.Event()
    done = threading.Event()

    def hold():
        with s.connection():
            held.set()
            done.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(10)
        began = time.monotonic()
        with pytest.raises(store.StoreUnavailable, match="DB_POOL_SIZE") as caught:
            with s.connection():
                pass
        assert caught.value.retry_after == store.BUSY_RETRY_AFTER
        assert 0.4 <= time.monotonic() - began < 5
    finally:
        done.set()
        t.join()
        s.shutdown()


@pytest.fixture
def tiny_tablespace(pg_only, postgres_server):
    """tiny_tablespace(url): a 3 MB tmpfs made the tablespace of that database's blob table, where writing a
    large image fills the disk. Needs root (mount) and the tests' own cluster; skipped elsewhere."""
    if os.geteuid() != 0 or postgres_server.cluster is None:
        pytest.skip("mounting a small tmpfs needs root and the tests' own cluster")
    folder = f"/tmp/imgsvc-tiny-{os.getpid()}"
    os.makedirs(folder, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", folder], capture_output=True).returncode:
        os.rmdir(folder)
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        os.makedirs(folder + "/pg")
        import pwd

        owner = pwd.getpwnam("postgres")
        os.chown(folder + "/pg", owner.pw_uid, owner.pw_gid)
        space = f"tiny_{os.getpid()}"
        with admin(postgres_server.admin_url) as conn:
            conn.execute(f"CREATE TABLESPACE {space} LOCATION '{folder}/pg'")
        moved = []

        def move(url: str) -> None:
            with admin(url) as conn:
                conn.execute(f"ALTER TABLE blob SET TABLESPACE {space}")
            moved.append(url)

        try:
            yield move
        finally:
            import psycopg

            for url in moved:
                with contextlib.suppress(psycopg.OperationalError):  # dropped already by new_db's teardown
                    with admin(url) as conn:
                        conn.execute("ALTER TABLE blob SET TABLESPACE pg_default")
            with admin(postgres_server.admin_url) as conn:
                conn.execute(f"DROP TABLESPACE IF EXISTS {space}")
    finally:
        subprocess.run(["umount", folder], capture_output=True)
        os.rmdir(folder)


@pytest.mark.postgresql_only
def test_a_full_disk_on_the_database_server_is_507_and_nothing_is_stored(make_service, tiny_tablespace):
    # (tiny_tablespace after make_service: its teardown moves the table back while the database still exists)
    service = make_service(min_free_disk_mb=100_000)  # the floor is SQLite's only
    tiny_tablespace(service.settings.db)
    small = service.client.post("/images", upload_files=[("image", "a.jpg", jpeg(3))])
    assert small.status_int == 200  # MIN_FREE_DISK_MB does not apply to PostgreSQL
    noise = os.urandom(4 * 1024 * 1024)  # incompressible: TOAST cannot shrink it below the 3 MB
    big = Image.frombytes("L", (2048, 2048), noise)
    out = io.BytesIO()
    big.save(out, "PNG")
    res = service.client.post("/images", upload_files=[("image", "big.png", out.getvalue())], expect_errors=True)
    detail = assert_problem(res, 507)
    assert "PostgreSQL database is full" in detail
    assert service.counts() == (1, 1)
    assert service.client.get("/images/1").status_int == 200  # reads go on


# -- concurrent writers: the row locks ---------------------------------------------------------------------------------


@pytest.mark.postgresql_only
def test_a_deadlock_is_run_again(pg, caplog):
    """Another session holds "person" and then asks for "cat", while a store's add() holds "cat" (names in
    order) and waits for "person": PostgreSQL ends one of the two. The other session waits far longer
    before it looks for deadlocks, so it is the store's transaction that is ended; add() runs it again
    and stores the image once."""
    s = store.Store(pg)
    with s.connection():
        s.add(new_image(1, ("cat", "person")))
    other = admin(pg)
    other.execute("SET deadlock_timeout = '20s'")
    other.execute("BEGIN")
    other.execute("UPDATE object_count SET images = images WHERE name = 'person'")
    result = {}

    def add():
        with s.connection():
            result["rec"] = s.add(new_image(2, ("cat", "person")))

    caplog.set_level(logging.INFO, logger="store")
    t = threading.Thread(target=add)
    t.start()
    try:
        # Wait until add() holds "cat" and waits for "person", then ask for "cat".
        deadline, watcher = time.monotonic() + 10, admin(pg)
        while time.monotonic() < deadline:
            waiting = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND application_name = 'imgsvc'"
            ).fetchone()[0]
            if waiting:
                break
            time.sleep(0.02)
        watcher.close()
        assert waiting, "add() never waited for the row lock"
        other.execute("UPDATE object_count SET images = images WHERE name = 'cat'")  # the deadlock: the store's end
        other.execute("COMMIT")
    finally:
        other.close()
        t.join(30)
    assert result["rec"].id >= 2
    assert "add lost a write conflict (attempt 1 of 5); running it again" in caplog.text
    with s.connection():
        assert s.count() == (2, 2)
        assert sorted(s.objects()) == [("cat", 2), ("person", 2)] == recount(s)
    s.shutdown()


@pytest.mark.postgresql_only
def test_concurrent_writers_keep_counts_ids_and_bytes_right(pg):
    """Eight threads add, re-detect and delete images holding overlapping names (the hot "person" row in
    all of them) and the same bytes: no error, no id twice, the counts equal a recount, and every image's
    bytes are there (a delete of the last image holding some bytes never takes them from an add under way)."""
    s = store.Store(pg, pool_size=10)
    shared = b"the same bytes in many images"
    errors, ids = [], []
    lock = threading.Lock()

    def worker(w: int) -> None:
        try:
            with s.connection():
                for i in range(25):
                    names = ["person", ["cat", "dog", "car", "kite"][(w + i) % 4]][:: 1 if i % 2 else -1]
                    rec = s.add(new_image(w * 100 + i, names, data=shared if i % 3 == 0 else None))
                    with lock:
                        ids.append(rec.id)
                    if i % 4 == 1:
                        s.replace_detections(rec.id, [store.Found("Person", 0.8, 0, 0, 1, 1), store.Found("bird", 0.7, 0, 0, 1, 1)],
                                             "def@0.4", "m2")
                    if i % 5 == 2:
                        s.delete(rec.id)
        except Exception as e:  # reported below, with the thread's number
            errors.append((w, repr(e)))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(ids) == len(set(ids)) == 200
    with s.connection():
        assert sorted(s.objects()) == recount(s)
        missing = s._sql("SELECT id FROM image i WHERE NOT EXISTS (SELECT 1 FROM blob b WHERE b.sha256 = i.sha256)").fetchall()
        assert missing == []
        orphans = s._sql("SELECT sha256 FROM blob b WHERE NOT EXISTS (SELECT 1 FROM image i WHERE i.sha256 = b.sha256)").fetchall()
        assert orphans == []
        assert s.count()[0] == 200 - 8 * 5
    s.shutdown()


@pytest.mark.postgresql_only
def test_processes_creating_one_schema_at_once_both_start(pg):
    """Two stores opening one new database at the same moment (two server processes started together)
    both find the schema made once."""
    stores, errors = [], []
    gate = threading.Barrier(3)

    def open_one():
        gate.wait(10)
        try:
            stores.append(store.Store(pg))
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=open_one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(stores) == 3
    with stores[0].connection():
        assert stores[0].schema_version == store.SCHEMA_VERSION
    for s in stores:
        s.shutdown()


def test_ids_from_the_sequence_are_never_handed_out_twice(new_db):
    """Both backends: a deleted top id never comes back, bulk loads take fresh ids, and the floor a copy
    sets holds (backend.raise_id_floor / id_high_water)."""
    s = store.Store(new_db())
    with s.connection():
        a, b = s.add(new_image(1)), s.add(new_image(2))
        s.delete(b.id)
        assert s.backend.id_high_water() == b.id
        assert s.add(new_image(3)).id == b.id + 1
        assert s.add_many([new_image(i) for i in range(10, 13)]) == 3
        assert s.last_id() == b.id + 4
        with s.backend.write():
            s.backend.raise_id_floor(100)
            s.backend.raise_id_floor(50)  # never lowers it
        assert s.backend.id_high_water() == 100
        assert s.add(new_image(4)).id == 101
        assert [r.id for r in s.list()[0]][:2] == [101, b.id + 4] and a.id == 1
    s.shutdown()


@pytest.mark.postgresql_only
def test_min_free_disk_mb_is_for_sqlite_files_only(pg):
    s = store.Store(pg, min_free_mb=10**9)
    with s.connection():
        assert s.backend.free_bytes() is None
        assert s.add(new_image(1)).id == 1
    s.shutdown()


# -- the command lines on PostgreSQL -------------------------------------------------------------------------------


def _with_password(url: str, password: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:{password}@{parts.hostname}:{parts.port}"))


@pytest.mark.postgresql_only
def test_import_and_redetect_on_postgresql_dry_runs_write_nothing(pg, images_dir, model_path, capsys, monkeypatch):
    """`ingest.py import` and `redetect` take a PostgreSQL URL as the server does; their dry runs read in
    READ ONLY transactions and create nothing (not even the tables); no line shows the password."""
    import ingest

    monkeypatch.setenv("MIN_FREE_DISK_MB", "0")
    url = _with_password(pg, "Sup3rS3cretPw")
    photos = [os.path.join(images_dir, n) for n in ("pets.jpg", "cat.bmp")]

    def run(*argv):
        code = ingest.main(list(argv))
        out, err = capsys.readouterr()
        assert "Sup3rS3cretPw" not in out + err
        return code, out, err

    code, out, _ = run("import", *photos, "--dry-run", "--db", url, "--model", model_path)
    assert code == 0 and "2 to add" in out, out
    with admin(pg) as conn:  # a dry run on an empty database made no tables
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0] == 0
    code, out, _ = run("import", *photos, "--db", url, "--model", model_path)
    assert code == 0 and "import: 2 added" in out, out
    code, out, _ = run("import", *photos, "--dry-run", "--db", url, "--model", model_path)
    assert code == 0 and "2 to skip" in out, out
    code, out, _ = run("redetect", "--all", "--dry-run", "--db", url, "--model", model_path)
    assert code == 0 and "2 image(s) in postgresql://postgres:***@" in out, out
    code, out, _ = run("redetect", "--all", "--threshold", "0.6", "--db", url, "--model", model_path)
    assert code == 0, out
    s = store.Store(pg)
    with s.connection():
        records = s.list()[0]
        assert len(records) == 2 and all(r.threshold == 0.6 for r in records)
        assert sorted(s.objects()) == recount(s)
    s.shutdown()


@pytest.mark.postgresql_only
def test_a_value_the_driver_refuses_is_not_called_busy(pg):
    """A NUL in text (SQLite takes it, PostgreSQL's driver refuses it before sending): an error saying so,
    without a Retry-After, since trying again cannot help. (The API refuses control characters in labels,
    file names and URLs before they reach the store; an old SQLite library may hold one.)"""
    s = store.Store(pg)
    try:
        with s.connection(), pytest.raises(store.StoreUnavailable) as caught:
            s.add(dataclasses.replace(new_image(1), label="a\x00b"))
        assert caught.value.retry_after is None and "busy" not in str(caught.value)
        assert "NUL" in str(caught.value)
        with s.connection():
            assert s.count() == (0, 0)
    finally:
        s.shutdown()


@pytest.mark.postgresql_only
def test_libpq_parameters_in_the_url_pass_through(pg):
    """Query parameters of the URL reach libpq as they are (here `options`, and `sslmode=disable` of a
    loopback server), and the URL's user is the one connected."""
    s = store.Store(pg + "?sslmode=disable&options=-c%20work_mem%3D5MB&connect_timeout=5")
    try:
        with s.connection():
            assert s._sql("SHOW work_mem").fetchone()[0] == "5MB"
            assert s._sql("SELECT current_user").fetchone()[0] == urllib.parse.urlsplit(pg).username
            assert s._sql("SHOW lock_timeout").fetchone()[0] == "10s"  # and our own settings too
    finally:
        s.shutdown()
