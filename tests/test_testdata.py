"""tests/testdata.py and `make test`'s first step: the test data downloaded all or nothing, from a mirror
when TESTDATA_BASE_URL says so; offline, one short message and nothing half-made."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

import testdata
from loopback import Loopback, dropped, ok, status

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = {  # a small tree like the real one; the bytes differ per file so a mix-up shows
    "images/a.jpg": b"\xff\xd8\xff" + b"a" * 3000,
    "images/b.bmp": b"BM" + b"b" * 5000,
    "models/m.tflite": b"TFL3" + b"m" * 7000,
}


def manifest(urls: dict[str, str]) -> dict[str, dict]:
    return {rel: {"url": urls[rel], "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            for rel, data in FILES.items()}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mirror():
    """A loopback server holding FILES at /<path>, as TESTDATA_BASE_URL expects."""
    with Loopback({f"/{rel}": ok(data) for rel, data in FILES.items()}) as srv:
        yield srv


def listing(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def test_download_gets_every_file_then_has_nothing_to_do(tmp_path, mirror):
    files = manifest({rel: mirror.url(f"/{rel}") for rel in FILES})
    dest = tmp_path / "testdata"
    saved = testdata.download(str(dest), files)
    assert sorted(saved) == sorted(str(dest / rel) for rel in FILES)
    assert all((dest / rel).read_bytes() == data for rel, data in FILES.items())
    assert os.listdir(tmp_path) == ["testdata"]  # no temporary folder left beside it
    hits = sum(mirror.hits.values())
    assert testdata.download(str(dest), files) == [] and sum(mirror.hits.values()) == hits


def test_base_url_replaces_the_manifest_urls(tmp_path, mirror):
    nowhere = f"http://127.0.0.1:{closed_port()}"
    files = manifest({rel: f"{nowhere}/{rel}" for rel in FILES})
    testdata.download(str(tmp_path / "testdata"), files, base_url=mirror.url("/"))
    assert listing(tmp_path / "testdata") == sorted(FILES)
    assert all(mirror.hits[f"/{rel}"] == 1 for rel in FILES)


@pytest.mark.parametrize("broken, said", [
    (status(404), "answered 404"),
    (ok(b"BM" + b"x" * 5000), "sha256"),                 # the right size, other bytes
    (ok(b"BM" + b"b" * 6000), "more than the 5,002 bytes"),  # longer than the manifest says
    (dropped(b"BM" + b"b" * 100, 5002), "stopped after 102 of 5,002 bytes"),  # cut off mid-body
])
def test_a_failed_file_leaves_nothing(tmp_path, broken, said):
    routes = {f"/{rel}": ok(data) for rel, data in FILES.items()}
    routes["/images/b.bmp"] = broken
    with Loopback(routes) as srv:
        files = manifest({rel: srv.url(f"/{rel}") for rel in FILES})
        with pytest.raises(testdata.DownloadError, match=said):
            testdata.download(str(tmp_path / "testdata"), files)
        assert srv.hits["/models/m.tflite"] == 0  # the first failure stops the run
    assert os.listdir(tmp_path) == []  # no testdata/, no empty folders, no temporary folder


def test_an_existing_folder_is_completed_or_left_as_it_was(tmp_path, mirror):
    dest = tmp_path / "testdata"
    (dest / "images").mkdir(parents=True)
    (dest / "images" / "a.jpg").write_bytes(FILES["images/a.jpg"])
    routes = {"/images/b.bmp": ok(FILES["images/b.bmp"]), "/models/m.tflite": status(500)}
    with Loopback(routes) as failing:
        with pytest.raises(testdata.DownloadError):
            testdata.download(str(dest), manifest({rel: failing.url(f"/{rel}") for rel in FILES}))
    assert listing(dest) == ["images/a.jpg"] and os.listdir(tmp_path) == ["testdata"]
    assert testdata.download(str(dest), manifest({rel: mirror.url(f"/{rel}") for rel in FILES})) == [
        str(dest / "images/b.bmp"), str(dest / "models/m.tflite")]
    assert listing(dest) == sorted(FILES) and mirror.hits["/images/a.jpg"] == 0


# -- ensure: what `make test` runs first -------------------------------------------------------------------


@pytest.fixture
def repo(tmp_path):
    """A stand-in for the repository root, with a manifest of FILES (real URLs nowhere)."""
    nowhere = f"http://127.0.0.1:{closed_port()}"
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"files": manifest({rel: f"{nowhere}/{rel}" for rel in FILES})}))
    root = tmp_path / "repo"
    root.mkdir()
    return root, str(path)


class Out(list):
    def write(self, text):
        self.append(text)

    def text(self) -> str:
        return "".join(self)


def test_ensure_downloads_what_the_tests_would_read_from_testdata(repo, mirror):
    root, path = repo
    assert testdata.ensure({"TESTDATA_BASE_URL": mirror.url("")}, root=str(root), manifest=path, out=Out()) == 0
    assert listing(root / "testdata") == sorted(FILES)


def test_ensure_with_both_variables_set_downloads_nothing(repo, tmp_path):
    root, path = repo
    (tmp_path / "shared" / "images").mkdir(parents=True)
    (tmp_path / "model.tflite").write_bytes(b"model")
    env = {"TESTDATA_DIR": str(tmp_path / "shared"), "DETECT_MODEL": str(tmp_path / "model.tflite")}
    assert testdata.ensure(env, root=str(root), manifest=path, out=Out()) == 0
    assert os.listdir(root) == []


def test_ensure_with_testdata_dir_only_fetches_just_the_model(repo, tmp_path, mirror):
    root, path = repo
    (tmp_path / "shared" / "images").mkdir(parents=True)
    env = {"TESTDATA_DIR": str(tmp_path / "shared"), "TESTDATA_BASE_URL": mirror.url("")}
    assert testdata.ensure(env, root=str(root), manifest=path, out=Out()) == 0
    assert listing(root / "testdata") == ["models/m.tflite"]


@pytest.mark.parametrize("env, said", [
    ({}, "could not download the test data"),  # offline: the manifest's URLs answer nothing
    ({"TESTDATA_DIR": "/nonexistent/testdata"}, "TESTDATA_DIR=/nonexistent/testdata has no images/ folder"),
    ({"DETECT_MODEL": "/nonexistent/m.tflite"}, "DETECT_MODEL=/nonexistent/m.tflite is not a file"),
])
def test_ensure_says_how_to_provide_the_data_in_one_short_message(repo, env, said):
    root, path = repo
    out = Out()
    t = time.monotonic()
    assert testdata.ensure(env, root=str(root), manifest=path, out=out) == 2
    assert time.monotonic() - t < 5  # at once
    text = out.text()
    assert said in text and "TESTDATA_DIR=" in text and "make testdata" in text  # the two ways
    assert len(text.splitlines()) <= 5, text
    assert os.listdir(root) == []  # nothing half-made


# -- through make ------------------------------------------------------------------------------------------


@pytest.fixture
def checkout(tmp_path, repo):
    """The Makefile and tests/testdata.py in a folder of their own, with the manifest of FILES."""
    root, path = repo
    (root / "tests").mkdir()
    shutil.copy(os.path.join(ROOT, "Makefile"), root / "Makefile")
    shutil.copy(os.path.join(ROOT, "tests", "testdata.py"), root / "tests" / "testdata.py")
    shutil.copy(path, root / "tests" / "testdata_manifest.json")
    return root


def make(root, *args, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("TESTDATA_DIR", "DETECT_MODEL", "TESTDATA_BASE_URL", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "-s", *args, f"PYTHON={sys.executable}"], cwd=root, env={**base, **env},
                          capture_output=True, text=True, timeout=60)


def test_make_test_offline_stops_before_installing_anything(checkout):
    t = time.monotonic()
    done = make(checkout, "test")
    assert done.returncode == 2 and time.monotonic() - t < 10
    ours = [line for line in done.stderr.splitlines() if not line.startswith("make: ***")]
    assert ours[0].startswith("make test: no test data yet") and "could not download the test data" in ours[1]
    assert len(ours) <= 6, done.stderr
    assert sorted(os.listdir(checkout)) == ["Makefile", "tests"]  # no .venv, no testdata/


def test_make_testdata_from_a_mirror(checkout, mirror):
    done = make(checkout, "testdata", TESTDATA_BASE_URL=mirror.url(""))
    assert done.returncode == 0, done.stderr
    assert listing(checkout / "testdata") == sorted(FILES)


def test_make_testdata_offline_leaves_no_folder(checkout):
    done = make(checkout, "testdata")
    assert done.returncode != 0 and "nothing was saved" in done.stderr
    assert sorted(os.listdir(checkout)) == ["Makefile", "tests"]


def test_the_real_manifest_lists_what_conftest_reads():
    files = testdata.load_manifest()
    assert "models/coco_ssd_mobilenet_v1_1.0_quant_2018_06_29.tflite" in files
    assert {"pets.jpg", "cat.bmp", "cat_1080p.jpg"} <= {rel.split("/", 1)[1] for rel in files if rel.startswith("images/")}
    assert all(len(spec["sha256"]) == 64 and spec["size"] > 0 and spec["url"].startswith("https://") for spec in files.values())
