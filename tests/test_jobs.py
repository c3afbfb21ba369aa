"""Imgur upload jobs: the API, jobs.py and imgur.py against a fake Imgur and an image host on loopback."""

import logging
import re
import threading

import pytest

import imgur
from fake_imgur import OVER_CAPACITY, FakeImgur, answer
from helpers import ISO_MS, assert_problem  # noqa: E402
from loopback import Loopback, drip, ok, status


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, t: float = 1514047709.123):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Sleeps:
    """Records the waits imgur.py asks for instead of waiting (it moves the clock along)."""

    def __init__(self, clock: Clock | None = None):
        self.calls: list[float] = []
        self.clock = clock

    def __call__(self, seconds: float) -> None:
        self.calls.append(round(seconds, 3))
        if self.clock:
            self.clock.t += seconds


@pytest.fixture
def fake():
    with FakeImgur() as f:
        yield f


@pytest.fixture
def gate():
    return threading.Event()


@pytest.fixture
def host(photo, gate):
    """Image host: real photos, errors, a gated URL that waits until the test opens the gate."""

    def gated(h):
        gate.wait(10)
        ok(photo("cat.bmp"), "image/bmp")(h)

    routes = {
        "/pets.jpg": ok(photo("pets.jpg"), "image/jpeg"),
        "/cat.bmp": ok(photo("cat.bmp"), "image/bmp"),
        "/gated.bmp": gated,
        "/missing.jpg": status(404),
        "/page.html": ok(b"<html>hi</html>", "text/html"),
        "/liar.jpg": ok(b"<html>this is not a jpeg</html>", "image/jpeg"),
        "/slow.jpg": drip(1000, 0.2),
        "/huge.jpg": ok(photo("kite_and_cold.jpg"), "image/jpeg"),
    }
    routes.update({f"/n/{i}.jpg": ok(photo("pets.jpg") + str(i).encode(), "image/jpeg") for i in range(200)})
    with Loopback(routes) as srv:
        yield srv
    gate.set()


def client(fake, **kw):
    kw.setdefault("sleep", Sleeps())
    return imgur.ImgurClient(client_id=fake.client_id, api_url=fake.url, **kw)


def account(fake, **kw):
    return client(fake, client_secret=fake.client_secret, refresh_token=fake.refresh_token, **kw)


def submit(service, urls, status=202):
    return service.client.post_json("/v1/images/upload", {"urls": urls}, status=status)





# --------------------------------------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------------------------------------


def test_job_life_pending_in_progress_complete(make_service, fake, host, gate, photo):
    clock = Clock()
    service = make_service(uploader=client(fake), now=clock, upload_workers=1)
    first = submit(service, [host.url("/gated.bmp")])
    assert first.headers["Location"] == f"/v1/images/upload/{first.json['jobId']}"
    second = submit(service, [host.url("/pets.jpg"), host.url("/missing.jpg"), host.url("/pets.jpg")])
    job_id = second.json["jobId"]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", job_id)

    # The only worker is held by the first job: the second has not started.
    view = service.client.get(f"/v1/images/upload/{job_id}").json
    assert view["status"] == "pending" and view["finished"] is None
    assert view["created"] == "2017-12-23T16:48:29.123Z" and ISO_MS.match(view["created"])
    assert view["uploaded"] == {"pending": [host.url("/pets.jpg"), host.url("/missing.jpg")], "complete": [], "failed": []}
    assert service.client.get(f"/v1/images/upload/{first.json['jobId']}").json["status"] == "in-progress"

    clock.t += 2.5
    gate.set()
    assert service.jobs.wait(timeout=30)
    view = service.client.get(f"/v1/images/upload/{job_id}").json
    assert view["status"] == "complete" and view["finished"] == "2017-12-23T16:48:31.623Z"
    assert view["uploaded"]["pending"] == [] and view["uploaded"]["failed"] == [host.url("/missing.jpg")]
    (link,) = view["uploaded"]["complete"]
    assert re.fullmatch(r"https://i\.imgur\.com/img\d+\.jpg", link)
    items = {i["url"]: i for i in view["items"]}
    assert items[host.url("/pets.jpg")]["link"] == link and items[host.url("/pets.jpg")]["deletehash"].startswith("del")
    assert "404" in items[host.url("/missing.jpg")]["error"] and items[host.url("/missing.jpg")]["link"] is None
    # Re-upload, not upload-by-link: Imgur received exactly the source bytes, as a file part.
    assert sorted(fake.received, key=len) == sorted([photo("cat.bmp"), photo("pets.jpg")], key=len)
    assert all(u["fields"]["type"] == "file" and u["auth"] == "Client-ID test-client" for u in fake.uploads)
    assert set(service.client.get("/v1/images").json["uploaded"]) == {link} | set(
        service.client.get(f"/v1/images/upload/{first.json['jobId']}").json["uploaded"]["complete"]
    )


