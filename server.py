"""The HTTP layer: the only module that imports Bottle or speaks HTTP.

`build_parts(settings, **overrides)` builds every part of the service (store, detector, fetcher, ingest,
Imgur client, jobs) for `main()` and the tests alike; `make_app(settings, parts)` builds the Bottle app
from them; `main()` reads flags and environment and serves the app with waitress. This module parses
requests, writes the response JSON of every resource (images and jobs) and serves the page's files.
Every error, Bottle's own 404/405 and unexpected 500s included, leaves as `application/problem+json`;
domain errors become HTTP statuses in one table, `ERROR_STATUS`.
"""

from __future__ import annotations

import base64
import binascii
import collections
import datetime
import errno
import functools
import io
import json
import logging
import os
import re
import signal
import socket
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Callable

import bottle
import waitress
import waitress.channel
import waitress.server
import waitress.task
import waitress.wasyncore

import detect
import fetch
import imaging
import imgur
import ingest
import jobs as jobs_mod
import settings as settings_mod
import store

__version__ = "0.1.0"

log = logging.getLogger(__name__)

# Domain errors -> HTTP status. The first matching class (in MRO order of the raised error) wins.
ERROR_STATUS: dict[type[BaseException], int] = {
    imaging.TooManyPixels: 413,
    imaging.NotAnImage: 422,  # UnsupportedFormat included
    detect.ModelError: 503,  # ModelMissing, ModelInvalid
    ingest.InvalidLabel: 400,
    ingest.Busy: 503,
    fetch.InvalidURL: 400,
    fetch.BlockedAddress: 400,
    fetch.TooLarge: 413,
    fetch.UpstreamStatus: 422,
    fetch.NotAnImage: 422,
    fetch.Unreachable: 502,
    fetch.TooManyRedirects: 502,
    fetch.DownloadTimeout: 504,
    store.NotFound: 404,
    store.StoreFull: 507,
    store.StoreUnavailable: 503,
    jobs_mod.UnknownJob: 404,
    jobs_mod.InvalidBatch: 400,
    jobs_mod.BacklogFull: 503,
    jobs_mod.Closed: 503,
    imgur.NotConfigured: 503,
}

PROBLEM_JSON = "application/problem+json"
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
INTERNAL_ERROR = "The server failed to handle this request; the error is in its log. Try again later."
BODY_TOO_LARGE = "The request body is too large; send a smaller image (see MAX_IMAGE_BYTES)."


class ClientError(Exception):
    """A mistake in the request that the HTTP layer itself finds (bad JSON, bad query...)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.headers = headers or {}


def problem_body(status: int, detail: str) -> str:
    """The one error shape (RFC 9457); `detail` tells the user what was wrong and what to do."""
    return json.dumps({"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail})


def problem(status: int, detail: str, headers: dict[str, str] | None = None) -> bottle.HTTPResponse:
    res = bottle.HTTPResponse(problem_body(status, detail), status=status, headers=headers)
    res.content_type = PROBLEM_JSON
    return res


def status_for(error: BaseException) -> int | None:
    for cls in type(error).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return None


def _json_errors(callback):
    """Route plugin: every exception a route raises becomes a problem response here, and only here."""

    @functools.wraps(callback)
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except bottle.HTTPResponse:
            raise
        except ClientError as e:
            return problem(e.status, str(e), e.headers)
        except Exception as e:
            status = status_for(e)
            if status is None:
                log.exception("unexpected error in %s %s", bottle.request.method, bottle.request.path)
                return problem(500, INTERNAL_ERROR)
            if status >= 500 and not isinstance(e, ingest.Busy):  # a Gate logs its refusals, once a minute
                log.warning("%s %s: %s", bottle.request.method, bottle.request.path, e)
            retry_after = getattr(e, "retry_after", None)
            return problem(status, str(e), {"Retry-After": str(retry_after)} if retry_after else None)

    return wrapper


def _bottle_error(res: bottle.HTTPError) -> str:
    """Bottle's own errors (no route, wrong method, a failure outside a route) as problem+json."""
    status = res.status_code
    if status == 404:
        detail = f"There is no {bottle.request.path} here; GET /openapi.json lists the routes."
    elif status == 405:
        allowed = res.headers.get("Allow", "")
        detail = f"{bottle.request.method} is not allowed on {bottle.request.path}; use {allowed or 'another method'}."
    elif status == 413:
        detail = BODY_TOO_LARGE
    elif status >= 500:
        if res.traceback:
            log.error("unhandled error in %s %s\n%s", bottle.request.method, bottle.request.path, res.traceback)
        detail = INTERNAL_ERROR
    else:
        detail = str(res.body) or HTTPStatus(status).phrase
    bottle.response.content_type = PROBLEM_JSON
    return problem_body(status, detail)


