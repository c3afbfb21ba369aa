"""GET /metrics (issue 13): the real parts, real requests, and the text read back with prometheus_client's
own parser, so the counts checked are the ones Prometheus would store."""

import os
import re
import shutil
import threading
import urllib.parse
import urllib.request
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_server import start_server, stop_server
from test_slow_senders import MB, _accepted, _connect, _post_head, _response

import detect
import imgur
import metrics
import server
from fake_imgur import FakeImgur, answer
from helpers import assert_problem, jpeg, wait_for
from loopback import Loopback, ok, status

KEY = "metrics-test-key-1234"
SSD = "coco_ssd_mobilenet_v1_1.0_quant_2018_06_29"  # the test model's file stem: its `model` label


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label pairs): value} of an exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(service, **kw) -> dict[tuple[str, tuple], float]:
    res = service.client.get("/metrics", **kw)
    assert res.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(res.text)


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def requests(samples, method: str, route: str, code: int) -> float:
    return value(samples, "imgsvc_http_requests_total", method=method, route=route, status=str(code))


def series(samples, name: str) -> set[tuple]:
    return {labels for (n, labels) in samples if n == name}



@pytest.fixture(scope="module")
def timed(model_path):
    """A Detector of its own (one interpreter) reporting to a DetectionTimes, as build_parts makes it."""
    times = metrics.DetectionTimes()
    d = detect.Detector(model_path, threshold=0.5, threads=1, pool=1, observe=times)
    d.load()
    return d


# --------------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------------


def test_requests_are_counted_by_route_rule_and_status(make_service, photo):
    service = make_service()
    other = make_service()  # a second app in the same process counts apart
    before = scrape(service)
    assert series(before, "imgsvc_http_requests_total") == set()  # a scrape counts once it has answered

    res = service.client.post("/images", {"detect": "true"}, upload_files=[("image", "pets.jpg", photo("pets.jpg"))])
    image = res.json["id"]
    service.client.get(f"/images/{image}")
    service.client.get(f"/images/{image + 1}", status=404)
    service.client.get("/no/such/route", status=404)
    service.client.post("/health", status=405)
    assert_problem(service.client.post("/images", b"hello", content_type="text/plain", status=415), 415)
    after = scrape(service)

    assert requests(after, "POST", "/images", 200) == 1
    assert requests(after, "GET", "/images/<id>", 200) == 1
    assert requests(after, "GET", "/images/<id>", 404) == 1  # the rule, not /images/2
    assert requests(after, "GET", metrics.UNMATCHED, 404) == 1
    assert requests(after, "POST", metrics.UNMATCHED, 405) == 1
    assert requests(after, "POST", "/images", 415) == 1
    assert requests(after, "GET", "/metrics", 200) == 1  # the first scrape
    assert sum(v for (n, _), v in after.items() if n == "imgsvc_http_requests_total") == 7
    assert value(after, "imgsvc_images") == 1
    assert value(after, "imgsvc_database_bytes") >= os.path.getsize(service.settings.db) > 0

    assert series(scrape(other), "imgsvc_http_requests_total") == set()
    assert value(scrape(other), "imgsvc_images") == 0


@pytest.mark.filterwarnings("ignore:Unknown REQUEST_METHOD")  # webtest's lint: the point of the test
def test_a_thousand_random_paths_add_no_series(service):
    service.client.get("/warm-up", status=404)
    service.client.get("/images/warm-up", status=404)
    service.client.request("/images", method="BREW", status=405)
    before = scrape(service)
    for _ in range(1000):
        service.client.get(f"/{uuid.uuid4().hex}/{uuid.uuid4().hex[:6]}", status=404)
        service.client.get(f"/images/{uuid.uuid4().hex}", status=404)
    for method in ("BREW", "PROPFIND", "X" * 40):
        service.client.request("/images", method=method, status="*")
    after = scrape(service)
    new = series(after, "imgsvc_http_requests_total") - series(before, "imgsvc_http_requests_total")
    assert new == {(("method", "GET"), ("route", "/metrics"), ("status", "200"))}  # the first scrape
    assert requests(after, "GET", metrics.UNMATCHED, 404) - requests(before, "GET", metrics.UNMATCHED, 404) == 1000
    assert requests(after, "GET", "/images/<id>", 404) == 1001
    assert requests(after, "other", metrics.UNMATCHED, 405) == 4
    methods = {dict(labels)["method"] for labels in series(after, "imgsvc_http_requests_total")}
    assert methods <= metrics.METHODS | {"other"}
    assert len(after) < 200  # every series of the exposition, process_* included