def test_two_hundred_urls_in_three_jobs_each_end_in_exactly_one_list(make_service, fake, host):
    service = make_service(uploader=client(fake), upload_workers=4)
    urls = [host.url(f"/n/{i}.jpg") for i in range(200)]
    urls[7] = host.url("/missing.jpg")
    urls[150] = host.url("/page.html")
    batches = [urls[:50], urls[50:120], urls[120:]]
    ids = [submit(service, b).json["jobId"] for b in batches]
    assert service.jobs.wait(timeout=60)
    links = []
    for job_id, batch in zip(ids, batches, strict=True):
        view = service.client.get(f"/v1/images/upload/{job_id}").json
        lists = view["uploaded"]
        assert view["status"] == "complete" and lists["pending"] == []
        assert len(lists["complete"]) + len(lists["failed"]) == len(batch)
        assert set(lists["failed"]) <= set(batch) and not set(lists["failed"]) & set(lists["complete"])
        links += lists["complete"]
    assert len(links) == len(set(links)) == 198
    assert sorted(service.client.get("/v1/images").json["uploaded"]) == sorted(links)
    assert len(fake.received) == 198


def test_duplicates_are_stripped_keeping_the_first(make_service, fake, host):
    service = make_service(uploader=client(fake), upload_workers=0)
    a, b = host.url("/pets.jpg"), host.url("/cat.bmp")
    job_id = submit(service, [a, b, a, " " + b]).json["jobId"]
    assert [i["url"] for i in service.client.get(f"/v1/images/upload/{job_id}").json["items"]] == [a, b]


@pytest.mark.parametrize(
    "body, words",
    [
        ({}, "urls"),
        ({"urls": []}, "empty"),
        ({"urls": "https://example.com/a.jpg"}, "array"),
        ({"urls": [1, {"u": 2}, None]}, "line 1 is a number, not a URL; lines 2, 3"),
        ({"urls": ["ftp://example.com/a.jpg", "https://example.com/ok.jpg", "not a url"]}, "; line 3 cannot"),
        ({"urls": ["https://example.com/a.jpg"], "priority": 1}, "unknown field"),
        ({"urls": [f"https://example.com/{i}.jpg" for i in range(1001)]}, "at most 1,000"),
        ({"urls": ["https://example.com/a.jpg"] * 1500 + ["ftp://example.com/b.jpg"]}, "line 1501 (ftp://"),
        ({"urls": ["https://example.com/a.jpg"] * 1500 + [5]}, "line 1501 is a number"),
        ({"urls": ["https://example.com/a.jpg"] * 10_001}, "10,001 entries"),
    ],
)
def test_bad_batches_are_400_and_queue_nothing(make_service, fake, body, words):
    service = make_service(uploader=client(fake))
    res = service.client.post_json("/v1/images/upload", body, status=400)
    assert words in assert_problem(res, 400, ("errors",) if "line " in words else ())
    assert service.jobs.stats() == {"jobs": 0, "backlog": 0, "running": 0}