def body_limit(settings: Any) -> int:
    """Largest request body we read: an image as base64 (4/3 of its bytes) plus room for the other fields."""
    return settings.max_image_bytes * 4 // 3 + 64 * 1024


# ---------------------------------------------------------------------------------------------------------
# Reading requests
# ---------------------------------------------------------------------------------------------------------

_TRUE = {"true", "1", "on", "yes"}
_FALSE = {"false", "0", "off", "no", ""}
_DATA_URI = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w-]+=[^;,]*)*)(;base64)?,", re.I)


def _media_type() -> str:
    return (bottle.request.content_type or "").split(";", 1)[0].strip().lower()


def _decode_base64(text: str, max_bytes: int) -> bytes:
    m = _DATA_URI.match(text)
    if m:
        if not m.group(3):
            raise ClientError(400, "`image` is a data: URI without ;base64; send the bytes base64-encoded")
        text = text[m.end():]
    text = "".join(text.split())  # line breaks from base64 tools
    if len(text) * 3 // 4 > max_bytes + 3:
        raise ClientError(413, f"the image is larger than {max_bytes:,} bytes (MAX_IMAGE_BYTES); send a smaller one")
    if "-" in text or "_" in text:
        text = text.translate(str.maketrans("-_", "+/"))  # URL-safe alphabet
    text += "=" * (-len(text) % 4)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(400, "`image` is not valid base64; send the file's bytes base64-encoded (or a data: URI)") from None
    if not data:
        raise ClientError(400, "`image` is empty; send the file's bytes base64-encoded")
    if len(data) > max_bytes:
        raise ClientError(413, f"the image is larger than {max_bytes:,} bytes (MAX_IMAGE_BYTES); send a smaller one")
    return data


def _check_url(url: Any) -> str:
    if not isinstance(url, str) or not url.strip():
        raise ClientError(400, "`url` must be an http(s) URL string")
    fetch.check_url(url.strip())  # raises fetch.InvalidURL -> 400
    return url.strip()


def _is_json(kind: str) -> bool:
    return kind == "application/json" or kind.endswith("+json")


def read_body(limit: int) -> bytes:
    """The request body, read once into memory, at most `limit` bytes (413 beyond).

    Bottle spools bodies over its class-wide MEMFILE_MAX (100 KB) to a temporary file and refuses them
    for request.json; raising that limit is process-wide state. Reading the body here instead, bounded by
    this app's own limit, and handing Bottle the bytes in memory keeps each app's limit its own.
    """
    env = bottle.request.environ
    cached = env.get("bottle.request.body")
    if cached is None:
        length = bottle.request.content_length
        if length > limit:
            raise ClientError(413, f"the body is larger than {limit:,} bytes; send a smaller image")
        data = env["wsgi.input"].read(length if length >= 0 else limit + 1) if "wsgi.input" in env else b""
        if len(data) > limit:
            raise ClientError(413, f"the body is larger than {limit:,} bytes; send a smaller image")
        cached = env["wsgi.input"] = env["bottle.request.body"] = io.BytesIO(data)
    return cached.getvalue()


def _json_object(fields: tuple[str, ...], example: str) -> dict[str, Any]:
    """The request body as a JSON object holding only `fields`; ClientError (400) otherwise."""
    try:
        body = json.loads(bottle.request.body.read() or b"null")
    except (ValueError, RecursionError):
        raise ClientError(400, f"the body is not valid JSON; send {example}") from None
    if not isinstance(body, dict):
        raise ClientError(400, f"the body must be a JSON object: {example}")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise ClientError(400, f"unknown field(s) {', '.join(unknown)}; the fields are {', '.join(fields)}")
    return body


