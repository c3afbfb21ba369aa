"""A throwaway PostgreSQL server for the test session, and a fresh database for each test.

With TEST_POSTGRES_URL naming an existing server (`postgresql://postgres@127.0.0.1:5432/postgres`, a user
that may CREATE DATABASE), the tests make their databases there and drop them. Otherwise `start()` makes a
cluster in a temporary folder with the newest initdb under /usr/lib/postgresql/*/bin (Debian's `postgresql`
package puts it there, not on PATH) or on PATH: trust authentication on the Unix socket and 127.0.0.1, on a
free port, its socket in that folder, fsync off. initdb refuses to run as root, so as root the folder goes
to the `postgres` user and initdb and pg_ctl run through `runuser -u postgres --`.

The cluster is stopped and its folder removed when the session ends, on failures too (the session
fixture's teardown, and atexit behind it). A pytest killed with -9 runs neither: the next `start()` stops
any postmaster in a folder of ours whose pytest is gone, and removes the folder.

The admin connection uses psycopg (3), else psycopg2. Run alone, `python tests/postgres.py` starts a
cluster, times a few database creations, and stops it.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import logging
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from typing import Any, Callable

log = logging.getLogger(__name__)

ENV_URL = "TEST_POSTGRES_URL"
PREFIX = "imgsvc-pg-"  # the temporary folders' names: the stale sweep only touches these
DEBIAN_BINS = "/usr/lib/postgresql/*/bin"
# Fit for tests: nothing reaches the disk's platters, room for several servers' pools, little memory.
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "off",
    "max_connections": "300",
    "shared_buffers": "32MB",
    "max_wal_size": "256MB",
    "log_min_messages": "warning",
    "log_min_error_statement": "panic",  # the tests cause errors on purpose (busy, unique); keep the log short
}


class Unavailable(Exception):
    """The PostgreSQL half cannot run here (no binaries, no driver); str() is the one line saying what to do."""


class ClusterError(RuntimeError):
    """The binaries are there but initdb or pg_ctl failed: a failure of the tests, with their words and the log's."""


# ---------------------------------------------------------------------------------------------------------
# What is there
# ---------------------------------------------------------------------------------------------------------


def find_bindir() -> str | None:
    """The folder holding initdb and pg_ctl: the newest /usr/lib/postgresql/N/bin, else PATH's."""

    def version(path: str) -> tuple[int, ...]:
        number = os.path.basename(os.path.dirname(path))
        return tuple(int(p) for p in re.findall(r"\d+", number)) or (0,)

    debian = [d for d in glob.glob(DEBIAN_BINS) if os.access(os.path.join(d, "initdb"), os.X_OK)]
    if debian:
        return max(debian, key=version)
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl", path=os.path.dirname(initdb)):
        return os.path.dirname(initdb)
    return None


def driver() -> tuple[str, Callable[[str], Any]]:
    """(name, connect(url) -> an autocommit DB-API connection): psycopg 3, else psycopg2."""
    try:
        import psycopg
    except ImportError:
        pass
    else:
        return f"psycopg {psycopg.__version__}", lambda url: psycopg.connect(url, autocommit=True)
    try:
        import psycopg2
    except ImportError:
        raise Unavailable(
            "PostgreSQL tests skipped: no PostgreSQL driver; install one: pip install -r requirements-postgres.txt"
        ) from None

    def connect(url: str):
        conn = psycopg2.connect(url)
        conn.autocommit = True
        return conn

    return f"psycopg2 {psycopg2.__version__.split()[0]}", connect


def check() -> str:
    """What the session will use, as one line; Unavailable (its one line) when the half must be skipped."""
    name, _ = driver()
    if os.environ.get(ENV_URL):
        return f"postgresql: the server of {ENV_URL} ({redact(os.environ[ENV_URL])}), {name}"
    bindir = find_bindir()
    if bindir is None:
        raise Unavailable(
            f"PostgreSQL tests skipped: no initdb in {DEBIAN_BINS} or PATH; install Debian's postgresql package "
            f"(or set {ENV_URL})"
        )
    if os.geteuid() == 0 and not _user_exists("postgres"):
        raise Unavailable(
            "PostgreSQL tests skipped: running as root and there is no `postgres` user to run initdb "
            "(it refuses root); install Debian's postgresql package, which makes it"
        )
    return f"postgresql: a throwaway cluster from {bindir}, {name}"


def redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------
# The server and its databases
# ---------------------------------------------------------------------------------------------------------