def test_bad_bodies(make_service, fake):
    service = make_service(uploader=client(fake))
    for raw in (b"{oops", b"null", b"[]", b"[" * 100_000):
        assert_problem(service.client.post("/v1/images/upload", raw, content_type="application/json", status=400), 400)
    assert_problem(service.client.post("/v1/images/upload", b"urls=x", content_type="text/plain", status=415), 415)


def test_not_configured_is_503(service):
    detail = assert_problem(submit(service, ["https://example.com/a.jpg"], status=503), 503)
    assert "IMGUR_CLIENT_ID" in detail
    assert service.client.get("/v1/images").json == {"uploaded": []}


def test_unknown_job_is_404(service):
    assert_problem(service.client.get("/v1/images/upload/nope", status=404), 404)
    assert_problem(service.client.get("/v1/images/upload/3fa85f64-5717-4562-b3fc-2c963f66afa6", status=404), 404)


def test_backlog_full_is_503_with_retry_after(make_service, fake, host, gate):
    service = make_service(uploader=client(fake), upload_workers=1, upload_backlog=3)
    submit(service, [host.url("/gated.bmp"), host.url("/pets.jpg")])
    res = submit(service, [host.url("/cat.bmp"), host.url("/n/1.jpg")], status=503)
    assert "waiting" in assert_problem(res, 503) and int(res.headers["Retry-After"]) >= 1
    submit(service, [host.url("/cat.bmp")])  # one more still fits
    gate.set()
    assert service.jobs.wait(timeout=30)
    submit(service, [host.url("/cat.bmp"), host.url("/n/1.jpg")])  # drained: accepted again


def test_finished_jobs_beyond_the_bound_are_forgotten_oldest_first(make_service, fake, host):
    service = make_service(uploader=client(fake), upload_workers=0, jobs_kept=2)
    ids = [submit(service, [host.url("/pets.jpg")]).json["jobId"] for _ in range(3)]
    assert_problem(service.client.get(f"/v1/images/upload/{ids[0]}", status=404), 404)
    for job_id in ids[1:]:
        assert service.client.get(f"/v1/images/upload/{job_id}").json["status"] == "complete"
    assert len(service.client.get("/v1/images").json["uploaded"]) == 3  # the links stay


def test_submit_returns_before_any_download(make_service, fake, host, gate):
    service = make_service(uploader=client(fake), upload_workers=2)
    before = sum(host.hits.values())
    res = submit(service, [host.url("/gated.bmp")])
    assert res.status_int == 202  # answered although the download cannot finish until the gate opens
    gate.set()
    assert service.jobs.wait(timeout=30) and sum(host.hits.values()) == before + 1


def test_a_big_job_does_not_starve_a_small_one(make_service, fake, host, gate):
    service = make_service(uploader=client(fake), upload_workers=1)
    big = submit(service, [host.url("/gated.bmp")] + [host.url(f"/n/{i}.jpg") for i in range(20)]).json["jobId"]
    small = submit(service, [host.url("/pets.jpg")]).json["jobId"]
    gate.set()
    assert service.jobs.wait(small, timeout=30)
    view = service.client.get(f"/v1/images/upload/{big}").json
    assert len(view["uploaded"]["pending"]) >= 15  # the small job went second, not last


# --------------------------------------------------------------------------------------------------------
# Failure reasons
# --------------------------------------------------------------------------------------------------------


def test_failures_have_readable_reasons_and_are_logged_once(make_service, fake, host, caplog):
    service = make_service(uploader=client(fake), upload_workers=0, max_image_bytes=1_000_000, fetch_timeout=1.0)
    urls = {
        "/missing.jpg": "404",
        "/page.html": "text/html",
        "/liar.jpg": "not an image Imgur takes",
        "/slow.jpg": "took longer than 1 seconds",
        "/huge.jpg": "at most 1000000 bytes",
    }
    caplog.set_level(logging.INFO, logger="jobs")
    job_id = submit(service, [host.url(p) for p in urls]).json["jobId"]
    view = service.client.get(f"/v1/images/upload/{job_id}").json
    assert view["status"] == "complete" and view["uploaded"]["complete"] == []
    errors = {i["url"]: i["error"] for i in view["items"]}
    for path, words in urls.items():
        assert words in errors[host.url(path)], (path, errors[host.url(path)])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "jobs"]
    assert len(warnings) == len(urls)
    for path in urls:
        (record,) = [r for r in warnings if host.url(path) in r.getMessage()]
        assert job_id in record.getMessage()
    assert any(r.levelno == logging.INFO and "0 uploaded, 5 failed" in r.getMessage() for r in caplog.records)
    assert fake.uploads == []  # nothing bad was sent on