def _read_new_image(max_bytes: int) -> ingest.Submission:
    kind = _media_type()
    if _is_json(kind):
        body = _json_object(("image", "url", "label", "detect"), '{"image": "<base64>"} or {"url": "https://..."}')
        image, url = body.get("image"), body.get("url")
        if ("image" in body) == ("url" in body):
            raise ClientError(400, "send exactly one of `image` (base64) and `url`")
        if "image" in body and not isinstance(image, str):
            raise ClientError(400, "`image` must be a base64 string (or a data: URI)")
        want = body.get("detect", False)
        if not isinstance(want, bool):
            raise ClientError(400, "`detect` must be true or false")
        label = ingest.check_label(body.get("label"))
        if "url" in body:
            url = _check_url(url)
            return ingest.Submission(None, url, label, want, url)
        return ingest.Submission(_decode_base64(image, max_bytes), None, label, want, None)
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):  # a form with only `url` is the latter
        forms, files = bottle.request.forms, bottle.request.files
        upload = files.get("image")
        url = forms.getunicode("url")
        if (upload is None) == (url is None):
            raise ClientError(400, "send exactly one of the file part `image` and the field `url`")
        raw = (forms.getunicode("detect") or "").strip().lower()
        if raw not in _TRUE | _FALSE:
            raise ClientError(400, "`detect` must be true/1/on or false/0/off")
        label = ingest.check_label(forms.getunicode("label"))
        if url is not None:
            url = _check_url(url)
            return ingest.Submission(None, url, label, raw in _TRUE, url)
        data = upload.file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ClientError(413, f"the image is larger than {max_bytes:,} bytes (MAX_IMAGE_BYTES); send a smaller one")
        if not data:
            raise ClientError(400, "the file part `image` is empty")
        return ingest.Submission(data, None, label, raw in _TRUE, upload.raw_filename)
    raise ClientError(
        415, f"Content-Type {kind or '(none)'} is not accepted; send application/json or multipart/form-data"
    )


def _int_param(name: str, low: int, high: int | None = None, default: int | None = None) -> int | None:
    raw = bottle.request.query.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"\d{1,18}", raw.strip()):
        raise ClientError(400, f"`{name}` must be a whole number" + (f" from {low} to {high}" if high else f" >= {low}"))
    value = int(raw)
    if value < low or (high is not None and value > high):
        raise ClientError(400, f"`{name}` must be from {low} to {high}" if high else f"`{name}` must be >= {low}")
    return value


def _objects_param() -> list[str] | None:
    raw = bottle.request.query.getunicode("objects")
    if raw is None:
        return None
    names = [n.strip().strip("\"'").strip().lower() for n in raw.strip().strip("\"'").split(",")]
    names = [n for n in names if n]
    if not names:
        raise ClientError(400, "`objects` names no object; give one or more names, e.g. objects=dog,cat")
    if len(names) > 20:
        raise ClientError(400, "`objects` names more than 20 objects; search for fewer at once")
    return names


def _confidence_param() -> float | None:
    raw = bottle.request.query.get("min_confidence")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise ClientError(400, "`min_confidence` must be a number from 0 to 1")
    return value


def _image_id(raw: str) -> int:
    if not re.fullmatch(r"[1-9]\d{0,17}", raw):
        raise store.NotFound(f"there is no image {raw!r}; ids are positive whole numbers")
    return int(raw)


# ---------------------------------------------------------------------------------------------------------
# Writing responses
# ---------------------------------------------------------------------------------------------------------


def _openapi_document() -> dict[str, Any]:
    """openapi.json beside this file, with this version; read once per app."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "openapi.json"), encoding="utf-8") as f:
        doc = json.load(f)
    doc["info"]["version"] = __version__
    return doc


def iso_ms(ms: int | None) -> str | None:
    """The API's one time format, ISO 8601 UTC with milliseconds and Z: 2017-12-22T16:48:29.123Z."""
    if ms is None:
        return None
    t = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def _clock_ms(t: float | None) -> int | None:
    return None if t is None else int(round(t * 1000))


def found_json(d: store.Found) -> dict[str, Any]:
    return {
        "label": d.label,
        "confidence": d.confidence,
        "box": {"x_min": d.x_min, "y_min": d.y_min, "x_max": d.x_max, "y_max": d.y_max},
    }


