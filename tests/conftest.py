"""Shared fixtures. Photos and model come from TESTDATA_DIR and DETECT_MODEL, never a path outside the repo.

Without those variables the tests look in testdata/ (what `make testdata` fills).

Two backends: tests marked `both_backends` (a module's `pytestmark`, a class or a function) that use a
database through `new_db` (`make_service` and `service` do) run twice, as `[sqlite]` and `[postgresql]`;
`sqlite_only` keeps one of them on SQLite (PRAGMAs, the file itself); `postgresql_only` runs a test on
PostgreSQL alone (what SQLite does not have: row locks, a server that goes away). The PostgreSQL half runs on a
throwaway cluster (tests/postgres.py), or on TEST_POSTGRES_URL's server; without PostgreSQL's binaries or
a driver its runs are deselected, with one line saying why (in the report's header and at the end).
"""

import contextlib
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import postgres  # noqa: E402

import detect  # noqa: E402

SSD_NAME = "coco_ssd_mobilenet_v1_1.0_quant_2018_06_29.tflite"


def _path(env: str, default: str) -> str:
    return os.path.abspath(os.environ.get(env) or os.path.join(ROOT, default))


TESTDATA_DIR = _path("TESTDATA_DIR", "testdata")
MODEL_PATH = _path("DETECT_MODEL", os.path.join("testdata", "models", SSD_NAME))
IMAGES_DIR = os.path.join(TESTDATA_DIR, "images")


BACKENDS = ("sqlite", "postgresql")


def _postgres_missing() -> str | None:
    """Why the PostgreSQL half cannot run here (one line), or None."""
    if not hasattr(_postgres_missing, "reason"):
        try:
            postgres.check()
            _postgres_missing.reason = None
        except postgres.Unavailable as e:
            _postgres_missing.reason = str(e)
    return _postgres_missing.reason


def pytest_report_header(config) -> str:
    return _postgres_missing() or postgres.check()


def pytest_generate_tests(metafunc) -> None:
    """Twice for `both_backends` tests that reach a database through `db_backend`; once for the rest."""
    marked = metafunc.definition.get_closest_marker("both_backends")
    if "db_backend" in metafunc.fixturenames and metafunc.definition.get_closest_marker("postgresql_only"):
        metafunc.parametrize("db_backend", ["postgresql"], indirect=True)
    elif marked and "db_backend" in metafunc.fixturenames and not metafunc.definition.get_closest_marker("sqlite_only"):
        metafunc.parametrize("db_backend", BACKENDS, indirect=True)


_postgres_server: list = []  # the session's, for the terminal summary
_postgres_deselected: list = []


def pytest_collection_modifyitems(config, items) -> None:
    """Without PostgreSQL the [postgresql] runs are deselected: one line says so, not one skip per test."""
    reason = _postgres_missing()
    if reason is None:
        return
    dropped = [item for item in items if getattr(item, "callspec", None) and item.callspec.params.get("db_backend") == "postgresql"]
    if dropped:
        keep = set(dropped)
        items[:] = [item for item in items if item not in keep]
        config.hook.pytest_deselected(items=dropped)
        _postgres_deselected.append(len(dropped))


@pytest.fixture(scope="session")
def postgres_server():
    """The PostgreSQL server of the session (started on first use, stopped at its end).

    initdb or pg_ctl failing where the binaries are is postgres.ClusterError: an error of each test that
    needs the server, with their words and the log's."""
    reason = _postgres_missing()
    if reason:
        pytest.skip(reason)
    server = postgres.start()
    _postgres_server.append(server)
    yield server
    server.close()


def pytest_terminal_summary(terminalreporter) -> None:
    if _postgres_deselected:
        terminalreporter.write_line(f"{_postgres_missing()} ({sum(_postgres_deselected)} [postgresql] tests not run)")
    for server in _postgres_server:
        terminalreporter.write_line(server.summary())


@pytest.fixture
def db_backend(request) -> str:
    """"sqlite", or "postgresql" for the second run of a `both_backends` test."""
    backend = getattr(request, "param", "sqlite")
    if backend == "postgresql":
        request.getfixturevalue("postgres_server")  # skips here, before the test's other fixtures, without one
    return backend


class NewDb:
    """new_db() -> a database target nobody has used: a file in tmp_path, or a new PostgreSQL database's URL.

    `drop(target)` removes one before the test ends (a test making many, one per Hypothesis example);
    the rest go at teardown. PostgreSQL's are dropped rather than left to die with the cluster: an empty
    database is 7.5 MB on disk, and the suite makes hundreds; and TEST_POSTGRES_URL's server lives on.
    """

    def __init__(self, backend: str, tmp_path, server=None, hint: str = ""):
        self.backend, self.tmp_path, self.server, self.hint = backend, tmp_path, server, hint
        self.made: list[str] = []
        self.count = 0

    def __call__(self) -> str:
        if self.backend == "postgresql":
            target = self.server.create_database(self.hint)
        else:
            target = str(self.tmp_path / f"images{self.count}.db")
        self.count += 1
        self.made.append(target)
        return target

    def drop(self, target: str) -> None:
        self.made.remove(target)
        if self.backend == "postgresql":
            self.server.drop_database(target)
        else:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(target + suffix)

    def close(self) -> None:
        if self.backend == "postgresql":
            for target in self.made:
                self.server.drop_database(target)
        self.made.clear()


@pytest.fixture
def new_db(request, db_backend, tmp_path):
    server = request.getfixturevalue("postgres_server") if db_backend == "postgresql" else None
    databases = NewDb(db_backend, tmp_path, server, hint=request.node.name)
    yield databases
    databases.close()


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
def make_service(new_db, detector):
    """make_service(detector=..., uploader=..., now=..., resolve=..., connect=..., **setting overrides) -> Service.

    A fresh database each time (new_db's: SQLite, or PostgreSQL in a `both_backends` test's second run). URL downloads may reach loopback (ALLOW_PRIVATE_URLS) unless a test
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
        s = settings.load([], {}, db=new_db(), model=detector.model_path, **overrides)
        parts = server.build_parts(s, detector=detector, uploader=uploader, now=now, resolve=resolve, connect=connect)
        made.append(Service(s, parts))
        return made[-1]

    yield make
    for service in made:
        service.parts.close(jobs_timeout=5)


@pytest.fixture
def service(make_service) -> "Service":
    return make_service()