class Server:
    """A PostgreSQL server the tests may make databases on (ours from `start()`, or TEST_POSTGRES_URL's).

    CREATE DATABASE takes 40 to 200 ms; a worker thread keeps `ahead` databases made in advance, off the
    tests' path (renamed for the test that takes one). DROP DATABASE (20 to 50 ms) is done at once, so a
    fixture torn down after new_db's finds its databases gone. `close()` drops what is left, stops the
    worker and, if it is ours, the cluster.
    """

    def __init__(self, admin_url: str, *, cluster: Cluster | None = None, ahead: int = 1):
        self.admin_url = admin_url
        self.cluster = cluster
        self.ahead = ahead
        self.driver, self._connect = driver()
        self._conn = self._connect(admin_url)  # the tests' thread: renames and drops
        self._names = itertools.count(1)
        self.version = self._query(self._conn, "SHOW server_version")
        self._force = int(self._query(self._conn, "SHOW server_version_num")) >= 130000  # DROP ... WITH (FORCE)
        self.created = self.dropped = self.handed = 0
        self.create_seconds = self.drop_seconds = self.wait_seconds = 0.0
        self._cv = threading.Condition()
        self._ready: list[str] = []  # made, not handed out
        self._queued = 0  # creations asked of the worker, not done
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # names to create; None: stop
        self._failure: BaseException | None = None
        self._worker = threading.Thread(target=self._work, args=(self._connect(admin_url),), name="postgres-admin",
                                        daemon=True)
        self._worker.start()

    @staticmethod
    def _query(conn, sql: str) -> str:
        cur = conn.cursor()
        cur.execute(sql)
        return cur.fetchone()[0]

    def url(self, name: str) -> str:
        """The URL of database `name` on this server (user, password, host, port and query of the admin URL)."""
        parts = urllib.parse.urlsplit(self.admin_url)
        return urllib.parse.urlunsplit(parts._replace(path="/" + name))

    def _name(self, hint: str = "") -> str:
        slug = re.sub(r"[^a-z0-9]+", "_", hint.lower()).strip("_")
        return f"t{os.getpid()}_{next(self._names)}_{slug}"[:63]  # PostgreSQL cuts names at 63 bytes

    # -- the worker ---------------------------------------------------------------------------------------

    def _work(self, conn) -> None:
        try:
            while (name := self._jobs.get()) is not None:
                began = time.perf_counter()
                try:
                    conn.cursor().execute(f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING \'UTF8\'')
                except Exception as e:
                    with self._cv:
                        self._failure = e  # raised in the test that waits for it
                        self._queued -= 1
                        self._cv.notify_all()
                    continue
                with self._cv:
                    self.created += 1
                    self.create_seconds += time.perf_counter() - began
                    self._queued -= 1
                    self._ready.append(name)
                    self._cv.notify_all()
        finally:
            conn.close()

    # -- what the tests call ------------------------------------------------------------------------------

    def create_database(self, hint: str = "") -> str:
        """A new, empty database (from template0) with a name no other test and no other run uses; its URL."""
        began = time.perf_counter()
        with self._cv:
            if not self._ready and not self._queued:
                self._ask()
            while not self._ready:
                if self._failure is not None:
                    failure, self._failure = self._failure, None
                    raise RuntimeError(f"CREATE DATABASE failed: {failure}") from failure
                if not self._cv.wait(timeout=120):
                    raise TimeoutError("CREATE DATABASE took over 120 s")
            made = self._ready.pop(0)
            while len(self._ready) + self._queued < self.ahead:
                self._ask()
        name = self._name(hint)
        self._conn.cursor().execute(f'ALTER DATABASE "{made}" RENAME TO "{name}"')  # made ahead for no test
        self.handed += 1
        self.wait_seconds += time.perf_counter() - began
        return self.url(name)

    def _ask(self) -> None:
        self._queued += 1
        self._jobs.put(self._name("ahead"))

    def drop_database(self, url: str) -> None:
        """Drop the database of `url`, whatever connections a store under test still holds to it."""
        self._drop(urllib.parse.urlsplit(url).path.lstrip("/"))

    def _drop(self, name: str) -> None:
        began = time.perf_counter()
        if self._force:
            self._conn.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        else:
            self._conn.cursor().execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
            self._conn.cursor().execute(f'DROP DATABASE IF EXISTS "{name}"')
        self.drop_seconds += time.perf_counter() - began
        self.dropped += 1

    def summary(self) -> str:
        where = f"cluster {self.cluster.summary()}" if self.cluster else f"{ENV_URL} server"
        made = ""
        if self.created:
            made = (f"; {self.created} database(s), made ahead in {1000 * self.create_seconds / self.created:.0f} ms "
                    f"(a test waited {1000 * self.wait_seconds / max(1, self.handed):.0f} ms for one) and dropped in "
                    f"{1000 * self.drop_seconds / max(1, self.dropped):.0f} ms on average")
        return f"postgresql {self.version} ({self.driver}): {where}{made}"

    def close(self) -> None:
        """Stop the worker, drop the databases it made ahead, then stop the cluster if it is ours."""
        try:
            self._jobs.put(None)
            self._worker.join(timeout=120)
            for name in self._ready:
                self._drop(name)
            self._ready.clear()
            self._conn.close()
        finally:
            if self.cluster:
                self.cluster.stop()