@pytest.mark.parametrize(
    "status_, body, reason",
    [
        (400, answer(400, "Image format not supported, or image is corrupt.")[1], "400 Bad Request: Image format not supported"),
        (400, b'{"errors": [{"id": "x", "code": "400", "status": "Bad Request", "detail": "File is over the size limit"}]}', "File is over the size limit"),
        (413, b'{"data": {"error": {"code": 1003, "message": "File is over the size limit", "type": "ImgurException"}}}', "413 Request Entity Too Large: File is over the size limit"),
        (403, OVER_CAPACITY, "403 Forbidden: Imgur is over capacity"),
        (502, b"<html><title>502 Bad Gateway</title></html>", "502 Bad Gateway: 502 Bad Gateway"),
        (500, b"", "500 Internal Server Error"),
    ],
)
def test_reason_from_every_error_shape(status_, body, reason):
    assert reason in imgur.reason_from(status_, body)


# --------------------------------------------------------------------------------------------------------
# imgur.py: retries, pauses, tokens
# --------------------------------------------------------------------------------------------------------


def test_retries_429_and_5xx_honouring_retry_after(fake, photo):
    sleeps = Sleeps()
    fake.script.extend([answer(429, "Too Many Requests", {"Retry-After": "7"}), answer(500, "oops"), answer(503, "later", {"X-Post-Rate-Limit-Reset": "3"})])
    up = client(fake, sleep=sleeps, rand=lambda: 0.5).upload(photo("pets.jpg"))
    assert up.link.startswith("https://i.imgur.com/") and fake.received == [photo("pets.jpg")]
    assert sleeps.calls == [7.0, 1.5, 3.0]  # Retry-After, backoff 2^1 with jitter, X-Post-Rate-Limit-Reset
    assert len(fake.uploads) == 4


def test_gives_up_after_three_retries(fake, photo):
    sleeps = Sleeps()
    fake.script.extend([answer(500, "oops")] * 4)
    with pytest.raises(imgur.Unavailable, match="gave up after 4 attempts"):
        client(fake, sleep=sleeps, rand=lambda: 0.0).upload(photo("pets.jpg"))
    assert sleeps.calls == [0.5, 1.0, 2.0]  # exponential, jitter between half and all of 2^n
    assert fake.received == []


def test_over_capacity_page_is_retried(fake, photo):
    fake.script.append(answer(403, OVER_CAPACITY))
    assert client(fake).upload(photo("pets.jpg")).link
    assert len(fake.uploads) == 2


@pytest.mark.parametrize("code", [400, 413])
def test_400_and_413_are_not_retried(fake, photo, code):
    fake.script.append(answer(code, "Image format not supported, or image is corrupt."))
    with pytest.raises(imgur.Rejected, match="Image format not supported"):
        client(fake).upload(photo("pets.jpg"))
    assert len(fake.uploads) == 1


def test_connection_errors_are_retried_then_reported(photo):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    sleeps = Sleeps()
    c = imgur.ImgurClient(client_id="x", api_url=f"http://127.0.0.1:{port}", sleep=sleeps)
    with pytest.raises(imgur.Unavailable, match="could not reach Imgur"):
        c.upload(photo("pets.jpg"))
    assert len(sleeps.calls) == 3


