"""Upload jobs bounded under attack (issue 10): what finished jobs hold, and what a job logs.

The attack: jobs of 1,000 blocked 2 KB URLs. With ALLOW_PRIVATE_URLS off a 10.x URL fails at once,
without any server; the fake Imgur is there only because jobs need Imgur configured (nothing reaches it).
"""

import gc
import logging
import sys
import threading
import time
import tracemalloc
import urllib.parse

import pytest

import fetch
import imgur
import jobs
from fake_imgur import FakeImgur
from helpers import assert_problem
from loopback import Loopback


@pytest.fixture
def fake():
    with FakeImgur() as f:
        yield f


def uploader(fake):
    return imgur.ImgurClient(client_id=fake.client_id, api_url=fake.url)


def long_urls(tag, n, host="10.0.0.1", length=2000):
    """`n` distinct URLs of `length` characters on `host`."""
    urls = []
    for i in range(n):
        base = f"http://{host}/{tag}/{i}/"
        urls.append(base + "a" * (length - len(base)))
    return urls


def submit(service, urls, status=202):
    return service.client.post_json("/v1/images/upload", {"urls": urls}, status=status).json["jobId"]


def answered(service, job_id) -> int:
    return service.client.get(f"/v1/images/upload/{job_id}", expect_errors=True).status_int


# --------------------------------------------------------------------------------------------------------
# What finished jobs hold
# --------------------------------------------------------------------------------------------------------


def test_finished_jobs_beyond_jobs_kept_mb_are_forgotten_oldest_first(make_service, fake):
    # A job of 10 blocked 2 KB URLs holds about 22 KB: two fit in 0.05 MB (52 KB), three do not.
    service = make_service(uploader=uploader(fake), upload_workers=0, allow_private_urls=False, jobs_kept_mb=0.05)
    ids = [submit(service, long_urls(n, 10)) for n in range(4)]
    assert_problem(service.client.get(f"/v1/images/upload/{ids[0]}", status=404), 404)
    assert_problem(service.client.get(f"/v1/images/upload/{ids[1]}", status=404), 404)
    for job_id in ids[2:]:
        view = service.client.get(f"/v1/images/upload/{job_id}").json
        assert view["status"] == "complete" and len(view["uploaded"]["failed"]) == 10
    kept, held = service.jobs.kept()
    assert kept == 2 and 2 * 10 * 2000 < held <= 0.05 * 1024 * 1024
    assert service.jobs.stats() == {"jobs": 2, "backlog": 0, "running": 0}
    assert fake.uploads == []


def test_a_running_job_is_never_forgotten(make_service, fake):
    entered, gate = threading.Event(), threading.Event()

    def connect(address, timeout):  # 10.9.9.9 holds its worker until the gate opens; the rest refuse
        if address[0] == "10.9.9.9":
            entered.set()
            gate.wait(10)
        raise ConnectionRefusedError(111, "Connection refused")

    # 0.001 MB is less than any job: only the newest finished job is kept.
    service = make_service(uploader=uploader(fake), upload_workers=2, connect=connect, jobs_kept_mb=0.001)
    try:
        held = submit(service, ["http://10.9.9.9/held.jpg"])
        assert entered.wait(10)
        older, newer = submit(service, long_urls("b", 3)), submit(service, long_urls("c", 3))
        assert service.jobs.wait(older, 10) and service.jobs.wait(newer, 10)
        assert (answered(service, older), answered(service, newer)) == (404, 200)
        assert service.client.get(f"/v1/images/upload/{held}").json["status"] == "in-progress"
    finally:
        gate.set()
    assert service.jobs.wait(held, 10)
    assert service.client.get(f"/v1/images/upload/{held}").json["status"] == "complete"
    assert answered(service, newer) == 404  # the held job finished last: it is the newest now
    assert service.jobs.kept()[0] == 1


