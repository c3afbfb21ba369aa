"""Issue 10, "Threads: nothing can hold every worker": /health and reads stay fast while slow POSTs pile up.

    python bench/bounds_threads.py [--seconds 20] [--server-root DIR]
                                   (DETECT_MODEL and TESTDATA_DIR as for the tests)

`threads_scenario()` starts the real server (`python server.py --port 0`, bench/serverproc.py) with its
default settings (ALLOW_PRIVATE_URLS=1 so that it may download from loopback) and runs two load patterns,
`seconds` each, while one probe times GET /health (a new connection each time, as Docker's HEALTHCHECK
does) and another GET /images (keep-alive), each waiting 50 ms between requests:

  drip    16 clients POST {"url": ...} of a loopback host that sends one byte every 0.5 s, in a loop.
          Admitted downloads end at FETCH_TIMEOUT (504); the others should be refused with 503; no
          answer should take longer than FETCH_TIMEOUT + 2 s.
  detect  200 clients POST cat_1080p.jpg as base64 with detect=true, in a loop; each request's bytes
          differ (a JPEG comment with a counter), so that no detection is reused from the database.

The load runs in a child process (multiprocessing), so that the 200 client threads do not share the
probes' interpreter lock and inflate what the probes measure. Prints rows "| target | measured |
ok/FAIL |" and returns them; it asserts nothing. `--server-root` runs another checkout's server.py
(the numbers before a change).
"""

from __future__ import annotations

import argparse
import base64
import collections
import http.client
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from loopback import Loopback, drip  # noqa: E402  (tests/loopback.py)
from serverproc import ServerProcess  # noqa: E402  (bench/serverproc.py)

SSD = "coco_ssd_mobilenet_v1_1.0_quant_2018_06_29.tflite"
PROBE_PAUSE = 0.05
PROBE_TIMEOUT = 30.0
POST_TIMEOUT = 60.0


def _progress(text: str) -> None:
    print(f"[bench/bounds_threads] {text}", file=sys.stderr, flush=True)


def _p99(values: list[float]) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[98]


# ---------------------------------------------------------------------------------------------------------
# Probes (in this process)
# ---------------------------------------------------------------------------------------------------------


class Probe(threading.Thread):
    """GET `path` until `stop`, PROBE_PAUSE between requests; latencies in ms (a failure counts as PROBE_TIMEOUT)."""

    def __init__(self, host: str, port: int, path: str, stop: threading.Event, fresh: bool):
        super().__init__(name=f"probe {path}", daemon=True)
        self.host, self.port, self.path, self.stop, self.fresh = host, port, path, stop, fresh
        self.ms: list[float] = []
        self.failures: collections.Counter = collections.Counter()

    def run(self) -> None:
        conn = None
        while not self.stop.is_set():
            if conn is None or self.fresh:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=PROBE_TIMEOUT)
            t = time.perf_counter()
            try:
                conn.request("GET", self.path)
                res = conn.getresponse()
                res.read()
                if res.status != 200:
                    self.failures[f"HTTP {res.status}"] += 1
            except (OSError, http.client.HTTPException) as e:
                self.failures[type(e).__name__] += 1
                conn.close()
                conn = None
            self.ms.append((time.perf_counter() - t) * 1000)
            if self.fresh and conn is not None:
                conn.close()
            self.stop.wait(PROBE_PAUSE)
        if conn is not None:
            conn.close()


# ---------------------------------------------------------------------------------------------------------
# Load (in a child process)
# ---------------------------------------------------------------------------------------------------------


def _with_comment(jpeg: bytes, tag: bytes) -> bytes:
    """The same picture with a COM segment after SOI: other bytes, so another sha256."""
    return jpeg[:2] + b"\xff\xfe" + (len(tag) + 2).to_bytes(2, "big") + tag + jpeg[2:]


def _load(host: str, port: int, clients: int, seconds: float, url: str | None, jpeg: bytes | None, out) -> None:
    """`clients` threads, each on its own keep-alive connection, POST /images in a loop for `seconds`."""
    lock = threading.Lock()
    statuses: collections.Counter = collections.Counter()
    ms: list[float] = []
    retry_after: collections.Counter = collections.Counter()  # of the 503s: "yes" / "missing"
    deadline = time.monotonic() + seconds

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=POST_TIMEOUT)
        n = 0
        while time.monotonic() < deadline:
            n += 1
            if url is not None:
                doc = {"url": url}
            else:
                doc = {"image": base64.b64encode(_with_comment(jpeg, f"{i}-{n}".encode())).decode(), "detect": True}
            body = json.dumps(doc).encode()
            t = time.perf_counter()
            try:
                conn.request("POST", "/images", body=body, headers={"Content-Type": "application/json"})
                res = conn.getresponse()
                res.read()
                status, ra = res.status, res.getheader("Retry-After")
            except (OSError, http.client.HTTPException) as e:
                status, ra = type(e).__name__, None
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=POST_TIMEOUT)
            took = (time.perf_counter() - t) * 1000
            with lock:
                statuses[status] += 1
                ms.append(took)
                if status == 503:
                    retry_after["yes" if ra and ra.isdigit() and int(ra) >= 1 else "missing"] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + POST_TIMEOUT + 10)
    with lock:
        out.send({"statuses": dict(statuses), "ms": ms, "retry_after": dict(retry_after),
                  "stuck": sum(t.is_alive() for t in threads)})
    out.close()


