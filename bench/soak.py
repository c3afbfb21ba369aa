"""Soak and failure scenarios against the real server process: concurrency, crashes, hostile clients, full disks.

    python bench/soak.py [--only NAME ...] [--seconds N] [--soak-minutes M] [--keep]
                         (DETECT_MODEL as for the tests; TESTDATA_DIR is not needed: the photos are generated)

Each scenario starts `python server.py --port 0 --db <its own database> --model $DETECT_MODEL` (bench/serverproc.py)
and, where it needs them, a fake Imgur (tests/fake_imgur.py) and an image host (tests/loopback.py), all on
127.0.0.1. Every request has a timeout and every scenario a bounded duration. Names (all but `soak` run by default;
`soak` runs with `--only soak` or `--soak-minutes M`):

  writers      --writers (50) threads, each with its own keep-alive connection, POST distinct 64x64 JPEGs
               (--detect-share of them with detect=true) for --seconds. Counts 2xx/4xx/5xx/errors and
               "database is locked/busy" in the answers and the server log; after the server stops, the rows
               in the database (sqlite3, read-only) must equal the 2xx count. req/s, latency median/p99.
  kill9        3 writer threads; `kill -9` the server at a random moment, --kills times, restarting on the same
               database; then PRAGMA integrity_check and every acknowledged image fetched back
               (GET /images/{id}/file) with the sha256 of the bytes that were sent.
  slowloris    --slow-connections (150) sockets dribbling request headers (one byte per second each) for
               --seconds/2; a keep-alive client and a new-connection-per-request client time GET /health and
               GET /images before, during and after. waitress's connection_limit (100) and channel_timeout
               (120 s, reset by every byte) decide whether new clients starve.
  hung-hosts   an image host that accepts and never answers; one job URL per upload worker (4), then the
               backlog filled (UPLOAD_BACKLOG=20) until a submit answers 503 with Retry-After; /health and
               GET /images timed meanwhile; the hung URLs must fail with the download deadline's reason.
  imgur-storm  the fake Imgur answers 429 (Retry-After: 1), 500 or slowly (2-6 s) for --seconds while jobs
               keep coming; afterwards every job must be complete (each URL uploaded or failed with a reason)
               and the server's thread count (/proc/<pid>/status) back at its baseline.
  disk-full    the database on an --tmpfs-mb (8) MB tmpfs (root only; skipped with a message otherwise) beside
               a 1 MB ballast file; POST ~110 KB JPEGs until the disk is full: answers must be 507/503
               problem+json, never 500 or a hang; then the ballast is deleted and writes must succeed again,
               the rows must equal the 2xx count and PRAGMA integrity_check be ok. Always unmounted.
  soak         --soak-minutes (30) of mixed uploads (base64 and by URL), deletes, searches and Imgur jobs;
               the server's RSS, open fds, threads and WAL size sampled every --sample-seconds (30): first /
               last / max and whether they stay flat; ends with SIGTERM while uploads are under way and checks
               the log says what shutdown finished or abandoned.

Prints one markdown table "scenario | measured | expectation | ok/FAILED", then context and the problems seen
(with server log excerpts). Progress goes to stderr. It reports; it asserts nothing. Servers are stopped,
sockets closed, loopback servers shut and the tmpfs unmounted on errors and Ctrl-C too. --keep keeps the
temporary directory (databases and full server logs).
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import hashlib
import http.client
import io
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from fake_imgur import FakeImgur, answer  # noqa: E402
from loopback import Loopback, read_body, respond  # noqa: E402
from serverproc import ServerProcess, testdata_paths  # noqa: E402  (bench/serverproc.py)

SUBMIT = "/v1/images/upload"
DEFAULT = ["writers", "kill9", "slowloris", "hung-hosts", "imgur-storm", "disk-full"]
ALL = DEFAULT + ["soak"]
LOCKED = re.compile(r"database is (locked|busy)", re.I)


def progress(text: str) -> None:
    print(f"[bench/soak] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------------------


def p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[98] if len(values) > 1 else values[0]


def lat(values: list[float]) -> str:
    if not values:
        return "no answers"
    return f"median {statistics.median(values):.1f} / p99 {p99(values):.1f} ms (n={len(values)})"


def mb(n_bytes: float) -> str:
    return f"{n_bytes / 1048576:.1f} MB"


# ---------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []
        self.notes: list[tuple[str, str]] = []
        self.problems: list[tuple[str, str]] = []

    def row(self, scenario: str, measured: str, expectation: str, ok) -> None:
        """`ok`: True / False, None for a row that only informs, or a word (skipped...)."""
        status = ok if isinstance(ok, str) else ("—" if ok is None else ("ok" if ok else "FAILED"))
        self.rows.append((scenario, measured, expectation, status))
        if ok is False:
            progress(f"FAILED {scenario}: {measured} (expected {expectation})")

    def note(self, scenario: str, text: str) -> None:
        self.notes.append((scenario, text))

    def problem(self, scenario: str, text: str) -> None:
        self.problems.append((scenario, text))
        progress(f"PROBLEM {scenario}: {text.splitlines()[0] if text else ''}")

    def print(self) -> None:
        print("| scenario | measured | expectation | ok/FAILED |")
        print("|---|---|---|---|")
        for row in self.rows:
            print("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
        if self.notes:
            print()
            for scenario, text in self.notes:
                print(f"- {scenario}: {text}")
        if self.problems:
            print("\nproblems:")
            for scenario, text in self.problems:
                print(f"- {scenario}: {text}")


# ---------------------------------------------------------------------------------------------------------
# The server, its process and its log
# ---------------------------------------------------------------------------------------------------------

WATCH = {
    "locked": LOCKED,
    "traceback": re.compile(r"Traceback \(most recent call last\)"),
    "error": re.compile(r" ERROR "),
    "warning": re.compile(r" WARNING "),
    "connection limit": re.compile(r"connection limit"),
    "queue depth": re.compile(r"Task queue depth is"),  # waitress: a request waited for one of the 8 threads
}


class LoggedServer(ServerProcess):
    """ServerProcess whose whole log goes to a file, with counts of the lines matching WATCH."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: str, **kwargs):
        self.log_path = log_path
        self._log = open(log_path, "a", encoding="utf-8")
        self.counts: collections.Counter = collections.Counter()
        self.started = time.perf_counter()
        super().__init__(args, env=env, **kwargs)
        self.start_seconds = time.perf_counter() - self.started

    def _drain(self) -> None:  # ServerProcess._drain, plus the file and the counts
        try:
            for line in self.proc.stderr:
                self.lines.append(line)
                self._log.write(line)
                for key, pattern in WATCH.items():
                    if pattern.search(line):
                        self.counts[key] += 1
                if " WARNING " in line or " ERROR " in line:
                    self.warnings += 1
                m = re.search(r"listening on (http://\S+)", line)
                if m:
                    self._url.put(m.group(1))
        finally:
            self._log.flush()
            self._url.put(None)

    def grep(self, pattern: str, limit: int = 8, context: int = 0) -> list[str]:
        """Lines of the whole log matching `pattern` (a regex), with `context` lines after each."""
        self._log.flush()
        out: list[str] = []
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
        rx = re.compile(pattern)
        for n, line in enumerate(lines):
            if rx.search(line):
                out.extend(x.rstrip("\n") for x in lines[n : n + 1 + context])
                if len(out) >= limit * (1 + context):
                    break
        return out

    def info(self) -> dict[str, int]:
        return proc_info(self.proc.pid)

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self._log.flush()