# --------------------------------------------------------------------------------------------------------
# Detections
# --------------------------------------------------------------------------------------------------------


def test_detection_times_by_model_and_a_second_detector_on_the_same_observer(make_service, timed, photo, tmp_path):
    service = make_service(detector=timed)
    base = scrape(service)
    for name in ("pets.jpg", "cats_and_dogs.jpg"):
        service.client.post("/images", {"detect": "true"}, upload_files=[("image", name, photo(name))])
    service.client.post("/images", {"detect": "false"}, upload_files=[("image", "t.jpg", photo("table.jpg"))])
    service.client.post("/images", {"detect": "true"}, upload_files=[("image", "p.jpg", photo("pets.jpg"))])  # cached
    after = scrape(service)
    for name in ("imgsvc_detection_decode_seconds", "imgsvc_detection_invoke_seconds", "imgsvc_detection_seconds"):
        count = value(after, f"{name}_count", model=SSD) - value(base, f"{name}_count", model=SSD)
        assert count == 2, name  # no detection for detect=false, none for bytes already detected
        assert value(after, f"{name}_bucket", model=SSD, le="+Inf") == value(after, f"{name}_count", model=SSD)
        assert value(after, f"{name}_sum", model=SSD) > 0
    assert value(after, "imgsvc_detection_seconds_sum", model=SSD) >= value(
        after, "imgsvc_detection_invoke_seconds_sum", model=SSD
    )
    buckets = sorted(float(dict(labels)["le"]) for labels in series(after, "imgsvc_detection_seconds_bucket"))
    assert buckets[0] == 0.005 and 2.0 in buckets and buckets[-1] == float("inf")

    # A Detector made later for another model (the vision routes' custom models) shows up by its stem.
    custom = tmp_path / "custom.tflite"
    shutil.copy(timed.model_path, custom)
    other = detect.Detector(str(custom), threads=1, pool=1, observe=service.parts.metrics.times)
    other.detect(photo("pets.jpg"))
    after = scrape(service)
    assert value(after, "imgsvc_detection_seconds_count", model="custom") == 1
    assert value(after, "imgsvc_detection_seconds_count", model=SSD) - value(base, "imgsvc_detection_seconds_count", model=SSD) == 2


def test_model_labels_are_bounded():
    times = metrics.DetectionTimes(max_models=2)
    for i in range(50):
        times(f"model{i}", {"preprocess": 1.0, "invoke": 2.0, "total": 4.0})
    models = {dict(s.labels)["model"] for m in times.collect() for s in m.samples if "model" in s.labels}
    assert models == {"model0", "model1", "other"}


def test_running_and_waiting_while_a_detection_is_held_then_a_refusal(make_service, timed, photo):
    """One interpreter, one queue place: the decode budget is held by the test, so two detections stay
    inside the gate (one running, one waiting) until it lets go; a third is refused at once."""
    service = make_service(detector=timed, detect_queue=1, decode_wait_ms=30_000, admission_wait_ms=0)
    budget = service.parts.ingest.budget
    answers: dict[str, int] = {}

    def post(name):
        res = service.client.post("/images", {"detect": "true"}, upload_files=[("image", name, photo(name))], status="*")
        answers[name] = res.status_int

    with budget.reserve(budget.limit):
        threads = [threading.Thread(target=post, args=(n,)) for n in ("pets.jpg", "cats_and_dogs.jpg")]
        for t in threads:
            t.start()
        wait_for(lambda: budget.waiting == 2)  # both admitted, both waiting to decode
        held = scrape(service)
        assert value(held, "imgsvc_detections_running") == 1
        assert value(held, "imgsvc_detections_waiting") == 1
        res = service.client.post(
            "/images", {"detect": "true"}, upload_files=[("image", "t.jpg", photo("table.jpg"))], status=503
        )
        assert "DETECT_QUEUE" in assert_problem(res, 503)
    for t in threads:  # the budget is free again (even when an assertion failed): both decode now
        t.join(30)
    assert answers == {"pets.jpg": 200, "cats_and_dogs.jpg": 200}
    after = scrape(service)
    assert value(after, "imgsvc_detections_running") == 0 and value(after, "imgsvc_detections_waiting") == 0
    assert value(after, "imgsvc_refusals_total", limit="detect_queue") == 1
    assert requests(after, "POST", "/images", 503) == 1 and requests(after, "POST", "/images", 200) == 2
    assert value(after, "imgsvc_detection_seconds_count", model=SSD) >= 2