# ---------------------------------------------------------------------------------------------------------
# The scenario
# ---------------------------------------------------------------------------------------------------------


def _pattern(srv: ServerProcess, name: str, clients: int, seconds: float, url=None, jpeg=None) -> dict:
    stop = threading.Event()
    health = Probe(srv.host, srv.port, "/health", stop, fresh=True)
    reads = Probe(srv.host, srv.port, "/images", stop, fresh=False)
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    load = ctx.Process(target=_load, args=(srv.host, srv.port, clients, seconds, url, jpeg, send), daemon=True)
    _progress(f"{name}: {clients} clients for {seconds:g} s")
    health.start()
    reads.start()
    load.start()
    send.close()
    try:
        result = recv.recv() if recv.poll(seconds + POST_TIMEOUT + 30) else None
    except EOFError:
        result = None
    stop.set()
    load.join(10)
    if load.is_alive():
        load.kill()
    health.join(PROBE_TIMEOUT + 5)
    reads.join(PROBE_TIMEOUT + 5)
    return {"health": health, "reads": reads, "load": result or {"statuses": {}, "ms": [], "retry_after": {}, "stuck": clients}}


def _rows(name: str, got: dict, statuses_ok: set, statuses_text: str,
          within_ms: float | None = None) -> list[tuple[str, str, bool]]:
    rows = []
    for probe, target in ((got["health"], 250.0), (got["reads"], 500.0)):
        p99 = _p99(probe.ms)
        fails = sum(probe.failures.values())
        text = f"p99 {p99:.0f} ms, max {max(probe.ms, default=float('nan')):.0f} ms (n={len(probe.ms)})"
        if fails:
            text += ", failures " + ", ".join(f"{k} x{v}" for k, v in probe.failures.items())
        rows.append((f"{name}: GET {probe.path} p99 < {target:.0f} ms", text, p99 < target and not fails))
    load = got["load"]
    statuses = load["statuses"]
    total = sum(statuses.values())
    ms = load["ms"]
    missing = load["retry_after"].get("missing", 0)
    text = ", ".join(f"{v} x {k}" for k, v in sorted(statuses.items(), key=lambda kv: str(kv[0])))
    text += f" (n={total}; 503 without Retry-After: {missing}"
    if ms:
        text += f"; POST median {statistics.median(ms):.0f} / p99 {_p99(ms):.0f} / max {max(ms):.0f} ms"
    if load["stuck"]:
        text += f"; {load['stuck']} clients still waiting at the end"
    text += ")"
    ok = total > 0 and set(statuses) <= statuses_ok and missing == 0 and not load["stuck"]
    if within_ms is not None:
        ok = ok and max(ms, default=0) <= within_ms
    rows.append((f"{name}: every POST {statuses_text}", text, ok))
    return rows


def threads_scenario(seconds: float = 20.0, server_root: str = ROOT) -> list[tuple[str, str, bool]]:
    """Both load patterns against a fresh server; prints the rows and returns them."""
    model = os.path.abspath(os.environ.get("DETECT_MODEL") or os.path.join(ROOT, "testdata", "models", SSD))
    photos = os.path.join(os.path.abspath(os.environ.get("TESTDATA_DIR") or os.path.join(ROOT, "testdata")), "images")
    with open(os.path.join(photos, "cat_1080p.jpg"), "rb") as f:
        jpeg = f.read()
    rows: list[tuple[str, str, bool]] = []
    with tempfile.TemporaryDirectory(prefix="bounds-threads-") as tmp:
        env = {**os.environ, "ALLOW_PRIVATE_URLS": "1"}
        for name, clients in (("drip", 16), ("detect", 200)):
            with ServerProcess(["--db", os.path.join(tmp, f"{name}.db"), "--model", model], env=env, cwd=server_root,
                               stop_timeout=15) as srv:
                for i in range(20):  # something for GET /images to list
                    body = json.dumps({"image": base64.b64encode(_with_comment(jpeg, b"seed%d" % i)).decode()})
                    srv.request("POST", "/images", body.encode())
                if name == "drip":
                    with Loopback({"/slow.jpg": drip(10_000_000, 0.5)}) as host:
                        got = _pattern(srv, name, clients, seconds, url=host.url("/slow.jpg"))
                    # An admitted download ends at FETCH_TIMEOUT (10 s): 504; nothing should take longer.
                    rows += _rows("16 dripping URL POSTs", got, {503, 504},
                                  "503 + Retry-After, or 504 once admitted, within FETCH_TIMEOUT + 2 s", within_ms=12_000)
                else:
                    got = _pattern(srv, name, clients, seconds, jpeg=jpeg)
                    rows += _rows("200 detect POSTs (cat_1080p)", got, {200, 503}, "200, or 503 + Retry-After")
            problem = srv.stop_problem()
            if problem:
                rows.append((f"{name}: the server stops on one SIGTERM", problem, False))
    print("| target | measured | ok/FAIL |")
    print("|---|---|---|")
    for target, measured, ok in rows:
        print(f"| {target} | {measured} | {'ok' if ok else 'FAIL'} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each load pattern (20)")
    parser.add_argument("--server-root", default=ROOT, help="the checkout whose server.py runs (this one)")
    args = parser.parse_args(argv)
    rows = threads_scenario(args.seconds, os.path.abspath(args.server_root))
    return 0 if all(ok for _, _, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