def test_a_long_retry_after_fails_the_url_instead_of_holding_a_worker(fake, photo):
    fake.script.append(answer(429, "slow down", {"Retry-After": "3600"}))
    with pytest.raises(imgur.Unavailable, match="wait 3600 s"):
        client(fake).upload(photo("pets.jpg"))


def test_exhausted_credits_pause_uploads_until_the_reset(fake, photo):
    clock = Clock(1_800_000_000.0)
    sleeps = Sleeps(clock)
    c = client(fake, sleep=sleeps, now=clock)
    fake.success_headers = {"X-RateLimit-UserRemaining": "0", "X-RateLimit-UserReset": str(int(clock.t) + 30), "X-RateLimit-ClientRemaining": "900"}
    c.upload(photo("pets.jpg"))
    assert sleeps.calls == [] and len(fake.uploads) == 1
    fake.success_headers = {}
    c.upload(photo("cat.bmp"))
    assert sleeps.calls == [30.0]  # waited for the reset before sending anything
    assert len(fake.uploads) == 2


def test_exhausted_client_credits_far_away_fail_fast(fake, photo):
    clock = Clock(1_800_000_000.0)
    c = client(fake, now=clock, max_pause=600)
    fake.success_headers = {"X-RateLimit-ClientRemaining": "0"}  # no reset sent: assume an hour
    c.upload(photo("pets.jpg"))
    with pytest.raises(imgur.Unavailable, match="credits are used up"):
        c.upload(photo("cat.bmp"))
    assert len(fake.uploads) == 1  # no request burnt


def test_account_uploads_use_a_bearer_token_kept_until_it_expires(fake, photo):
    clock = Clock(1_800_000_000.0)
    c = account(fake, now=clock)
    c.upload(photo("pets.jpg"))
    c.upload(photo("cat.bmp"))
    assert fake.refreshes == 1 and [u["auth"] for u in fake.uploads] == ["Bearer tok-1", "Bearer tok-1"]
    clock.t += 3600
    c.upload(photo("pets.jpg"))
    assert fake.refreshes == 2 and fake.uploads[-1]["auth"] == "Bearer tok-2"


def test_invalid_token_is_refreshed_once_and_retried(fake, photo):
    c = account(fake)
    c.upload(photo("pets.jpg"))
    fake.invalidate_tokens()
    assert c.upload(photo("cat.bmp")).link
    assert fake.refreshes == 2 and [u["auth"] for u in fake.uploads] == ["Bearer tok-1", "Bearer tok-1", "Bearer tok-2"]


def test_a_refresh_token_imgur_refuses_is_a_clear_rejection(fake, photo):
    c = imgur.ImgurClient(client_id=fake.client_id, client_secret="wrong", refresh_token="nope", api_url=fake.url, sleep=Sleeps())
    with pytest.raises(imgur.Rejected, match="IMGUR_REFRESH_TOKEN"):
        c.upload(photo("pets.jpg"))
    assert fake.uploads == []