def proc_info(pid: int) -> dict[str, int]:
    """Threads, VmRSS (kB) and open fds of a live process; {} when it is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("Threads", "VmRSS"):
                    out[key] = int(value.split()[0])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return out


# ---------------------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int | None  # None: no answer (refused, reset, timed out)
    ms: float
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased names
    body: bytes = b""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    @property
    def problem_json(self) -> bool:
        return self.headers.get("content-type", "").startswith("application/problem+json")

    def text(self, n: int = 200) -> str:
        return self.body[:n].decode("utf-8", "replace")


class Client:
    """One keep-alive HTTP/1.1 connection (http.client), reopened after an error; never raises for HTTP."""

    def __init__(self, host: str, port: int, timeout: float = 30.0):
        self.host, self.port, self.timeout = host, port, timeout
        self.conn: http.client.HTTPConnection | None = None
        self.connects = 0

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json") -> Answer:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self.connects += 1
        headers = {"Content-Type": content_type} if body is not None else {}
        t = time.perf_counter()
        try:
            self.conn.request(method, path, body=body, headers=headers)
            res = self.conn.getresponse()
            data = res.read()
        except (OSError, http.client.HTTPException) as e:
            self.close()
            return Answer(None, (time.perf_counter() - t) * 1000, error=f"{type(e).__name__}: {e}")
        ms = (time.perf_counter() - t) * 1000
        if res.will_close:
            self.close()
        return Answer(res.status, ms, {k.lower(): v for k, v in res.getheaders()}, data)

    def post_json(self, path: str, doc) -> Answer:
        return self.request("POST", path, json.dumps(doc).encode())

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def fresh_request(host: str, port: int, path: str, timeout: float) -> Answer:
    """One request over a new TCP connection, as a new browser tab or another client would."""
    client = Client(host, port, timeout)
    try:
        return client.request("GET", path)
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------------------
# Photos
# ---------------------------------------------------------------------------------------------------------


class Jpegs:
    """Distinct JPEGs without re-encoding: one noise JPEG with a comment segment (COM) holding a tag."""

    def __init__(self, size: int = 64, quality: int = 85, seed: int = 7):
        rng = np.random.default_rng(seed)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=quality)
        self.base = buf.getvalue()

    def make(self, tag: str) -> bytes:
        payload = tag.encode()
        return self.base[:2] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + self.base[2:]


def image_body(data: bytes, want_detect: bool = False) -> bytes:
    return json.dumps({"image": base64.b64encode(data).decode("ascii"), "detect": want_detect}).encode()


# ---------------------------------------------------------------------------------------------------------
# The database, read from outside
# ---------------------------------------------------------------------------------------------------------


def _ro(db: str) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)


def count_rows(db: str) -> int | str:
    try:
        con = _ro(db)
        try:
            return con.execute("SELECT COUNT(*) FROM image").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error as e:
        return f"sqlite3 error: {e}"


def integrity(db: str) -> str:
    try:
        con = _ro(db)
        try:
            return "; ".join(str(r[0]) for r in con.execute("PRAGMA integrity_check").fetchall())[:500]
        finally:
            con.close()
    except sqlite3.Error as e:
        return f"sqlite3 error: {e}"


def stored_shas(db: str) -> set[str]:
    con = _ro(db)
    try:
        return {r[0] for r in con.execute("SELECT sha256 FROM image")}
    finally:
        con.close()


# ---------------------------------------------------------------------------------------------------------
# Shared scenario plumbing
# ---------------------------------------------------------------------------------------------------------


class Ctx:
    def __init__(self, args, tmp: str, model: str, report: Report):
        self.args, self.tmp, self.model, self.report = args, tmp, model, report
        self.jpegs = Jpegs()
        self.tags = itertools.count()  # next() is atomic under the GIL: distinct bytes across threads

    def path(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def env(self, **extra) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMGUR_")}
        for key in ("UPLOAD_WORKERS", "UPLOAD_BACKLOG", "JOB_MAX_URLS", "ALLOW_PRIVATE_URLS", "IMAGES_DB", "PORT", "HOST"):
            env.pop(key, None)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def server(self, scenario: str, db: str, env: dict[str, str] | None = None, **kwargs) -> LoggedServer:
        log_path = self.path(f"{scenario}.log")
        return LoggedServer(["--db", db, "--model", self.model], env or self.env(), log_path, **kwargs)

    def photo(self, scenario: str) -> bytes:
        return self.jpegs.make(f"{scenario} {next(self.tags)}")

    def seed(self, srv: LoggedServer, n: int = 20) -> None:
        client = Client(srv.host, srv.port)
        for _ in range(n):
            client.request("POST", "/images", image_body(self.photo("seed")))
        client.close()

    def server_checks(self, scenario: str, srv: LoggedServer, expect_warnings: bool = False) -> None:
        """After a server stopped: how it stopped, and its tracebacks."""
        problem = srv.stop_problem()
        if problem:
            self.report.problem(scenario, f"stopping the server: {problem}; log tail:\n{indent(srv.tail(10))}")
        if srv.counts["traceback"]:
            self.report.problem(
                scenario,
                f"{srv.counts['traceback']} traceback(s) in the server log; the first:\n"
                + indent("\n".join(srv.grep(r"Traceback|ERROR", limit=1, context=25))),
            )


def indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip("\n").splitlines())


def run_threads(threads: list[threading.Thread], stop: threading.Event, seconds: float, join_timeout: float = 90) -> int:
    """Start, let run for `seconds` (Ctrl-C ends it early), stop, join; returns how many are still alive."""
    for t in threads:
        t.start()
    try:
        stop.wait(seconds)
    finally:
        stop.set()
        deadline = time.monotonic() + join_timeout
        for t in threads:
            t.join(max(0.1, deadline - time.monotonic()))
    return sum(t.is_alive() for t in threads)


# ---------------------------------------------------------------------------------------------------------
# 1. writers
# ---------------------------------------------------------------------------------------------------------


def scenario_writers(ctx: Ctx) -> None:
    S, args, rep = "writers", ctx.args, ctx.report
    db = ctx.path("writers.db")
    progress(f"{S}: {args.writers} keep-alive writers for {args.seconds:g} s ({args.detect_share:.0%} detect=true)")
    stop = threading.Event()
    outs: list[list] = [[] for _ in range(args.writers)]
    with ctx.server(S, db, stop_timeout=30) as srv:

        def writer(i: int) -> None:
            client, rng, out = Client(srv.host, srv.port, timeout=60), random.Random(i), outs[i]
            try:
                while not stop.is_set():
                    want = rng.random() < args.detect_share
                    a = client.request("POST", "/images", image_body(ctx.photo(S), want))
                    out.append((a.status, a.ms, want, bool(LOCKED.search(a.text(1000))), a.error or (None if a.ok else a.text())))
            finally:
                client.close()

        threads = [threading.Thread(target=writer, args=(i,), name=f"writer-{i}", daemon=True) for i in range(args.writers)]
        t0 = time.perf_counter()
        stuck = run_threads(threads, stop, args.seconds)
        elapsed = time.perf_counter() - t0
        peak = srv.info()
    rows = count_rows(db)
    results = [r for out in outs for r in out]
    by = collections.Counter(
        "error" if s is None else "2xx" if s < 300 else "4xx" if s < 500 else "5xx" for s, *_ in results
    )
    statuses = collections.Counter(s for s, *_ in results)
    locked_answers = sum(1 for r in results if r[3])
    ok_ms = [r[1] for r in results if r[0] is not None and r[0] < 300]
    det_ms = [r[1] for r in results if r[0] is not None and r[0] < 300 and r[2]]
    plain_ms = [r[1] for r in results if r[0] is not None and r[0] < 300 and not r[2]]
    rep.row(f"{S}: 2xx / 4xx / 5xx / no answer", f"{by['2xx']} / {by['4xx']} / {by['5xx']} / {by['error']}",
            "all 2xx", by["2xx"] > 0 and by["2xx"] == len(results))
    rep.row(f"{S}: 'database is locked/busy' in answers / in server log", f"{locked_answers} / {srv.counts['locked']}",
            "0 / 0", locked_answers == 0 and srv.counts["locked"] == 0)
    rep.row(f"{S}: image rows in the database / 2xx answers", f"{rows} / {by['2xx']}", "equal", rows == by["2xx"])
    rep.row(f"{S}: throughput ({args.writers} writers, {elapsed:.0f} s)", f"{len(results) / elapsed:.1f} req/s "
            f"({by['2xx'] / elapsed:.1f} stored/s)", "—", None)
    rep.row(f"{S}: latency of 2xx, all / detect=false / detect=true", f"{lat(ok_ms)}; {lat(plain_ms)}; {lat(det_ms)}",
            "p99 below the 10 s busy timeout", bool(ok_ms) and p99(ok_ms) < 10_000)
    other_warnings = srv.counts["warning"] - srv.counts["queue depth"]
    rep.row(f"{S}: server log WARNING lines: waitress 'Task queue depth' / others", f"{srv.counts['queue depth']} / "
            f"{other_warnings} (for {len(results)} requests)", "a few / 0", other_warnings == 0 and srv.counts["queue depth"] <= 100)
    rep.note(S, f"statuses {dict(statuses)}; server at the end: {peak}; writer threads still stuck after the stop: "
                f"{stuck}; server log: {srv.counts['error']} ERROR lines; started in {srv.start_seconds:.1f} s")
    bad = [r for r in results if r[0] is None or r[0] >= 300]
    if bad:
        kinds = collections.Counter(f"{r[0]}: {r[4][:160] if r[4] else ''}" for r in bad)
        rep.problem(S, "non-2xx answers: " + "; ".join(f"{n}x {k}" for k, n in kinds.most_common(6)))
    if srv.counts["queue depth"] > 100:
        rep.problem(S, f"waitress logged {srv.counts['queue depth']} WARNING lines 'Task queue depth is N' for "
                       f"{len(results)} requests (one per request that waited for a thread), e.g.:\n"
                       + indent("\n".join(srv.grep(r"Task queue depth", 2))))
    if other_warnings or srv.counts["error"]:
        rep.problem(S, "other server log WARNING/ERROR lines (first 6):\n"
                       + indent("\n".join(srv.grep(r" (WARNING|ERROR) (?!waitress\.queue)", 6))))
    if stuck:
        rep.problem(S, f"{stuck} writer thread(s) did not finish their last request within 90 s of the stop")
    ctx.server_checks(S, srv)


# ---------------------------------------------------------------------------------------------------------
# 2. kill9
# ---------------------------------------------------------------------------------------------------------


def scenario_kill9(ctx: Ctx) -> None:
    S, args, rep = "kill9", ctx.args, ctx.report
    db = ctx.path("kill9.db")
    rng = random.Random(9)
    acked: dict[int, str] = {}  # id -> sha256 of the bytes sent
    reused: list[str] = []
    unanswered: list[str] = []  # sha256 of requests without an answer (at or after the kill)
    refused: collections.Counter = collections.Counter()
    writers = 3
    progress(f"{S}: {args.kills} rounds of {writers} writers, then kill -9 at a random moment")
    for rnd in range(args.kills):
        stop = threading.Event()
        outs: list[list] = [[] for _ in range(writers)]
        with ctx.server(f"{S}-{rnd}", db) as srv:

            def writer(i: int, outs=outs, stop=stop) -> None:
                client, out = Client(srv.host, srv.port, timeout=30), outs[i]
                try:
                    while not stop.is_set():
                        data = ctx.photo(S)
                        sha = hashlib.sha256(data).hexdigest()
                        a = client.request("POST", "/images", image_body(data))
                        if a.ok:
                            doc = a.json()
                            out.append(("ack", doc["id"], sha, doc["sha256"]))
                        elif a.status is None:
                            if "ConnectionRefused" not in (a.error or ""):  # refused: never reached a server
                                out.append(("lost", None, sha, a.error))
                        else:
                            out.append(("status", a.status, sha, a.text()))
                finally:
                    client.close()

            threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(writers)]
            for t in threads:
                t.start()
            try:
                time.sleep(rng.uniform(1.5, 4.0))
                os.kill(srv.proc.pid, signal.SIGKILL)
                stop.set()
                srv.proc.wait(10)
            finally:
                stop.set()
                for t in threads:
                    t.join(40)
        for kind, a, sha, b in (r for out in outs for r in out):
            if kind == "ack":
                if a in acked and acked[a] != sha:
                    reused.append(f"id {a}: first {acked[a][:12]}, then {sha[:12]}")
                acked[a] = sha
                if b != sha:
                    reused.append(f"id {a}: answered sha256 {b[:12]} for bytes {sha[:12]}")
            elif kind == "lost":
                unanswered.append(sha)
            else:
                refused[f"{a}: {b[:120]}"] += 1
        progress(f"{S}: round {rnd + 1}: {len(acked)} acknowledged so far, killed")
    with ctx.server(f"{S}-final", db) as srv:
        restart = srv.start_seconds
        check = integrity(db)
        client = Client(srv.host, srv.port)
        missing, mismatched = [], []
        for image_id, sha in sorted(acked.items()):
            a = client.request("GET", f"/images/{image_id}/file")
            if a.status == 404:
                missing.append(image_id)
            elif not a.ok:
                missing.append(f"{image_id} (HTTP {a.status} {a.error or a.text()})")
            elif hashlib.sha256(a.body).hexdigest() != sha:
                mismatched.append(image_id)
        client.close()
        present = stored_shas(db)
        rows = count_rows(db)
    unanswered_stored = sum(1 for sha in unanswered if sha in present)
    rep.row(f"{S}: acknowledged images back with the exact bytes, after {args.kills} kill -9",
            f"{len(acked) - len(missing) - len(mismatched)} / {len(acked)} (missing {len(missing)}, wrong bytes {len(mismatched)})",
            "all", bool(acked) and not missing and not mismatched and not reused)
    rep.row(f"{S}: PRAGMA integrity_check after the restart", check, "ok", check == "ok")
    rep.row(f"{S}: requests unanswered at the kills, stored anyway", f"{len(unanswered)} unanswered, {unanswered_stored} stored",
            "either (never acknowledged)", None)
    rep.note(S, f"rows {rows} = {len(acked)} acknowledged + {unanswered_stored} unanswered-but-stored; non-2xx answers "
                f"{dict(refused) or 0}; restart on the killed database took {restart:.1f} s")
    if missing or mismatched or reused:
        rep.problem(S, f"missing {missing[:10]}, wrong bytes {mismatched[:10]}, id/sha problems {reused[:5]}")
    if refused:
        rep.problem(S, f"non-2xx answers before the kills: {dict(refused)}")


# ---------------------------------------------------------------------------------------------------------
# 3. slowloris
# ---------------------------------------------------------------------------------------------------------


def measure(client: Client, paths: list[str], seconds: float, pause: float = 0.05) -> dict[str, list]:
    """Round-robin GETs for `seconds`: {path: [ms...]}, plus "errors": [..]."""
    out: dict[str, list] = {p: [] for p in paths}
    out["errors"] = []
    end = time.monotonic() + seconds
    for path in itertools.cycle(paths):
        if time.monotonic() >= end:
            break
        a = client.request("GET", path)
        if a.ok:
            out[path].append(a.ms)
        else:
            out["errors"].append(f"{path}: {a.status} {a.error or a.text(100)}")
        time.sleep(pause)
    return out


def scenario_slowloris(ctx: Ctx) -> None:
    S, args, rep = "slowloris", ctx.args, ctx.report
    db = ctx.path("slowloris.db")
    during_s = max(10.0, args.seconds / 2)
    paths = ["/health", "/images?limit=20"]
    fresh_timeout = 5.0
    progress(f"{S}: {args.slow_connections} dribbling connections for {during_s:.0f} s")
    socks: list[socket.socket] = []
    stop = threading.Event()
    closed_by_server = [0]
    with ctx.server(S, db) as srv:
        try:
            ctx.seed(srv)
            ka = Client(srv.host, srv.port, timeout=fresh_timeout)
            before = measure(ka, paths, 3)
            fresh_before = [fresh_request(srv.host, srv.port, "/health", fresh_timeout) for _ in range(5)]
            fds0 = srv.info().get("fds", 0)
            for i in range(args.slow_connections):
                s = socket.create_connection((srv.host, srv.port), timeout=5)
                s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow-%d: " % i)
                s.setblocking(False)
                socks.append(s)

            def dribble() -> None:
                open_ = set(range(len(socks)))
                while not stop.wait(1.0):
                    for i in list(open_):
                        try:
                            socks[i].send(b"a")
                            if socks[i].recv(4096, socket.MSG_PEEK) == b"":
                                raise ConnectionResetError
                        except BlockingIOError:
                            pass
                        except OSError:
                            open_.discard(i)
                            closed_by_server[0] += 1

            dribbler = threading.Thread(target=dribble, name="dribbler", daemon=True)
            dribbler.start()
            time.sleep(2)
            accepted = srv.info().get("fds", 0) - fds0
            fresh_during: list[Answer] = []
            fresh_stop = threading.Event()

            def fresh_loop() -> None:
                while not fresh_stop.is_set():
                    fresh_during.append(fresh_request(srv.host, srv.port, "/health", fresh_timeout))
                    fresh_stop.wait(0.5)

            fresher = threading.Thread(target=fresh_loop, name="fresh", daemon=True)
            fresher.start()
            try:
                during = measure(ka, paths, during_s)
            finally:
                fresh_stop.set()
                fresher.join(fresh_timeout + 5)
            still_open = args.slow_connections - closed_by_server[0]
        finally:
            stop.set()
            for s in socks:
                with contextlib.suppress(OSError):
                    s.close()
        t = time.monotonic()
        recovered = None
        while time.monotonic() - t < 30:
            a = fresh_request(srv.host, srv.port, "/health", 2)
            if a.ok:
                recovered = time.monotonic() - t
                break
        after = measure(ka, paths, 2)
        ka.close()
        limit_lines = srv.grep("connection limit", 4)
    fresh_ok_before = [a.ms for a in fresh_before if a.ok]
    fresh_ok = [a.ms for a in fresh_during if a.ok]
    fresh_bad = [a for a in fresh_during if not a.ok]
    for p in paths:
        b, d = before[p], during[p]
        fine = bool(d) and p99(d) <= max(100.0, 5 * p99(b))
        rep.row(f"{S}: GET {p}, client connected before, before -> during", f"{lat(b)} -> {lat(d)}",
                "p99 <= max(100 ms, 5x before)", fine)
    rep.row(f"{S}: GET /health on a new connection, before -> during",
            f"{len(fresh_ok_before)}/{len(fresh_before)} answered ({lat(fresh_ok_before)}) -> "
            f"{len(fresh_ok)}/{len(fresh_during)} answered within {fresh_timeout:g} s ({lat(fresh_ok)})",
            "all answered, fast", bool(fresh_during) and not fresh_bad and p99(fresh_ok) <= max(100.0, 5 * p99(fresh_ok_before)))
    rep.row(f"{S}: slow connections the server took in / still open at the end / closed by it",
            f"~{accepted} / {still_open} / {closed_by_server[0]} of {args.slow_connections}", "—", None)
    rep.row(f"{S}: a new connection served again after the slow ones closed",
            "never (30 s)" if recovered is None else f"after {recovered:.2f} s", "at once", recovered is not None and recovered < 2)
    rep.note(S, f"dribbling for {during_s:.0f} s, one byte per connection per second; waitress defaults "
                f"(connection_limit 100, channel_timeout 120 s, which every byte resets); errors on the old "
                f"connection during: {during['errors'][:3] or 0}; after: {lat(after['/health'])}; server log on the "
                f"limit: {limit_lines or 'nothing'}")
    if fresh_bad:
        kinds = collections.Counter((a.error or f"HTTP {a.status}")[:100] for a in fresh_bad)
        rep.problem(S, f"{len(fresh_bad)} of {len(fresh_during)} new-connection GET /health got no answer within "
                       f"{fresh_timeout:g} s while {args.slow_connections} connections dribbled headers: {dict(kinds)}")
    ctx.server_checks(S, srv)


# ---------------------------------------------------------------------------------------------------------
# 4. hung-hosts
# ---------------------------------------------------------------------------------------------------------


def wait_job(client: Client, job_id: str, seconds: float, poll: float = 0.2) -> dict | None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        a = client.request("GET", f"{SUBMIT}/{job_id}")
        doc = a.json() if a.ok else None
        if doc and doc["status"] == "complete":
            return doc
        time.sleep(poll)
    return None


def scenario_hung_hosts(ctx: Ctx) -> None:
    S, args, rep = "hung-hosts", ctx.args, ctx.report
    db = ctx.path("hung.db")
    workers, backlog = 4, args.backlog
    hits: list[float] = []

    def hang(h) -> None:  # accept, read the request, then never answer (until the scenario ends)
        hits.append(time.monotonic())
        h.server.stopping.wait(300)
        h.close_connection = True

    routes = {f"/hang/{n}.jpg": hang for n in range(backlog + 50)}
    progress(f"{S}: {workers} URLs that never answer, then UPLOAD_BACKLOG={backlog} filled")
    with FakeImgur() as fake:
        env = ctx.env(IMGUR_CLIENT_ID=fake.client_id, IMGUR_API_URL=fake.url, ALLOW_PRIVATE_URLS=1,
                      UPLOAD_WORKERS=workers, UPLOAD_BACKLOG=backlog)
        with ctx.server(S, db, env, stop_timeout=20) as srv:
            with Loopback(routes) as host:
                ctx.seed(srv)
                client = Client(srv.host, srv.port, timeout=10)
                before = measure(client, ["/health", "/images"], 2)
                t_submit = time.monotonic()
                first_ids = []
                for n in range(workers):
                    a = client.post_json(SUBMIT, {"urls": [host.url(f"/hang/{n}.jpg")]})
                    if a.status == 202:
                        first_ids.append(a.json()["jobId"])
                end = time.monotonic() + 5
                while len(hits) < workers and time.monotonic() < end:
                    time.sleep(0.05)
                hanging = len(hits)
                during = measure(client, ["/health", "/images"], 3)
                accepted, refusal, n, last_fill = workers, None, workers, None
                while n < len(routes):
                    a = client.post_json(SUBMIT, {"urls": [host.url(f"/hang/{n}.jpg")]})
                    n += 1
                    if a.status == 202:
                        accepted += 1
                        last_fill = a.json()["jobId"]
                        continue
                    refusal, t_refusal = a, time.monotonic()
                    break
                fill_s = time.monotonic() - t_submit
                waiting_view = client.request("GET", f"{SUBMIT}/{last_fill}").json() if last_fill else None
                full = measure(client, ["/health", "/images"], 2)
                # How long a client that was told Retry-After really had to wait: one URL every 0.5 s until taken.
                accepted_again, retries = None, 0
                while refusal is not None and time.monotonic() - t_refusal < 20 and n < len(routes):
                    a = client.post_json(SUBMIT, {"urls": [host.url(f"/hang/{n}.jpg")]})
                    n += 1
                    if a.status == 202:
                        accepted_again = time.monotonic() - t_refusal
                        break
                    retries += 1
                    time.sleep(0.5)
                done = wait_job(client, first_ids[0], 20) if first_ids else None
                failed_after = time.monotonic() - t_submit
                client.close()
            # the host is closed (its hung requests end) before the server gets its SIGTERM
        abandoned = srv.grep(r"shutdown abandoned|nothing was abandoned", 2)
    rep.row(f"{S}: hung downloads under way (one per worker)", f"{hanging} of {workers}", f"{workers}", hanging == workers)
    for p in ("/health", "/images"):
        b, d, f = before[p], during[p], full[p]
        fine = bool(d) and bool(f) and max(p99(d), p99(f)) <= 100
        rep.row(f"{S}: GET {p} idle -> workers hung -> backlog full", f"{lat(b)} -> {lat(d)} -> {lat(f)}", "p99 <= 100 ms", fine)
    retry_after = refusal.headers.get("retry-after") if refusal else None
    refused_ok = refusal is not None and refusal.status == 503 and bool(retry_after) and refusal.problem_json
    rep.row(f"{S}: URLs accepted before the first refusal (UPLOAD_BACKLOG={backlog})", f"{accepted}", f"{backlog}",
            accepted == backlog)
    rep.row(f"{S}: the next submit", "no refusal" if refusal is None else
            f"HTTP {refusal.status}, Retry-After {retry_after!r}, {refusal.headers.get('content-type')}",
            "503, Retry-After, problem+json", refused_ok)
    item = done["items"][0] if done else None
    reason = (item or {}).get("error") or ""
    rep.row(f"{S}: a hung URL's outcome", "not complete after 20 s" if not done else
            f"{item['status']} after {failed_after:.1f} s: {reason[:90]}", "failed with the 10 s download deadline",
            bool(done) and item["status"] == "failed" and "longer than" in reason)
    if retry_after and str(retry_after).isdigit():
        rep.row(f"{S}: Retry-After vs the wait until a 1-URL submit was taken again",
                f"{retry_after} s vs " + (f"{accepted_again:.1f} s ({retries} more 503s, one every 0.5 s)"
                                          if accepted_again is not None else "> 20 s"),
                ">= half the real wait", accepted_again is not None and int(retry_after) >= accepted_again / 2)
    rep.note(S, f"filled in {fill_s:.1f} s after the first submit; refusal detail: "
                f"{refusal.text(200) if refusal else '-'}; last job accepted, when the backlog was full: "
                f"{(waiting_view or {}).get('status')}; shutdown log: {abandoned or 'nothing'}")
    ctx.server_checks(S, srv)


# ---------------------------------------------------------------------------------------------------------
# 5. imgur-storm
# ---------------------------------------------------------------------------------------------------------


class StormImgur(FakeImgur):
    """FakeImgur that, while `storm` is set, answers 429 (Retry-After: 1), 500 or slowly instead of at once."""

    def __init__(self, seed: int = 5, **kwargs):
        super().__init__(**kwargs)
        self.storm = threading.Event()
        self.answers: collections.Counter = collections.Counter()
        self._rng = random.Random(seed)
        self._count_lock = threading.Lock()

    def _tally(self, kind: str) -> None:
        with self._count_lock:
            self.answers[kind] += 1

    def _image(self, h) -> None:
        if not self.storm.is_set():
            self._tally("ok (calm)")
            return super()._image(h)
        with self._count_lock:
            r = self._rng.random()
            slow = self._rng.uniform(2, 6)
        if r < 0.30:
            read_body(h)
            self._tally("429")
            status, payload, headers = answer(429, "Too Many Requests", {"Retry-After": "1"})
            return respond(h, status, payload, "application/json", headers)
        if r < 0.55:
            read_body(h)
            self._tally("500")
            status, payload, headers = answer(500, "Internal Server Error")
            return respond(h, status, payload, "application/json", headers)
        if r < 0.75:
            self._tally("slow")
            if h.server.stopping.wait(slow):
                return None
        else:
            self._tally("ok")
        return super()._image(h)


def scenario_imgur_storm(ctx: Ctx) -> None:
    S, args, rep = "imgur-storm", ctx.args, ctx.report
    db = ctx.path("storm.db")
    workers = 4
    n_paths = 4000
    photos = {f"/s/{n}.jpg": ctx.jpegs.make(f"storm {n}") for n in range(n_paths)}
    routes = {p: (lambda body: (lambda h: respond(h, 200, body, "image/jpeg")))(b) for p, b in photos.items()}
    progress(f"{S}: 429 / 500 / slow Imgur for {args.seconds:g} s while jobs keep coming")
    job_ids: list[str] = []
    refused: list[str] = []
    samples: list[int] = []
    with StormImgur() as fake, Loopback(routes) as host:
        env = ctx.env(IMGUR_CLIENT_ID=fake.client_id, IMGUR_API_URL=fake.url, ALLOW_PRIVATE_URLS=1,
                      UPLOAD_WORKERS=workers, JOBS_KEPT=5000)
        with ctx.server(S, db, env, stop_timeout=20) as srv:
            next_path = itertools.count()

            def urls(k: int) -> list[str]:
                return [host.url(f"/s/{next(next_path) % n_paths}.jpg") for _ in range(k)]

            client = Client(srv.host, srv.port, timeout=30)
            t_start = srv.info().get("Threads", 0)
            warm = client.post_json(SUBMIT, {"urls": urls(2 * workers)})
            warm_done = wait_job(client, warm.json()["jobId"], 30) if warm.status == 202 else None
            time.sleep(1)
            baseline = srv.info().get("Threads", 0)
            fake.storm.set()
            rng = random.Random(55)
            end = time.monotonic() + args.seconds
            health: list[float] = []
            try:
                while time.monotonic() < end:
                    a = client.post_json(SUBMIT, {"urls": urls(rng.randint(1, 3))})
                    if a.status == 202:
                        job_ids.append(a.json()["jobId"])
                    else:
                        refused.append(f"{a.status} {a.error or a.text(120)}")
                    h = client.request("GET", "/health")
                    if h.ok:
                        health.append(h.ms)
                    samples.append(srv.info().get("Threads", 0))
                    time.sleep(0.5)
            finally:
                fake.storm.clear()
            storm_answers = dict(fake.answers)
            t_calm = time.monotonic()
            progress(f"{S}: storm over ({len(job_ids)} jobs); waiting for every job to complete")
            views, unfinished = {}, []
            for job_id in job_ids:
                left = max(1.0, t_calm + 120 - time.monotonic())
                view = wait_job(client, job_id, left)
                if view is None:
                    unfinished.append(job_id)
                else:
                    views[job_id] = view
            drain_s = time.monotonic() - t_calm
            final = srv.info().get("Threads", 0)
            settle = time.monotonic()
            while final > baseline and time.monotonic() - settle < 15:
                time.sleep(1)
                final = srv.info().get("Threads", 0)
            client.close()
    items = [i for v in views.values() for i in v["items"]]
    complete = [i for i in items if i["status"] == "complete"]
    failed = [i for i in items if i["status"] == "failed"]
    no_reason = [i for i in failed if not (i.get("error") or "").strip()]
    odd = [i for i in items if i["status"] not in ("complete", "failed")]
    reasons = collections.Counter(re.sub(r"http://127\.0\.0\.1:\d+/\S+", "<url>", i["error"])[:110] for i in failed)
    rep.row(f"{S}: jobs complete after the storm", f"{len(views)} / {len(job_ids)} (in {drain_s:.1f} s)",
            "all", bool(job_ids) and not unfinished)
    rep.row(f"{S}: URLs uploaded / failed with a reason / failed without / other",
            f"{len(complete)} / {len(failed) - len(no_reason)} / {len(no_reason)} / {len(odd)}",
            "each uploaded or failed with a reason", bool(items) and not no_reason and not odd)
    rep.row(f"{S}: server threads before jobs / after warm-up (baseline) / max in storm / final",
            f"{t_start} / {baseline} / {max(samples) if samples else '-'} / {final}", "final = baseline", final == baseline)
    rep.row(f"{S}: GET /health during the storm", lat(health), "—", None)
    rep.note(S, f"fake Imgur answers {storm_answers}; failure reasons: "
                f"{'; '.join(f'{n}x {r}' for r, n in reasons.most_common(4)) or 'none'}; submits refused: "
                f"{refused[:3] or 0}; warm-up job complete: {bool(warm_done)}")
    if unfinished:
        rep.problem(S, f"{len(unfinished)} job(s) not complete 120 s after the storm; server log tail:\n{indent(srv.tail(8))}")
    ctx.server_checks(S, srv)


# ---------------------------------------------------------------------------------------------------------
# 6. disk-full
# ---------------------------------------------------------------------------------------------------------


def scenario_disk_full(ctx: Ctx) -> None:
    S, args, rep = "disk-full", ctx.args, ctx.report
    if os.geteuid() != 0:
        rep.row(f"{S}: database on a full tmpfs", "not run: mounting a tmpfs needs root", "—", "skipped")
        progress(f"{S}: skipped (not root)")
        return
    mnt = tempfile.mkdtemp(prefix="soak-tmpfs-", dir=ctx.tmp)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.tmpfs_mb}m", "tmpfs", mnt],
                          capture_output=True, text=True)
    if done.returncode != 0:
        rep.row(f"{S}: database on a full tmpfs", f"not run: mount failed: {done.stderr.strip()[:120]}", "—", "skipped")
        progress(f"{S}: skipped (mount failed: {done.stderr.strip()})")
        return
    progress(f"{S}: {args.tmpfs_mb} MB tmpfs at {mnt}; posting ~110 KB images until it is full")
    big = Jpegs(size=300, quality=95, seed=11)
    try:
        ballast = os.path.join(mnt, "ballast")
        with open(ballast, "wb") as f:
            f.write(os.urandom(1024 * 1024))
            f.flush()
            os.fsync(f.fileno())
        db = os.path.join(mnt, "images.db")
        answers: list[Answer] = []
        # MIN_FREE_DISK_MB=0: this scenario fills the disk itself, for SQLite's own "disk is full" (507)
        with ctx.server(S, db, ctx.env(MIN_FREE_DISK_MB=0)) as srv:
            client = Client(srv.host, srv.port, timeout=30)
            consecutive = 0
            for n in range(400):
                a = client.request("POST", "/images", image_body(big.make(f"disk {n}")))
                answers.append(a)
                consecutive = 0 if a.ok else consecutive + 1
                if consecutive >= 10 or a.status is None:
                    break
            vfs = os.statvfs(mnt)
            free_when_full = vfs.f_bavail * vfs.f_frsize
            reads = [client.request("GET", p) for p in ("/health", "/images?limit=5", "/objects")]
            os.remove(ballast)
            after = [client.request("POST", "/images", image_body(ctx.photo(S))) for _ in range(5)]
            after += [client.request("POST", "/images", image_body(big.make(f"disk after {n}"))) for n in range(2)]
            client.close()
            live_check = integrity(db)
        stop_check = integrity(db)
        rows = count_rows(db)
        sizes = {name: os.path.getsize(os.path.join(mnt, name)) for name in sorted(os.listdir(mnt))}
    finally:
        umount = subprocess.run(["umount", mnt], capture_output=True, text=True)
        if umount.returncode != 0:
            time.sleep(1)
            umount = subprocess.run(["umount", "-l", mnt], capture_output=True, text=True)
        with contextlib.suppress(OSError):
            os.rmdir(mnt)
    first_bad = next((i for i, a in enumerate(answers) if not a.ok), None)
    bad = [a for a in answers if not a.ok]
    kinds = collections.Counter(
        f"{a.status} {'problem+json' if a.problem_json else a.headers.get('content-type')}: "
        f"{(a.json() or {}).get('detail', a.error or a.text(80)) if a.status else a.error}"[:150]
        for a in bad
    )
    clean = all(a.status in (503, 507) and a.problem_json for a in bad)
    stored = sum(a.ok for a in answers) + sum(a.ok for a in after)
    rep.row(f"{S}: answers once the disk was full", "; ".join(f"{n}x {k}" for k, n in kinds.items()) or "never full",
            "507 (or 503) problem+json, no 500, no hang", bool(bad) and clean)
    said_full = [a for a in bad if a.status == 507 or "full" in ((a.json() or {}).get("detail") or "")]
    rep.row(f"{S}: refusals that say the disk is full (README: 507)", f"{len(said_full)} of {len(bad)}",
            "all", bool(bad) and len(said_full) == len(bad))
    rep.row(f"{S}: uploads stored before the first refusal", f"{first_bad if first_bad is not None else len(answers)} "
            f"(~110 KB each; {mb(free_when_full)} free when full)", "—", None)
    rep.row(f"{S}: reads while full (/health, /images, /objects)", ", ".join(str(a.status) for a in reads),
            "200", all(a.status == 200 for a in reads))
    rep.row(f"{S}: writes after deleting the 1 MB ballast", ", ".join(str(a.status or a.error) for a in after),
            "all 200", all(a.ok for a in after))
    rep.row(f"{S}: integrity_check (server running / stopped); rows vs 2xx", f"{live_check} / {stop_check}; {rows} vs {stored}",
            "ok / ok; equal", live_check == "ok" and stop_check == "ok" and rows == stored)
    rep.row(f"{S}: tmpfs unmounted", "yes" if umount.returncode == 0 else f"no: {umount.stderr.strip()}", "yes",
            umount.returncode == 0)
    rep.note(S, f"files on the tmpfs before unmounting: {sizes}; server log: {srv.counts['warning']} WARNING, "
                f"{srv.counts['error']} ERROR lines")
    if bad and len(said_full) < len(bad):
        rep.problem(S, f"{len(bad) - len(said_full)} refusal(s) on a full disk do not say so (README: 507 \"the disk holding "
                       f"the database is full\"); the server log:\n" + indent("\n".join(srv.grep(r" WARNING ", 3))))
    if not clean or not all(a.ok for a in after):
        rep.problem(S, "server log around the failures:\n" + indent("\n".join(srv.grep(r" (WARNING|ERROR) ", 8))))
    ctx.server_checks(S, srv)


# ---------------------------------------------------------------------------------------------------------
# 7. soak
# ---------------------------------------------------------------------------------------------------------


def scenario_soak(ctx: Ctx) -> None:
    S, args, rep = "soak", ctx.args, ctx.report
    db = ctx.path("soak.db")
    minutes = args.soak_minutes or 30
    seconds = minutes * 60
    every = args.sample_seconds
    n_paths = 2000
    photos = {f"/p/{n}.jpg": ctx.jpegs.make(f"soak-host {n}") for n in range(n_paths)}
    routes = {p: (lambda body: (lambda h: respond(h, 200, body, "image/jpeg")))(b) for p, b in photos.items()}
    progress(f"{S}: {minutes:g} minutes of mixed load, sampling every {every:g} s")
    stop = threading.Event()
    tally: collections.Counter = collections.Counter()
    bad: collections.Counter = collections.Counter()
    tally_lock = threading.Lock()
    samples: list[dict] = []

    def count(kind: str, a: Answer) -> None:
        with tally_lock:
            tally[kind] += 1
            if a.status is None or a.status >= 500:
                bad[f"{kind}: {a.status} {(a.error or a.text(100))[:100]}"] += 1

    with FakeImgur(delay=0.05) as fake, Loopback(routes) as host:
        env = ctx.env(IMGUR_CLIENT_ID=fake.client_id, IMGUR_API_URL=fake.url, ALLOW_PRIVATE_URLS=1, JOBS_KEPT=1000)
        with ctx.server(S, db, env, stop_timeout=30) as srv:
            ids: collections.deque = collections.deque(maxlen=500)
            next_path = itertools.count()

            def uploader() -> None:
                client, rng = Client(srv.host, srv.port, timeout=60), random.Random(1)
                while not stop.wait(0.2):
                    r = rng.random()
                    if r < 0.2:
                        url = host.url(f"/p/{next(next_path) % n_paths}.jpg")
                        a = client.post_json("/images", {"url": url, "detect": rng.random() < 0.3})
                        count("POST /images url", a)
                    elif r < 0.3 and ids:
                        a = client.request("DELETE", f"/images/{ids.popleft()}")
                        count("DELETE /images/{id}", a)
                        continue
                    else:
                        a = client.request("POST", "/images", image_body(ctx.photo(S), rng.random() < 0.3))
                        count("POST /images", a)
                    if a.ok:
                        ids.append(a.json()["id"])
                client.close()

            def searcher() -> None:
                client, rng = Client(srv.host, srv.port, timeout=60), random.Random(2)
                paths = ["/images?limit=50", "/images?objects=person,dog", "/objects", "/health", "/v1/images"]
                while not stop.wait(0.1):
                    if ids and rng.random() < 0.3:
                        image_id = rng.choice(list(ids))
                        a = client.request("GET", f"/images/{image_id}" + ("/file" if rng.random() < 0.5 else ""))
                        count("GET /images/{id}[/file]", a)
                    else:
                        path = rng.choice(paths)
                        count(f"GET {path}", client.request("GET", path))
                client.close()

            def submitter() -> None:
                client, rng = Client(srv.host, srv.port, timeout=60), random.Random(3)
                last = None
                while not stop.wait(2.0):
                    urls = [host.url(f"/p/{next(next_path) % n_paths}.jpg") for _ in range(rng.randint(1, 4))]
                    a = client.post_json(SUBMIT, {"urls": urls})
                    count(f"POST {SUBMIT}", a)
                    if last:
                        count(f"GET {SUBMIT}/{{id}}", client.request("GET", f"{SUBMIT}/{last}"))
                    last = a.json()["jobId"] if a.status == 202 else None
                client.close()

            threads = [threading.Thread(target=f, name=f.__name__, daemon=True) for f in (uploader, searcher, submitter)]
            for t in threads:
                t.start()
            t0 = time.monotonic()
            try:
                while True:
                    elapsed = time.monotonic() - t0
                    info = srv.info()
                    wal = db + "-wal"
                    info.update(t=elapsed, wal=os.path.getsize(wal) if os.path.exists(wal) else 0, db=os.path.getsize(db))
                    samples.append(info)
                    progress(f"{S}: {elapsed / 60:.1f} min: RSS {info.get('VmRSS', 0) / 1024:.0f} MB, fds {info.get('fds')}, "
                             f"threads {info.get('Threads')}, WAL {mb(info['wal'])}, DB {mb(info['db'])}")
                    if elapsed >= seconds or stop.wait(min(every, max(0.0, seconds - elapsed))):
                        break
            finally:
                stop.set()
                for t in threads:
                    t.join(70)
            # the end: a job of slow uploads under way when SIGTERM comes
            fake.delay = 3.0
            client = Client(srv.host, srv.port, timeout=30)
            last_job = client.post_json(SUBMIT, {"urls": [host.url(f"/p/{n}.jpg") for n in range(40)]})
            time.sleep(1.0)
            client.close()
            progress(f"{S}: SIGTERM with a 40-URL job under way")
            t_stop = time.monotonic()
        stop_s = time.monotonic() - t_stop
        shutdown = srv.grep(r"shutdown abandoned|nothing was abandoned|stopping on", 4)
    first, last = samples[min(1, len(samples) - 1)], samples[-1]  # the first sample is before any load
    mid = samples[len(samples) // 2]

    def flat(key: str, slack: float) -> tuple[str, bool]:
        values = [s.get(key, 0) for s in samples[1:]] or [0]
        growth = last.get(key, 0) - mid.get(key, 0)
        return (f"first {first.get(key)} / last {last.get(key)} / max {max(values)}; 2nd half +{growth}",
                growth <= slack)

    rss, rss_ok = flat("VmRSS", max(10 * 1024, 0.1 * mid.get("VmRSS", 0)))
    fds, fds_ok = flat("fds", 5)
    threads_, threads_ok = flat("Threads", 0)
    wal_text = f"first {mb(first['wal'])} / last {mb(last['wal'])} / max {mb(max(s['wal'] for s in samples))}"
    wal_ok = last["wal"] - mid["wal"] <= 1024 * 1024 and max(s["wal"] for s in samples) <= 32 * 1024 * 1024
    rep.row(f"{S}: RSS kB over {minutes:g} min ({len(samples)} samples)", rss, "flat (2nd half +<= 10%)", rss_ok)
    rep.row(f"{S}: open fds", fds, "flat (2nd half +<= 5)", fds_ok)
    rep.row(f"{S}: threads", threads_, "flat", threads_ok)
    rep.row(f"{S}: WAL file", wal_text, "bounded, not growing in the 2nd half", wal_ok)
    total = sum(tally.values())
    rep.row(f"{S}: requests / 5xx or no answer", f"{total} / {sum(bad.values())}", "0 5xx", total > 0 and not bad)
    said = [line for line in shutdown if "abandoned" in line]
    rep.row(f"{S}: SIGTERM with uploads under way: stopped in, log says",
            f"{stop_s:.1f} s; {said[0].split(': ', 1)[-1] if said else 'nothing'}",
            "one SIGTERM; finished or abandoned uploads logged", bool(said) and srv.stop_problem() is None)
    rep.note(S, f"requests {dict(tally)}; last job submitted: HTTP {last_job.status}; DB {mb(last['db'])}; samples "
                + ", ".join(f"{s['t'] / 60:.1f}m:{s.get('VmRSS', 0) // 1024}MB/{s.get('fds')}fd/{mb(s['wal'])}" for s in samples))
    if bad:
        rep.problem(S, "5xx / unanswered: " + "; ".join(f"{n}x {k}" for k, n in bad.most_common(6)))
    ctx.server_checks(S, srv)


# ---------------------------------------------------------------------------------------------------------

SCENARIOS = {
    "writers": scenario_writers,
    "kill9": scenario_kill9,
    "slowloris": scenario_slowloris,
    "hung-hosts": scenario_hung_hosts,
    "imgur-storm": scenario_imgur_storm,
    "disk-full": scenario_disk_full,
    "soak": scenario_soak,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=ALL, metavar="NAME",
                        help=f"scenarios to run: {', '.join(ALL)} (default: all but soak)")
    parser.add_argument("--seconds", type=float, default=60, help="length of writers and imgur-storm; slowloris runs half (default 60)")
    parser.add_argument("--soak-minutes", type=float, default=None, help="length of soak; runs soak too (default 30 when selected)")
    parser.add_argument("--sample-seconds", type=float, default=30, help="soak: seconds between samples (default 30)")
    parser.add_argument("--writers", type=int, default=50, help="writers: concurrent connections (default 50)")
    parser.add_argument("--detect-share", type=float, default=0.1, help="writers: share of detect=true (default 0.1)")
    parser.add_argument("--kills", type=int, default=3, help="kill9: kill -9 rounds (default 3)")
    parser.add_argument("--slow-connections", type=int, default=150, help="slowloris: dribbling sockets (default 150)")
    parser.add_argument("--backlog", type=int, default=20, help="hung-hosts: UPLOAD_BACKLOG (default 20)")
    parser.add_argument("--tmpfs-mb", type=int, default=8, help="disk-full: tmpfs size in MB (default 8)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (databases, server logs)")
    args = parser.parse_args()
    # SIGTERM (make, CI) unwinds like Ctrl-C: servers stopped, sockets closed, tmpfs unmounted, temp dir removed,
    # and what was measured so far printed.
    def _interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, _interrupt)

    names = args.only or (DEFAULT + (["soak"] if args.soak_minutes else []))
    testdata, model = testdata_paths()
    if not os.path.isfile(model):
        print(f"bench/soak.py: no model at {model}: set DETECT_MODEL (see README)", file=sys.stderr)
        return 2
    report = Report()
    tmp = tempfile.mkdtemp(prefix="bench-soak-")
    ctx = Ctx(args, tmp, model, report)
    started = time.perf_counter()
    times = {}
    interrupted = False
    try:
        for name in names:
            t = time.perf_counter()
            try:
                SCENARIOS[name](ctx)
            except KeyboardInterrupt:
                report.row(f"{name}", "interrupted (Ctrl-C)", "—", "interrupted")
                raise
            except Exception as e:  # a scenario that breaks is reported; the others still run
                traceback.print_exc()
                report.row(f"{name}", f"the scenario itself failed: {type(e).__name__}: {str(e)[:200]}", "runs", False)
            times[name] = time.perf_counter() - t
    except KeyboardInterrupt:
        interrupted = True
        progress("interrupted; printing what was measured")
    finally:
        if args.keep:
            progress(f"kept {tmp} (databases and server logs)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report.print()
    print(
        f"\ncores: {os.cpu_count()}, model {os.path.basename(model)}, scenarios {', '.join(names)}; seconds per scenario: "
        + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
        + f"; whole run {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.2f}"
    )
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