def start() -> Server:
    """The server for the session: TEST_POSTGRES_URL's, else a new cluster. Unavailable when neither can be."""
    check()
    if os.environ.get(ENV_URL):
        return Server(os.environ[ENV_URL])
    cluster = Cluster(find_bindir())
    try:
        return Server(cluster.admin_url, cluster=cluster)
    except BaseException:
        cluster.stop()
        raise


class Cluster:
    """initdb + pg_ctl in a temporary folder; `stop()` (also at exit) stops it and removes the folder."""

    def __init__(self, bindir: str, *, tries: int = 3):
        self.bindir = bindir
        self.as_postgres = os.geteuid() == 0
        sweep_stale()
        self.folder = tempfile.mkdtemp(prefix=PREFIX)
        with open(os.path.join(self.folder, "owner"), "w") as f:
            f.write(str(os.getpid()))  # what the stale sweep of a later run looks at
        self.data = os.path.join(self.folder, "data")
        self.log_path = os.path.join(self.folder, "postgres.log")
        self.running = False
        self.stop_seconds: float | None = None
        atexit.register(self.stop)
        began = time.perf_counter()
        try:
            if self.as_postgres:
                shutil.chown(self.folder, "postgres", "postgres")
            self._run("initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C",
                      "--no-sync")
            self.initdb_seconds = time.perf_counter() - began
            for attempt in range(tries):
                self.port = free_port()
                self._configure()
                try:
                    self._run("pg_ctl", "-D", self.data, "-l", self.log_path, "-w", "-t", "60", "start")
                    break
                except ClusterError:
                    if attempt == tries - 1 or "could not bind" not in self.log_tail():
                        raise
                    log.info("port %d was taken meanwhile; trying another", self.port)
            self.running = True
            self.start_seconds = time.perf_counter() - began
        except BaseException:
            self.stop()
            raise
        self.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        log.info("PostgreSQL cluster in %s on port %d, up in %.2f s", self.folder, self.port, self.start_seconds)

    def _configure(self) -> None:
        # The last line for a name wins in postgresql.conf, so a retry on another port just appends again.
        lines = [f"{k} = {v}" for k, v in {**SETTINGS, "port": str(self.port),
                                           "unix_socket_directories": f"'{self.folder}'"}.items()]
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write("\n# tests/postgres.py\n" + "\n".join(lines) + "\n")

    def _run(self, program: str, *args: str) -> None:
        argv = [os.path.join(self.bindir, program), *args]
        if self.as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # PGDATA, PGPORT... are not ours
        result = subprocess.run(argv, cwd=self.folder, env=env, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise ClusterError(
                f"`{' '.join(argv)}` failed ({result.returncode}): {(result.stderr or result.stdout).strip()[-800:]}"
                f"\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def summary(self) -> str:
        stopped = f", stopped in {self.stop_seconds:.2f} s" if self.stop_seconds is not None else ""
        return f"on port {self.port}: initdb {self.initdb_seconds:.2f} s, up in {self.start_seconds:.2f} s{stopped}"

    def stop(self) -> None:
        """Stop the postmaster (fast: running transactions are rolled back) and remove the folder. Idempotent."""
        if not os.path.isdir(self.folder):
            return
        began = time.perf_counter()
        if self.running:
            try:
                self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "30", "stop")
            except (ClusterError, subprocess.TimeoutExpired) as e:
                log.warning("pg_ctl stop failed (%s); killing the postmaster", e)
                _kill_postmaster(self.data)
            self.running = False
        shutil.rmtree(self.folder, ignore_errors=True)
        self.stop_seconds = time.perf_counter() - began


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_postmaster(data: str, wait: float = 10.0) -> None:
    """SIGQUIT (immediate shutdown) to the postmaster of `data`, then wait for it to go."""
    try:
        with open(os.path.join(data, "postmaster.pid")) as f:
            pid = int(f.readline())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGQUIT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def sweep_stale(tmp: str | None = None) -> list[str]:
    """Stop the postmaster of, and remove, every folder of ours whose pytest is gone (killed with -9)."""
    removed = []
    for folder in glob.glob(os.path.join(tmp or tempfile.gettempdir(), PREFIX + "*")):
        try:
            with open(os.path.join(folder, "owner")) as f:
                owner = int(f.read().strip() or 0)
        except (OSError, ValueError):
            owner = 0
        if owner and _alive(owner):
            continue  # another test run, going on now
        if not owner and time.time() - os.path.getmtime(folder) < 60:
            continue  # just made; its owner file comes next
        _kill_postmaster(os.path.join(folder, "data"))
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        log.warning("removed %s, a PostgreSQL cluster a test run left behind", folder)
    return removed


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(check())
    server = start()
    try:
        for _ in range(10):
            server.drop_database(server.create_database("timing"))
            time.sleep(0.3)  # a test's time: the next database is made meanwhile
    finally:
        server.close()
    print(server.summary())