def image_json(rec: store.ImageRecord, data: bytes | None = None) -> dict[str, Any]:
    out = {
        "id": rec.id,
        "label": rec.label,
        "label_generated": rec.label_generated,
        "detection_enabled": rec.detection_enabled,
        "objects": rec.objects,
        "detections": [found_json(d) for d in rec.detections],
        "width": rec.width,
        "height": rec.height,
        "content_type": rec.content_type,
        "size": rec.size,
        "sha256": rec.sha256,
        "source_url": rec.source_url,
        "created_at": iso_ms(rec.created_ms),
        "file_url": f"/images/{rec.id}/file",
    }
    if data is not None:
        out["data"] = base64.b64encode(data).decode("ascii")
    return out


def job_json(job: jobs_mod.JobView) -> dict[str, Any]:
    items = job.items
    return {
        "id": job.id,
        "created": iso_ms(_clock_ms(job.created)),
        "finished": iso_ms(_clock_ms(job.finished)),
        "status": job.status,
        "uploaded": {
            # "still waiting to be processed", as the brief says: not started or under way
            "pending": [i.url for i in items if i.status in (jobs_mod.PENDING, jobs_mod.IN_PROGRESS)],
            "complete": [i.link for i in items if i.status == jobs_mod.COMPLETE],
            "failed": [i.url for i in items if i.status == jobs_mod.FAILED],
        },
        "items": [
            {"url": i.url, "status": i.status, "link": i.link, "deletehash": i.deletehash, "error": i.error}
            for i in items
        ],
    }


def batch_detail(e: jobs_mod.InvalidBatch) -> str:
    """An InvalidBatch in the request's own terms: which entries of `urls` are wrong, and why."""
    if not e.problems:
        return f"`urls`: {e}"
    shown = [
        f"urls[{p.index}] {p.reason}" if not isinstance(p.value, str) else f"urls[{p.index}] ({p.value[:100]!r}): {p.reason}"
        for p in e.problems[:20]
    ]
    if len(e.problems) > 20:
        shown.append(f"... and {len(e.problems) - 20} more")
    return "some entries of `urls` are not http(s) URLs: " + "; ".join(shown)


def _json(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> bottle.HTTPResponse:
    """Any JSON value (Bottle only serialises dicts by itself)."""
    res = bottle.HTTPResponse(json.dumps(value), status=status, headers=headers)
    res.content_type = "application/json"
    return res


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)


# ---------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Parts:
    """Every part of the service, built once by `build_parts` and closed once by `close()`."""

    settings: Any
    images: store.Store
    detector: detect.Detector
    fetcher: fetch.Fetcher
    ingest: ingest.Ingest
    jobs: jobs_mod.Jobs
    uploader: imgur.ImgurClient | None = None
    closers: list[Callable[[], Any]] = field(default_factory=list, repr=False)

    def close(self, jobs_timeout: float = 10.0) -> None:
        """Stop the upload jobs (waiting for uploads under way, up to a deadline) and close the database."""
        self.jobs.close(timeout=jobs_timeout)  # logs what it abandoned; closes the Imgur client
        self.images.shutdown()


