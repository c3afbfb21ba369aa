"""SIGTERM stops the real process gracefully: it stops accepting, lets the requests in flight finish,
then stops the jobs, within STOP_GRACE + 2 s (10 s by default: Docker's stop grace). Issue 10."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import urllib.parse
import urllib.request

from test_server import start_server, stop_server

from helpers import jpeg
from loopback import Loopback, respond

JPEG = jpeg()


def _held_image(release: threading.Event, arrived: list) -> Loopback:
    """An image host whose answers wait until `release` is set (or it closes)."""

    def route(h):
        arrived.append(h.path)
        while not release.wait(0.05):
            if h.server.stopping.is_set():
                return
        respond(h, 200, JPEG, "image/jpeg")

    return Loopback({"/held.jpg": route})


def _post_url(base: str, url: str, results: list) -> None:
    body = json.dumps({"url": url}).encode()
    req = urllib.request.Request(base + "/images", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            results.append(res.status)
    except Exception as e:  # noqa: BLE001 - what a client sees is the result
        results.append(repr(e))


def _refused(base: str) -> bool:
    parts = urllib.parse.urlsplit(base)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=1).close()
    except OSError:
        return True
    return False


def _wait_for(condition, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def test_sigterm_lets_requests_in_flight_finish(tmp_path):
    """3 clients wait for URL downloads when SIGTERM comes: the server stops accepting at once, the 3
    get their 200 once the downloads finish, and it exits 0 without a traceback in its log."""
    release, arrived, results = threading.Event(), [], []
    with _held_image(release, arrived) as host:
        proc, base, _ = start_server(tmp_path, "--model", str(tmp_path / "none.tflite"), env={"ALLOW_PRIVATE_URLS": "1", "DOWNLOAD_SLOTS": "3"})
        clients = [threading.Thread(target=_post_url, args=(base, host.url("/held.jpg"), results)) for _ in range(3)]
        try:
            for c in clients:
                c.start()
            assert _wait_for(lambda: len(arrived) == 3, 10), arrived
            proc.send_signal(signal.SIGTERM)
            t = time.monotonic()
            assert _wait_for(lambda: _refused(base), 3), "the server still accepts connections after SIGTERM"
            release.set()
            for c in clients:
                c.join(15)
            proc.wait(10)
            took = time.monotonic() - t
        finally:
            release.set()
            err = stop_server(proc)
    assert results == [200, 200, 200], results
    assert proc.returncode == 0 and took < 10, (proc.returncode, took)
    assert "Traceback" not in err and "EBADF" not in err and "Bad file descriptor" not in err, err


def test_sigterm_with_a_request_stuck_stops_within_stop_grace(tmp_path):
    """A download that never finishes (within FETCH_TIMEOUT) cannot hold the stop: after STOP_GRACE (1 s
    here) the server stops anyway, within STOP_GRACE + 2 s, and says so."""
    release, arrived, results = threading.Event(), [], []
    with _held_image(release, arrived) as host:
        proc, base, _ = start_server(
            tmp_path, "--model", str(tmp_path / "none.tflite"), env={"ALLOW_PRIVATE_URLS": "1", "STOP_GRACE": "1"},
        )
        client = threading.Thread(target=_post_url, args=(base, host.url("/held.jpg"), results))
        try:
            client.start()
            assert _wait_for(lambda: len(arrived) == 1, 10), arrived
            t = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
            took = time.monotonic() - t
        finally:
            release.set()
            err = stop_server(proc)
            client.join(15)
    assert proc.returncode == 0 and took < 1 + 2 + 1, took  # a second more for a loaded machine
    assert "unfinished after STOP_GRACE" in err, err
    assert "Traceback" not in err, err
