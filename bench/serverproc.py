"""`python server.py --port 0 ...` as a child process for the benches, with one keep-alive connection to it.

    from serverproc import ServerProcess        # bench/ is sys.path[0] when a bench runs as `python bench/x.py`

    with ServerProcess(["--db", db, "--model", model], env=env) as srv:
        ms, status, body = srv.request("GET", "/images")
    srv.stop_problem()                          # None, or what it took to stop the server
"""

from __future__ import annotations

import collections
import http.client
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SSD = "coco_ssd_mobilenet_v1_1.0_quant_2018_06_29.tflite"  # the offline test model


def testdata_paths() -> tuple[str, str]:
    """(the test data folder, the model file) a bench uses: TESTDATA_DIR and DETECT_MODEL, else the
    repository's testdata/ (what `make testdata` fills) and the SSD test model in it."""
    testdata = os.path.abspath(os.environ.get("TESTDATA_DIR") or os.path.join(ROOT, "testdata"))
    return testdata, os.path.abspath(os.environ.get("DETECT_MODEL") or os.path.join(testdata, "models", SSD))


def server_detector(model: str):
    """A loaded detect.Detector laid out as `python server.py` would lay it out here (DETECT_THRESHOLD,
    DETECT_THREADS, DETECT_INTERPRETERS from the environment, else the defaults sized by the cores), for
    the `detect()` a bench compares the server with."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import detect
    import settings

    resolved = settings.load(environ=dict(os.environ))
    detector = detect.Detector(
        model, threshold=resolved.detect_threshold, threads=resolved.detect_threads or None,
        pool=resolved.detect_interpreters or None,
    )
    detector.load()
    return detector


class ServerProcess:
    """`python server.py --port 0 <args>` in `cwd` with `env` (None: this process's); one keep-alive connection.

    The server's stderr is read in a thread: the last lines are kept (`tail()`), WARNING/ERROR lines counted
    (`warnings`), and the `listening on http://...` line gives `url`, `host` and `port`. `stop()` (also on
    leaving a `with`) sends SIGTERM and waits up to `stop_timeout` s; a SIGTERM more, or SIGKILL as the last
    resort, is counted in `sigterms` / `killed`; see `stop_problem()`."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, cwd: str = ROOT, *,
                 timeout: float = 60, stop_timeout: float = 5, start_timeout: float = 60):
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self.warnings = 0
        self.stop_timeout = stop_timeout
        self._url: queue.Queue = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, "server.py", "--port", "0", *args],
            cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True,  # Ctrl-C reaches this process only; stop() sends the SIGTERM
        )
        self.conn: http.client.HTTPConnection | None = None
        self.connects, self.sigterms, self.killed = 0, 0, False
        self._reader = threading.Thread(target=self._drain, daemon=True)  # the server logs every request
        self._reader.start()
        try:
            url = self._url.get(timeout=start_timeout)
            if url is None:
                raise RuntimeError("the server exited before listening:\n" + "".join(self.lines))
            parts = urllib.parse.urlsplit(url)
            self.url, self.host, self.port = url, parts.hostname, parts.port
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        except BaseException:
            self.stop()
            raise

    def on_line(self, line: str) -> None:
        """Each line the server logs, as it comes (a subclass counts what it needs)."""

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.on_line(line)
            self.lines.append(line)
            if " WARNING " in line or " ERROR " in line:
                self.warnings += 1
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                self._url.put(m.group(1))
        self._url.put(None)

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json",
                ok: range | None = range(200, 300)) -> tuple[float, int, bytes]:
        """(milliseconds from sending to the last byte read, status, body); a status not in `ok` raises."""
        if self.conn.sock is None:
            self.connects += 1  # http.client (re)opens the connection by itself
        headers = {"Content-Type": content_type} if body is not None else {}
        t = time.perf_counter()
        self.conn.request(method, path, body=body, headers=headers)
        res = self.conn.getresponse()
        data = res.read()
        ms = (time.perf_counter() - t) * 1000
        if ok is not None and res.status not in ok:
            raise RuntimeError(f"{method} {path}: HTTP {res.status}: {data[:500]!r}")
        return ms, res.status, data

    def rss_kb(self) -> int:
        with open(f"/proc/{self.proc.pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS in /proc status")

    def cpu_seconds(self) -> float:
        """The server's CPU time so far (utime + stime, all its threads), from /proc."""
        with open(f"/proc/{self.proc.pid}/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def tail(self, n: int = 20) -> str:
        return "".join(list(self.lines)[-n:])

    def stop(self) -> None:
        """SIGTERM and wait; again if the first is lost, SIGKILL as the last resort (counted in `sigterms`)."""
        if self.conn is not None:
            self.conn.close()
        for _ in range(3):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(signal.SIGTERM)
            self.sigterms += 1
            try:
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                continue
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            self.killed = True
        self._reader.join(timeout=5)

    def stop_problem(self) -> str | None:
        """None if one SIGTERM stopped the server (or it had already exited); else what it took, a regression
        of server.py's shutdown (its SIGTERM handler notes the signal and wakes waitress's loop)."""
        if self.sigterms <= 1 and not self.killed:
            return None
        return f"{self.sigterms} SIGTERMs{' +SIGKILL' if self.killed else ''} to stop the server"

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def rate(n_threads: int, per_thread: int, make_work) -> float:
    """Images per second with `n_threads` threads, each running `make_work()`'s callable `per_thread` times
    back to back (the clock starts when all are ready)."""
    barrier = threading.Barrier(n_threads + 1)
    errors: list[BaseException] = []

    def run(work):
        barrier.wait()
        try:
            for _ in range(per_thread):
                work()
        except BaseException as e:  # reported below: a silent thread would flatter the rate
            errors.append(e)

    threads = [threading.Thread(target=run, args=(make_work(),)) for _ in range(n_threads)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return n_threads * per_thread / (time.perf_counter() - start)