def build_parts(
    settings: Any,
    *,
    detector: detect.Detector | None = None,
    uploader: imgur.ImgurClient | None | bool = True,
    now: Callable[[], float] = time.time,
    resolve: Callable[..., Any] | None = None,
    connect: Callable[..., Any] | None = None,
) -> Parts:
    """Build every part from `settings`; the keyword arguments are the seams tests use.

    `detector`: a ready Detector (tests share one loaded model); `uploader`: an ImgurClient, None for
    uploads off, or True to build one from the IMGUR_* settings; `now`: the jobs' clock; `resolve` and
    `connect`: fetch.Fetcher's DNS and socket seams. Raises store.StoreError or OSError when the
    database cannot be opened.
    """
    if detector is None:
        detector = detect.Detector(
            settings.model, threshold=settings.detect_threshold, threads=settings.detect_threads,
            max_pixels=settings.max_pixels,
        )
    images = store.Store(settings.db)
    fetcher = fetch.Fetcher(
        max_bytes=settings.max_image_bytes, allow_private=settings.allow_private_urls,
        timeout=settings.fetch_timeout, resolve=resolve, connect=connect,
    )
    if uploader is True:
        uploader = None
        if settings.imgur_client_id:
            uploader = imgur.ImgurClient(
                client_id=settings.imgur_client_id,
                client_secret=settings.imgur_client_secret,
                refresh_token=settings.imgur_refresh_token,
                api_url=settings.imgur_api_url,
                timeout=settings.imgur_timeout,
                min_upload_rate=settings.imgur_min_upload_rate,
                max_answer_bytes=settings.imgur_max_answer_bytes,
            )
    jobs = jobs_mod.Jobs(
        uploader=uploader or None, fetcher=fetcher, workers=settings.upload_workers, max_urls=settings.job_max_urls,
        max_backlog=settings.upload_backlog, keep_finished=settings.jobs_kept, now=now,
    )
    wait = settings.admission_wait_ms / 1000
    pipeline = ingest.Ingest(
        images=images, detector=detector, fetcher=fetcher, max_pixels=settings.max_pixels,
        downloads=ingest.download_gate(settings.download_slots, wait),
        detections=ingest.detection_gate(detector.pool, settings.detect_queue, wait),
    )
    return Parts(settings, images, detector, fetcher, pipeline, jobs, uploader or None)


def make_app(settings: Any, parts: Parts) -> bottle.Bottle:
    """Build the WSGI app from its parts. Nothing here touches the network or starts a thread, and
    nothing changes Bottle's process-wide state: each app keeps its own limits."""
    app = bottle.Bottle()
    app.config["imgsvc.settings"] = settings
    app.default_error_handler = _bottle_error
    app.install(_json_errors)
    max_bytes = settings.max_image_bytes
    limit = body_limit(settings)
    images, detector, jobs = parts.images, parts.detector, parts.jobs

    @app.hook("before_request")
    def _connect():
        try:
            images.connect()
        except store.StoreError as e:  # hooks run outside the route plugin: map the error here
            log.error("cannot open the database: %s", e)
            raise problem(status_for(e) or 503, str(e)) from None

    @app.hook("after_request")
    def _close():
        images.close()

    @app.get("/health")
    def health():
        info = detector.info()
        return {"status": "ok", "version": __version__, "detector": info}

    @app.post("/images")
    def create_image():
        if (bottle.request.content_length or 0) > limit:
            raise ClientError(413, f"the body is larger than {limit:,} bytes; send a smaller image")
        include = bottle.request.query.get("include")
        if include not in (None, "data"):  # checked first: a failed request stores nothing
            raise ClientError(400, "`include` takes one value, data (to return the stored bytes as base64)")
        read_body(limit)
        rec, data = parts.ingest.add(_read_new_image(max_bytes))
        body = image_json(rec, data if include == "data" else None)
        return _json(body, headers={"Location": f"/images/{rec.id}"})

    @app.get("/images")
    def list_images():
        limit = _int_param("limit", 1, 1000, default=100)
        before = _int_param("before", 1)
        names = _objects_param()
        match = bottle.request.query.get("match", "any")
        if match not in ("any", "all"):
            raise ClientError(400, "`match` must be any or all")
        min_confidence = _confidence_param()
        if names is None and (min_confidence is not None or "match" in bottle.request.query):
            raise ClientError(400, "`match` and `min_confidence` go with `objects`, e.g. objects=dog&match=all")
        records, more = images.list(
            limit=limit, before=before, objects=names or (), match_all=match == "all", min_confidence=min_confidence
        )
        headers = {}
        if more and records:
            params = {"limit": limit, "before": records[-1].id}
            if names:
                params["objects"] = ",".join(names)
                params["match"] = match
                if min_confidence is not None:
                    params["min_confidence"] = min_confidence
            headers["Link"] = f'</images?{urllib.parse.urlencode(params)}>; rel="next"'
        return _json([image_json(r) for r in records], headers=headers)

    @app.get("/images/<id>")
    def get_image(id):  # noqa: A002 - the route parameter is documented as {id}
        return image_json(images.get(_image_id(id)))

    @app.get("/images/<id>/file")
    def get_file(id):  # noqa: A002
        data, content_type, sha256 = images.file(_image_id(id))
        etag = f'"{sha256}"'
        headers = {
            "ETag": etag,
            "Cache-Control": "public, max-age=31536000, immutable",  # the bytes of an id never change
            "X-Content-Type-Options": "nosniff",
        }
        if _etag_matches(bottle.request.headers.get("If-None-Match"), etag):
            return bottle.HTTPResponse(status=304, headers=headers)
        res = bottle.HTTPResponse(data, headers=headers)
        res.content_type = content_type
        return res

    @app.delete("/images/<id>")
    def delete_image(id):  # noqa: A002
        images.delete(_image_id(id))
        return bottle.HTTPResponse(status=204)

    @app.get("/objects")
    def list_objects():
        return _json([{"name": name, "images": n} for name, n in images.objects()])

    @app.post("/v1/images/upload")
    def submit_job():
        if not jobs.configured:
            raise imgur.NotConfigured("Imgur uploads are off: set IMGUR_CLIENT_ID (see README) and restart the service")
        if not _is_json(_media_type()):
            raise ClientError(415, 'send application/json: {"urls": ["https://..."]}')
        read_body(limit)
        body = _json_object(("urls",), '{"urls": ["https://...", ...]}')
        urls = body.get("urls")
        if not isinstance(urls, list):
            raise ClientError(400, '`urls` must be a JSON array of http(s) URLs: {"urls": ["https://..."]}')
        try:
            checked = jobs.check(urls)
        except jobs_mod.InvalidBatch as e:
            raise ClientError(400, batch_detail(e)) from None
        job = jobs.submit(checked)
        return _json({"jobId": job.id}, status=202, headers={"Location": f"/v1/images/upload/{job.id}"})

    @app.get("/v1/images/upload/<jobId>")
    def get_job(jobId):  # noqa: N803 - documented as {jobId}, as the brief writes it
        return job_json(jobs.get(jobId))

    @app.get("/v1/images")
    def uploaded_links():
        return {"uploaded": jobs.uploaded()}

    @app.get("/")
    def index():
        res = bottle.static_file("index.html", root=STATIC_DIR)
        # The page loads nothing from elsewhere (it must work on a Pi without internet); say so.
        res.set_header(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
        )
        res.set_header("Cache-Control", "no-cache")
        return res

    @app.get("/static/<filepath:path>")
    def static(filepath):
        res = bottle.static_file(filepath, root=STATIC_DIR)
        if isinstance(res, bottle.HTTPError):  # missing, or outside static/ (Bottle says 403): both "not here"
            return problem(404, f"There is no /static/{filepath} here; the page's files are under /static/.")
        res.set_header("Cache-Control", "no-cache")  # revalidate (Last-Modified): a new version shows at once
        return res

    openapi = _openapi_document()

    @app.get("/openapi.json")
    def openapi_json():
        return openapi

    return app


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


