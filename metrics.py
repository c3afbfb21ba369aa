"""What GET /metrics says, in the Prometheus text format, written by `prometheus_client`.

Each app has its own `CollectorRegistry` (never the library's global one), so several apps in one
process, as in the tests, count apart. Most numbers are read from the parts at scrape time by
`ServiceCollector` (images stored, the database's size, detections running and waiting, refusals, upload
jobs): the parts already keep them. Only what happens and leaves no state behind is counted as it
happens: requests (`Metrics.count_request`, from one hook in server.make_app) and detection times
(`DetectionTimes`, the observer a `detect.Detector` calls once per detection).

Every label has a bounded set of values: routes are the app's route rules ("unmatched" for the rest),
methods a fixed set, statuses three digits, models at most MAX_MODELS file stems, limits the settings
named in REFUSALS, errors the class names of our own exceptions. Nothing a client sends becomes a label.

This module imports none of ours: it reads the parts through the few attributes named below.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # text/plain; version=0.0.4; charset=utf-8
UNMATCHED = "unmatched"  # the route label of a request no route matched (404, 405)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # others count as "other"
MAX_MODELS = 16  # distinct model labels; more models share the label "other"
# Detections take 5 ms (a small frame on a laptop) to 2 s (a large photo on a Pi 3), in seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.4, 0.6, 1.0, 1.5, 2.0, 5.0)
# The `limit` label of imgsvc_refusals_total: the setting whose limit refused (each refusal names it too).
REFUSALS = ("detect_queue", "download_slots", "decode_memory_mb", "upload_backlog", "body_buffer_mb")
NAMES = (  # every metric of ours, as it appears in the text (README lists the same)
    "imgsvc_http_requests_total",
    "imgsvc_detection_decode_seconds",
    "imgsvc_detection_invoke_seconds",
    "imgsvc_detection_seconds",
    "imgsvc_detections_running",
    "imgsvc_detections_waiting",
    "imgsvc_refusals_total",
    "imgsvc_images",
    "imgsvc_database_bytes",
    "imgsvc_upload_jobs",
    "imgsvc_imgur_uploads_total",
    "imgsvc_imgur_failures_total",
    "imgsvc_connections",
    "imgsvc_requests_queued",
)


class DetectionTimes:
    """The observer of detections: `times(model_name, timings_ms)`, called by a Detector once per detection
    with its timings in milliseconds (`preprocess` is the decode, `invoke` the model, `total` all of it).

    A collector itself: each app that serves detections of a Detector registers that Detector's
    DetectionTimes in its registry. One DetectionTimes may observe several Detectors (a model each)."""

    def __init__(self, max_models: int = MAX_MODELS):
        self.max_models = max_models
        self._models: set[str] = set()
        self._lock = threading.Lock()

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, ["model"], buckets=LATENCY_BUCKETS, registry=None)

        self.decode = histogram(
            "imgsvc_detection_decode_seconds", "Time a detection spent decoding and scaling the image, by model."
        )
        self.invoke = histogram("imgsvc_detection_invoke_seconds", "Time a detection spent in the model, by model.")
        self.total = histogram(
            "imgsvc_detection_seconds",
            "Time a detection took in all (decode, waiting for an interpreter, model, boxes), by model.",
        )

    def _model(self, name: str) -> str:
        with self._lock:
            if name in self._models:
                return name
            if len(self._models) < self.max_models:
                self._models.add(name)
                return name
        return "other"

    def __call__(self, model_name: str, timings_ms: dict[str, float]) -> None:
        model = self._model(model_name)
        self.decode.labels(model).observe(timings_ms.get("preprocess", 0.0) / 1000)
        self.invoke.labels(model).observe(timings_ms.get("invoke", 0.0) / 1000)
        self.total.labels(model).observe(timings_ms.get("total", 0.0) / 1000)

    def collect(self) -> Iterator[Metric]:
        for h in (self.decode, self.invoke, self.total):
            yield from h.collect()

    def describe(self) -> Iterator[Metric]:
        for h in (self.decode, self.invoke, self.total):
            yield from h.describe()


class ServiceCollector:
    """Reads the parts' own state at scrape time (see `Metrics`)."""

    def __init__(self, parts: Any):
        self.parts = parts
        self.servers: list[tuple[Any, Any, list[Any]]] = []  # (BodyBudget, _Lanes, listeners) of the server

    def describe(self) -> Iterator[Metric]:
        # The names only: the registry refuses a second collector with the same ones.
        yield GaugeMetricFamily("imgsvc_detections_running", "")
        yield GaugeMetricFamily("imgsvc_detections_waiting", "")
        yield CounterMetricFamily("imgsvc_refusals", "", labels=["limit"])
        yield GaugeMetricFamily("imgsvc_images", "")
        yield GaugeMetricFamily("imgsvc_database_bytes", "")
        yield GaugeMetricFamily("imgsvc_upload_jobs", "", labels=["state"])
        yield CounterMetricFamily("imgsvc_imgur_uploads", "")
        yield CounterMetricFamily("imgsvc_imgur_failures", "", labels=["error"])
        yield GaugeMetricFamily("imgsvc_connections", "")
        yield GaugeMetricFamily("imgsvc_requests_queued", "", labels=["lane"])

    def collect(self) -> Iterator[Metric]:
        tally = self.parts.jobs.tally()
        yield from self._detections(tally["backlog_refusals"])
        yield from self._store()
        yield from self._jobs(tally)
        if self.servers:  # only once main() serves the app with waitress
            yield from self._server()

    def _server(self) -> Iterator[Metric]:
        # len() of waitress's dict and deques, read from a request thread: atomic, no lock needed.
        connections = sum(len(listener.active_channels) for _, _, listeners in self.servers for listener in listeners)
        yield GaugeMetricFamily(
            "imgsvc_connections", "Open client connections (waitress stops accepting at CONNECTION_LIMIT).",
            value=connections,
        )
        queued = GaugeMetricFamily(
            "imgsvc_requests_queued", "Requests read and waiting for a request thread, by lane (reads go first).",
            labels=["lane"],
        )
        queued.add_metric(["read"], sum(len(lanes.reads) for _, lanes, _ in self.servers))
        queued.add_metric(["other"], sum(len(lanes.queue) for _, lanes, _ in self.servers))
        yield queued

    def _detections(self, backlog_refusals: int) -> Iterator[Metric]:
        pipeline = self.parts.ingest
        gate, pool = pipeline.detections, self.parts.detector.pool
        in_use, waiting = (gate.in_use, gate.waiting) if gate is not None else (0, 0)
        yield GaugeMetricFamily(
            "imgsvc_detections_running",
            "Detections admitted and given one of the interpreters' places (DETECT_INTERPRETERS).",
            value=min(in_use, pool),
        )
        yield GaugeMetricFamily(
            "imgsvc_detections_waiting",
            "Detections waiting: admitted to the queue (DETECT_QUEUE), or for a place in it (ADMISSION_WAIT_MS).",
            value=max(0, in_use - pool) + waiting,
        )
        refusals = CounterMetricFamily(
            "imgsvc_refusals",
            "Requests refused (503) because a limit was reached, by the setting of that limit.",
            labels=["limit"],
        )
        counts = {
            "detect_queue": gate.refusals if gate is not None else 0,
            "download_slots": pipeline.downloads.refusals if pipeline.downloads is not None else 0,
            "decode_memory_mb": pipeline.budget.refusals,
            "upload_backlog": backlog_refusals,
            "body_buffer_mb": sum(budget.refusals for budget, _, _ in self.servers),
        }
        for limit in REFUSALS:
            refusals.add_metric([limit], counts[limit])
        yield refusals

    def _store(self) -> Iterator[Metric]:
        images = self.parts.images
        with images.connection():
            stored, _ = images.count()
            size = images.backend.size_bytes()
        yield GaugeMetricFamily("imgsvc_images", "Images stored.", value=stored)
        yield GaugeMetricFamily(
            "imgsvc_database_bytes", "Bytes of the database: SQLite's file and write-ahead log, or PostgreSQL's database size.",
            value=size,
        )

    def _jobs(self, tally: dict[str, Any]) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "imgsvc_upload_jobs", "Imgur upload jobs in memory, by state (finished ones up to JOBS_KEPT).", labels=["state"]
        )
        for state, n in tally["jobs"].items():
            jobs.add_metric([state], n)
        yield jobs
        yield CounterMetricFamily("imgsvc_imgur_uploads", "URLs of upload jobs uploaded to Imgur.", value=tally["uploaded"])
        failures = CounterMetricFamily(
            "imgsvc_imgur_failures",
            "URLs of upload jobs that failed, by the class of the error (fetch's while downloading, imgur's while uploading).",
            labels=["error"],
        )
        for error, n in sorted(tally["failures"].items()):
            failures.add_metric([error], n)
        yield failures