def traced_bytes(run) -> int:
    """Bytes that jobs.py allocated during run() and still holds after it (urllib's own bounded caches,
    filled while fetch.py checks a URL, and tracemalloc's own work are left out)."""
    gc.collect()
    only_jobs = [
        tracemalloc.Filter(True, jobs.__file__, all_frames=True),
        tracemalloc.Filter(False, fetch.__file__, all_frames=True),
        tracemalloc.Filter(False, urllib.parse.__file__, all_frames=True),
    ]
    tracemalloc.start(8)  # deep enough to see jobs.py under uuid and str.replace; tracing slows fetch 10x
    try:
        before = tracemalloc.take_snapshot().filter_traces(only_jobs)
        run()
        gc.collect()
        after = tracemalloc.take_snapshot().filter_traces(only_jobs)
    finally:
        tracemalloc.stop()
    return sum(stat.size_diff for stat in after.compare_to(before, "filename"))


@pytest.mark.parametrize("hosts", [1, 20])
def test_a_failed_item_holds_its_url_once_and_the_size_counted_is_what_it_holds(make_service, fake, caplog, hosts):
    caplog.set_level(logging.CRITICAL)  # no log records kept: only what the job holds is measured
    service = make_service(uploader=uploader(fake), upload_workers=0, allow_private_urls=False)
    service.jobs.submit(service.jobs.check(long_urls("warm", 5)))  # a first job: the dicts it grows
    urls = [u for h in range(hosts) for u in long_urls("m", 40 // hosts, host=f"10.0.{h}.1")]
    checked = service.jobs.check(urls)
    made = []
    held = traced_bytes(lambda: made.append(service.jobs.submit(checked)))
    (job,) = made
    assert job.finished is not None and {i.status for i in job.items} == {jobs.FAILED}
    # Beyond the URLs themselves (made before tracing): one copy of each distinct reason (the items that
    # failed alike share it; it is not a second copy of their 2 KB URL), and about 100 bytes per item.
    reasons = sum(sys.getsizeof(r) for r in {id(i.error): i.error for i in job.items}.values())
    assert (held - reasons) / len(urls) < 150, (held, reasons)
    assert len({id(i.error) for i in job.items}) == hosts
    # JOBS_KEPT_MB counts what the job really holds (its URLs included).
    counted = job.size - sum(sys.getsizeof(u) for u in urls)
    assert 0.85 * held <= counted <= 1.15 * held, (counted, held)


def test_a_queued_url_costs_little_more_than_its_item(make_service, fake):
    gate = threading.Event()

    def connect(address, timeout):  # every worker held until the gate opens
        gate.wait(10)
        raise ConnectionRefusedError(111, "Connection refused")

    service = make_service(uploader=uploader(fake), upload_workers=2, connect=connect, job_max_urls=500)
    try:
        urls = service.jobs.check([f"http://10.0.0.1/{n}.jpg" for n in range(500)])
        held = traced_bytes(lambda: service.jobs.submit(urls))
    finally:
        gate.set()
    # Its Item and a share of the job; not a Future (with its Condition and lock) for each URL waiting.
    assert held / len(urls) < 300, held / len(urls)
    assert service.jobs.wait(timeout=30)


def test_the_api_still_shows_each_reason_whole_with_its_url(make_service, fake):
    service = make_service(uploader=uploader(fake), upload_workers=0, allow_private_urls=False)
    (url,) = long_urls("api", 1)
    with pytest.raises(fetch.BlockedAddress) as raised:
        service.fetcher.fetch(url)
    job_id = submit(service, [url])
    (item,) = service.client.get(f"/v1/images/upload/{job_id}").json["items"]
    assert item == {"url": url, "status": "failed", "link": None, "deletehash": None, "error": str(raised.value)}
    assert url in item["error"]


def test_a_reason_is_stored_cut_to_a_bound(make_service, fake):
    def long_phrase(h):  # a 404 whose reason phrase is 3,000 characters: the reason quotes it
        h.send_response(404, "x" * 3000)
        h.send_header("Content-Length", "0")
        h.end_headers()

    with Loopback({"/p.jpg": long_phrase}) as host:
        service = make_service(uploader=uploader(fake), upload_workers=0)
        url = host.url("/p.jpg")
        job_id = submit(service, [url])
        (item,) = service.client.get(f"/v1/images/upload/{job_id}").json["items"]
    assert item["error"].startswith("The server answered 404 xxx") and item["error"].endswith("...")
    assert len(item["error"]) == jobs.REASON_CHARS  # the phrase was cut before the URL it is followed by


# --------------------------------------------------------------------------------------------------------
# What a job logs
# --------------------------------------------------------------------------------------------------------


def test_failures_are_logged_once_per_kind_with_a_summary_and_urls_cut(make_service, fake, caplog):
    service = make_service(uploader=uploader(fake), upload_workers=0, allow_private_urls=False, now=lambda: 1e9)
    caplog.set_level(logging.DEBUG)
    first = long_urls("x", 50) + long_urls("y", 3, host="10.0.0.2")
    ids = [submit(service, first), submit(service, long_urls("z", 5))]

    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.name, r.getMessage().split(":")[0]) for r in warnings] == [
        ("jobs", f"job {ids[0]}"), ("jobs", f"job {ids[0]}"), ("jobs", f"job {ids[1]}")
    ]
    cut = fetch.for_log(first[0])
    assert len(cut) == 200 and cut.endswith("...")
    assert f"{cut} failed: Refusing to fetch {cut}: the address 10.0.0.1 is not" in warnings[0].getMessage()
    assert "10.0.0.2" in warnings[1].getMessage()
    summaries = [r.getMessage() for r in caplog.records if r.name == "jobs" and " complete: " in r.getMessage()]
    assert summaries == [
        f"job {ids[0]} complete: 0 uploaded, 53 failed, 0.0 s; failed: 50 x BlockedAddress (host 10.0.0.1), "
        "3 x BlockedAddress (host 10.0.0.2)",
        f"job {ids[1]} complete: 0 uploaded, 5 failed, 0.0 s; failed: 5 x BlockedAddress (host 10.0.0.1)",
    ]
    # Each blocked URL is still told at DEBUG, cut too; nothing from fetch at INFO or above.
    assert len([r for r in caplog.records if r.name == "fetch" and r.levelno == logging.DEBUG]) == 58
    assert not [r for r in caplog.records if r.name == "fetch" and r.levelno >= logging.INFO]
    for record in caplog.records:
        message = record.getMessage()
        assert len(message) < 800 and not any(u in message for u in first), message[:300]
    info_bytes = sum(len(r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO)
    assert info_bytes < 2500  # 58 failed URLs of 2 KB; before: 58 x 4.3 KB of warnings alone


def test_kinds_of_failure_logged_per_job_are_bounded(make_service, fake, caplog):
    hosts = [f"host-{n}.example" for n in range(25)]
    service = make_service(
        uploader=uploader(fake), upload_workers=0, allow_private_urls=False, resolve=lambda host, port: ["10.0.0.1"]
    )
    caplog.set_level(logging.INFO)
    job_id = submit(service, [u for h in hosts for u in long_urls("k", 2, host=h)])
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == jobs.LOGGED_KINDS
    assert all(m.startswith(f"job {job_id}: ") for m in warnings)
    (summary,) = [r.getMessage() for r in caplog.records if " complete: " in r.getMessage()]
    assert summary.endswith(f", {2 * (25 - jobs.LOGGED_KINDS)} x {25 - jobs.LOGGED_KINDS} other kinds")
    assert summary.count(" x BlockedAddress (host host-") == jobs.LOGGED_KINDS and len(summary) < 800


def test_the_summary_counts_urls_a_shutdown_failed(make_service, fake, caplog):
    entered, gate = threading.Event(), threading.Event()

    def connect(address, timeout):
        entered.set()
        gate.wait(10)
        raise ConnectionRefusedError(111, "Connection refused")

    service = make_service(uploader=uploader(fake), upload_workers=1, connect=connect, now=lambda: 1e9)
    caplog.set_level(logging.INFO, logger="jobs")
    job_id = submit(service, ["http://10.9.9.9/held.jpg"] + long_urls("s", 3, host="10.9.9.8"))
    assert entered.wait(10)
    closing = threading.Thread(target=service.jobs.close, kwargs={"timeout": 10})
    closing.start()
    try:
        deadline = time.monotonic() + 10
        while service.jobs.get(job_id).items[-1].status != jobs.FAILED:  # close() fails the URLs not started
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        gate.set()
        closing.join(10)
    (summary,) = [r.getMessage() for r in caplog.records if " complete: " in r.getMessage()]
    assert summary == (
        f"job {job_id} complete: 0 uploaded, 4 failed, 0.0 s; failed: 1 x Unreachable (host 10.9.9.9), "
        "3 x not started (the service shut down)"
    )
