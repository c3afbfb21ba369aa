"""`python ingest.py import PATH...`: folders of real photos into a real database, with the real model.

Most tests call ingest.main() in this process (the output captured); the ones about the process itself
(plain lines off a terminal, a bar on one, Ctrl-C, a server on the same database) run it as a child.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pty
import re
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request

import pytest
from test_server import ROOT, start_server, stop_server

import ingest
import store

PHOTOS = (
    "pets.jpg", "cat_1080p.jpg", "cats_and_dogs.jpg", "coupleanddog.jpeg", "kite_and_cold.jpg",
    "pasta_wine_test_image.jpg", "table.jpg", "bird.bmp", "cat.bmp", "dragonfly.bmp", "grace_hopper.bmp",
    "traffic_0001.bmp",
)
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[ ,]")  # a log line: its time first
PROGRESS = re.compile(r"import: (\d+)/(\d+) files")


def rows(db) -> list[tuple]:
    """(filename, label, detection_enabled, objects) of every image, in id order, read with plain sqlite3."""
    with sqlite3.connect(db) as c:
        images = c.execute("SELECT id, filename, label, detection_enabled FROM image ORDER BY id").fetchall()
        out = []
        for image_id, name, label, enabled in images:
            names = [r[0] for r in c.execute("SELECT name FROM detection WHERE image_id = ?", (image_id,))]
            out.append((name, label, bool(enabled), sorted(set(names))))
    return out


def variants(images_dir, folder, n: int, name: str = "cat.bmp", first: int = 0) -> list[str]:
    """`n` distinct files made from one BMP photo: one byte of its pixels changed in each."""
    data = open(os.path.join(images_dir, name), "rb").read()
    start = int.from_bytes(data[10:14], "little")  # where the pixels begin
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(first, first + n):
        b = bytearray(data)
        b[start + i] ^= 0xFF
        path = os.path.join(folder, f"v{i:03d}.bmp")
        with open(path, "wb") as f:
            f.write(b)
        paths.append(path)
    return paths


@pytest.fixture
def tree(tmp_path, images_dir):
    """The twelve photos spread over subfolders, plus a copy of one under another name, a text file, a
    fake HEIC (an ISO media header) and a truncated JPEG."""
    top = tmp_path / "photos"
    for i, name in enumerate(PHOTOS):
        folder = top / ("" if i < 4 else "2024" if i < 8 else "2024/summer")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(images_dir, name), folder / name)
    shutil.copy(os.path.join(images_dir, "pets.jpg"), top / "2024" / "pets again.jpg")
    (top / "notes.txt").write_text("not a photo\n")
    (top / "IMG_0001.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 200)
    pets = open(os.path.join(images_dir, "pets.jpg"), "rb").read()
    (top / "2024" / "broken.jpg").write_bytes(pets[: len(pets) // 3])
    return top


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = ingest.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def child(*argv, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "ingest.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "MIN_FREE_DISK_MB": "0", **(env or {})},
    )


@pytest.fixture(autouse=True)
def no_disk_floor(monkeypatch):
    monkeypatch.setenv("MIN_FREE_DISK_MB", "0")  # test machines can be short of disk; one test sets it


# ---------------------------------------------------------------------------------------------------------


def test_a_folder_tree_is_imported_by_content_with_detection(tree, tmp_path, model_path, capsys, caplog):
    db = str(tmp_path / "lib" / "images.db")
    code, out, err = run_main(capsys, "import", str(tree), "--db", db, "--model", model_path)
    assert code == 1  # the truncated JPEG failed
    m = re.search(r"import: (\d+) added, (\d+) skipped \(duplicates: (\d+), not images: (\d+)\), (\d+) failed; (\d+) files", out)
    assert m and tuple(map(int, m.groups())) == (12, 3, 1, 2, 1, 16), out
    failed = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(failed) == 1 and re.search(r"failed \S*broken\.jpg: the image data is truncated", failed[0]), failed
    found = rows(db)
    assert sorted(r[0] for r in found) == sorted(PHOTOS)  # the copy under another name is not stored twice
    by_name = {r[0]: r for r in found}
    assert by_name["pets.jpg"][1:] == ("2 dogs", True, ["dog"])
    assert by_name["grace_hopper.bmp"][2] is True and "person" in by_name["grace_hopper.bmp"][3]
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert {r[0] for r in c.execute("SELECT DISTINCT content_type FROM image")} == {"image/jpeg", "image/bmp"}


def test_a_second_run_adds_nothing_and_exits_0(tmp_path, images_dir, model_path, capsys):
    db = str(tmp_path / "images.db")
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("pets.jpg", "table.jpg", "cat.bmp"):
        shutil.copy(os.path.join(images_dir, name), folder / name)
    assert run_main(capsys, "import", str(folder), "--db", db, "--model", model_path)[0] == 0
    shutil.copy(os.path.join(images_dir, "bird.bmp"), folder / "bird.bmp")
    code, out, _ = run_main(capsys, "import", str(folder), "--db", db, "--model", model_path)
    assert code == 0
    assert "import: 1 added, 3 skipped (duplicates: 3), 0 failed; 4 files" in out
    code, out, _ = run_main(capsys, "import", str(folder), str(folder / "pets.jpg"), "--db", db, "--model", model_path)
    assert code == 0 and "import: 0 added, 5 skipped (duplicates: 5), 0 failed" in out
    assert len(rows(db)) == 4


def test_bytes_added_through_the_api_are_skipped(make_service, tmp_path, photo, images_dir, capsys):
    service = make_service()
    body = {"image": base64.b64encode(photo("pets.jpg")).decode(), "detect": False, "label": "my dog"}
    service.client.post_json("/images", body, status=200)
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(os.path.join(images_dir, "pets.jpg"), folder / "renamed.jpg")
    shutil.copy(os.path.join(images_dir, "table.jpg"), folder / "table.jpg")
    code, out, _ = run_main(capsys, "import", str(folder), "--db", service.settings.db, "--model", service.detector.model_path)
    assert code == 0 and "import: 1 added, 1 skipped (duplicates: 1), 0 failed" in out
    assert [r[:2] for r in rows(service.settings.db)] == [(None, "my dog"), ("table.jpg", "table")]


def test_a_dry_run_writes_nothing(tree, tmp_path, model_path, images_dir, capsys):
    absent = tmp_path / "new" / "images.db"
    code, out, _ = run_main(capsys, "import", str(tree), "--dry-run", "--db", str(absent), "--model", model_path)
    assert code == 1  # the truncated JPEG would fail
    assert "import (dry run: nothing is written): 12 to add, 3 to skip (duplicates: 1, not images: 2), 1 would fail" in out
    assert not absent.parent.exists()
    # An existing library: what it holds would be skipped, and it is left as it was.
    db = str(tmp_path / "images.db")
    assert run_main(capsys, "import", os.path.join(images_dir, "pets.jpg"), "--db", db, "--model", model_path)[0] == 0
    with sqlite3.connect(db) as c:  # fold the WAL in, so that the file alone says what the database holds
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = open(db, "rb").read()
    code, out, _ = run_main(capsys, "import", str(tree), "--dry-run", "--db", db, "--model", model_path)
    assert "11 to add, 4 to skip (duplicates: 2, not images: 2), 1 would fail" in out
    assert open(db, "rb").read() == before and len(rows(db)) == 1
    assert not os.path.exists(db + "-wal") or os.path.getsize(db + "-wal") == 0


def test_without_detection_no_model_is_needed(tmp_path, images_dir, capsys):
    db = str(tmp_path / "images.db")
    code, out, _ = run_main(
        capsys, "import", os.path.join(images_dir, "pets.jpg"), os.path.join(images_dir, "cat.bmp"), "--no-detect",
        "--db", db, "--model", str(tmp_path / "none.tflite"),
    )
    assert code == 0 and "import: 2 added" in out
    assert sorted(r[1:] for r in rows(db)) == [("cat", False, []), ("pets", False, [])]


def test_detection_without_a_model_is_refused_before_anything_is_read(tmp_path, images_dir, capsys):
    code, out, err = run_main(
        capsys, "import", images_dir, "--db", str(tmp_path / "images.db"), "--model", str(tmp_path / "none.tflite")
    )
    assert code == 2 and out == ""
    assert "no detection model at" in err and "--no-detect" in err
    assert rows(str(tmp_path / "images.db")) == []


def test_usage_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ingest.main(["import"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        ingest.main(["import", str(tmp_path / "nowhere"), "--db", str(tmp_path / "images.db")])
    assert e.value.code == 2 and "no such file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        ingest.main([])
    assert e.value.code == 2


def test_a_loop_of_links_given_as_a_path_is_called_one(tmp_path, capsys):
    os.symlink("b.jpg", tmp_path / "a.jpg")
    os.symlink("a.jpg", tmp_path / "b.jpg")
    with pytest.raises(SystemExit) as e:
        ingest.main(["import", str(tmp_path / "a.jpg"), str(tmp_path / "nowhere"), "--db", str(tmp_path / "images.db")])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"a loop of links: {tmp_path / 'a.jpg'}; no such file or folder: {tmp_path / 'nowhere'}" in err, err
    assert not (tmp_path / "images.db").exists()


def test_the_limits_of_post_images_apply(tmp_path, images_dir, model_path, monkeypatch, capsys, caplog):
    db = str(tmp_path / "images.db")
    big, small = os.path.join(images_dir, "kite_and_cold.jpg"), os.path.join(images_dir, "table.jpg")
    monkeypatch.setenv("MAX_IMAGE_BYTES", str(1024 * 1024))
    code, out, err = run_main(capsys, "import", big, small, "--db", db, "--model", model_path)
    assert code == 1 and "import: 1 added, 0 skipped, 1 failed" in out
    assert "kite_and_cold.jpg: the file is larger than 1,048,576 bytes (MAX_IMAGE_BYTES)" in caplog.text
    monkeypatch.delenv("MAX_IMAGE_BYTES")
    monkeypatch.setenv("MAX_PIXELS", "1000000")  # kite_and_cold is 1.2 MP, table less
    code, out, err = run_main(capsys, "import", big, "--db", db, "--model", model_path)
    assert code == 1 and "kite_and_cold.jpg: the image is 1352x900 (1,216,800 pixels); the limit is 1,000,000" in caplog.text
    assert [r[0] for r in rows(db)] == ["table.jpg"]


def test_the_disk_floor_stops_the_import(tmp_path, images_dir, model_path, monkeypatch, capsys):
    db = str(tmp_path / "images.db")
    store.Store(db).shutdown()  # the database exists; the floor only refuses writes of images
    monkeypatch.setenv("MIN_FREE_DISK_MB", str(10**9))
    paths = variants(images_dir, str(tmp_path / "in"), 12)
    code, out, err = run_main(capsys, "import", *paths, "--db", db, "--model", model_path)
    assert code == 1
    assert "stopped early" in err and "MIN_FREE_DISK_MB" in err
    m = re.search(r"import: 0 added, 0 skipped, (\d+) failed; (\d+) files", out)
    assert m and int(m.group(1)) == int(m.group(2)) < 12, out  # the rest was not tried
    assert rows(db) == []


def test_progress_off_a_terminal_is_a_bounded_number_of_plain_lines():
    now = [0.0]
    out = io.StringIO()
    with ingest.Progress(100, "import", stream=out, tty=False, every=5, clock=lambda: now[0]) as p:
        for i in range(100):
            now[0] += 0.5  # 50 s in all: a line at most every 5 s
            p.update("failed" if i == 7 else "skipped" if i % 10 == 0 else "added", "duplicates" if i % 10 == 0 else None)
    lines = out.getvalue().splitlines()
    assert 9 <= len(lines) <= 11 and "\r" not in out.getvalue()
    assert all(LINE.match(line) for line in lines)
    assert lines[-1].endswith("100/100 files (100%), 89 added, 10 skipped, 1 failed; 2.0 files/s")
    assert "about 45.0 s left" in lines[0]
    assert p.summary() == "import: 89 added, 10 skipped (duplicates: 10), 1 failed; 100 files in 50.0 s, 2.0 files/s"
    with pytest.raises(ValueError):
        p.update("done")


def test_off_a_terminal_the_command_writes_plain_lines(tree, tmp_path, model_path):
    result = child("import", str(tree), "--db", str(tmp_path / "images.db"), "--model", model_path, "--log-every", "0")
    assert result.returncode == 1, result.stderr
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    lines = result.stderr.splitlines()
    assert all(LINE.match(line) for line in lines), lines
    assert len([line for line in lines if PROGRESS.search(line)]) == 16  # --log-every 0: one per file
    assert result.stdout.startswith("import: 12 added, 3 skipped (duplicates: 1, not images: 2), 1 failed; 16 files in")
    # The default (at most a line every 5 s) keeps a quick import to its first line, a failure and the last.
    result = child("import", str(tree), "--db", str(tmp_path / "images.db"), "--model", model_path)
    assert len(result.stderr.splitlines()) <= 4, result.stderr


def test_on_a_terminal_it_draws_a_bar(tmp_path, images_dir, model_path):
    leader, follower = pty.openpty()
    import fcntl

    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    folder = tmp_path / "in"
    variants(images_dir, str(folder), 6)
    proc = subprocess.Popen(
        [sys.executable, "ingest.py", "import", str(folder), "--db", str(tmp_path / "images.db"), "--model", model_path],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=follower, stdin=subprocess.DEVNULL, text=True,
        env={**os.environ, "MIN_FREE_DISK_MB": "0"},
    )
    os.close(follower)
    drawn = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        drawn += chunk
    out = proc.communicate(timeout=60)[0]
    os.close(leader)
    text = drawn.decode("utf-8", "replace")
    assert proc.returncode == 0, text
    assert "\r" in text and "6/6" in text and "files/s" in text and "6 added, 0 skipped, 0 failed" in text
    assert out.startswith("import: 6 added, 0 skipped, 0 failed; 6 files in")


def _watch(proc, lines: list[str], enough: threading.Event, done_at: int) -> threading.Thread:
    def read():
        for line in proc.stderr:
            lines.append(line)
            m = PROGRESS.search(line)
            if m and int(m.group(1)) >= done_at:
                enough.set()
        enough.set()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_keeps_what_was_done_and_a_second_run_adds_the_rest(tmp_path, images_dir, model_path, sig, status):
    db = str(tmp_path / "images.db")
    folder = tmp_path / "in"
    variants(images_dir, str(folder), 60, name="grace_hopper.bmp")
    proc = subprocess.Popen(
        [sys.executable, "ingest.py", "import", str(folder), "--db", db, "--model", model_path, "--log-every", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "MIN_FREE_DISK_MB": "0"},
    )
    lines: list[str] = []
    enough = threading.Event()
    reader = _watch(proc, lines, enough, done_at=4)
    try:
        assert enough.wait(60), "".join(lines)
        proc.send_signal(sig)
        out = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    err = "".join(lines)
    assert proc.returncode == status, err
    assert "Traceback" not in err
    m = re.search(r"import \(interrupted: the rest was not looked at\): (\d+) added, 0 skipped, 0 failed", out)
    assert m, out
    added = int(m.group(1))
    assert 4 <= added < 60
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert c.execute("SELECT COUNT(*) FROM image").fetchone() == (added,)
        # Every image whole: its bytes and its detections are there.
        assert c.execute("SELECT COUNT(*) FROM image WHERE sha256 NOT IN (SELECT sha256 FROM blob)").fetchone() == (0,)
        assert c.execute(
            "SELECT COUNT(*) FROM image WHERE id NOT IN (SELECT image_id FROM detection)"
        ).fetchone() == (0,)  # grace_hopper: a person and ties in every variant
    again = child("import", str(folder), "--db", db, "--model", model_path)
    assert again.returncode == 0, again.stderr
    assert f"import: {60 - added} added, {added} skipped (duplicates: {added}), 0 failed" in again.stdout
    assert len(rows(db)) == 60


def test_safe_while_the_server_runs_on_the_same_database(tmp_path, images_dir, model_path, photo):
    proc, base, _ = start_server(tmp_path, "--model", model_path)  # tmp_path/images.db
    db = str(tmp_path / "images.db")
    answers: list[int] = []
    answered: list[float] = []
    try:
        req = urllib.request.Request(
            base + "/images", json.dumps({"image": base64.b64encode(photo("pets.jpg")).decode()}).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as res:
            assert res.status == 200
        folder = tmp_path / "in"
        variants(images_dir, str(folder), 30)
        shutil.copy(os.path.join(images_dir, "pets.jpg"), folder / "pets.jpg")  # the server holds it
        posted = variants(images_dir, str(tmp_path / "posted"), 12, first=100)
        start = threading.Event()

        def post_while_importing():
            start.wait(30)
            for path in posted:
                body = json.dumps({"image": base64.b64encode(open(path, "rb").read()).decode()}).encode()
                r = urllib.request.Request(base + "/images", body, {"Content-Type": "application/json"})
                with urllib.request.urlopen(r, timeout=30) as res:
                    answers.append(res.status)
                answered.append(time.monotonic())

        poster = threading.Thread(target=post_while_importing)
        poster.start()
        imp = subprocess.Popen(
            [sys.executable, "ingest.py", "import", str(folder), "--db", db, "--model", model_path, "--log-every", "0"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "MIN_FREE_DISK_MB": "0"},
        )
        lines: list[str] = []
        first = threading.Event()
        reader = _watch(imp, lines, first, done_at=1)
        first.wait(60)
        start.set()  # the posts go while the import stores
        out = imp.communicate(timeout=120)[0]
        import_ended = time.monotonic()
        reader.join(5)
        poster.join(60)
        with urllib.request.urlopen(base + "/images?limit=100", timeout=10) as res:
            listed = json.load(res)
    finally:
        stop_server(proc)
    assert imp.returncode == 0, "".join(lines)
    assert "import: 30 added, 1 skipped (duplicates: 1), 0 failed" in out
    assert answers == [200] * 12
    assert answered[0] < import_ended, "no POST was answered while the import ran"
    assert len(listed) == 1 + 30 + 12
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_readmes_examples_work_as_written(tmp_path, images_dir, model_path):
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme[readme.index("## Import a folder\n"):]
    section = section[: section.index("\n## ", 1)]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    commands = [line.split("#")[0].split() for line in block.splitlines() if line.startswith("python ingest.py import")]
    assert len(commands) == 3
    env = {"IMAGES_DB": str(tmp_path / "data" / "images.db"), "DETECT_MODEL": model_path}
    outs = []
    for words in commands:
        assert words[:3] == ["python", "ingest.py", "import"] and words[-1] == "testdata/images"
        result = child(*words[2:-1], images_dir, env=env)
        assert result.returncode == 0, result.stderr
        outs.append(result.stdout)
    photos = len([n for n in os.listdir(images_dir) if n.endswith((".jpg", ".jpeg", ".bmp"))])
    assert f": {photos} to add," in outs[0] and f"import: {photos} added," in outs[1]
    assert f"import: 0 added, {len(os.listdir(images_dir))} skipped" in outs[2]
    # The summary README shows is the one the tree above gets.
    shown = re.search(r"^  import: .*$", section, re.M).group(0).strip()
    assert re.fullmatch(r"import: 12 added, 3 skipped \(duplicates: 1, not images: 2\), 1 failed; 16 files in [\d.]+ s, [\d.]+ files/s", shown)
