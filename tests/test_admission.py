"""Issue 10, threads: nothing can hold every worker.

Bounded admission for the slow steps (ingest.Gate: URL downloads, detections), reads past waitress's
queue (server._Lanes), the thread layout checked at start, and the real process under dripping URLs.
"""

import collections
import contextlib
import json
import logging
import threading
import time
import types
import urllib.error
import urllib.request

import pytest
import webtest
from test_server import _one_line_failure, _run_server, start_server, stop_server

import ingest
import server
import settings
from helpers import assert_problem, b64, jpeg, wait_for
from loopback import Loopback, drip, ok, respond


class Clock:
    """A clock the test moves by hand: holds that "took" 10 s without waiting 10 s."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t



def refused(gate: ingest.Gate) -> ingest.Busy:
    with pytest.raises(ingest.Busy) as e:
        with gate.enter():
            pass
    return e.value


# --------------------------------------------------------------------------------------------------------
# ingest.Gate
# --------------------------------------------------------------------------------------------------------


def test_a_gate_lets_in_as_many_as_it_has_places_and_refuses_the_next():
    gate = ingest.Gate(2, 0, "busy: try again in {retry} s (SOME_SETTING)")
    with gate.enter(), gate.enter():
        assert gate.in_use == 2
        busy = refused(gate)
        assert busy.retry_after >= 1 and str(busy) == f"busy: try again in {busy.retry_after} s (SOME_SETTING)"
    assert gate.in_use == 0
    with gate.enter():  # the places are free again
        pass


def test_a_caller_waits_for_a_place_and_gets_the_one_that_frees():
    gate = ingest.Gate(1, 30, "busy {retry}")
    inside = threading.Event()

    def second():
        with gate.enter():
            inside.set()

    holder = gate.enter()
    holder.__enter__()
    t = threading.Thread(target=second)
    try:
        t.start()
        wait_for(lambda: gate.waiting == 1)
        assert not inside.is_set()
    finally:
        holder.__exit__(None, None, None)
    assert inside.wait(5)
    t.join(5)
    assert gate.in_use == 0 and gate.waiting == 0


def test_the_wait_ends_in_busy_after_the_admission_wait():
    gate = ingest.Gate(1, 0.05, "busy {retry}")
    with gate.enter():
        start = time.monotonic()
        refused(gate)
        assert 0.05 <= time.monotonic() - start < 5
    assert gate.waiting == 0


def test_retry_after_is_how_long_holds_take_spread_over_the_places_and_a_hopeless_wait_is_skipped():
    clock = Clock()
    gate = ingest.Gate(2, 4, "busy {retry}", clock=clock)
    with gate.enter():
        clock.t += 10  # a hold that took 10 s
    with gate.enter(), gate.enter():
        start = time.monotonic()
        busy = refused(gate)
        # Holds take 10 s and there are 2 places: one frees every 5 s, more than the 4 s wait allowed,
        # so waiting could not help and the caller is refused at once.
        assert busy.retry_after == 5
        assert time.monotonic() - start < 2


def test_before_any_hold_finished_retry_after_is_the_holders_age():
    clock = Clock()
    gate = ingest.Gate(1, 0, "busy {retry}", clock=clock)
    with gate.enter():
        clock.t += 7.2
        assert refused(gate).retry_after == 8
    with gate.enter():
        clock.t += 0.01
        assert refused(gate).retry_after == 8  # the finished hold (7.2 s) is the pace now


def test_refusals_are_logged_at_most_once_a_minute(caplog):
    clock = Clock()
    gate = ingest.Gate(1, 0, "busy, try again in {retry} s", clock=clock)
    with caplog.at_level(logging.WARNING, logger="ingest"), gate.enter():
        for _ in range(50):
            refused(gate)
        clock.t += 61
        refused(gate)
    lines = [r.getMessage() for r in caplog.records if r.name == "ingest"]
    assert len(lines) == 2 and lines[0].startswith("refused 1 ") and lines[1].startswith("refused 50 ")


# --------------------------------------------------------------------------------------------------------
# The gates in POST /images
# --------------------------------------------------------------------------------------------------------


def test_a_url_beyond_the_download_slots_is_a_503_with_retry_after(make_service):
    arrived, release = threading.Event(), threading.Event()

    def held(h):
        arrived.set()
        release.wait(10)
        respond(h, 200, jpeg(), "image/jpeg")

    with Loopback({"/held.jpg": held, "/other.jpg": ok(jpeg((1, 2, 3)), "image/jpeg")}) as host:
        svc = make_service(download_slots=1, admission_wait_ms=50)
        first = []
        t = threading.Thread(target=lambda: first.append(
            webtest.TestApp(svc.wsgi).post_json("/images", {"url": host.url("/held.jpg")}, expect_errors=True)
        ))
        try:
            t.start()
            assert arrived.wait(10)
            res = svc.client.post_json("/images", {"url": host.url("/other.jpg")}, status=503)
            detail = assert_problem(res, 503)
            assert "DOWNLOAD_SLOTS" in detail and int(res.headers["Retry-After"]) >= 1
            assert host.hits["/other.jpg"] == 0 and svc.counts() == (0, 0)  # refused before it was fetched
        finally:
            release.set()
            t.join(10)
        assert first[0].status_int == 200
        svc.client.post_json("/images", {"url": host.url("/other.jpg")}, status=200)  # the slot is free again


def test_a_detection_beyond_the_pool_and_its_queue_is_a_503_and_other_work_goes_on(make_service):
    svc = make_service(detect_queue=1, admission_wait_ms=50)
    gate = svc.parts.ingest.detections
    assert gate.places == svc.detector.pool + 1
    with contextlib.ExitStack() as others:  # detections under way and waiting: every place taken
        for _ in range(gate.places):
            others.enter_context(gate.enter())
        res = svc.client.post_json("/images", {"image": b64(jpeg()), "detect": True}, status=503)
        detail = assert_problem(res, 503)
        assert "DETECT_QUEUE" in detail and "detect=false" in detail and int(res.headers["Retry-After"]) >= 1
        assert svc.counts() == (0, 0)
        svc.client.post_json("/images", {"image": b64(jpeg((5, 5, 5))), "detect": False}, status=200)
    svc.client.post_json("/images", {"image": b64(jpeg()), "detect": True}, status=200)


def test_detections_reused_from_the_database_pass_a_full_detector(make_service):
    svc = make_service(admission_wait_ms=0)
    data = b64(jpeg((40, 80, 120)))
    svc.client.post_json("/images", {"image": data, "detect": True}, status=200)
    gate = svc.parts.ingest.detections
    with contextlib.ExitStack() as others:
        for _ in range(gate.places):
            others.enter_context(gate.enter())
        svc.client.post_json("/images", {"image": data, "detect": True}, status=200)  # same bytes: no detection runs


def test_a_waiting_detection_goes_in_when_a_place_frees(make_service):
    svc = make_service(detect_queue=0, admission_wait_ms=30_000)
    gate = svc.parts.ingest.detections
    answers = []
    t = threading.Thread(target=lambda: answers.append(
        webtest.TestApp(svc.wsgi).post_json("/images", {"image": b64(jpeg()), "detect": True}, expect_errors=True)
    ))
    with contextlib.ExitStack() as others:
        for _ in range(gate.places):
            others.enter_context(gate.enter())
        t.start()
        wait_for(lambda: gate.waiting == 1)
    t.join(30)
    assert answers[0].status_int == 200, answers[0].text


# --------------------------------------------------------------------------------------------------------
# server._Lanes: reads past waitress's queue
# --------------------------------------------------------------------------------------------------------


class Channel:
    """What the dispatcher sees of a waitress channel: its first request, service() and cancel()."""

    def __init__(self, method: str, path: str, block: threading.Event | None = None, order: list | None = None):
        self.requests = [types.SimpleNamespace(command=method, path=path, error=None)]
        self.block = block
        self.order = order if order is not None else []
        self.started = threading.Event()
        self.cancelled = False

    def service(self):
        self.order.append(self)
        self.started.set()
        if self.block is not None:
            self.block.wait(10)

    def cancel(self):
        self.cancelled = True


@pytest.fixture
def lanes():
    made = []

    def make(threads: int) -> server._Lanes:
        made.append(server._Lanes())
        made[-1].set_thread_count(threads)
        return made[-1]

    yield make
    for d in made:
        d.shutdown(timeout=5)


def test_a_read_passes_queued_slow_requests_and_finds_a_thread_kept_for_it(lanes):
    dispatcher = lanes(3)
    release = threading.Event()
    slow = [Channel("POST", "/images", release) for _ in range(4)]
    try:
        for c in slow:
            dispatcher.add_task(c)
        assert slow[0].started.wait(5) and slow[1].started.wait(5)
        read = Channel("GET", "/health")
        dispatcher.add_task(read)
        assert read.started.wait(5), "the read waited behind slow requests"
        assert not slow[2].started.is_set()  # two of the three threads at most for slow work
    finally:
        release.set()
    assert all(c.started.wait(5) for c in slow)


def test_reads_go_first_when_a_thread_frees(lanes):
    dispatcher = lanes(2)
    release, read_block = threading.Event(), threading.Event()
    order = []
    try:
        slow = Channel("POST", "/images", release)
        first_read = Channel("GET", "/images", read_block)
        dispatcher.add_task(slow)
        dispatcher.add_task(first_read)
        assert slow.started.wait(5) and first_read.started.wait(5)  # both threads busy
        queued = [Channel("DELETE", f"/images/{i}", order=order) for i in range(3)]
        for c in queued:
            dispatcher.add_task(c)
        read = Channel("HEAD", "/health", order=order)
        dispatcher.add_task(read)  # queued last
        release.set()  # a thread frees: the read goes before the slow requests queued earlier
        assert all(c.started.wait(5) for c in [read, *queued])
        assert order[0] is read
    finally:
        release.set()
        read_block.set()


def test_shutdown_cancels_what_is_still_queued_in_both_lanes(lanes):
    dispatcher = lanes(1)
    release = threading.Event()
    try:
        dispatcher.add_task(Channel("POST", "/images", release))
        waiting = [Channel("POST", "/images"), Channel("GET", "/health")]
        for c in waiting:
            dispatcher.add_task(c)
    finally:
        release.set()
    dispatcher.shutdown(timeout=5)
    assert all(c.cancelled or c.started.is_set() for c in waiting)


@pytest.mark.parametrize(("method", "path", "read"), [
    ("GET", "/health", True), ("HEAD", "/health", True), ("GET", "/images", True), ("GET", "/images/12/file", True),
    ("GET", "/objects", True), ("GET", "/", True), ("GET", "/static/app.js", True), ("GET", "/openapi.json", True),
    ("GET", "/v1/images/upload/abc", True), ("GET", "/v1/images", True),
    ("POST", "/images", False), ("DELETE", "/images/1", False), ("POST", "/v1/images/upload", False),
    ("GET", "/healthz", False), ("GET", "/imagesx", False), ("POST", "/health", False),
])
def test_which_requests_are_reads(method, path, read):
    assert server.is_read(method, path) is read


# --------------------------------------------------------------------------------------------------------
# The thread layout
# --------------------------------------------------------------------------------------------------------


def test_the_default_thread_count_leaves_threads_beyond_the_slow_work():
    s = settings.load([], {"DETECT_INTERPRETERS": "2"})
    assert s.waitress_threads == 0
    assert server.thread_layout(s, pool=2) == 2 + 2 + 4 + 4  # downloads, interpreters, queue; reads and the rest


def test_a_layout_in_which_slow_work_could_hold_every_thread_is_refused():
    with pytest.raises(settings.SettingError, match=r"WAITRESS_THREADS=9 is too few.*10 or more"):
        server.thread_layout(settings.load([], {"WAITRESS_THREADS": "9"}), pool=2)
    assert server.thread_layout(settings.load([], {"WAITRESS_THREADS": "10"}), pool=2) == 10


def test_a_layout_that_does_not_fit_is_one_line_at_start(tmp_path, model_path):
    result = _run_server(tmp_path, "--model", model_path, env={"WAITRESS_THREADS": "6", "DETECT_INTERPRETERS": "2"})
    line = _one_line_failure(result)
    assert all(name in line for name in ("WAITRESS_THREADS", "DOWNLOAD_SLOTS", "DETECT_QUEUE", "DETECT_INTERPRETERS"))


# --------------------------------------------------------------------------------------------------------
# The real process
# --------------------------------------------------------------------------------------------------------


def test_dripping_urls_hold_their_download_slots_only_and_health_stays_fast(tmp_path, model_path):
    """16 clients POSTing URLs of a host that sends a byte every 0.5 s held every thread before."""
    statuses: collections.Counter = collections.Counter()
    no_retry_after = []
    lock, stop = threading.Lock(), threading.Event()
    with Loopback({"/drip.jpg": drip(10_000_000, 0.5)}) as host:
        proc, base, _ = start_server(tmp_path, "--model", model_path, "--allow-private-urls")
        body = json.dumps({"url": host.url("/drip.jpg")}).encode()

        def client():
            while not stop.is_set():
                req = urllib.request.Request(base + "/images", body, {"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=30) as res:
                        status, retry_after = res.status, None
                except urllib.error.HTTPError as e:
                    status, retry_after = e.code, e.headers.get("Retry-After")
                    e.read()
                with lock:
                    statuses[status] += 1
                    if status == 503 and not (retry_after or "").isdigit():
                        no_retry_after.append(retry_after)
                stop.wait(0.1)

        clients = [threading.Thread(target=client) for _ in range(16)]
        took = []
        try:
            for c in clients:
                c.start()
            wait_for(lambda: host.hits["/drip.jpg"] >= 2 and statuses[503] >= 14, timeout=20)
            for _ in range(10):
                start = time.monotonic()
                with urllib.request.urlopen(base + "/health", timeout=5) as res:
                    assert res.status == 200
                took.append(time.monotonic() - start)
                stop.wait(0.05)
            downloads = host.hits["/drip.jpg"]  # before the end, when waiting clients may take the freed slots
        finally:
            stop.set()
            host.stopping.set()  # the drips end, so the two downloads under way end too
            for c in clients:
                c.join(30)
            stop_server(proc)
    assert downloads == 2  # only the slots' downloads started
    assert max(took) < 1.0, took
    assert not no_retry_after
    others = {s: n for s, n in statuses.items() if s != 503}
    # The rest are downloads that ran (cut short by the host's end: 502), the two slots' and any that took
    # a freed slot at the end.
    assert sum(others.values()) <= host.hits["/drip.jpg"] and 500 not in others, statuses
