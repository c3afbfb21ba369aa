"""Slow and greedy senders against the real process (issue 10, "Disk and slow senders").

waitress reads every request whole before the app runs, so these limits live in server.py's channel
(_ProblemChannel, _Request): read deadlines as Apache's mod_reqtimeout has them (HEADER_TIMEOUT, and
BODY_TIMEOUT extended at MIN_RATE_BPS), a budget for the request bodies held at once (BODY_BUFFER_MB),
and a lingering close after a refusal, so that a client which sends its whole body before reading sees
the answer. One server with tiny limits serves the module, so each test takes seconds.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from PIL import Image
from test_server import start_server, stop_server

from helpers import PROBLEM_KEYS, b64

MB = 1024 * 1024
LIMITS = {"BODY_BUFFER_MB": "2", "HEADER_TIMEOUT": "1", "BODY_TIMEOUT": "1", "MIN_RATE_BPS": "1000"}


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    """`python server.py` with the limits above; its temporary files go to a folder of its own."""
    tmp = tmp_path_factory.mktemp("slow-senders")
    (tmp / "tmp").mkdir()
    env = {**LIMITS, "TMPDIR": str(tmp / "tmp")}
    proc, base, _ = start_server(tmp, "--model", str(tmp / "none.tflite"), env=env)
    parts = urllib.parse.urlsplit(base)
    proc.address, proc.tmpdir = (parts.hostname, parts.port), str(tmp / "tmp")
    yield proc
    err = stop_server(proc)
    assert "Traceback" not in err, err
    assert "raise BODY_BUFFER_MB" in err  # 2 MB is below the 28 MB body limit: said at start


def _connect(server, timeout: float = 10) -> socket.socket:
    return socket.create_connection(server.address, timeout=timeout)


def _post_head(server, length: int, path: str = "/images") -> bytes:
    host, port = server.address
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def _response(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    res = http.client.HTTPResponse(sock, method="POST")
    res.begin()
    body = res.read()
    headers = {k.lower(): v for k, v in res.getheaders()}
    return res.status, headers, json.loads(body) if body else {}


def _assert_problem(status: int, headers: dict[str, str], body: dict, code: int) -> str:
    assert status == code, (status, body)
    assert headers["content-type"] == "application/problem+json", headers
    assert set(body) == PROBLEM_KEYS and body["status"] == code
    return body["detail"]


def _closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closed `sock` (recv gives b"" or a reset); fails after `seconds`."""
    t = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except socket.timeout:
        pytest.fail(f"the server kept the connection open for {seconds} s")
    return time.monotonic() - t