class _ProblemErrorTask(waitress.task.ErrorTask):
    """waitress's own refusals, made before the app runs (413 body too large, 431 headers too large,
    400 malformed request), in the same problem+json shape as every other error."""

    def execute(self):
        error = self.request.error
        status = int(error.code)
        detail = {
            413: BODY_TOO_LARGE,
            431: "The request headers are too large; send at most 256 KB of headers.",
        }.get(status, f"The request could not be read ({error.reason}); check what your client sends.")
        body = problem_body(status, detail).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", PROBLEM_JSON))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _ProblemChannel(waitress.channel.HTTPChannel):
    error_task_class = _ProblemErrorTask


# GET and HEAD of these paths are reads: a few milliseconds of SQLite or a file, never a download or
# a detection. _Lanes serves them first.
_READ_PATH = re.compile(r"/(health|objects|images(/.*)?|v1/images(/.*)?|static/.*|openapi\.json)?")
READ_THREADS = 1  # waitress threads that only reads may use (_Lanes)


def is_read(method: str, path: str) -> bool:
    return method in ("GET", "HEAD") and _READ_PATH.fullmatch(path) is not None


class _Lanes(waitress.task.ThreadedTaskDispatcher):
    """waitress's thread pool with a second queue, so that reads never wait behind slow work.

    waitress queues every complete request for its threads, first come first served: behind 200 POSTs,
    /health waited seconds even when each POST was refused at once. Here reads (`is_read`) have a queue
    of their own that every thread serves first, and the other requests run on at most
    `threads - READ_THREADS` threads at once, so a thread is always free for reads. A task is the
    channel; the request it stands for is the first of `channel.requests` (waitress holds the channel's
    lock while it adds the task).
    """

    def __init__(self):
        super().__init__()
        self.reads: collections.deque = collections.deque()  # self.queue holds the others
        self.others_limit = 1
        self.others_running = 0

    def set_thread_count(self, count):
        with self.lock:
            self.others_limit = max(1, count - READ_THREADS)
        super().set_thread_count(count)

    def add_task(self, task):
        request = task.requests[0] if getattr(task, "requests", None) else None
        read = request is not None and not request.error and is_read(
            getattr(request, "command", ""), getattr(request, "path", "")
        )
        with self.lock:
            (self.reads if read else self.queue).append(task)
            self.queue_cv.notify()

    def handler_thread(self, thread_no):
        while True:
            with self.lock:
                while self.stop_count == 0 and not self.reads and not (
                    self.queue and self.others_running < self.others_limit
                ):
                    self.active_count -= 1
                    self.queue_cv.wait()
                    self.active_count += 1
                if self.stop_count > 0:
                    self.active_count -= 1
                    self.stop_count -= 1
                    self.threads.discard(thread_no)
                    self.thread_exit_cv.notify()
                    break
                other = not self.reads
                task = self.queue.popleft() if other else self.reads.popleft()
                self.others_running += other
            try:
                task.service()
            except BaseException:
                self.logger.exception("Exception when servicing %r", task)
            finally:
                if other:
                    with self.lock:
                        self.others_running -= 1
                        self.queue_cv.notify()  # a waiting other request may run now

    def shutdown(self, cancel_pending=True, timeout=5):
        done = super().shutdown(cancel_pending, timeout)
        if cancel_pending:
            with self.lock:
                while self.reads:
                    self.reads.popleft().cancel()
        return done