def test_only_image_bytes_imgur_takes_are_sent(fake):
    c = client(fake)
    for data in (b"<html></html>", b"%PDF-1.7", b"", b"\x00" * 100):
        with pytest.raises(imgur.NotUploadable):
            c.upload(data)
    with pytest.raises(imgur.NotUploadable, match="20,971,520"):
        c.upload(b"\x89PNG\r\n\x1a\n" + b"\x00" * imgur.MAX_STILL_BYTES)
    assert fake.uploads == []
    assert imgur.sniff(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == ("WEBP", "image/webp")


def test_not_configured_without_a_client_id():
    with pytest.raises(imgur.NotConfigured, match="IMGUR_CLIENT_ID"):
        imgur.ImgurClient(client_id="")


# --------------------------------------------------------------------------------------------------------
# Shutdown
# --------------------------------------------------------------------------------------------------------


def upload_threads():
    return [t for t in threading.enumerate() if t.name.startswith("upload")]


def test_close_waits_for_uploads_and_leaves_no_thread(fake, host, make_service):
    service = make_service(uploader=client(fake), upload_workers=4)
    submit(service, [host.url(f"/n/{i}.jpg") for i in range(12)])
    abandoned = service.jobs.close(timeout=30)
    assert upload_threads() == []
    assert abandoned["in_flight"] == 0
    assert abandoned["not_started"] + len(fake.received) == 12
    assert_problem(submit(service, [host.url("/pets.jpg")], status=503), 503)  # closed: no new jobs


def test_close_abandons_a_hung_upload_after_its_deadline_and_says_so(fake, host, gate, make_service, caplog):
    service = make_service(uploader=client(fake), upload_workers=1)
    job_id = submit(service, [host.url("/gated.bmp"), host.url("/pets.jpg")]).json["jobId"]
    abandoned = service.jobs.close(timeout=0.3)
    assert abandoned == {"not_started": 1, "in_flight": 1}
    assert any("abandoned 1 URL(s) not started and 1 upload(s) under way" in r.getMessage() for r in caplog.records)
    view = service.client.get(f"/v1/images/upload/{job_id}").json
    assert view["items"][1]["status"] == "failed" and "shut down" in view["items"][1]["error"]
    assert view["status"] == "in-progress" and view["finished"] is None  # its first URL is still under way
    gate.set()  # the hung download returns; its worker then ends
    for t in upload_threads():
        t.join(10)
    assert upload_threads() == []


def test_a_job_that_never_started_ends_at_shutdown(fake, host, gate, make_service):
    clock = Clock()
    service = make_service(uploader=client(fake), upload_workers=1, now=clock)
    submit(service, [host.url("/gated.bmp")])
    waiting = submit(service, [host.url("/pets.jpg"), host.url("/cat.bmp")]).json["jobId"]
    clock.t += 1
    service.jobs.close(timeout=0.2)
    view = service.client.get(f"/v1/images/upload/{waiting}").json
    assert view["status"] == "complete" and view["finished"] == "2017-12-23T16:48:30.123Z"
    assert view["uploaded"]["failed"] == [host.url("/pets.jpg"), host.url("/cat.bmp")]
    gate.set()


def test_uploads_reuse_one_connection_per_thread(fake, photo):
    c = client(fake)
    for _ in range(3):
        c.upload(photo("pets.jpg"))
    assert fake.server.server.connections_made == 1
    c.close()


def test_a_connection_imgur_dropped_while_idle_is_reopened_without_a_retry(fake, photo):
    sleeps = Sleeps()
    c = client(fake, sleep=sleeps)
    c.upload(photo("pets.jpg"))
    fake.server.server.hang_up()  # Imgur closes the idle keep-alive connection
    assert c.upload(photo("cat.bmp")).link
    assert sleeps.calls == [] and fake.server.server.connections_made == 2 and len(fake.received) == 2
    c.close()


def test_retry_after_follows_how_long_urls_take(make_service, fake, host, gate):
    service = make_service(uploader=client(fake), upload_workers=1, upload_backlog=2)
    submit(service, [host.url("/pets.jpg")])
    assert service.jobs.wait(timeout=30)
    assert service.jobs.seconds_per_url < 1.0  # a quick URL pulled the average down from its start
    service.jobs.seconds_per_url = 10.0  # as if each URL took 10 s (the download deadline)
    submit(service, [host.url("/gated.bmp"), host.url("/cat.bmp")])
    res = submit(service, [host.url(f"/n/{i}.jpg") for i in range(3)], status=503)
    assert res.headers["Retry-After"] == "30"  # 3 URLs over the limit x 10 s / 1 worker
    gate.set()


def test_a_batch_refusal_reads_as_one_sentence(make_service, fake):
    service = make_service(uploader=client(fake))
    res = service.client.post_json("/v1/images/upload", {"urls": ["ftp://example.com/a.jpg", "not a url", 7]}, status=400)
    detail = res.json["detail"]
    assert ".;" not in detail and detail.startswith("line 1 (ftp://example.com/a.jpg) is not an http or https URL (its scheme is 'ftp'); ")
    assert "lines 2, 3 cannot be used either" in detail