def _image_body() -> bytes:
    """About 9 KB of JSON: a PNG of noise (it does not compress), base64."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (48, 48), os.urandom(48 * 48 * 3)).save(buf, "PNG")
    return json.dumps({"image": b64(buf.getvalue())}).encode()


# --------------------------------------------------------------------------------------------------------
# Read deadlines
# --------------------------------------------------------------------------------------------------------


def test_headers_trickled_past_header_timeout_get_408_and_the_connection_closes(real_server):
    sock = _connect(real_server)
    try:
        t = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        for _ in range(20):  # one header byte every 0.2 s: it never looks idle
            try:
                sock.sendall(b"X")
            except OSError:
                break
            time.sleep(0.2)
            if time.monotonic() - t > 1.5:
                break
        status, headers, body = _response(sock)
        detail = _assert_problem(status, headers, body, 408)
        assert "HEADER_TIMEOUT" in detail
        assert time.monotonic() - t < 3.5  # HEADER_TIMEOUT (1 s) and the loop's once-a-second check
    finally:
        sock.close()


def test_a_connection_that_sends_nothing_is_closed_after_header_timeout(real_server):
    sock = _connect(real_server)
    try:
        assert _closed_within(sock, 5) < 3.5  # without a word: there was no request to answer
    finally:
        sock.close()


def test_a_kept_alive_connection_may_wait_before_its_next_request(real_server):
    """On a kept-alive connection the next request's headers are due from its first byte: idle time
    between requests is CHANNEL_TIMEOUT's (60 s), not HEADER_TIMEOUT's (1 s here)."""
    host, port = real_server.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        ports = []
        for i in range(2):
            if i:
                time.sleep(1.6)  # idle for longer than HEADER_TIMEOUT and one check of the loop
            conn.request("GET", "/health")
            res = conn.getresponse()  # RemoteDisconnected if the idle connection had been closed
            assert res.status == 200 and res.read()
            ports.append(conn.sock.getsockname()[1])
        assert ports[0] == ports[1]  # the same connection
    finally:
        conn.close()


def test_a_body_trickled_below_min_rate_gets_408(real_server):
    """One body byte every 0.25 s (4 bytes/s, MIN_RATE_BPS is 1000): each byte resets waitress's idle
    timer, but not the body's deadline of BODY_TIMEOUT (1 s) plus one second per 1000 bytes."""
    sock = _connect(real_server)
    try:
        sock.sendall(_post_head(real_server, 1000))
        t = time.monotonic()
        while time.monotonic() - t < 4:
            try:
                sock.sendall(b" ")
            except OSError:
                break
            time.sleep(0.25)
            sock.settimeout(0.01)
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break  # the answer has come
            except (socket.timeout, BlockingIOError):
                pass
            finally:
                sock.settimeout(10)
        status, headers, body = _response(sock)
        detail = _assert_problem(status, headers, body, 408)
        assert "BODY_TIMEOUT" in detail and "MIN_RATE_BPS" in detail
        assert time.monotonic() - t < 3.5
    finally:
        sock.close()