def thread_layout(settings: Any, pool: int) -> int:
    """How many waitress threads to run; SettingError for a layout in which slow work could hold them all.

    Admitted slow work holds at most DOWNLOAD_SLOTS + `pool` (the detector's interpreters) + DETECT_QUEUE
    threads. READ_THREADS more are kept for reads, and at least one must be left for the rest (uploads,
    quick refusals). WAITRESS_THREADS=0 (the default) runs all that plus 3 threads for the rest. A
    layout given by hand that does not fit is refused rather than changed: raising the threads or
    shrinking the queue behind the operator's back would hide the contradiction.
    """
    held = settings.download_slots + pool + settings.detect_queue
    if settings.waitress_threads == 0:
        return held + READ_THREADS + 3
    need = held + READ_THREADS + 1
    if settings.waitress_threads < need:
        raise settings_mod.SettingError(
            f"WAITRESS_THREADS={settings.waitress_threads} is too few: downloads (DOWNLOAD_SLOTS={settings.download_slots}), "
            f"detections ({pool} interpreters, DETECT_THREADS) and the detection queue (DETECT_QUEUE={settings.detect_queue}) "
            f"can hold {held} threads, and {need - held} more must stay free for reads and for everything else; "
            f"set WAITRESS_THREADS to {need} or more (or 0 to size it by itself), or lower those settings"
        )
    return settings.waitress_threads


class _Stop(waitress.wasyncore.ExitNow):
    """Raised by the signal handler. waitress's loop swallows other exceptions raised inside a
    channel's handler (it logs them and closes the channel), so a plain Exception could lose a SIGTERM."""