class Metrics:
    """The metrics of one app: its registry, the request counter, and collectors reading `parts`.

    `parts` is server.Parts, read at scrape time: `images` (count(), path, connection()), `detector.pool`,
    `ingest.detections` and `ingest.downloads` (ingest.Gate: in_use, waiting, refusals), `ingest.budget`
    (imaging.DecodeBudget: refusals) and `jobs.tally()`. `times` is the DetectionTimes the app's Detectors
    report to: every Detector of the app (a custom model's too) is given the same one, `Metrics.times`,
    as its `observe`; their models are told apart by the `model` label. ProcessCollector adds
    process_resident_memory_bytes and the other process_* metrics on Linux.
    """

    def __init__(self, parts: Any, times: DetectionTimes | None = None):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "imgsvc_http_requests", "HTTP requests answered by the app, by method, route rule and status.",
            ["method", "route", "status"], registry=self.registry,
        )
        self.service = ServiceCollector(parts)
        self.registry.register(self.service)
        self.times = times if times is not None else DetectionTimes()
        self.registry.register(self.times)
        ProcessCollector(registry=self.registry)

    def count_request(self, method: str, route: str | None, status: int) -> None:
        """One request answered: `route` is the rule of the route that matched it (None: none did)."""
        method = method if method in METHODS else "other"
        self.requests.labels(method, route or UNMATCHED, str(status)).inc()

    def watch_server(self, budget: Any, lanes: Any, listeners: list[Any]) -> None:
        """Read the waitress server that serves the app too (made after it, by server._create_server):
        its BodyBudget's refusals, its _Lanes' queues and its listeners' open connections."""
        self.service.servers.append((budget, lanes, listeners))

    def text(self) -> bytes:
        """The exposition, Prometheus text format 0.0.4."""
        return generate_latest(self.registry)