def test_a_slow_upload_that_keeps_coming_passes(real_server):
    """A body arriving steadily over 2.5 s (about 3.6 KB/s), past BODY_TIMEOUT (1 s) but above MIN_RATE_BPS
    (1000 bytes/s): stored."""
    body = _image_body()
    sock = _connect(real_server)
    try:
        sock.sendall(_post_head(real_server, len(body)))
        piece = max(1, len(body) // 10)
        for i in range(0, len(body), piece):
            sock.sendall(body[i:i + piece])
            time.sleep(0.25)
        status, _, created = _response(sock)
        assert status == 200, created
        assert created["id"] >= 1
    finally:
        sock.close()


# --------------------------------------------------------------------------------------------------------
# The body budget
# --------------------------------------------------------------------------------------------------------


def _accepted(server, length: int, deadline: float = 3) -> socket.socket:
    """A connection whose `length`-byte body the server is waiting for (budget free again after the last
    test's connections closed: the server sees a close on its next loop turn)."""
    end = time.monotonic() + deadline
    while True:
        sock = _connect(server)
        sock.sendall(_post_head(server, length))
        sock.settimeout(0.3)
        try:
            sock.recv(1, socket.MSG_PEEK)  # an answer before the body: refused
        except socket.timeout:
            sock.settimeout(10)
            return sock
        sock.close()
        if time.monotonic() > end:
            pytest.fail(f"a {length}-byte body was still refused after {deadline} s")


def test_bodies_past_body_buffer_mb_get_503_with_retry_after(real_server):
    first = _accepted(real_server, int(1.5 * MB))
    try:
        first.sendall(b" " * (MB // 2))  # half of it: 1.5 MB of the 2 MB budget stay taken
        second = _connect(real_server)
        try:
            second.sendall(_post_head(real_server, MB))
            status, headers, body = _response(second)
            detail = _assert_problem(status, headers, body, 503)
            assert "BODY_BUFFER_MB" in detail and int(headers["retry-after"]) > 0
        finally:
            second.close()
    finally:
        first.close()  # half sent, then gone: its 1.5 MB come back
    third = _accepted(real_server, int(1.5 * MB))
    third.close()


def test_a_body_larger_than_the_whole_budget_is_413(real_server):
    sock = _connect(real_server)
    try:
        sock.sendall(_post_head(real_server, 3 * MB))
        detail = _assert_problem(*_response(sock), 413)
        assert "BODY_BUFFER_MB" in detail
    finally:
        sock.close()


def _temp_bytes(server) -> int:
    """Bytes in the files the server holds open in its TMPDIR (waitress's spooled bodies: unlinked at once)."""
    total, fds = 0, f"/proc/{server.pid}/fd"
    for fd in os.listdir(fds):
        try:
            if os.readlink(f"{fds}/{fd}").startswith(server.tmpdir):
                total += os.stat(f"{fds}/{fd}").st_size
        except OSError:
            pass  # closed meanwhile
    return total


def test_announced_bodies_sent_all_but_their_last_byte_hold_at_most_the_budget(real_server):
    """Issue 10's attack, small: 8 connections announce 1 MB each and send all but the last byte. Two fit
    the 2 MB budget; the others get 503 at once. The temporary files stay within the budget."""
    if not os.path.isdir(f"/proc/{real_server.pid}/fd"):
        pytest.skip("counting the server's temporary files needs Linux /proc")
    socks = [_accepted(real_server, MB)]  # the budget is free again; then the rest at once
    try:
        for _ in range(7):
            socks.append(_connect(real_server))
            socks[-1].sendall(_post_head(real_server, MB))
        for s in socks:
            try:
                s.sendall(b" " * (MB - 1))
            except OSError:
                pass  # refused and read to the end of what it announced: fine
        refused = 0
        for s in socks:
            s.settimeout(0.5)
            try:
                status, _, _ = _response(s)
                refused += status == 503
            except (socket.timeout, OSError):
                pass  # accepted: waiting for the last byte
        held = 0
        end = time.monotonic() + 5
        while time.monotonic() < end and held < 2 * (MB - 1):
            held = max(held, _temp_bytes(real_server))
            time.sleep(0.05)
        assert refused == 6, refused
        assert 2 * (MB - 1) <= held <= 2 * MB, held
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------------------------------------
# Lingering close
# --------------------------------------------------------------------------------------------------------


def test_urllib_sees_the_413_for_a_body_over_the_limit(real_server):
    """urllib sends the whole body before it reads: without a lingering close it got "Connection reset
    by peer" (or a broken pipe) instead of the 413 that the server had answered."""
    host, port = real_server.address
    body = b"A" * (30 * MB)  # over the 28 MB body limit (MAX_IMAGE_BYTES' 20 MB as base64, plus room)
    req = urllib.request.Request(f"http://{host}:{port}/images", body, {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=20)
    assert e.value.code == 413 and e.value.headers["Content-Type"] == "application/problem+json"
    assert "MAX_IMAGE_BYTES" in json.load(e.value)["detail"]


def test_urllib_sees_the_503_when_the_budget_is_spent(real_server):
    host, port = real_server.address
    holder = _accepted(real_server, int(1.5 * MB))
    try:
        req = urllib.request.Request(f"http://{host}:{port}/images", b" " * MB, {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=20)
        assert e.value.code == 503 and e.value.headers["Retry-After"]
    finally:
        holder.close()


def test_an_announcement_past_the_lingering_bound_is_cut_off_at_once(real_server):
    """Reading and dropping is bounded (4 times the body limit, about 112 MB): a client announcing 1 GB
    gets its 413 and the connection closes without the server reading the gigabyte."""
    sock = _connect(real_server)
    sent = 0
    try:
        sock.sendall(_post_head(real_server, 1 << 30))
        _assert_problem(*_response(sock), 413)
        piece = b"A" * MB
        try:
            while sent < 300 * MB:
                sock.sendall(piece)
                sent += len(piece)
        except OSError:
            pass  # the server hung up
    finally:
        sock.close()
    assert sent < 100 * MB, sent
