"""Shared fixtures. Photos and model come from TESTDATA_DIR and DETECT_MODEL, never a path outside the repo.

Without those variables the tests look in testdata/ (what `make testdata` fills).
"""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import detect  # noqa: E402

SSD_NAME = "coco_ssd_mobilenet_v1_1.0_quant_2018_06_29.tflite"


def _path(env: str, default: str) -> str:
    return os.path.abspath(os.environ.get(env) or os.path.join(ROOT, default))


TESTDATA_DIR = _path("TESTDATA_DIR", "testdata")
MODEL_PATH = _path("DETECT_MODEL", os.path.join("testdata", "models", SSD_NAME))
IMAGES_DIR = os.path.join(TESTDATA_DIR, "images")


@pytest.fixture(scope="session")
def images_dir() -> str:
    if not os.path.isdir(IMAGES_DIR):
        pytest.fail(f"no test photos in {IMAGES_DIR}: set TESTDATA_DIR or run `make testdata`")
    return IMAGES_DIR


@pytest.fixture(scope="session")
def model_path() -> str:
    if not os.path.isfile(MODEL_PATH):
        pytest.fail(f"no model at {MODEL_PATH}: set DETECT_MODEL or run `make testdata`")
    return MODEL_PATH


@pytest.fixture(scope="session")
def expected(images_dir) -> dict:
    path = os.path.join(images_dir, "expected.json")
    if not os.path.isfile(path):
        pytest.skip(f"{path} is absent (it comes with ../shared/testdata, not with `make testdata`)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def detector(model_path) -> detect.Detector:
    """The real model, loaded once for the session (two interpreters, one thread each)."""
    d = detect.Detector(model_path, threshold=0.5, threads=1, pool=2)
    d.load()
    return d


@pytest.fixture(scope="session")
def photo(images_dir):
    """photo('pets.jpg') -> the bytes of a test photo."""

    def read(name: str) -> bytes:
        with open(os.path.join(images_dir, name), "rb") as f:
            return f.read()

    return read


class Service:
    """The app built from real parts (server.build_parts, as main() builds them), and those parts."""

    def __init__(self, settings, parts):
        import webtest

        import server

        self.settings, self.parts = settings, parts
        self.detector, self.store, self.fetcher, self.jobs = parts.detector, parts.images, parts.fetcher, parts.jobs
        self.wsgi = server.make_app(settings, parts)
        self.client = webtest.TestApp(self.wsgi)

    def counts(self) -> tuple[int, int]:
        with self.store.connection():
            return self.store.count()


@pytest.fixture
def make_service(tmp_path, detector):
    """make_service(detector=..., uploader=..., now=..., resolve=..., connect=..., **setting overrides) -> Service.

    A fresh database each time. URL downloads may reach loopback (ALLOW_PRIVATE_URLS) unless a test
    says otherwise. Without an `uploader` (an imgur.ImgurClient), Imgur is not configured. `resolve` and
    `connect` are fetch.Fetcher's seams (fake DNS; route a "public" address to a loopback server).
    """
    import time

    import server
    import settings

    made = []

    def make(detector=detector, uploader=None, now=time.time, resolve=None, connect=None, **overrides):
        overrides.setdefault("allow_private_urls", True)
        overrides.setdefault("min_free_disk_mb", 0)  # test machines can be short of disk; tests/test_disk.py sets it
        s = settings.load([], {}, db=str(tmp_path / f"images{len(made)}.db"), model=detector.model_path, **overrides)
        parts = server.build_parts(s, detector=detector, uploader=uploader, now=now, resolve=resolve, connect=connect)
        made.append(Service(s, parts))
        return made[-1]

    yield make
    for service in made:
        service.parts.close(jobs_timeout=5)


@pytest.fixture
def service(make_service) -> "Service":
    return make_service()
