"""`python store.py copy SOURCE TARGET`: a whole library between SQLite and PostgreSQL, resumable and verified.

Real databases and real bytes (the test photos, small Pillow-made pictures). The other side of each copy is
new_db's (tests/conftest.py): SQLite, then PostgreSQL in a `both_backends` test's second run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import re
import socket
import sqlite3
import urllib.parse

import pytest
from PIL import Image

import store

PHOTOS = ("cats_and_dogs.jpg", "kite_and_cold.jpg", "coupleanddog.jpeg")

# Tests taking `db_backend` run twice (tests/conftest.py): copying to and from SQLite, then PostgreSQL.
pytestmark = pytest.mark.both_backends


@pytest.fixture
def sqlite_db(tmp_path):
    """sqlite_db() -> the path of a SQLite file nobody has used (beside new_db's, whatever its backend)."""
    names = iter(range(1000))
    return lambda: str(tmp_path / f"library{next(names)}.db")


@pytest.fixture
def open_store():
    """open_store(target) -> a Store on it, shut down at the end of the test (tests that take new_db name it
    first: its databases are dropped after the stores are shut down)."""
    stores: list[store.Store] = []

    def open_(target: str) -> store.Store:
        s = store.Store(target)
        stores.append(s)
        return s

    yield open_
    for s in stores:
        s.shutdown()


def picture(n: int, size: tuple[int, int] = (32, 24)) -> bytes:
    """A small JPEG, different for each n."""
    out = io.BytesIO()
    Image.new("RGB", size, (n * 37 % 256, n * 91 % 256, n * 13 % 256)).save(out, "JPEG", quality=90)
    return out.getvalue()


def new_image(data: bytes, labels=(), *, n: int = 0) -> store.NewImage:
    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
    # Confidences and boxes a float32 holds exactly, so a copy through any column type compares equal.
    found = tuple(store.Found(label, 0.5 + i / 8, 0.125, 0.25, 0.5, 0.75) for i, label in enumerate(labels))
    return store.NewImage(
        data, hashlib.sha256(data).hexdigest(), "image/jpeg", width, height, f"picture {n}", not labels, True, found,
        detected_with="abc123@0.5" if labels else None, created_ms=1_700_000_000_000 + n, filename=f"{n}.jpg",
        model_name="ssd" if labels else None,
    )


def fill(s: store.Store, photo) -> None:
    """A library with everything a copy carries: shared bytes, detections, counts, a vision frame, thumbnails,
    and deleted images, the newest among them (its id must never come back)."""
    with s.connection():
        for i, name in enumerate(PHOTOS):
            s.add(new_image(photo(name), ["dog", "person", "cat"][: i + 1], n=i))
        s.add(new_image(photo(PHOTOS[0]), ["dog"], n=10))  # the same bytes again: one blob
        for i in range(6):
            s.add(new_image(picture(i), ["car"] if i % 2 else [], n=20 + i))
        s.add_frame(new_image(picture(50), ["person"], n=50), keep=5)
        first = s.get(1)
        s.keep_thumbnail(first.sha256, 16, "jpeg", store.Thumbnail(picture(99, (16, 12)), 16, 12))
        s.keep_thumbnail(first.sha256, 16, "webp", store.Thumbnail(picture(98, (16, 12)), 16, 12))
        s.delete(5)
        top = s.add(new_image(picture(60), ["kite"], n=60))
        s.delete(top.id)


def dump(s: store.Store) -> dict:
    """Every row a copy carries, in a form that compares across backends (detection ids are the target's)."""

    def rows(sql: str) -> list[tuple]:
        return [
            tuple(bytes(v) if isinstance(v, memoryview) else v.strip() if isinstance(v, str) and len(v) == 64 else v
                  for v in r)
            for r in s.database.execute_sql(sql).fetchall()
        ]

    with s.connection():
        return {
            "image": rows("SELECT id, sha256, label, label_generated, detection_enabled, detected_with, content_type, "
                          "size, width, height, source_url, created_ms, filename, model_name FROM image ORDER BY id"),
            "detection": rows("SELECT image_id, name, label, confidence, x_min, y_min, x_max, y_max FROM detection "
                              "ORDER BY image_id, id"),
            "blob": rows("SELECT sha256, data FROM blob ORDER BY sha256"),
            "thumbnail": rows("SELECT sha256, size, format, data, width, height, created_ms FROM thumbnail "
                              "ORDER BY sha256, size, format"),
            "vision_frame": rows("SELECT image_id FROM vision_frame ORDER BY image_id"),
            "object_count": rows("SELECT name, images FROM object_count ORDER BY name"),
            "object_pair": rows("SELECT a, b, images FROM object_pair ORDER BY a, b"),
            "setting": rows("SELECT key, value FROM setting WHERE key NOT IN ('copy_from', 'copied_from') ORDER BY key"),
            "high_water": s.backend.id_high_water(),
        }


def copy(source: store.Store, target: store.Store, **kw) -> store.CopyReport:
    return store.copy_library(source, target, **kw)


def test_a_round_trip_keeps_every_row_and_id(new_db, sqlite_db, open_store, photo):
    a = open_store(sqlite_db())
    fill(a, photo)
    b, c = open_store(new_db()), open_store(sqlite_db())
    first = copy(a, b)
    copy(b, c)
    want = dump(a)
    assert dump(b) == want
    assert dump(c) == want
    assert want["high_water"] == 12 and max(r[0] for r in want["image"]) == 11  # the newest was deleted
    assert (first.images, first.blobs, first.thumbnails, first.frames) == (10, 9, 2, 1)
    assert first.counts == {"image": 10, "blob": 9, "detection": 11, "thumbnail": 2, "vision_frame": 1,
                            "object_count": 4, "object_pair": 3}
    assert first.checked == 9
    with c.connection():
        assert c.objects() == a.objects()
        assert c.file(1) == a.file(1)
        rows = dict(c.database.execute_sql("SELECT key, value FROM setting").fetchall())
    assert rows["copied_from"].startswith(b.path) and "copy_from" not in rows


def test_a_deleted_id_does_not_come_back_in_the_copy(new_db, sqlite_db, open_store):
    a = open_store(sqlite_db())
    with a.connection():
        for i in range(3):
            a.add(new_image(picture(i), n=i))
        a.delete(3)
    b = open_store(new_db())
    copy(a, b)
    with b.connection():
        assert b.add(new_image(picture(7), n=7)).id == 4
        assert [r.id for r in b.list()[0]] == [4, 2, 1]


def test_an_interrupted_copy_goes_on_where_it_stopped(new_db, sqlite_db, open_store, photo):
    a = open_store(sqlite_db())
    fill(a, photo)
    b = open_store(new_db())
    seen = []

    def stop(done: int) -> None:
        seen.append(done)
        if len(seen) == 2:
            raise KeyboardInterrupt  # Ctrl-C after the second batch was committed

    with pytest.raises(KeyboardInterrupt):
        copy(a, b, batch_rows=3, after_batch=stop)
    assert seen == [3, 6]
    with b.connection():
        assert b.count()[0] == 6
        assert b.database.execute_sql("SELECT value FROM setting WHERE key = 'copy_from'").fetchone()[0] == a.path
    seen.clear()
    again = copy(a, b, batch_rows=3, after_batch=seen.append)
    assert (again.already, again.images) == (6, 4)
    assert seen == [9, 10]
    assert dump(b) == dump(a)  # nothing twice, nothing missing


def test_an_older_sqlite_source_is_migrated_first(new_db, sqlite_db, open_store, photo):
    """A source as schema version 3 left it (no counts tables): opened as the server opens it, it gains the
    counts, and the copy carries them."""
    source = sqlite_db()
    fill(open_store(source), photo)
    conn = sqlite3.connect(source)
    conn.executescript(
        "BEGIN; DROP TABLE object_count; DROP TABLE object_pair; DROP INDEX detection_name_confidence_image_id;"
        "UPDATE setting SET value = '3' WHERE key = 'schema_version'; COMMIT;"
    )
    conn.close()
    target = new_db()
    assert store.main(["copy", source, target]) == 0
    a, b = open_store(source), open_store(target)
    assert dump(b) == dump(a)
    with b.connection():
        assert b.objects() == [("dog", 4), ("car", 3), ("person", 3), ("cat", 1)]

def test_batches_are_bounded_by_bytes(sqlite_db, open_store, photo):
    a = open_store(sqlite_db())
    with a.connection():
        for i, name in enumerate(PHOTOS):
            a.add(new_image(photo(name), n=i))
    sizes = [len(photo(name)) for name in PHOTOS]
    b = open_store(sqlite_db())
    seen = []
    # Room for the first two photos together, not for three: a larger one alone, never none.
    copy(a, b, batch_mb=(sizes[0] + sizes[1]) / 2**20, after_batch=seen.append)
    assert seen == [2, 3]
    assert dump(b) == dump(a)


def test_a_target_holding_another_library_is_refused(new_db, sqlite_db, open_store, capsys):
    a = open_store(sqlite_db())
    with a.connection():
        a.add(new_image(picture(1), n=1))
    target = new_db()
    b = open_store(target)
    with b.connection():
        b.add(new_image(picture(2), n=2))
    b.shutdown()
    assert store.main(["copy", a.path, target]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("store.py copy: ") and "is not empty (1 image(s), 1 blob(s)) and no copy was started" in err[-1]
    assert "Traceback" not in "".join(err)
    with b.connection():
        assert b.count() == (1, 1)  # nothing written


def test_an_unfinished_copy_of_another_source_is_refused(sqlite_db, open_store):
    a, other = open_store(sqlite_db()), open_store(sqlite_db())
    for i, s in enumerate((a, other)):
        with s.connection():
            s.add(new_image(picture(i), n=i))
            s.add(new_image(picture(i + 10), n=i + 10))
    b = open_store(sqlite_db())

    def stop(done: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        copy(other, b, batch_rows=1, after_batch=stop)
    with pytest.raises(store.StoreError, match=r"holds an unfinished copy of another library \(.*\); give that library"):
        copy(a, b)
    copy(other, b)  # the one it started with goes on
    assert dump(b) == dump(other)


def test_the_verification_names_a_corrupted_blob(new_db, sqlite_db, open_store, photo):
    a = open_store(sqlite_db())
    fill(a, photo)
    b = open_store(new_db())
    copy(a, b)
    assert store.verify_copy(a, b) == []
    sha = hashlib.sha256(photo(PHOTOS[1])).hexdigest()
    with b.connection(), b.backend.write():
        p = b.database.param
        b.database.execute_sql(f"UPDATE blob SET data = {p} WHERE sha256 = {p}", [picture(5), sha])
    problems = store.verify_copy(a, b, batch_mb=0.01)  # a group of one blob at a time
    assert problems == [f"1 blob(s) whose bytes do not match their sha256: {sha}"]


def test_the_verification_names_a_missing_row_and_a_wrong_count(sqlite_db, open_store, photo):
    a = open_store(sqlite_db())
    fill(a, photo)
    b = open_store(sqlite_db())
    copy(a, b)
    with b.connection(), b.backend.write():
        b.database.execute_sql("DELETE FROM vision_frame")
        b.database.execute_sql("UPDATE object_count SET images = images + 1 WHERE name = 'dog'")
    problems = store.verify_copy(a, b)
    assert "vision_frame: 1 row(s) in the source, 0 in the copy" in problems
    assert "object_count: 2 row(s) disagree with a recount from the copy's detections" in problems


def test_the_command_shows_progress_lines_off_a_terminal_and_one_summary(sqlite_db, open_store, photo, capsys):
    source = sqlite_db()
    fill(open_store(source), photo)
    target = sqlite_db()
    assert store.main(["copy", source, target]) == 0
    out, err = capsys.readouterr()
    assert "\r" not in err
    lines = err.splitlines()
    stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
    assert re.search(stamp + r"copy images: 10/10 images \(100%\); [\d.]+ images/s$", lines[0]), lines
    assert any(re.search(stamp + r"copy thumbnails: 2/2 thumbnails \(100%\)", x) for x in lines), lines
    assert any(re.search(stamp + r"verify bytes: 9/9 blobs \(100%\)", x) for x in lines), lines
    assert out.count("\n") == 1
    assert re.fullmatch(
        r"copied 10 image\(s\), 9 blob\(s\) \([\d.]+ MB\), 11 detection\(s\), 1 vision frame\(s\) and 2 thumbnail\(s\) "
        rf"from {re.escape(os.path.abspath(source))} to {re.escape(os.path.abspath(target))} in [\d.]+ s; verified: "
        r"7 tables' rows equal, 9 sha256 recomputed, next image id above 12\n",
        out,
    ), out


def test_usage_errors_exit_2(sqlite_db, open_store, capsys):
    source = sqlite_db()
    open_store(source)
    for argv, says in (
        (["copy", source, os.path.join(os.path.dirname(source), ".", os.path.basename(source))], "are the same database"),
        (["copy", source + ".missing", sqlite_db()], "does not exist"),
        (["copy", source], "the following arguments are required: TARGET"),
    ):
        with pytest.raises(SystemExit) as stopped:
            store.main(argv)
        assert stopped.value.code == 2
        assert says in capsys.readouterr().err


def test_on_a_terminal_the_progress_is_a_bar():
    out = io.StringIO()
    with store._Bar(3, "copy images", unit="image", stream=out, tty=True) as bar:
        for _ in range(3):
            bar.update("added")
        bar.write("a line above the bar")
    text = out.getvalue()
    assert "\r" in text and "a line above the bar\n" in text
    assert re.search(r"copy images: 100%.*3/3", text), text


def with_password(url: str, password: str) -> str:
    parts = urllib.parse.urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user or 'postgres'}:{password}@{host}"))


@pytest.mark.postgresql_only
def test_no_password_in_any_output_or_row(new_db, sqlite_db, open_store, photo, capsys, caplog):
    """SQLite to PostgreSQL and back, the URL with a password: it is in no line the
    command prints or logs, and not in the copy_from / copied_from rows."""
    source = sqlite_db()
    fill(open_store(source), photo)
    pg = new_db()
    secret = urllib.parse.urlsplit(pg).password
    if secret is None:  # the session's own cluster trusts 127.0.0.1: any password is taken
        secret = "s3cret-pw"
        pg = with_password(pg, secret)
    back = sqlite_db()
    assert store.main(["copy", source, pg]) == 0
    assert store.main(["copy", pg, back]) == 0
    assert store.main(["copy", source, pg]) == 1  # refused: it holds a verified copy, and says so
    out, err = capsys.readouterr()
    assert "already holds a verified copy" in err
    assert ":***@" in out
    assert secret not in out + err + caplog.text
    b = open_store(back)
    with b.connection():
        copied = b.database.execute_sql("SELECT value FROM setting WHERE key = 'copied_from'").fetchone()[0]
    assert copied.startswith(store.redact(pg) + " at ") and secret not in copied


def test_a_database_error_is_one_line_and_status_1(sqlite_db, open_store, capsys):
    if not any(importlib.util.find_spec(name) for name in ("psycopg", "psycopg2")):
        pytest.skip("no PostgreSQL driver (requirements-postgres.txt)")
    source = sqlite_db()
    open_store(source)
    port = socket.socket()
    port.bind(("127.0.0.1", 0))  # a free port nobody listens on: the connection is refused
    try:
        url = f"postgresql://postgres:s3cret-pw@127.0.0.1:{port.getsockname()[1]}/nowhere"
        assert store.main(["copy", source, url]) == 1
    finally:
        port.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("store.py copy: the database postgresql://postgres:***@127.0.0.1:")
    assert "unreachable" in err and "s3cret-pw" not in err and "Traceback" not in err


@pytest.mark.postgresql_only
def test_one_postgresql_database_spelt_two_ways_is_refused(new_db, open_store, capsys):
    url = new_db()
    with open_store(url).connection():
        pass
    other = url + ("&" if "?" in url else "?") + "application_name=copy"  # another spelling, the same database
    assert store.main(["copy", url, other]) == 1
    assert "are the same database; give another TARGET" in capsys.readouterr().err
    a = open_store(url)
    with a.connection():
        assert a.database.execute_sql("SELECT COUNT(*) FROM setting WHERE key IN ('copy_from', 'copied_from')").fetchone()[0] == 0


def test_ingest_progress_fits_the_copy(sqlite_db, open_store, photo):
    """copy_library's progress displays have ingest.Progress's interface: that one can be handed in as is."""
    import ingest

    out = io.StringIO()
    a, b = open_store(sqlite_db()), open_store(sqlite_db())
    fill(a, photo)
    store.copy_library(a, b, progress=lambda total, what, **kw: ingest.Progress(total, what, stream=out, tty=False, **kw))
    assert re.search(r"copy images: 10/10 images \(100%\), 10 added", out.getvalue()), out.getvalue()
    assert dump(b) == dump(a)


@pytest.mark.postgresql_only
def test_a_row_the_target_refuses_is_one_line_and_status_1(new_db, sqlite_db, open_store, capsys):
    """SQLite takes a NUL in text, PostgreSQL does not: the insert fails, the batch is rolled back, one line."""
    source = sqlite_db()
    a = open_store(source)
    with a.connection():
        a.add(new_image(picture(1), n=1))
        a.database.execute_sql("UPDATE image SET label = ? WHERE id = 1", ["a\x00b"])
    target = new_db()
    assert store.main(["copy", source, target]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("store.py copy: ") and "NUL" in err[-1]
    assert not any("Traceback" in line for line in err)
    b = open_store(target)
    with b.connection():
        assert b.count() == (0, 0)  # the batch went back whole
