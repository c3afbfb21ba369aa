"""Issue 10's attacks through the real server process, each against its target: `python bench/bounds_jobs.py` (or all of them: `python bench/bounds.py`).

    python bench/bounds_jobs.py [--jobs N] [--urls N] [--hosts one,many]   (DETECT_MODEL as for the tests)

Each scenario starts `python server.py --port 0` with its own database (bench/serverproc.py), attacks it
and prints markdown rows `| target | measured | ok/FAIL |`. Progress goes to stderr. It reports; it
asserts nothing (the exit status is 1 when a row is FAIL).

jobs_scenario(): upload jobs of blocked 2 KB URLs. With ALLOW_PRIVATE_URLS off every 10.x URL fails at
once, so no server but ours is needed; IMGUR_CLIENT_ID is set (jobs need it) and IMGUR_API_URL points at
a closed loopback port, which is never reached. The server's defaults otherwise (4 workers, UPLOAD_BACKLOG
5000, JOBS_KEPT 1000, JOBS_KEPT_MB 32), so jobs past the backlog are submitted again after their
Retry-After. Two rounds on fresh servers: every URL of a job on one host, and every URL on its own host
(the most kinds of failure a job can log). Measured: VmRSS of the server before the first job and once
every job has finished, the bytes the server logged during the attack, and whether every job is named.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from serverproc import ServerProcess, testdata_paths  # noqa: E402  (bench/serverproc.py)

JOB_LINE = re.compile(r"job ([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}) complete: ")


def progress(text: str) -> None:
    print(f"[bench/bounds] {text}", file=sys.stderr, flush=True)


def row(target: str, measured: str, ok: bool) -> bool:
    print(f"| {target} | {measured} | {'ok' if ok else 'FAIL'} |", flush=True)
    return ok


def model_path() -> str:
    return testdata_paths()[1]


class LoggingServer(ServerProcess):
    """A ServerProcess that also counts the bytes of everything the server logs, and the jobs whose end
    (`job <id> complete: ...`) was logged."""

    def __init__(self, *args, **kwargs):
        self.log_bytes = 0
        self.completed: set[str] = set()
        super().__init__(*args, **kwargs)

    def on_line(self, line: str) -> None:
        self.log_bytes += len(line.encode("utf-8", "replace"))
        self.completed.update(JOB_LINE.findall(line))

    def status_kb(self, key: str) -> int:
        with open(f"/proc/{self.proc.pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"no {key} in /proc status")


def blocked_urls(job: int, n: int, many_hosts: bool, length: int = 2000) -> list[str]:
    urls = []
    for i in range(n):
        host = f"10.{job % 256}.{i // 256}.{i % 256}" if many_hosts else "10.0.0.1"
        base = f"http://{host}/{job}/{i}/"
        urls.append(base + "a" * (length - len(base)))
    return urls


def attack(srv: LoggingServer, jobs: int, urls: int, many_hosts: bool) -> list[str]:
    """Submit the jobs (again after Retry-After while the backlog is full); their ids."""
    ids = []
    for j in range(jobs):
        body = json.dumps({"urls": blocked_urls(j, urls, many_hosts)}).encode()
        while True:
            _, status, data = srv.request("POST", "/v1/images/upload", body, ok=range(200, 600))
            if status == 202:
                ids.append(json.loads(data)["jobId"])
                break
            if status != 503:
                raise RuntimeError(f"POST job {j}: HTTP {status}: {data[:300]!r}")
            time.sleep(0.2)  # Retry-After says seconds; the backlog drains faster than that here
        if j % 10 == 9:
            progress(f"{j + 1} jobs accepted")
    return ids


def wait_finished(srv: LoggingServer, ids: list[str], timeout: float = 600) -> dict[int, int]:
    """Poll until every job is complete or forgotten; {HTTP status: jobs} of the last GETs."""
    deadline = time.monotonic() + timeout
    pending = list(ids)
    answers: dict[int, int] = {}
    while pending:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(pending)} jobs still running after {timeout:.0f} s")
        _, status, data = srv.request("GET", f"/v1/images/upload/{pending[0]}", ok=range(200, 500))
        if status == 404 or json.loads(data)["status"] == "complete":
            pending.pop(0)
        else:
            time.sleep(0.2)
    for job_id in ids:
        _, status, _ = srv.request("GET", f"/v1/images/upload/{job_id}", ok=range(200, 500))
        answers[status] = answers.get(status, 0) + 1
    return answers


def jobs_scenario(jobs: int = 40, urls: int = 1000, hosts: tuple[str, ...] = ("one", "many")) -> bool:
    """Issue 10: `jobs` jobs of `urls` blocked 2 KB URLs grow RSS by < 100 MB and the log by < 10 MB, and
    every job is named in the log. One round on a fresh server per entry of `hosts` ("one": every URL of a
    job on one host, "many": each on its own); True when every row is ok."""
    ok = True
    for many_hosts in (h == "many" for h in hosts):
        where = "every URL on its own host" if many_hosts else "one host per job"
        env = {**os.environ, "IMGUR_CLIENT_ID": "bench-bounds", "IMGUR_API_URL": "http://127.0.0.1:9"}
        env.pop("ALLOW_PRIVATE_URLS", None)
        with tempfile.TemporaryDirectory(prefix="bench-bounds-") as tmp:
            srv = LoggingServer(["--db", os.path.join(tmp, "images.db"), "--model", model_path()], env=env,
                                timeout=120, stop_timeout=15)
            with srv:
                srv.request("GET", "/health")
                rss_before, log_before = srv.status_kb("VmRSS"), srv.log_bytes
                progress(f"{where}: server at {rss_before / 1024:.1f} MB; {jobs} jobs of {urls} blocked URLs")
                started = time.monotonic()
                ids = attack(srv, jobs, urls, many_hosts)
                answers = wait_finished(srv, ids)
                seconds = time.monotonic() - started
                settle = time.monotonic() + 10  # the last summary lines may still be on their way
                while not srv.completed >= set(ids) and time.monotonic() < settle:
                    time.sleep(0.1)
                rss_after, peak = srv.status_kb("VmRSS"), srv.status_kb("VmHWM")
                logged = srv.log_bytes - log_before
            named = len(set(ids) & srv.completed)
            grew = (rss_after - rss_before) / 1024
            ok &= row(f"{where}: RSS growth, {jobs} jobs x {urls} blocked 2 KB URLs < 100 MB",
                      f"{grew:.1f} MB ({rss_before / 1024:.1f} -> {rss_after / 1024:.1f} MB; peak {peak / 1024:.1f} MB)",
                      grew < 100)
            ok &= row(f"{where}: log written during the attack < 10 MB", f"{logged / 1e6:.2f} MB ({logged:,} bytes)",
                      logged < 10e6)
            ok &= row(f"{where}: every job named in the log (its `complete` line)", f"{named} / {len(ids)}",
                      named == len(ids))
            row(f"{where}: jobs still answered / forgotten (404) at the end", f"{answers.get(200, 0)} / "
                f"{answers.get(404, 0)}; {seconds:.0f} s for {jobs * urls:,} URLs", True)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40, help="jobs per round (default 40)")
    parser.add_argument("--urls", type=int, default=1000, help="blocked URLs per job (default 1000)")
    parser.add_argument("--hosts", default="one,many", help="rounds of jobs_scenario: one host per job, many (default both)")
    args = parser.parse_args()
    hosts = tuple(args.hosts.split(","))
    if not set(hosts) <= {"one", "many"}:
        parser.error("--hosts takes one, many or one,many")
    print("| target | measured | |\n|---|---|---|", flush=True)
    return 0 if jobs_scenario(args.jobs, args.urls, hosts) else 1


if __name__ == "__main__":
    sys.exit(main())