def _raise_stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # waitress warns "Task queue depth is N" for every request that waits for a thread: hundreds of
    # lines a second under load, on a Pi's SD card, burying real warnings.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    # waitress reads and writes every socket in one thread, which gives up the GIL at each socket call
    # and then waits for it behind the request threads, up to the switch interval (5 ms) each time.
    # Under 200 detect POSTs that put /health's p99 at 0.4-1.1 s; 1 ms made it 0.14-0.6 s in the same
    # runs (bench/bounds_threads.py, machine shared), at no cost in detections per second.
    sys.setswitchinterval(0.001)
    try:
        settings = settings_mod.load(sys.argv[1:] if argv is None else argv)
    except settings_mod.SettingError as e:
        return _startup_failure(f"{e}. `python server.py --help` lists every setting.")
    try:
        parts = build_parts(settings)
    except (store.StoreError, OSError) as e:
        return _startup_failure(_database_hint(settings.db, e))
    try:
        threads = thread_layout(settings, parts.detector.pool)
    except settings_mod.SettingError as e:
        parts.close(jobs_timeout=0)
        return _startup_failure(str(e))
    if not parts.detector.ready:
        log.warning("object detection is unavailable until a model is present: %s", parts.detector.error)
    if parts.uploader is not None:
        log.info("Imgur uploads on (%s)", "to the account" if parts.uploader.account else "anonymous")
    else:
        log.info("Imgur uploads off: IMGUR_CLIENT_ID is unset")
    app = make_app(settings, parts)
    lanes = _Lanes()
    try:
        server = _create_server(app, settings, lanes)
    except OSError as e:
        parts.close(jobs_timeout=0)
        return _startup_failure(_listen_hint(settings, e))
    lanes.set_thread_count(threads)
    log.info(
        "%d request threads (%d kept for reads); at most %d URL download(s), %d detection(s) running and %d waiting",
        threads, READ_THREADS, settings.download_slots, parts.detector.pool, settings.detect_queue,
    )
    # One listening socket gives one server; a host name with several addresses gives one per address.
    listeners = [server] if isinstance(server, waitress.server.BaseWSGIServer) else [
        s for s in server.map.values() if isinstance(s, waitress.server.BaseWSGIServer)
    ]
    for listener in listeners:
        listener.channel_class = _ProblemChannel
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _raise_stop)
    for listener in listeners:
        host = f"[{listener.effective_host}]" if ":" in listener.effective_host else listener.effective_host
        log.info("listening on http://%s:%s (version %s)", host, listener.effective_port, __version__)
    try:
        server.run()
    except _Stop as e:
        log.info("stopping on %s", e)
    finally:
        server.close()
        parts.close()  # waits for uploads under way, up to a deadline, and logs what it abandoned
    return 0


def _startup_failure(message: str) -> int:
    """A start-up failure is one line on stderr saying what to do, and exit status 2 (no traceback)."""
    print(f"server.py: {message}", file=sys.stderr)
    return 2


def _database_hint(db: str, e: BaseException) -> str:
    folder = os.path.dirname(os.path.abspath(db))
    if isinstance(e, PermissionError) or (os.path.isdir(folder) and not os.access(folder, os.W_OK)):
        return (
            f"cannot write the database folder {folder} (running as uid {os.getuid()}): make it writable "
            "by this user (a Docker bind mount on /data is often root's: chown it), or point IMAGES_DB / --db elsewhere"
        )
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return f"cannot open the database {db}: {reason}. Point IMAGES_DB / --db at a SQLite file this user can write."


def _listen_hint(settings: Any, e: OSError) -> str:
    where = f"{settings.host}:{settings.port}"
    if e.errno == errno.EADDRINUSE:
        return (
            f"port {settings.port} on {settings.host} is in use by another program; stop it, or choose "
            "another port with PORT / --port (0 picks a free one)"
        )
    if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or isinstance(e, socket.gaierror):
        return f"cannot listen on {where}: {e.strerror or e}; set HOST / --host to an address of this machine (0.0.0.0 for all)"
    if e.errno == errno.EACCES:
        return f"not allowed to listen on port {settings.port}; ports below 1024 need root: choose PORT / --port 1024 or above"
    return f"cannot listen on {where}: {e.strerror or e}"


def _create_server(app: bottle.Bottle, settings: Any, dispatcher: _Lanes) -> Any:
    return waitress.create_server(
        app,
        _dispatcher=dispatcher,  # its threads start once the server is made (set_thread_count)
        host=settings.host,
        port=settings.port,
        max_request_body_size=body_limit(settings),
        # waitress stops accepting at connection_limit (default 100), and a client sending one header
        # byte a second never looks idle: 100 such sockets locked everyone else out (bench/soak.py).
        # Idle channels cost waitress little; poll() because select() stops at descriptor 1024.
        connection_limit=settings.connection_limit,
        asyncore_use_poll=True,
        channel_timeout=settings.channel_timeout,
        ident="imgsvc",
    )


if __name__ == "__main__":
    sys.exit(main())