def test_decode_memory_and_download_refusals(make_service, photo):
    service = make_service(decode_wait_ms=0, download_slots=1, admission_wait_ms=0)
    budget = service.parts.ingest.budget
    with budget.reserve(budget.limit):
        res = service.client.post("/images", {"detect": "false"}, upload_files=[("image", "a.jpg", jpeg())], status=503)
        assert "DECODE_MEMORY_MB" in assert_problem(res, 503)

    release = threading.Event()

    def slow(h):
        release.wait(10)
        ok(photo("pets.jpg"), "image/jpeg")(h)

    with Loopback({"/slow.jpg": slow}) as host:
        done = []
        t = threading.Thread(
            target=lambda: done.append(service.client.post_json("/images", {"url": host.url("/slow.jpg")}, status="*"))
        )
        t.start()
        try:
            wait_for(lambda: service.parts.ingest.downloads.in_use == 1)
            res = service.client.post_json("/images", {"url": host.url("/slow.jpg")}, status=503)
            assert "DOWNLOAD_SLOTS" in assert_problem(res, 503)
        finally:
            release.set()
            t.join(30)
    assert done[0].status_int == 200
    after = scrape(service)
    assert value(after, "imgsvc_refusals_total", limit="decode_memory_mb") == 1
    assert value(after, "imgsvc_refusals_total", limit="download_slots") == 1
    assert value(after, "imgsvc_refusals_total", limit="detect_queue") == 0
    assert {dict(labels)["limit"] for labels in series(after, "imgsvc_refusals_total")} == set(metrics.REFUSALS)


# --------------------------------------------------------------------------------------------------------
# Upload jobs and Imgur
# --------------------------------------------------------------------------------------------------------


def test_job_states_uploads_and_failures_by_error_class(make_service, photo):
    gate = threading.Event()

    def gated(h):
        gate.wait(10)
        ok(photo("cat.bmp"), "image/bmp")(h)

    routes = {"/gated.bmp": gated, "/pets.jpg": ok(photo("pets.jpg"), "image/jpeg"), "/missing.jpg": status(404)}
    with FakeImgur() as fake, Loopback(routes) as host:
        uploader = imgur.ImgurClient(client_id=fake.client_id, api_url=fake.url, sleep=lambda s: None)
        service = make_service(uploader=uploader, upload_workers=1, upload_backlog=3)
        try:
            first = service.client.post_json("/v1/images/upload", {"urls": [host.url("/gated.bmp")]}).json["jobId"]
            wait_for(lambda: service.jobs.get(first).status == "in-progress")
            urls = [host.url("/pets.jpg"), host.url("/missing.jpg")]
            service.client.post_json("/v1/images/upload", {"urls": urls})
            held = scrape(service)
            assert value(held, "imgsvc_upload_jobs", state="in-progress") == 1
            assert value(held, "imgsvc_upload_jobs", state="pending") == 1
            assert value(held, "imgsvc_upload_jobs", state="complete") == 0
            # The backlog (3 URLs) is full: refused, and counted by its setting.
            res = service.client.post_json("/v1/images/upload", {"urls": [host.url("/pets.jpg?again")]}, status=503)
            assert_problem(res, 503)
            fake.script.append(answer(400, "Invalid image: https://i.imgur.com/secret.jpg"))  # the gated one's
            gate.set()
            assert service.jobs.wait(timeout=30)
        finally:
            gate.set()
        res = service.client.get("/metrics")
    after = parse(res.text)
    assert value(after, "imgsvc_upload_jobs", state="complete") == 2
    assert value(after, "imgsvc_upload_jobs", state="pending") == value(after, "imgsvc_upload_jobs", state="in-progress") == 0
    assert value(after, "imgsvc_imgur_uploads_total") == 1
    failures = {dict(labels)["error"]: v for (n, labels), v in after.items() if n == "imgsvc_imgur_failures_total"}
    assert failures == {"Rejected": 1, "UpstreamStatus": 1}
    assert value(after, "imgsvc_refusals_total", limit="upload_backlog") == 1
    # No label value anywhere holds a URL, a host or a reason: class names, rules and fixed words only.
    values = {v for (_, labels) in after for _, v in labels}
    assert all(re.fullmatch(r"[\w<>/:.+\-]{1,60}", v) for v in values), values
    assert not any("://" in v or "127.0.0.1" in v or "imgur" in v.lower() for v in values), values
    assert "127.0.0.1" not in res.text and "secret" not in res.text


