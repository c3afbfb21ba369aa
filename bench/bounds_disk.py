"""Issue 10's disk and slow-sender targets against the real server process: `disk_scenario()`.

    python bench/bounds_disk.py [--cwd DIR]     (DIR: a checkout whose server.py to measure; default this one)

Each part starts `python server.py --port 0` with default settings (but the named ones) on a database of
its own in a temporary folder, with no model (nothing here detects), and stops it with SIGTERM:

  attack     20 connections each announce a 28 MB body and send all but its last byte; for 6 s the
             server's temporary files (waitress spools bodies past 512 KB to unlinked files in TMPDIR,
             a fresh folder: counted through /proc/PID/fd) are sampled. Target: under 150 MB at peak.
  trickle    one body byte every 25 s, and one header byte every 25 s, on two connections: how long until
             the server cuts each off. Target: within the deadline (BODY_TIMEOUT + bytes / MIN_RATE_BPS,
             HEADER_TIMEOUT; both 20 s by default), plus one second for the loop's check.
  urllib     a 30 MB body (over the 28 MB limit) through Python's urllib, which sends it all before reading.
             Target: urllib sees the 413.
  floor      the database on a 64 MB tmpfs with MIN_FREE_DISK_MB=24 (root only; skipped otherwise);
             768 KB noise images until the first refusal. Target: it is a 507, at least 12 MB stay free.
  sigterm    3 URL downloads in flight (an image host answering after 1 s), then SIGTERM. Target: 3 x 200,
             stopped within 10 s, no traceback in the log.

Prints one markdown table "| target | measured | ok/FAIL |"; progress goes to stderr. It reports; it
asserts nothing. Needs Linux (/proc).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from PIL import Image  # noqa: E402

from loopback import Loopback, respond  # noqa: E402
from serverproc import ServerProcess  # noqa: E402  (bench/serverproc.py)

MB = 1024 * 1024


def _progress(text: str) -> None:
    print(f"[bench/bounds_disk] {text}", file=sys.stderr, flush=True)


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGUR_")}
    for key in ("IMAGES_DB", "PORT", "HOST", "MIN_FREE_DISK_MB", "BODY_BUFFER_MB", "HEADER_TIMEOUT", "BODY_TIMEOUT",
                "MIN_RATE_BPS", "STOP_GRACE", "MAX_IMAGE_BYTES", "ALLOW_PRIVATE_URLS", "TMPDIR"):
        env.pop(key, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _server(tmp: str, name: str, cwd: str, db: str | None = None, **env) -> ServerProcess:
    folder = os.path.join(tmp, name)
    os.makedirs(folder, exist_ok=True)
    args = ["--db", db or os.path.join(folder, "images.db"), "--model", os.path.join(folder, "none.tflite")]
    return ServerProcess(args, env=_env(**env), cwd=cwd, stop_timeout=15)


def _closed(sock: socket.socket) -> bool:
    """Whether the server has closed `sock` (or answered on it): a peek that does not wait."""
    timeout = sock.gettimeout()
    sock.settimeout(0)  # a socket with a timeout would wait for it before the peek
    try:
        sock.recv(1, socket.MSG_PEEK)
        return True  # a byte of an answer, or b"" for the end
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.settimeout(timeout)


# ---------------------------------------------------------------------------------------------------------
# attack: 20 connections x 28 MB, all but the last byte
# ---------------------------------------------------------------------------------------------------------


def _temp_bytes(pid: int, folder: str) -> int:
    total, fds = 0, f"/proc/{pid}/fd"
    for fd in os.listdir(fds):
        try:
            if os.readlink(f"{fds}/{fd}").startswith(folder):
                total += os.stat(f"{fds}/{fd}").st_size
        except OSError:
            pass
    return total


def _attack(tmp: str, cwd: str) -> list[tuple[str, str, bool | None]]:
    spool = os.path.join(tmp, "attack-tmpdir")
    os.makedirs(spool)
    announce, conns = 28_000_000, 20
    with _server(tmp, "attack", cwd, TMPDIR=spool) as srv:
        _progress(f"attack: {conns} connections announcing {announce:,} bytes each, sending all but the last")
        socks: list[socket.socket] = []
        sent = [0] * conns

        def send(i: int) -> None:
            s = socket.create_connection((srv.host, srv.port), timeout=30)
            socks.append(s)
            try:
                s.sendall(
                    f"POST /images HTTP/1.1\r\nHost: {srv.host}:{srv.port}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {announce}\r\n\r\n".encode()
                )
                piece = b" " * MB
                while sent[i] < announce - 1:
                    n = min(len(piece), announce - 1 - sent[i])
                    s.sendall(piece[:n])
                    sent[i] += n
            except OSError:
                pass  # the server hung up

        senders = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(conns)]
        t0 = time.monotonic()
        for t in senders:
            t.start()
        peak, samples = 0, 0
        while time.monotonic() - t0 < 6:
            peak = max(peak, _temp_bytes(srv.proc.pid, spool))
            samples += 1
            time.sleep(0.02)
        held_end = _temp_bytes(srv.proc.pid, spool)
        statuses = []
        for s in list(socks):
            s.settimeout(1)
            try:
                res = http.client.HTTPResponse(s, method="POST")
                res.begin()
                statuses.append(res.status)
            except OSError:
                statuses.append(None)  # no answer: still waiting for its last byte
            except http.client.HTTPException:
                statuses.append("?")
        for s in socks:
            s.close()
        for t in senders:
            t.join(10)
    answered = {k: statuses.count(k) for k in sorted(set(statuses), key=str)}
    full = sum(1 for n in sent if n >= announce - 1)
    return [(
        "20 connections x 28 MB, all but the last byte: temporary files held, peak over 6 s < 150 MB",
        f"{peak / MB:.1f} MB peak, {held_end / MB:.1f} MB at 6 s ({samples} samples); answers {answered} "
        f"(None: waiting for the last byte); {full} of {conns} sent all they meant to",
        peak < 150 * MB,
    )]


# ---------------------------------------------------------------------------------------------------------
# trickle: one byte every 25 s
# ---------------------------------------------------------------------------------------------------------


def _trickle(tmp: str, cwd: str, every: float = 25.0, cap: float = 130.0) -> list[tuple[str, str, bool | None]]:
    body_timeout, header_timeout, rate = 20.0, 20.0, 500.0
    rows = []
    with _server(tmp, "trickle", cwd) as srv:
        _progress(f"trickle: one byte every {every:g} s on two connections (body, headers), up to {cap:g} s")
        body = socket.create_connection((srv.host, srv.port), timeout=10)
        head = socket.create_connection((srv.host, srv.port), timeout=10)
        body.sendall(
            f"POST /images HTTP/1.1\r\nHost: {srv.host}:{srv.port}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n".encode()
        )
        head.sendall(f"GET /health HTTP/1.1\r\nHost: {srv.host}:{srv.port}\r\n".encode())
        t0 = time.monotonic()
        cut: dict[str, float] = {}
        sent = {"body": 0, "headers": 0}
        next_byte = t0
        while len(cut) < 2 and time.monotonic() - t0 < cap:
            now = time.monotonic()
            for name, s in (("body", body), ("headers", head)):
                if name in cut:
                    continue
                if _closed(s):
                    cut[name] = time.monotonic() - t0
                elif now >= next_byte:
                    try:
                        s.sendall(b" " if name == "body" else b"X")
                        sent[name] += 1
                    except OSError:
                        cut[name] = now - t0
            if now >= next_byte:
                next_byte += every
            time.sleep(0.05)
        answers = {}
        for name, s in (("body", body), ("headers", head)):
            s.settimeout(2)
            try:
                res = http.client.HTTPResponse(s, method="GET")
                res.begin()
                answers[name] = str(res.status)
            except (OSError, http.client.HTTPException) as e:
                answers[name] = type(e).__name__
            s.close()
    body_deadline = body_timeout + sent["body"] / rate + 1.0
    b = cut.get("body")
    rows.append((
        f"one body byte every {every:g} s: cut off within BODY_TIMEOUT + bytes / MIN_RATE_BPS (+1 s) = {body_deadline:.1f} s",
        f"cut at {b:.1f} s ({answers['body']}) after {sent['body']} byte(s)" if b is not None else
        f"still open after {cap:g} s ({sent['body']} bytes)",
        b is not None and b <= body_deadline,
    ))
    h = cut.get("headers")
    rows.append((
        f"one header byte every {every:g} s: cut off within HEADER_TIMEOUT (+1 s) = {header_timeout + 1:.0f} s",
        f"cut at {h:.1f} s ({answers['headers']})" if h is not None else f"still open after {cap:g} s",
        h is not None and h <= header_timeout + 1,
    ))
    return rows


# ---------------------------------------------------------------------------------------------------------
# urllib: a 30 MB body over the limit
# ---------------------------------------------------------------------------------------------------------


def _urllib(tmp: str, cwd: str) -> list[tuple[str, str, bool | None]]:
    with _server(tmp, "urllib", cwd) as srv:
        _progress("urllib: POST of a 30 MB body")
        req = urllib.request.Request(f"{srv.url}/images", b"A" * (30 * MB), {"Content-Type": "application/json"})
        t = time.monotonic()
        try:
            urllib.request.urlopen(req, timeout=60)
            seen = "200 (?)"
        except urllib.error.HTTPError as e:
            seen = f"{e.code} {e.headers['Content-Type']}"
        except (urllib.error.URLError, OSError) as e:
            seen = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        took = time.monotonic() - t
    return [("a 30 MB body through Python's urllib: it sees the 413", f"{seen} in {took:.2f} s",
             seen.startswith("413"))]


# ---------------------------------------------------------------------------------------------------------
# floor: a 64 MB tmpfs, MIN_FREE_DISK_MB=24
# ---------------------------------------------------------------------------------------------------------


def _noise_image_body() -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (512, 512), os.urandom(512 * 512 * 3)).save(buf, "BMP")
    return json.dumps({"image": base64.b64encode(buf.getvalue()).decode()}).encode()


def _floor(tmp: str, cwd: str) -> list[tuple[str, str, bool | None]]:
    target = "64 MB tmpfs, MIN_FREE_DISK_MB=24: uploads stop with 507, >= 12 MB stay free"
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return [(target, "not run: mounting a tmpfs needs root", None)]
    mnt = os.path.join(tmp, "floor-tmpfs")
    os.makedirs(mnt)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", mnt], capture_output=True, text=True)
    if done.returncode != 0:
        return [(target, f"not run: mount failed: {done.stderr.strip()[:100]}", None)]
    try:
        with _server(tmp, "floor", cwd, db=os.path.join(mnt, "images.db"), MIN_FREE_DISK_MB=24) as srv:
            _progress("floor: 768 KB images onto a 64 MB tmpfs until the first refusal")
            stored, refusal = 0, None
            for _ in range(100):
                try:
                    _, status, data = srv.request("POST", "/images", _noise_image_body(), ok=None)
                except (OSError, http.client.HTTPException) as e:
                    refusal = (type(e).__name__, "")
                    break
                if status != 200:
                    refusal = (status, json.loads(data).get("detail", "") if data else "")
                    break
                stored += 1
            st = os.statvfs(mnt)
            free = st.f_bavail * st.f_frsize
            _, read_status, _ = srv.request("GET", "/images?limit=5", ok=None)
    finally:
        if subprocess.run(["umount", mnt], capture_output=True).returncode != 0:
            time.sleep(1)
            subprocess.run(["umount", "-l", mnt], capture_output=True)
    named = refusal is not None and "MIN_FREE_DISK_MB" in str(refusal[1])
    return [(
        target,
        f"{stored} stored, then {refusal[0] if refusal else 'no refusal'}"
        f"{' naming MIN_FREE_DISK_MB' if named else ''}; {free / MB:.1f} MB free; GET /images {read_status}",
        refusal is not None and refusal[0] == 507 and free >= 12 * MB and read_status == 200,
    )]


# ---------------------------------------------------------------------------------------------------------
# sigterm: 3 requests in flight
# ---------------------------------------------------------------------------------------------------------


def _sigterm(tmp: str, cwd: str) -> list[tuple[str, str, bool | None]]:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "JPEG")
    jpeg = buf.getvalue()

    def slow(h):
        if not h.server.stopping.wait(1.0):
            respond(h, 200, jpeg, "image/jpeg")

    results: list = []
    with Loopback({"/slow.jpg": slow}) as host:
        srv = _server(tmp, "sigterm", cwd, ALLOW_PRIVATE_URLS=1, DOWNLOAD_SLOTS=3)  # 3 downloads in flight at once
        _progress("sigterm: 3 URL downloads in flight (1 s each), then SIGTERM")

        def post() -> None:
            body = json.dumps({"url": host.url("/slow.jpg")}).encode()
            req = urllib.request.Request(f"{srv.url}/images", body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as res:
                    results.append(res.status)
            except Exception as e:  # noqa: BLE001 - what the client saw is the measurement
                results.append(type(e).__name__)

        clients = [threading.Thread(target=post, daemon=True) for _ in range(3)]
        for c in clients:
            c.start()
        end = time.monotonic() + 10
        while host.hits["/slow.jpg"] < 3 and time.monotonic() < end:
            time.sleep(0.01)
        t = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        took = time.monotonic() - t
        for c in clients:
            c.join(10)
        srv.stop()
        log = "".join(srv.lines)
    tracebacks = log.count("Traceback")
    return [(
        "SIGTERM with 3 requests in flight: 3 x 200, stopped within 10 s, no traceback",
        f"{results}; stopped in {took:.2f} s; {tracebacks} traceback(s)",
        results == [200, 200, 200] and took <= 10 and not tracebacks,
    )]


def disk_scenario(cwd: str = ROOT) -> list[tuple[str, str, bool | None]]:
    """Run every part against `cwd`'s server.py, print the table, return its rows (target, measured, ok)."""
    tmp = tempfile.mkdtemp(prefix="bounds-disk-")
    rows: list[tuple[str, str, bool | None]] = []
    try:
        for part in (_attack, _trickle, _urllib, _floor, _sigterm):
            try:
                rows += part(tmp, cwd)
            except Exception as e:  # noqa: BLE001 - one failed part is a row, the others still run
                rows.append((part.__name__.strip("_"), f"error: {type(e).__name__}: {e}", False))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("| target | measured | ok/FAIL |")
    print("|---|---|---|")
    for target, measured, ok in rows:
        print(f"| {target} | {measured} | {'skipped' if ok is None else 'ok' if ok else 'FAIL'} |")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cwd", default=ROOT, help="the checkout whose server.py to measure (default: this one)")
    args = parser.parse_args()
    rows = disk_scenario(os.path.abspath(args.cwd))
    sys.exit(0 if all(ok is not False for _, _, ok in rows) else 1)