# --------------------------------------------------------------------------------------------------------
# The key, the process
# --------------------------------------------------------------------------------------------------------


def test_metrics_need_the_key_when_one_is_set(make_service):
    service = make_service(api_key=KEY)
    assert_problem(service.client.get("/metrics", status=401), 401)
    assert_problem(service.client.get("/metrics", headers={"X-API-Key": "wrong-key-123"}, status=401), 401)
    samples = scrape(service, headers={"Authorization": f"Bearer {KEY}"})
    assert requests(samples, "GET", "/metrics", 401) == 2  # refused before routing, counted by the rule
    assert make_service().client.get("/metrics").status_int == 200  # open without a key


def test_the_process_memory_is_there(service):
    if not os.path.exists("/proc/self/stat"):
        pytest.skip("prometheus_client's ProcessCollector reads /proc (Linux)")
    samples = scrape(service)
    assert value(samples, "process_resident_memory_bytes") > 10 * MB
    assert value(samples, "process_cpu_seconds_total") > 0


def test_the_names_readme_lists_are_the_ones_served(service):
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    section = readme[readme.index("### `GET /metrics`"):]
    section = section[: section.index("\n### ")]
    listed = set(re.findall(r"^\| `(imgsvc_\w+)", section, re.M))
    assert listed == set(metrics.NAMES)
    served = {family.name for family in text_string_to_metric_families(service.client.get("/metrics").text)}
    served |= {n + "_total" for n in served}  # the parser names a counter's family without _total
    waitress_only = {"imgsvc_connections", "imgsvc_requests_queued"}  # tests/test_metrics.py's real-server test
    assert set(metrics.NAMES) - {"imgsvc_http_requests_total"} - waitress_only <= served  # requests: once answered
    assert "each process is its own scrape target" in section.lower()


# --------------------------------------------------------------------------------------------------------
# The real process: waitress's body budget, /metrics over a socket
# --------------------------------------------------------------------------------------------------------


def _scrape_url(base: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as res:
        assert res.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return parse(res.read().decode())


def test_the_real_server_counts_bodies_refused_by_body_buffer_mb(tmp_path):
    proc, base, _ = start_server(tmp_path, "--model", str(tmp_path / "none.tflite"), env={"BODY_BUFFER_MB": "2"})
    address = urllib.parse.urlsplit(base)
    proc.address = (address.hostname, address.port)  # what test_slow_senders' helpers connect to
    try:
        first = _accepted(proc, int(1.5 * MB))
        try:
            first.sendall(b" " * (MB // 2))
            before = _scrape_url(base)  # a read: served while 1.5 MB of the budget are taken
            assert value(before, "imgsvc_connections") >= 2  # that upload's and the scrape's own
            assert {dict(labels)["lane"] for labels in series(before, "imgsvc_requests_queued")} == {"read", "other"}
            assert value(before, "imgsvc_requests_queued", lane="read") == 0
            second = _connect(proc)
            try:
                second.sendall(_post_head(proc, MB))
                assert _response(second)[0] == 503
            finally:
                second.close()
        finally:
            first.close()
        after = _scrape_url(base)
        refused = value(after, "imgsvc_refusals_total", limit="body_buffer_mb")
        assert refused - value(before, "imgsvc_refusals_total", limit="body_buffer_mb") == 1
        assert requests(after, "GET", "/metrics", 200) >= 1
        assert value(after, "process_resident_memory_bytes") > 10 * MB
        assert server.is_read("GET", "/metrics")  # scrapes use the read lane: fast while the service is busy
    finally:
        err = stop_server(proc)
    assert "Traceback" not in err, err
