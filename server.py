"""The HTTP layer: the only module that imports Bottle or speaks HTTP.

`build_parts(settings, **overrides)` builds every part of the service (store, detector, fetcher, ingest,
Imgur client, jobs) for `main()` and the tests alike; `make_app(settings, parts)` builds the Bottle app
from them; `main()` reads flags and environment and serves the app with waitress. This module parses
requests, writes the response JSON of every resource (images and jobs) and serves the page's files.
Every error, Bottle's own 404/405 and unexpected 500s included, leaves as `application/problem+json`;
domain errors become HTTP statuses in one table, `ERROR_STATUS`.
"""

from __future__ import annotations

import binascii
import collections
import contextlib
import datetime
import errno
import functools
import hashlib
import io
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Callable, Iterator

import bottle
import waitress
import waitress.channel
import waitress.parser
import waitress.server
import waitress.task
import waitress.utilities
import waitress.wasyncore

import detect
import fetch
import imaging
import imgur
import ingest
import jobs as jobs_mod
import lan
import metrics as metrics_mod
import settings as settings_mod
import store
import vision

try:  # SIMD base64: 0.6 ms instead of 21 for a 3.2 MB photo's 4.3 MB of text, the same strict checks
    import pybase64 as base64
except ImportError:  # a platform without its wheel or a compiler: the standard library's, slower
    import base64  # type: ignore[no-redef]
try:  # JSON answers written 5-10x faster (_dumps); without it the standard library writes them
    import orjson
except ImportError:
    orjson = None  # type: ignore[assignment]

__version__ = "0.1.0"

log = logging.getLogger(__name__)

# Domain errors -> HTTP status. The first matching class (in MRO order of the raised error) wins.
ERROR_STATUS: dict[type[BaseException], int] = {
    imaging.TooManyPixels: 413,
    imaging.TooLargeToDecode: 413,
    imaging.DecodeBusy: 503,  # with Retry-After
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
    vision.UnknownModel: 404,
    vision.UnusableModel: 400,
}

PROBLEM_JSON = "application/problem+json"
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
INTERNAL_ERROR = "The server failed to handle this request; the error is in its log. Try again later."
BODY_TOO_LARGE = "The request body is too large; send a smaller image (see MAX_IMAGE_BYTES)."
SESSION_BODY_LIMIT = 4096  # {"key": "..."}


class ClientError(Exception):
    """A mistake in the request that the HTTP layer itself finds (bad JSON, bad query...)."""

    def __init__(
        self, status: int, detail: str, headers: dict[str, str] | None = None, members: dict[str, Any] | None = None
    ):
        super().__init__(detail)
        self.status = status
        self.headers = headers or {}
        self.members = members or {}  # extension members of the problem (RFC 9457), e.g. a batch's `errors`


def problem_body(status: int, detail: str, members: dict[str, Any] | None = None) -> str:
    """The one error shape (RFC 9457); `detail` tells the user what was wrong and what to do."""
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail}
    return json.dumps({**body, **(members or {})})


VISION_PREFIX = "/v1/vision/"
# DeepStack's clients know one status for every mistake in what was sent, 400; the other statuses stay.
DEEPSTACK_STATUS = {415: 400, 422: 400}
MODEL_RETRY_AFTER = 30  # seconds: the hint given to a DeepStack client while there is no model


def is_vision(path: str) -> bool:
    """Whether `path` is under /v1/vision/, where every answer is in DeepStack's shape."""
    return path.startswith(VISION_PREFIX) or path == VISION_PREFIX[:-1]


def refusal(path: str, status: int, detail: str, members: dict[str, Any] | None = None) -> tuple[int, str, str]:
    """(status, body, Content-Type) of every refusal, the one place one takes its shape: problem+json, or
    under /v1/vision/ DeepStack's `{"success": false, "error", "code", "duration": 0}` as application/json
    (what DeepStack's clients read; Frigate's detector process crashes on a body that is not JSON)."""
    if is_vision(path):
        status = DEEPSTACK_STATUS.get(status, status)
        body = json.dumps({"success": False, "error": detail, "code": status, "duration": 0})
        return status, body, "application/json"
    return status, problem_body(status, detail, members), PROBLEM_JSON


def _request_path() -> str:
    try:
        return bottle.request.path
    except (RuntimeError, KeyError):  # outside a request
        return ""


def problem(
    status: int, detail: str, headers: dict[str, str] | None = None, members: dict[str, Any] | None = None
) -> bottle.HTTPResponse:
    status, body, kind = refusal(_request_path(), status, detail, members)
    res = bottle.HTTPResponse(body, status=status, headers=headers)
    res.content_type = kind
    return res


def lan_answer(answer: lan.Answer) -> bottle.HTTPResponse:
    """The guard's answers (refusals, preflights, the session routes'), shaped by problem(): under
    /v1/vision/ in DeepStack's shape."""
    if not answer.detail:
        return bottle.HTTPResponse(status=answer.status, headers=dict(answer.headers))
    return problem(answer.status, answer.detail, dict(answer.headers))


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
            return problem(e.status, str(e), e.headers, e.members)
        except Exception as e:
            status = status_for(e)
            if status is None:
                log.exception("unexpected error in %s %s", bottle.request.method, bottle.request.path)
                return problem(500, INTERNAL_ERROR)
            if status >= 500 and not isinstance(e, ingest.Busy):  # a Gate logs its refusals, once a minute
                log.warning("%s %s: %s", bottle.request.method, bottle.request.path, e)
            retry_after = getattr(e, "retry_after", None)
            if retry_after is None and isinstance(e, detect.ModelError) and is_vision(bottle.request.path):
                retry_after = MODEL_RETRY_AFTER  # DeepStack clients retry on it; a model may be put in place
            return problem(status, str(e), {"Retry-After": str(retry_after)} if retry_after else None)

    return wrapper


def _bottle_error(res: bottle.HTTPError) -> str:
    """Bottle's own errors (no route, wrong method, a failure outside a route) as problem+json."""
    status = res.status_code
    if status == 404 and is_vision(bottle.request.path):
        detail = (
            f"There is no {bottle.request.path[:200]} here: of DeepStack's API this service offers object detection, "
            "POST /v1/vision/detection, /v1/vision/custom/<model> and /v1/vision/custom/list."
        )
    elif status == 404:
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
    _, body, kind = refusal(bottle.request.path, status, detail)  # 404, 405, 413, 500: no status changes
    bottle.response.content_type = kind
    return body


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
    if len(text) * 3 // 4 > max_bytes + 3 and len("".join(text.split())) * 3 // 4 > max_bytes + 3:
        raise ClientError(413, f"the image is larger than {max_bytes:,} bytes (MAX_IMAGE_BYTES); send a smaller one")
    try:
        # Most clients send plain padded base64: decoded as it is, without copying 4 MB of text twice.
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        data = _decode_base64_loosely(text)
    if not data:
        raise ClientError(400, "`image` is empty; send the file's bytes base64-encoded")
    if len(data) > max_bytes:
        raise ClientError(413, f"the image is larger than {max_bytes:,} bytes (MAX_IMAGE_BYTES); send a smaller one")
    return data


def _decode_base64_loosely(text: str) -> bytes:
    """Base64 as people's tools write it: line breaks, the URL-safe alphabet, padding left out."""
    text = "".join(text.split())
    if "-" in text or "_" in text:
        text = text.translate(str.maketrans("-_", "+/"))
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(400, "`image` is not valid base64; send the file's bytes base64-encoded (or a data: URI)") from None


def _check_url(url: Any) -> str:
    if not isinstance(url, str) or not url.strip():
        raise ClientError(400, "`url` must be an http(s) URL string")
    fetch.check_url(url.strip())  # raises fetch.InvalidURL -> 400
    return url.strip()


def _is_json(kind: str) -> bool:
    return kind == "application/json" or kind.endswith("+json")


def read_body(limit: int, too_large: str) -> bytes:
    """The request body, read once into memory, at most `limit` bytes (413 with `too_large` beyond).

    Bottle spools bodies over its class-wide MEMFILE_MAX (100 KB) to a temporary file and refuses them
    for request.json; raising that limit is process-wide state. Reading the body here instead, bounded by
    this app's own limit, and handing Bottle the bytes in memory keeps each app's limit its own.
    """
    env = bottle.request.environ
    cached = env.get("bottle.request.body")
    if cached is None:
        length = bottle.request.content_length
        if length > limit:
            raise ClientError(413, too_large)
        data = env["wsgi.input"].read(length if length >= 0 else limit + 1) if "wsgi.input" in env else b""
        if len(data) > limit:
            raise ClientError(413, too_large)
        cached = env["wsgi.input"] = env["bottle.request.body"] = io.BytesIO(data)
    return cached.getvalue()


# Bodies that make a parser work hard for few bytes (issue 10) are refused before anything is built.
JSON_MAX_TOKENS = 1000  # brackets, braces, commas, colons and strings of a POST /images body (about 12 in use)
FORM_MAX_BYTES = 64 * 1024  # a URL-encoded form carries url, label and detect: small by nature
FORM_MAX_FIELDS = 8  # fields of a URL-encoded form, parts of a multipart one (4 are used)
PART_HEADERS_MAX_BYTES = 8 * 1024  # one multipart part's header lines (Apache's LimitRequestFieldSize)
FORM_URLENCODED = "application/x-www-form-urlencoded"
FORM_TOO_LARGE = (
    f"a URL-encoded form is at most {FORM_MAX_BYTES // 1024} KB (it carries only url, label and detect); "
    "send the image itself as multipart/form-data or base64 JSON"
)
FORM_FIELDS = ("image", "url", "label", "detect")

_STRUCTURAL = b"{}[],:"
_SCAN_CHUNK = 64 * 1024


def _backslashes_before(data: bytes, start: int, end: int) -> int:
    """How many backslashes come right before `end` (not before `start`), looked at 64 KB at a time."""
    run = 0
    while end > start:
        window = data[max(start, end - _SCAN_CHUNK):end]
        kept = len(window.rstrip(b"\\"))
        run += len(window) - kept
        if kept:
            break
        end -= len(window)
    return run


def json_tokens_over(data: bytes, limit: int) -> bool:
    """Whether the JSON text `data` holds more than `limit` tokens outside strings: brackets, braces,
    commas, colons and the strings themselves (numbers and literals sit between those).

    json.loads builds a Python object per token (`[{},{},...]`: about 100 MB for 4.5 MB), so this runs
    first, in C-speed steps: bytes.find (memchr) jumps from a string's opening quote to the next quote,
    which ends the string unless a backslash is right before it; runs between strings are counted in
    64 KB chunks, so a huge run stops at the first chunk past the limit. An escaped quote costs a token
    too (a real body holds a few, in a label), which bounds the steps. A 28 MB base64 body costs two
    memchr passes (a few ms). Text that is not UTF-8 may be miscounted; _json_object refuses it anyway.
    """
    tokens, pos, end = 0, 0, len(data)
    while pos < end:
        quote = data.find(b'"', pos)
        stop = end if quote < 0 else quote
        for i in range(pos, stop, _SCAN_CHUNK):
            chunk = data[i:min(stop, i + _SCAN_CHUNK)]
            tokens += len(chunk) - len(chunk.translate(None, _STRUCTURAL))
            if tokens > limit:
                return True
        if quote < 0:
            return False
        tokens += 1  # the string
        close = data.find(b'"', quote + 1)
        while close > 0 and data[close - 1] == 0x5C and _backslashes_before(data, quote + 1, close) % 2:
            tokens += 1  # an escaped quote: look further
            if tokens > limit:
                return True
            close = data.find(b'"', close + 1)
        if tokens > limit:
            return True
        if close < 0:
            return False  # unterminated: json.loads refuses it
        pos = close + 1
    return False


def _json_object(data: bytes, fields: tuple[str, ...], example: str, max_tokens: int, fewer: str) -> dict[str, Any]:
    """The body `data` as a JSON object holding only `fields`; ClientError (400) otherwise, and before
    json.loads when it holds more than `max_tokens` tokens (`fewer` says what to send instead)."""
    if json_tokens_over(data, max_tokens):
        raise ClientError(
            400, f"the body has more than {max_tokens:,} JSON tokens (brackets, braces, commas, colons, strings); {fewer}"
        )
    try:
        # JSON between systems is UTF-8 (RFC 8259): strictly, so no UTF-16 and no encoded lone surrogates.
        body = json.loads(data.decode("utf-8-sig") or "null")
    except UnicodeDecodeError:
        raise ClientError(400, f"the body is not valid JSON: it is not UTF-8 text; send {example} as UTF-8") from None
    except (ValueError, RecursionError):
        raise ClientError(400, f"the body is not valid JSON; send {example}") from None
    if not isinstance(body, dict):
        raise ClientError(400, f"the body must be a JSON object: {example}")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise ClientError(400, f"unknown field(s) {', '.join(unknown)}; the fields are {', '.join(fields)}")
    return body


def _add_field(fields: dict[str, str], name: str, value: str) -> None:
    if name not in FORM_FIELDS:
        raise ClientError(400, f"unknown field {name[:40]!r}; a form takes {', '.join(FORM_FIELDS)}")
    if name in fields:
        raise ClientError(400, f"`{name}` is given more than once; send each field once")
    fields[name] = value


def _urlencoded_form(data: bytes) -> dict[str, str]:
    """A URL-encoded body (at most FORM_MAX_BYTES, read_body saw to it) as {field: text}; every field
    strictly UTF-8 (Bottle's forms silently dropped a field that was not)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ClientError(400, "the form body is not UTF-8 text; percent-encode its fields as UTF-8") from None
    pairs = [pair for pair in text.split("&") if pair]
    if len(pairs) > FORM_MAX_FIELDS:
        raise ClientError(400, f"the form has more than {FORM_MAX_FIELDS} fields; send only {', '.join(FORM_FIELDS[1:])}")
    fields: dict[str, str] = {}
    for pair in pairs:
        raw_name, _, raw_value = pair.partition("=")
        try:
            name = urllib.parse.unquote_plus(raw_name, errors="strict")
        except UnicodeDecodeError:
            raise ClientError(400, "a field name of the form is not UTF-8 once percent-decoded") from None
        try:
            value = urllib.parse.unquote_plus(raw_value, errors="strict")
        except UnicodeDecodeError:
            raise ClientError(400, f"`{name[:40]}` is not UTF-8 text once percent-decoded; percent-encode it as UTF-8") from None
        _add_field(fields, name, value)
    return fields


_PARAM = re.compile(r';\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;]*))', re.S)


def _header_params(text: str) -> dict[str, str]:
    """`; name="x"; filename=y` -> {"name": "x", "filename": "y"} (names lower-cased, the first one wins)."""
    params: dict[str, str] = {}
    for m in _PARAM.finditer(text):
        quoted = m.group(2)
        value = re.sub(r"\\(.)", r"\1", quoted, flags=re.S) if quoted is not None else m.group(3).strip()
        params.setdefault(m.group(1).lower(), value)
    return params


@dataclass(frozen=True)
class _Part:
    name: str
    filename: str | None
    content: memoryview  # a view into the body: nothing copied until the image is taken


def _part(head: bytes, content: memoryview) -> _Part:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise ClientError(400, "a part's headers are not UTF-8 text; send field and file names as UTF-8") from None
    disposition = None
    for line in text.replace("\r\n ", " ").replace("\r\n\t", " ").split("\r\n"):  # folded lines joined
        name, colon, value = line.partition(":")
        if not colon:
            raise ClientError(400, "a part's header line has no colon; send the form as multipart/form-data does")
        if name.strip().lower() == "content-disposition":
            disposition = value
    if disposition is None:
        raise ClientError(400, 'a part has no Content-Disposition header; each needs Content-Disposition: form-data; name="..."')
    kind, _, rest = disposition.partition(";")
    params = _header_params(";" + rest)
    if kind.strip().lower() != "form-data" or not params.get("name"):
        raise ClientError(400, 'a part has no field name; each needs Content-Disposition: form-data; name="..."')
    return _Part(params["name"], params.get("filename"), content)


def _multipart_parts(data: bytes) -> list[_Part]:
    """The parts of a multipart/form-data body, the scan of _multipart_form (which says its bounds)."""
    params = _header_params(";" + bottle.request.environ.get("CONTENT_TYPE", "").partition(";")[2])  # not lower-cased
    boundary = params.get("boundary", "")
    if not 1 <= len(boundary) <= 70:
        raise ClientError(400, "multipart/form-data needs a boundary parameter of 1 to 70 characters in its Content-Type")
    delimiter = b"\r\n--" + boundary.encode("latin-1")  # WSGI headers are latin-1: this cannot fail
    if data.startswith(delimiter[2:]):
        pos = len(delimiter) - 2
    else:  # a preamble before the first boundary is allowed, and ignored
        pos = data.find(delimiter)
        if pos < 0:
            raise ClientError(400, "the multipart body holds no boundary line; send the form as multipart/form-data does")
        pos += len(delimiter)
    view, parts = memoryview(data), []
    while not data.startswith(b"--", pos):  # "--" after a boundary closes the body
        line_end = data.find(b"\r\n", pos, pos + 256)
        if line_end < 0 or data[pos:line_end].strip(b" \t"):
            raise ClientError(400, "a multipart boundary line is followed by something other than a line break")
        if len(parts) == FORM_MAX_FIELDS:
            raise ClientError(
                400, f"the form has more than {FORM_MAX_FIELDS} parts; send the file part image (or url), label and detect"
            )
        start = line_end + 2
        if data.startswith(b"\r\n", start):
            head_end = start
        else:
            head_end = data.find(b"\r\n\r\n", start, start + PART_HEADERS_MAX_BYTES + 4)
            if head_end < 0:
                raise ClientError(400, f"a part's headers are over {PART_HEADERS_MAX_BYTES // 1024} KB or never end; send shorter headers")
        body_start = head_end + (2 if head_end == start else 4)
        body_end = data.find(delimiter, body_start)
        if body_end < 0:
            raise ClientError(400, "the multipart body ends without its closing boundary line; send the whole form")
        parts.append(_part(data[start:head_end], view[body_start:body_end]))
        pos = body_end + len(delimiter)
    return parts


def _multipart_form(data: bytes) -> tuple[dict[str, str], _Part | None]:
    """A multipart/form-data body as ({text field: value}, the file part `image` or None).

    Bounded while scanning, before anything is built: at most FORM_MAX_FIELDS parts, at most
    PART_HEADERS_MAX_BYTES of headers per part; parts are views into the body, not copies. Bottle's
    parser built every part first (424,000 parts: 19 s), failed with a 500 on a field or header that was
    not UTF-8, and on control characters in a file name.
    """
    parts = _multipart_parts(data)
    fields: dict[str, str] = {}
    upload = None
    for p in parts:
        if p.name == "image":
            if p.filename is None:
                raise ClientError(
                    400, "`image` came as a text field; send it as a file part (curl -F image=@photo.jpg, with the @)"
                )
            if upload is not None:
                raise ClientError(400, "`image` is given more than once; send one file part")
            upload = p
            continue
        if p.filename is not None and p.name in FORM_FIELDS:
            raise ClientError(400, f"`{p.name}` came as a file; send it as a text field")
        try:
            value = str(p.content, "utf-8")
        except UnicodeDecodeError:
            raise ClientError(400, f"`{p.name}` is not UTF-8 text; send it as UTF-8") from None
        _add_field(fields, p.name, value)
    return fields, upload


def _read_new_image(data: bytes, max_bytes: int) -> ingest.Submission:
    kind = _media_type()
    if _is_json(kind):
        example = '{"image": "<base64>"} or {"url": "https://..."}'
        body = _json_object(
            data, ("image", "url", "label", "detect", "filename"), example, JSON_MAX_TOKENS,
            f'a new image is one small object: {example}, with "label" and "detect"',
        )
        image, url = body.get("image"), body.get("url")
        if ("image" in body) == ("url" in body):
            raise ClientError(400, "send exactly one of `image` (base64) and `url`")
        if "image" in body and not isinstance(image, str):
            raise ClientError(400, "`image` must be a base64 string (or a data: URI)")
        want = body.get("detect", False)
        if not isinstance(want, bool):
            raise ClientError(400, "`detect` must be true or false")
        label = ingest.check_label(body.get("label"))
        filename = body.get("filename")
        if filename is not None and not isinstance(filename, str):
            raise ClientError(400, "`filename` must be a string: the image's file name, shown beside its label")
        if "url" in body:
            if filename is not None:
                raise ClientError(400, "`filename` goes with `image`; an image from a URL is named by the URL's last path segment")
            url = _check_url(url)
            return ingest.Submission(None, url, label, want, url)
        return ingest.Submission(_decode_base64(image, max_bytes), None, label, want, filename)
    if kind == "multipart/form-data":
        fields, upload = _multipart_form(data)
    elif kind == FORM_URLENCODED:  # what a browser sends for a form with only `url`
        fields, upload = _urlencoded_form(data), None
    else:
        raise ClientError(
            415,
            f"Content-Type {kind or '(none)'} is not accepted; send application/json, multipart/form-data "
            "or application/x-www-form-urlencoded (a form with only `url`)",
        )
    url = fields.get("url")
    if (upload is None) == (url is None):
        raise ClientError(400, "send exactly one of the file part `image` and the field `url`")
    raw = fields.get("detect", "").strip().lower()
    if raw not in _TRUE | _FALSE:
        raise ClientError(400, "`detect` must be true/1/on or false/0/off")
    label = ingest.check_label(fields.get("label"))
    if url is not None:
        url = _check_url(url)
        return ingest.Submission(None, url, label, raw in _TRUE, url)
    if len(upload.content) > max_bytes:
        raise ClientError(413, f"the image is larger than {max_bytes:,} bytes (MAX_IMAGE_BYTES); send a smaller one")
    if not len(upload.content):
        raise ClientError(400, "the file part `image` is empty")
    return ingest.Submission(upload.content.tobytes(), None, label, raw in _TRUE, upload.filename)


VISION_FIELDS = ("min_confidence", "api_key")  # with the file part `image`; clients' other fields are ignored


def _vision_form(limit: int) -> tuple[dict[str, str], _Part | None]:
    """The form of a /v1/vision/ POST: ({min_confidence, api_key present}, the part `image` or None).

    Kept in the environ, since the key check (api_key) and the route both read it. `image` may come with
    any file name or none and any Content-Type (the bytes are sniffed); other fields are ignored, as
    DeepStack does; the bounds of _multipart_form hold."""
    env = bottle.request.environ
    cached = env.get("imgsvc.vision_form")
    if cached is not None:
        return cached
    if _media_type() != "multipart/form-data":
        raise ClientError(
            400, "no image: send the picture as the file part `image` of a multipart/form-data body (curl -F image=@photo.jpg)"
        )
    too_large = f"the body is larger than {limit:,} bytes; send a smaller image (MAX_IMAGE_BYTES)"
    if bottle.request.content_length > limit:
        raise ClientError(413, too_large)
    fields: dict[str, str] = {}
    upload = None
    for p in _multipart_parts(read_body(limit, too_large)):
        if p.name != "image" and p.name not in VISION_FIELDS:
            continue
        if p.name in fields or (p.name == "image" and upload is not None):
            raise ClientError(400, f"`{p.name}` is given more than once; send each field once")
        if p.name == "image":
            upload = p
            continue
        try:
            fields[p.name] = str(p.content, "utf-8")
        except UnicodeDecodeError:
            raise ClientError(400, f"`{p.name}` is not UTF-8 text; send it as UTF-8") from None
    env["imgsvc.vision_form"] = (fields, upload)
    return fields, upload


def _vision_confidence(raw: str | None) -> float:
    if raw is None or not raw.strip():
        return vision.DEFAULT_MIN_CONFIDENCE
    try:
        value = float(raw.strip())
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise ClientError(400, f"`min_confidence` must be a number from 0 to 1 (default {vision.DEFAULT_MIN_CONFIDENCE}), not {raw[:40]!r}")
    return value


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


def _size_param(default: int) -> int:
    """`size`: exactly one of imaging.THUMBNAIL_SIZES (the longest side in pixels), `default` when absent."""
    raw = bottle.request.query.get("size")
    if raw is None:
        return default
    if raw not in {str(n) for n in imaging.THUMBNAIL_SIZES}:
        sizes = ", ".join(str(n) for n in imaging.THUMBNAIL_SIZES[:-1]) + f" or {imaging.THUMBNAIL_SIZES[-1]}"
        raise ClientError(400, f"`size` must be one of {sizes} (the longest side in pixels); leave it out for the default")
    return int(raw)


def accepts_webp(accept: str | None) -> bool:
    """Whether an Accept header names image/webp with a quality above 0 (browsers that show WebP say so)."""
    for item in (accept or "").split(","):
        media, *params = item.split(";")
        if media.strip().lower() != "image/webp":
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        return q > 0
    return False


ANNOTATE_VERSION = 1  # in the annotated render's ETag: a new drawing style must not match old copies


OBJECTS_MAX_TERMS = 20  # search terms of one GET /images, counted as written (before plurals and categories)


def _objects_param() -> list[list[str]] | None:
    """The terms of every `objects` parameter (it may repeat), one list per parameter; None without any."""
    given = bottle.request.query.getall("objects")  # as latin-1 (WSGI); getunicode gave None for non-UTF-8: "no filter"
    if not given:
        return None
    terms = []
    for raw in given:
        try:
            raw = raw.encode("latin-1").decode("utf-8")
        except UnicodeError:
            raise ClientError(400, "`objects` is not UTF-8 text once percent-decoded; percent-encode the names as UTF-8") from None
        names = [n.strip().strip("\"'").strip().lower() for n in raw.strip().strip("\"'").split(",")]
        names = [n for n in names if n]
        if not names:
            raise ClientError(400, "`objects` names no object; give one or more names, e.g. objects=dog,cat")
        terms.append(names)
    if sum(len(t) for t in terms) > OBJECTS_MAX_TERMS:
        raise ClientError(
            400, f"`objects` names more than {OBJECTS_MAX_TERMS} objects (plurals and categories count once); search for fewer at once"
        )
    return terms


def _check_query(known: tuple[str, ...], repeatable: tuple[str, ...] = ()) -> None:
    """ClientError (400) for a query parameter not in `known`, or one of them given twice unless `repeatable`:
    a misspelt filter (object=dog) must not answer as if there were none."""
    query = bottle.request.query
    unknown = sorted(set(query) - set(known))
    if unknown:
        names = [name.encode("latin-1").decode("utf-8", "replace")[:40] for name in unknown[:5]]  # WSGI's latin-1
        shown = ", ".join(names) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        takes = f"the parameters are {', '.join(known)}" if known else "this route takes no query parameters"
        raise ClientError(400, f"unknown query parameter(s) {shown}; {takes}")
    for name in known:
        if name not in repeatable and len(query.getall(name)) > 1:
            raise ClientError(400, f"`{name}` is given {len(query.getall(name))} times; give it once")


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


def _detect_threshold(value: Any) -> float:
    """`threshold` of POST /images/{id}/detect: a number from the detector's candidate floor to 1."""
    low = detect.CANDIDATE_FLOOR
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= 1:  # refuses nan
        raise ClientError(400, f"`threshold` must be a number from {low:g} to 1 (or left out for DETECT_THRESHOLD)")
    return float(value)


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
        "thumbnail_url": f"/images/{rec.id}/thumbnail",
        "filename": rec.filename,
        "model": rec.model,
        "model_name": rec.model_name,
        "threshold": rec.threshold,
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


BATCH_ERRORS_SHOWN = 20  # bad entries a batch's 400 lists in `errors`
BATCH_URL_SHOWN = 200  # characters of a bad URL repeated in `errors` and `detail`
_KINDS = {int: "a number", float: "a number", bool: "true or false", dict: "an object", list: "a list"}


def batch_reason(p: jobs_mod.BatchProblem) -> str:
    """Why one entry of a batch cannot be used, as the rest of a sentence that starts "line 3 (...)"."""
    if not isinstance(p.value, str):
        return "is empty (null), not a URL" if p.value is None else f"is {_KINDS.get(type(p.value), 'not text')}, not a URL"
    if not p.value.strip():
        return "is empty"
    if p.reason.startswith("Only http:// and https://"):
        scheme = urllib.parse.urlsplit(p.value.strip()).scheme
        return "is not an http or https URL" + (f" (its scheme is {scheme[:20]!r})" if scheme else "")
    return "cannot be fetched: " + p.reason[:1].lower() + p.reason[1:].rstrip(".")


def _shown(url: str) -> str:
    return url if len(url) <= BATCH_URL_SHOWN else url[: BATCH_URL_SHOWN - 3] + "..."


def batch_errors(e: jobs_mod.InvalidBatch) -> list[dict[str, Any]]:
    """The `errors` member of a batch's 400: every bad entry (up to BATCH_ERRORS_SHOWN), by index from 0."""
    return [
        {"index": p.index, "url": _shown(p.value) if isinstance(p.value, str) else None, "reason": batch_reason(p)}
        for p in e.problems[:BATCH_ERRORS_SHOWN]
    ]


def batch_detail(e: jobs_mod.InvalidBatch) -> str:
    """An InvalidBatch in the words of someone who typed one URL a line: the first bad line (lines
    count from 1) and why, then which other lines are bad; `errors` holds each of them."""
    if not e.problems:
        return f"`urls`: {e}"
    first = e.problems[0]
    shown = f" ({_shown(first.value)})" if isinstance(first.value, str) and first.value.strip() else ""
    detail = f"line {first.index + 1}{shown} {batch_reason(first)}"
    others = [str(p.index + 1) for p in e.problems[1:BATCH_ERRORS_SHOWN]]
    if others:
        more = f" and {len(e.problems) - BATCH_ERRORS_SHOWN} more" if len(e.problems) > BATCH_ERRORS_SHOWN else ""
        detail += f"; line{'s' if len(others) > 1 else ''} {', '.join(others)}{more} cannot be used either"
    return detail + "; fix or remove them and send the batch again (`errors` lists each)"


def _dumps(value: Any) -> bytes | str:
    """`value` as JSON text: orjson's (UTF-8 bytes; 3.4 of a 100-image page's 10 ms went to the standard
    library's encoder, mostly writing floats), else the standard library's (orjson missing, or a value it
    does not take, such as an integer past 64 bits)."""
    if orjson is not None:
        try:
            return orjson.dumps(value)
        except TypeError:
            pass
    return json.dumps(value)


def _json(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> bottle.HTTPResponse:
    """Any JSON value (Bottle only serialises dicts by itself)."""
    res = bottle.HTTPResponse(_dumps(value), status=status, headers=headers)
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
    metrics: metrics_mod.Metrics | None = None  # GET /metrics; build_parts makes it once the rest exists
    closers: list[Callable[[], Any]] = field(default_factory=list, repr=False)
    shelf: vision.Shelf | None = None  # the models of /v1/vision/custom/<name>
    thumbnails: ingest.Thumbnails | None = None  # made on request, and ahead for a listed page

    def close(self, jobs_timeout: float = 10.0) -> None:
        """Stop the upload jobs (waiting for uploads under way, up to a deadline), the thumbnails made
        ahead, and close the database."""
        self.jobs.close(timeout=jobs_timeout)  # logs what it abandoned; closes the Imgur client
        if self.shelf is not None:
            self.shelf.close()
        if self.thumbnails is not None:
            self.thumbnails.close()
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
    budget = imaging.DecodeBudget(settings.decode_memory_mb * imaging.MB, settings.decode_wait_ms / 1000)
    imaging.free_large_blocks_promptly()  # so that the RSS follows the budget, not past decodes' peaks
    # Every Detector of the app reports its detection times here (give the same to one made later).
    times = metrics_mod.DetectionTimes()
    if detector is None:
        detector = detect.Detector(
            settings.model, threshold=settings.detect_threshold, threads=settings.detect_threads or None,
            pool=settings.detect_interpreters or None, max_pixels=settings.max_pixels, budget=budget,
            observe=times,
        )
    elif isinstance(detector.observe, metrics_mod.DetectionTimes):
        times = detector.observe  # a caller's detector (tests) shows its own times
    images = store.Store(
        settings.db, min_free_mb=settings.min_free_disk_mb, pool_size=settings.db_pool_size,
        busy_timeout_ms=int(settings.db_busy_timeout * 1000),
    )
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
        keep_finished_bytes=int(settings.jobs_kept_mb * 1024 * 1024),
    )
    wait = settings.admission_wait_ms / 1000
    pipeline = ingest.Ingest(
        images=images, detector=detector, fetcher=fetcher, max_pixels=settings.max_pixels, budget=budget,
        downloads=ingest.download_gate(settings.download_slots, wait),
        detections=ingest.detection_gate(detector.pool, settings.detect_queue, wait),
    )
    shelf = vision.Shelf(
        settings.vision_models_dir, loaded=settings.vision_models_loaded, main=detector,
        make_detector=lambda path: detect.Detector(
            path, threshold=settings.detect_threshold, threads=detector.threads, pool=detector.pool,
            max_pixels=settings.max_pixels, budget=budget, observe=times,
        ),
    )
    thumbnails = ingest.Thumbnails(
        images, max_pixels=settings.max_pixels, budget=budget, read_ahead=settings.thumbnail_read_ahead,
    )
    parts = Parts(settings, images, detector, fetcher, pipeline, jobs, uploader or None, shelf=shelf, thumbnails=thumbnails)
    parts.metrics = metrics_mod.Metrics(parts, times)
    return parts


def make_app(settings: Any, parts: Parts) -> bottle.Bottle:
    """Build the WSGI app from its parts. Nothing here touches the network or starts a thread, and
    nothing changes Bottle's process-wide state: each app keeps its own limits."""
    app = bottle.Bottle()
    app.config["imgsvc.settings"] = settings
    app.config["imgsvc.metrics"] = parts.metrics  # _create_server adds waitress's server to it
    app.default_error_handler = _bottle_error
    app.install(_json_errors)
    max_bytes = settings.max_image_bytes
    limit = body_limit(settings)
    images, detector, jobs = parts.images, parts.detector, parts.jobs
    guard = app.config["imgsvc.guard"] = lan.from_settings(settings)  # raises lan.KeyUnusable

    @app.hook("before_request")  # first: a refused request never touches the database
    def _guard():
        environ = bottle.request.environ
        answer = guard.check(environ)
        if answer is not None and answer.status == 401 and is_vision(bottle.request.path) and not lan.sends_credentials(environ):
            key = _vision_key(limit)  # DeepStack's clients send the key as the form field api_key
            if key is not None:
                answer = guard.check_key(key, environ)
        if answer is not None:
            raise lan_answer(answer)

    @app.hook("after_request")
    def _lan_headers():
        for name, value in guard.response_headers(bottle.request.environ, bottle.response.content_type or ""):
            bottle.response.set_header(name, value)

    # A request's database connection is taken from the pool at its first query (the store's errors say
    # when the database is busy or unreachable: 503 with Retry-After), and handed back when it ends. What
    # needs no database (/health, the page, /metrics' process part) goes on while it is away.
    @app.hook("after_request")
    def _close():
        images.close()

    @app.hook("after_request")
    def _count_request():
        env = bottle.request.environ
        route = env.get("bottle.route")
        if route is None:  # refused before routing (the guard), or no route: the rule it would have had
            try:
                route = app.router.match(env)[0]
            except bottle.HTTPError:
                pass
        parts.metrics.count_request(bottle.request.method, route and route.rule, bottle.response.status_code)

    @app.get("/metrics")
    def metrics():
        return bottle.HTTPResponse(parts.metrics.text(), headers={"Content-Type": metrics_mod.CONTENT_TYPE})

    @app.get("/health")
    def health():
        info = detector.info()
        # `imgur` lets the page say whether its Imgur panel works without sending a batch to find out.
        return {"status": "ok", "version": __version__, "detector": info, "auth": guard.mode,
                "imgur": {"enabled": jobs.configured}, "database": images.backend.name}

    @app.post("/session")
    def sign_in():
        if not _is_json(_media_type()):
            raise ClientError(415, 'send application/json: {"key": "<API_KEY>"}')
        too_big = f'the body is larger than {SESSION_BODY_LIMIT:,} bytes; send only {{"key": "<API_KEY>"}}'
        raw = read_body(SESSION_BODY_LIMIT, too_big)
        key = _json_object(raw, ("key",), '{"key": "<API_KEY>"}', 16, 'send only {"key": "<API_KEY>"}').get("key")
        if not isinstance(key, str):
            raise ClientError(400, '`key` must be the API key as a string: {"key": "<API_KEY>"}')
        return lan_answer(guard.sign_in(key, bottle.request.environ))

    @app.delete("/session")
    def sign_out():
        return lan_answer(guard.sign_out(bottle.request.environ))

    too_large = f"the body is larger than {limit:,} bytes; send a smaller image"
    job_tokens = JSON_MAX_TOKENS + 20 * settings.job_max_urls  # a string and a comma per entry jobs.check reads

    @app.post("/images")
    def create_image():
        # A URL-encoded form is refused past 64 KB before a byte of it is read (let alone parsed).
        cap, refusal = (FORM_MAX_BYTES, FORM_TOO_LARGE) if _media_type() == FORM_URLENCODED else (limit, too_large)
        if bottle.request.content_length > cap:
            raise ClientError(413, refusal)
        include = bottle.request.query.get("include")
        if include not in (None, "data"):  # checked first: a failed request stores nothing
            raise ClientError(400, "`include` takes one value, data (to return the stored bytes as base64)")
        raw = read_body(cap, refusal)
        rec, data = parts.ingest.add(_read_new_image(raw, max_bytes))
        body = image_json(rec, data if include == "data" else None)
        return _json(body, headers={"Location": f"/images/{rec.id}"})

    @app.get("/images")
    def list_images():
        if "include" in bottle.request.query:  # pages carry no bytes: a page of 1,000 would not fit in memory
            raise ClientError(400, "`include` is not taken by the list; ask GET /images/{id}?include=data for one image's bytes")
        _check_query(("limit", "before", "objects", "match", "min_confidence"), repeatable=("objects",))
        limit = _int_param("limit", 1, 1000, default=100)
        before = _int_param("before", 1)
        terms = _objects_param()
        match = bottle.request.query.get("match", "any")
        if match not in ("any", "all"):
            raise ClientError(400, "`match` must be any or all")
        min_confidence = _confidence_param()
        if terms is None and (min_confidence is not None or "match" in bottle.request.query):
            raise ClientError(400, "`match` and `min_confidence` go with `objects`, e.g. objects=dog&match=all")
        # `match` is between the terms as written; each term stands for any of its names ("dogs": dog or dogs).
        groups = [ingest.search_names(term) for names in terms or () for term in names]
        records, more = images.list(
            limit=limit, before=before, objects=groups, match_all=match == "all", min_confidence=min_confidence
        )
        headers = {}
        if more and records:
            params: list[tuple[str, Any]] = [("limit", limit), ("before", records[-1].id)]
            if terms:
                # The terms as written, one `objects` each as given, so the next page expands them the same way.
                params += [("objects", ",".join(names)) for names in terms]
                params.append(("match", match))
                if min_confidence is not None:
                    params.append(("min_confidence", min_confidence))
            headers["Link"] = f'</images?{urllib.parse.urlencode(params)}>; rel="next"'
        answer = _json([image_json(r) for r in records], headers=headers)
        parts.thumbnails.read_ahead(records)  # the grid's thumbnails, made while the page runs its scripts
        return answer

    @app.get("/images/<id>")
    def get_image(id):  # noqa: A002 - the route parameter is documented as {id}
        _check_query(("include",))
        include = bottle.request.query.get("include")
        if include not in (None, "data"):
            raise ClientError(400, "`include` takes one value, data (to return the stored bytes as base64)")
        image_id = _image_id(id)
        rec = images.get(image_id)
        return image_json(rec, images.file(image_id)[0] if include == "data" else None)

    @app.get("/images/<id>/file")
    def get_file(id):  # noqa: A002
        data, content_type, sha256 = images.file(_image_id(id))
        etag = f'"{sha256}"'
        headers = {
            "ETag": etag,
            # The bytes of an id never change; behind a key, no shared cache may keep them.
            "Cache-Control": f"{'private' if guard.key else 'public'}, max-age=31536000, immutable",
            "X-Content-Type-Options": "nosniff",
        }
        if _etag_matches(bottle.request.headers.get("If-None-Match"), etag):
            return bottle.HTTPResponse(status=304, headers=headers)
        res = bottle.HTTPResponse(data, headers=headers)
        res.content_type = content_type
        return res

    budget, max_pixels = parts.ingest.budget, settings.max_pixels

    @app.get("/images/<id>/thumbnail")
    def get_thumbnail(id):  # noqa: A002
        longest = _size_param(320)
        fmt = "webp" if accepts_webp(bottle.request.headers.get("Accept")) else "jpeg"
        image_id = _image_id(id)
        sha256, width, height = images.thumbnail_source(image_id)
        size = min(longest, max(width, height))  # never enlarged: the sizes past the picture's are the picture's
        etag = f'"{sha256}-{size}-{fmt}"'
        headers = {
            "ETag": etag,
            # Made from bytes that never change; one per format, so caches key on Accept too.
            "Cache-Control": f"{'private' if guard.key else 'public'}, max-age=31536000, immutable",
            "Vary": "Accept",
            "X-Content-Type-Options": "nosniff",
        }
        if _etag_matches(bottle.request.headers.get("If-None-Match"), etag):
            return bottle.HTTPResponse(status=304, headers=headers)
        thumb, kept = parts.thumbnails.get(image_id, sha256, size, fmt)
        body: Any = thumb.data if kept else _sent_then_kept(image_id, sha256, size, fmt, thumb)
        headers["Content-Length"] = str(len(thumb.data))
        res = bottle.HTTPResponse(body, headers=headers)
        res.content_type = imaging.THUMBNAIL_FORMATS[fmt][1]
        return res

    def _sent_then_kept(image_id: int, sha256: str, size: int, fmt: str, thumb: store.Thumbnail) -> Iterator[bytes]:
        """The body of a thumbnail's first answer, which keeps the thumbnail once its bytes are written:
        waitress writes each chunk to the socket as it comes (send_bytes=1), so the answer does not wait
        for the database's write (a commit with fsync, one at a time: 2-100 ms each with the first screen's
        12 made at once). Kept also when the client went away (close() runs the `finally`) or asked HEAD."""
        try:
            yield thumb.data
        finally:
            parts.thumbnails.keep(image_id, sha256, size, fmt, thumb)  # the request's connection is closed by now

    @app.get("/images/<id>/annotated")
    def get_annotated(id):  # noqa: A002
        longest = _size_param(imaging.ANNOTATED_SIZE)
        rec = images.get(_image_id(id))
        size = min(longest, max(rec.width, rec.height))
        drawn = [[d.label, d.confidence, d.x_min, d.y_min, d.x_max, d.y_max] for d in rec.detections]
        key = json.dumps([ANNOTATE_VERSION, rec.sha256, size, drawn])
        etag = f'"{hashlib.sha256(key.encode()).hexdigest()[:40]}"'  # the bytes and the detections drawn
        headers = {
            "ETag": etag,
            # Detections can change (a new model, a re-detection): kept copies are revalidated each time.
            "Cache-Control": "private, no-cache" if guard.key else "no-cache",
            "X-Content-Type-Options": "nosniff",
        }
        if _etag_matches(bottle.request.headers.get("If-None-Match"), etag):
            return bottle.HTTPResponse(status=304, headers=headers)
        data = images.file(rec.id)[0]
        made = imaging.annotate(data, rec.detections, size, max_pixels, budget)
        res = bottle.HTTPResponse(made.data, headers=headers)
        res.content_type = made.content_type
        return res

    detect_body_limit = 4096  # {"threshold": 0.4}

    @app.post("/images/<id>/detect")
    def detect_image(id):  # noqa: A002
        image_id = _image_id(id)
        _check_query(())
        threshold = None
        raw = read_body(detect_body_limit, f'the body is larger than {detect_body_limit:,} bytes; send only {{"threshold": 0.4}}')
        if raw.strip():
            if not _is_json(_media_type()):
                raise ClientError(415, 'send application/json: {"threshold": 0.4}, or no body for DETECT_THRESHOLD')
            body = _json_object(raw, ("threshold",), '{"threshold": 0.4}', 16, 'send only {"threshold": 0.4}')
            threshold = body.get("threshold")
            if threshold is not None:
                threshold = _detect_threshold(threshold)
        return image_json(parts.ingest.redetect(image_id, threshold))

    @app.delete("/images/<id>")
    def delete_image(id):  # noqa: A002
        images.delete(_image_id(id))
        return bottle.HTTPResponse(status=204)

    @app.get("/objects")
    def list_objects():
        _check_query(())
        return _json([{"name": name, "images": n} for name, n in images.objects()])

    @app.post("/v1/images/upload")
    def submit_job():
        if not jobs.configured:
            raise imgur.NotConfigured("Imgur uploads are off: set IMGUR_CLIENT_ID (see README) and restart the service")
        if not _is_json(_media_type()):
            raise ClientError(415, 'send application/json: {"urls": ["https://..."]}')
        body = _json_object(
            read_body(limit, too_large), ("urls",), '{"urls": ["https://...", ...]}', job_tokens,
            f'a job takes at most {settings.job_max_urls:,} URLs (JOB_MAX_URLS): send {{"urls": [...]}} with fewer',
        )
        urls = body.get("urls")
        if not isinstance(urls, list):
            raise ClientError(400, '`urls` must be a JSON array of http(s) URLs: {"urls": ["https://..."]}')
        try:
            checked = jobs.check(urls)
        except jobs_mod.InvalidBatch as e:
            raise ClientError(400, batch_detail(e), members={"errors": batch_errors(e)} if e.problems else None) from None
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
        res = bottle.static_file("index.html", root=STATIC_DIR)  # its security headers: lan.HTML_HEADERS
        res.set_header("Cache-Control", "no-cache")
        return res

    @app.get("/static/<filepath:path>")
    def static(filepath):
        res = bottle.static_file(filepath, root=STATIC_DIR)
        if isinstance(res, bottle.HTTPError):  # missing, or outside static/ (Bottle says 403): both "not here"
            return problem(404, f"There is no /static/{filepath} here; the page's files are under /static/.")
        res.set_header("Cache-Control", "no-cache")  # revalidate (Last-Modified): a new version shows at once
        return res

    _vision_routes(app, settings, parts)
    openapi = _openapi_document()

    @app.get("/openapi.json")
    def openapi_json():
        return openapi

    return app


def _vision_key(limit: int) -> str | None:
    """The api_key form field of a /v1/vision/ POST, or None (absent, blank, or the body is not a form)."""
    if bottle.request.method != "POST":
        return None
    try:
        fields, _ = _vision_form(limit)
    except ClientError:
        return None  # the request is refused for its missing key; its form is not the question now
    return fields.get("api_key", "").strip() or None


def _vision_routes(app: bottle.Bottle, settings: Any, parts: Parts) -> None:
    """The DeepStack / CodeProject.AI-compatible routes (README: Use it as a DeepStack / CodeProject.AI
    server). Their refusals take DeepStack's shape in refusal(); every other path under /v1/vision/ is a
    404 there."""
    limit, max_bytes = body_limit(settings), settings.max_image_bytes
    shelf, pipeline = parts.shelf, parts.ingest
    host_name = socket.gethostname()
    store_failures = vision.Throttled(60)

    def detect_objects(name: str | None) -> bottle.HTTPResponse:
        started = time.perf_counter()
        fields, upload = _vision_form(limit)
        min_confidence = _vision_confidence(fields.get("min_confidence"))
        if upload is None:
            raise ClientError(400, "no image: send the picture as the file part `image` (curl -F image=@photo.jpg)")
        if len(upload.content) > max_bytes:
            raise ClientError(413, f"the image is larger than {max_bytes:,} bytes (MAX_IMAGE_BYTES); send a smaller one")
        if not len(upload.content):
            raise ClientError(400, "the file part `image` is empty; send the picture's bytes")
        data = upload.content.tobytes()
        lent = contextlib.nullcontext(parts.detector) if name is None else shelf.use(name)
        with lent as detector:
            detector.load()  # no model: 503 now, before a place in the detection queue is taken
            gate = pipeline.detections
            with contextlib.nullcontext() if gate is None else gate.enter():
                result = detector.detect(data, budget=pipeline.budget)
        found = vision.predictions(result, min_confidence, settings.vision_max_predictions)
        body = vision.detection_answer(
            found, result.timings, (time.perf_counter() - started) * 1000, host=host_name, now=time.time()
        )
        if settings.vision_store:
            try:
                pipeline.add_frame(data, result, keep=settings.vision_store_max, name=upload.filename)
            except (store.StoreError, ingest.Busy) as e:  # the detection stands; the frame is lost, and said so
                store_failures.warn(log, "an image /v1/vision/ analysed was not stored (VISION_STORE): %s", e)
        return _json(body)

    @app.post("/v1/vision/detection")
    def vision_detection():
        return detect_objects(None)

    @app.post("/v1/vision/custom/list")
    def vision_models():
        return _json({"success": True, "models": shelf.names()})

    @app.post("/v1/vision/custom/<name>")
    def vision_custom(name):
        return detect_objects(name)


# ---------------------------------------------------------------------------------------------------------
# waitress: reading requests off the network, and stopping
# ---------------------------------------------------------------------------------------------------------

BUSY_RETRY_AFTER = 5  # seconds: the hint given to a body refused because BODY_BUFFER_MB is spent
LINGER_READ = 256 * 1024  # bytes per read while a refused body is dropped
RECV_BYTES = 256 * 1024  # bytes per read of a request (waitress's recv_bytes)
JOBS_STOP_SECONDS = 2.0  # what the upload jobs get after STOP_GRACE: 8 + 2 is Docker's 10 s stop grace


class BodyBudget:
    """Bytes of request bodies held at once across every connection (BODY_BUFFER_MB).

    waitress reads each body whole before the app runs, in memory and past 512 KB in a temporary file;
    without a budget, 20 connections announcing 28 MB each held 534 MB of temporary files
    (bench/bounds_disk.py). A body takes its Content-Length when its headers arrive (a chunked body: what
    has arrived, as it arrives) and gives it back when its request is done.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.refusals = 0  # takes refused since the start (GET /metrics)
        self._lock = threading.Lock()  # taken on waitress's loop, given back on its worker threads

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                self.refusals += 1
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


@dataclass(frozen=True)
class ReadLimits:
    """What a client may take to send a request. The deadlines are Apache mod_reqtimeout's: the headers
    within `header_timeout` of the connection (or, on a kept-alive one, of the request's first byte), the
    body within `body_timeout` of its headers plus one second per `min_rate` bytes received, so a slow
    upload that keeps coming passes and a trickle does not. `linger_bytes`: most bytes of a refused body
    read and dropped before the connection closes."""

    budget: BodyBudget
    header_timeout: float
    body_timeout: float
    min_rate: float
    linger_bytes: int

    @classmethod
    def from_settings(cls, settings: Any) -> ReadLimits:
        return cls(
            BodyBudget(settings.body_buffer_mb * 1024 * 1024), settings.header_timeout, settings.body_timeout,
            settings.min_rate_bps, 4 * body_limit(settings),
        )

    def body_deadline(self, started: float, received: int) -> float:
        return started + self.body_timeout + received / self.min_rate


class _Refusal(waitress.utilities.Error):
    """A refusal of ours made while a request is read; _ProblemErrorTask answers it."""

    def __init__(self, code: int, detail: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(detail)
        self.code, self.reason = code, HTTPStatus(code).phrase
        self.detail, self.extra_headers = detail, headers


class _Request(waitress.parser.HTTPRequestParser):
    """waitress's request parser with the channel's ReadLimits: a body takes its size from the budget
    (503 when it is spent), the times the headers and the body began are kept for the deadlines, and a
    refused request swallows the rest of what was read with it (the connection closes after the answer)
    and keeps in `unread` how much of its body is still to come, for the lingering close."""

    body_started: float | None = None
    reserved = 0  # bytes taken from the budget
    unread = 0  # bytes of a refused body still to come; 0 when none, unknown (chunked) or over linger_bytes

    def __init__(self, adj: Any, limits: ReadLimits | None = None, started: float | None = None):
        super().__init__(adj)
        self.limits = limits
        self.started = time.monotonic() if started is None else started

    def received(self, data: bytes) -> int:
        if self.completed or self.limits is None:
            return super().received(data)
        in_headers = not self.headers_finished
        n = super().received(data)
        if self.error is None:
            if in_headers and self.headers_finished:
                self.body_started = time.monotonic()
                if self.body_rcv is not None and not self.chunked:
                    self._take(self.content_length)
            elif not in_headers and self.chunked:
                self._take(len(self.body_rcv) - self.reserved)
        if self.error is None:
            return n
        # Refused: nothing will read this body; the rest of `data` is more of it, not a next request.
        self._give_back()
        self.expect_continue = False  # no "100 Continue" for a body already refused
        if not self.chunked and self.content_length > 0:
            left = self.content_length - self.body_bytes_received - (len(data) - n)
            self.unread = left if 0 < left <= self.limits.linger_bytes else 0
        return len(data)

    def _take(self, n: int) -> None:
        budget = self.limits.budget
        if n <= 0:
            return
        mb = budget.limit // (1024 * 1024)
        if self.reserved + n > budget.limit:
            self._refuse(_Refusal(413, (
                f"The body is larger than the {mb:,} MB that request bodies may take at once (BODY_BUFFER_MB); "
                "send a smaller one, or raise BODY_BUFFER_MB."
            )))
        elif budget.take(n):
            self.reserved += n
        else:
            self._refuse(_Refusal(503, (
                f"Bodies of other requests fill the {mb:,} MB they may take at once (BODY_BUFFER_MB); "
                f"try again in {BUSY_RETRY_AFTER} seconds."
            ), (("Retry-After", str(BUSY_RETRY_AFTER)),)))

    def _refuse(self, error: _Refusal) -> None:
        self.error = error
        self.completed = True

    def _give_back(self) -> None:
        if self.body_rcv is not None:
            self.body_rcv.getbuf().close()  # a temporary file goes now, not when the answer is out
        if self.reserved:
            self.limits.budget.give(self.reserved)
            self.reserved = 0

    def close(self) -> None:
        super().close()
        if self.reserved:
            self.limits.budget.give(self.reserved)
            self.reserved = 0


class _ProblemErrorTask(waitress.task.ErrorTask):
    """Refusals made before the app runs, waitress's (413 body too large, 431 headers too large, 400
    malformed request) and ours (_Refusal), in the same problem+json shape as every other error. A
    refused body still on its way is read and dropped after the answer (see _ProblemChannel)."""

    def execute(self):
        error = self.request.error
        status = int(error.code)
        detail = getattr(error, "detail", None) or {
            413: BODY_TOO_LARGE,
            431: "The request headers are too large; send at most 256 KB of headers.",
        }.get(status, f"The request could not be read ({error.reason}); check what your client sends.")
        status, text, kind = refusal(getattr(self.request, "path", "") or "", status, detail)
        body = text.encode()
        self.status = f"{status} {HTTPStatus(status).phrase}"
        self.response_headers.append(("Content-Type", kind))
        self.response_headers.extend(getattr(error, "extra_headers", ()))
        self.set_close_on_finish()
        self.content_length = len(body)
        unread = getattr(self.request, "unread", 0)
        if unread:
            self.channel.linger_for = unread  # read by the loop once this task has set close_when_flushed
        self.write(body)


@dataclass
class _Drain:
    left: int  # bytes of the refused body still to come
    started: float
    dropped: int = 0


class _ProblemChannel(waitress.channel.HTTPChannel):
    """waitress's connection, refusing in problem+json, with the ReadLimits `limits` (None: waitress's
    own behaviour): each request's parser is a _Request; headers and body past their deadline get 408
    and the connection closes (a connection that sent nothing just closes); after refusing a body the
    channel reads and drops the rest of it before closing (nginx's lingering close), so that a client
    sending its whole body before it reads (Python's urllib) sees the 413/503 instead of a reset.

    The deadlines are checked in readable(), which waitress's loop asks of every channel at least once
    per second (its poll timeout), whether or not the client sends anything."""

    error_task_class = _ProblemErrorTask
    linger_for = 0  # bytes of a refused body to drop once its answer is out (set by _ProblemErrorTask)
    _drain: _Drain | None = None

    def __init__(self, server, sock, addr, adj, map=None, limits: ReadLimits | None = None):  # noqa: A002
        self.limits = limits
        self._first_start: float | None = time.monotonic()  # the first request's headers are due from accept
        super().__init__(server, sock, addr, adj, map)

    def parser_class(self, adj: Any) -> _Request:
        """A parser for the next request (waitress calls this when a request's first bytes arrive)."""
        started, self._first_start = self._first_start, None
        return _Request(adj, self.limits, started)

    def readable(self):
        if self.limits is not None and not (self.requests or self.will_close or self.close_when_flushed
                                            or self.total_outbufs_len):
            self._check_deadline(time.monotonic())
        return super().readable()

    def _check_deadline(self, now: float) -> None:
        limits, req, drain = self.limits, self.request, self._drain
        if drain is not None:
            if now > limits.body_deadline(drain.started, drain.dropped):
                self.will_close = True
        elif req is None:
            if self._first_start is not None and now > self._first_start + limits.header_timeout:
                self.will_close = True  # silent since it connected: nothing to answer
        elif req.body_started is None:
            if now > req.started + limits.header_timeout:
                self._time_out(
                    f"The request headers did not arrive within {limits.header_timeout:g} s (HEADER_TIMEOUT); "
                    "send the whole request at once."
                )
        elif now > limits.body_deadline(req.body_started, req.body_bytes_received):
            self._time_out(
                f"The request body arrived too slowly: it has {limits.body_timeout:g} s plus one second per "
                f"{limits.min_rate:g} bytes (BODY_TIMEOUT, MIN_RATE_BPS); send it again over a faster connection."
            )

    def _time_out(self, detail: str) -> None:
        """Answer 408 and close. Written here on the loop: no task owns this channel's output now."""
        path = getattr(self.request, "path", "") or ""  # known once the headers are in
        self.request.close()  # gives its body budget back
        self.request = None
        _, text, kind = refusal(path, 408, detail)
        body = text.encode()
        head = (
            f"HTTP/1.1 408 {HTTPStatus(408).phrase}\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: {kind}\r\nDate: {waitress.utilities.build_http_date(time.time())}\r\n"
            f"Server: {self.adj.ident}\r\n\r\n"
        ).encode("latin-1")
        with self.outbuf_lock:
            self.outbufs[-1].append(head + body)
            self.total_outbufs_len += len(head) + len(body)
            self.current_outbuf_count += len(head) + len(body)
        self.close_when_flushed = True

    def handle_write(self):
        if self.linger_for and self.close_when_flushed and not self.requests and not self.will_close:
            self._flush_exception(self._flush_some)
            if self.will_close:
                self.handle_close()
            elif not self.total_outbufs_len:
                self._linger()
            return
        super().handle_write()

    def _linger(self) -> None:
        """The refusal is out: half-close, then read and drop the rest of the body (handle_read), within
        the body's deadline rule, and close once it has all come."""
        self._drain = _Drain(self.linger_for, time.monotonic())
        self.linger_for = 0
        self.close_when_flushed = False
        try:
            self.socket.shutdown(socket.SHUT_WR)  # the answer is complete: the client may read it now
        except OSError:
            self.handle_close()

    def handle_read(self):
        drain = self._drain
        if drain is None:
            return super().handle_read()
        try:
            data = self.recv(LINGER_READ)  # b"" when the client closed (recv closed the channel then)
        except OSError:
            self.handle_close()
            return
        drain.dropped += len(data)
        drain.left -= len(data)
        self.last_activity = time.time()
        if data and drain.left <= 0:
            self.handle_close()

    def handle_close(self):
        if self.request is not None:  # a request half received: give its body budget back
            self.request.close()
            self.request = None
        super().handle_close()

    def in_flight(self) -> bool:
        """A request served or answered, or a body being received, here (what a stop waits for)."""
        req = self.request
        return bool(
            self.requests or self.total_outbufs_len or self._drain is not None
            or (req is not None and req.headers_finished and not req.completed)
        )


def _listeners(server: Any) -> list[waitress.server.BaseWSGIServer]:
    """One listening socket gives one server; a host name with several addresses gives one per address."""
    if isinstance(server, waitress.server.BaseWSGIServer):
        return [server]
    return [s for s in server.map.values() if isinstance(s, waitress.server.BaseWSGIServer)]


# GET and HEAD of these paths are reads: a few milliseconds of SQLite or a file, never a download or
# a detection. _Lanes serves them first.
_READ_PATH = re.compile(r"/(health|metrics|objects|images(/.*)?|v1/images(/.*)?|static/.*|openapi\.json)?")
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
            f"detections ({pool} interpreters, DETECT_INTERPRETERS) and the detection queue (DETECT_QUEUE={settings.detect_queue}) "
            f"can hold {held} threads, and {need - held} more must stay free for reads and for everything else; "
            f"set WAITRESS_THREADS to {need} or more (or 0 to size it by itself), or lower those settings"
        )
    return settings.waitress_threads


class _StopSignals:
    """The SIGTERM/SIGINT handler: notes the signal for _serve's loop, which signal.set_wakeup_fd wakes at
    once. (Raising from the handler would unwind waitress's loop wherever it was, mid-way through a
    channel's bookkeeping.) A second signal cuts the grace short."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.first: float | None = None

    def install(self, sockets: dict) -> None:
        """Handle SIGTERM and SIGINT, waking the loop of the socket map `sockets`."""
        wake, self._wake_fd = socket.socketpair()
        wake.setblocking(False)
        self._wake_fd.setblocking(False)
        _Waker(wake, map=sockets)
        signal.set_wakeup_fd(self._wake_fd.fileno())
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self)

    def __call__(self, signum, frame) -> None:
        if self.first is None:
            self.first = time.monotonic()
        self.names.append(signal.Signals(signum).name)


class _Waker(waitress.wasyncore.dispatcher):
    """The read end of the signal wake-up socket, in waitress's map: a signal ends the loop's poll."""

    def writable(self):
        return False

    def handle_read(self):
        self.recv(512)


def _serve(server: Any, grace: float, signals: _StopSignals) -> None:
    """waitress's loop until a signal, then a graceful stop: close the listening sockets (new clients
    are refused), close idle connections, let the requests in flight finish and their answers go out
    for up to `grace` seconds (STOP_GRACE), then stop waitress's threads."""
    listeners = _listeners(server)
    sockets = listeners[0]._map  # every listener and channel is in this one map
    tick = listeners[0].adj.asyncore_loop_timeout
    while not signals.names:
        waitress.wasyncore.loop(timeout=tick, map=sockets, use_poll=True, count=1)
    log.info("stopping on %s", signals.names[0])
    for listener in listeners:
        listener.accepting = False
        waitress.wasyncore.dispatcher.close(listener)  # the socket only: the threads still pull its trigger
    deadline = time.monotonic() + grace
    while True:
        busy = 0
        for listener in listeners:
            for channel in list(listener.active_channels.values()):
                if channel.in_flight() if isinstance(channel, _ProblemChannel) else channel.requests:
                    busy += 1
                else:
                    channel.handle_close()
        if not busy:
            break
        if time.monotonic() >= deadline or len(signals.names) > 1:
            log.warning("stopping with %d request(s) unfinished after STOP_GRACE (%g s)", busy, grace)
            break
        waitress.wasyncore.loop(timeout=0.05, map=sockets, use_poll=True, count=1)
    dispatcher = server.task_dispatcher
    dispatcher.shutdown(cancel_pending=True, timeout=0.5 if busy else 5)
    signal.set_wakeup_fd(-1)
    if not dispatcher.threads:  # else a thread still serving would pull a closed trigger (EBADF)
        waitress.wasyncore.close_all(sockets)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


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
    _warn_about_limits(settings, parts)
    if parts.uploader is not None:
        log.info("Imgur uploads on (%s)", "to the account" if parts.uploader.account else "anonymous")
    else:
        log.info("Imgur uploads off: IMGUR_CLIENT_ID is unset")
    try:
        app = make_app(settings, parts)
    except lan.KeyUnusable as e:
        parts.close(jobs_timeout=0)
        return _startup_failure(str(e))
    app.config["imgsvc.guard"].announce(settings.host)
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
    signals = _StopSignals()
    signals.install(_listeners(server)[0]._map)
    for listener in _listeners(server):
        host = f"[{listener.effective_host}]" if ":" in listener.effective_host else listener.effective_host
        log.info("listening on http://%s:%s (version %s)", host, listener.effective_port, __version__)
    try:
        _serve(server, settings.stop_grace, signals)
    finally:
        # The jobs get what is left of STOP_GRACE + 2 s: waiting for uploads under way, logging what they abandon.
        stop_by = (signals.first or time.monotonic()) + settings.stop_grace + JOBS_STOP_SECONDS
        parts.close(jobs_timeout=max(0.0, stop_by - time.monotonic()))
    return 0


def _warn_about_limits(settings: Any, parts: Parts) -> None:
    """Say at start when a limit refuses everything of its kind, and what to change."""
    budget = settings.body_buffer_mb * 1024 * 1024
    if body_limit(settings) > budget:
        log.warning(
            "BODY_BUFFER_MB (%d MB) is below the largest body accepted (%s bytes, from MAX_IMAGE_BYTES): "
            "bodies over it answer 413; raise BODY_BUFFER_MB", settings.body_buffer_mb, f"{body_limit(settings):,}",
        )
    with parts.images.connection():
        free = parts.images.backend.free_bytes()
    if free is not None and free < settings.min_free_disk_mb * 1024 * 1024:
        log.warning(
            "the disk holding %s has %d MB free, below MIN_FREE_DISK_MB (%d MB): uploads answer 507 until "
            "there is room; free space on it, or lower MIN_FREE_DISK_MB", settings.db, free // 2**20,
            settings.min_free_disk_mb,
        )


def _startup_failure(message: str) -> int:
    """A start-up failure is one line on stderr saying what to do, and exit status 2 (no traceback)."""
    print(f"server.py: {message}", file=sys.stderr)
    return 2


def _database_hint(db: str, e: BaseException) -> str:
    if store.is_url(db):  # never the URL itself: it may hold a password
        if isinstance(e, store.DriverMissing):
            return str(e)
        return (
            f"cannot open the database {store.redact(db)}: {e}. Check that the PostgreSQL server runs and "
            "accepts this user, and the URL in IMAGES_DB / --db."
        )
    folder = os.path.dirname(os.path.abspath(db))
    if isinstance(e, PermissionError) or (os.path.isdir(folder) and not os.access(folder, os.W_OK)):
        return (
            f"cannot write the database folder {folder} (running as uid {os.getuid()}): make it writable "
            "by this user (a Docker bind mount on /data is often root's: chown it), or point IMAGES_DB / --db elsewhere"
        )
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return (
        f"cannot open the database {db}: {reason}. Point IMAGES_DB / --db at a SQLite file this user can write, "
        "or a postgresql:// URL."
    )


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
    """waitress's server for `app` on `dispatcher`'s threads, its connections _ProblemChannels holding the
    ReadLimits of `settings`."""
    server = waitress.create_server(
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
        # One read of up to 256 KB, not waitress's 8 KB: a 4.3 MB body took 530 reads (and as many trips
        # through the parser and the body's buffer), 15-20 ms of POST /images for a 3 MB photo as base64.
        recv_bytes=RECV_BYTES,
        channel_timeout=settings.channel_timeout,
        ident="imgsvc",
        **lan.proxy_options(settings.trusted_proxy),
    )
    limits = ReadLimits.from_settings(settings)
    channel = functools.partial(_ProblemChannel, limits=limits)  # one budget for all
    for listener in _listeners(server):
        listener.channel_class = channel
    if app.config.get("imgsvc.metrics") is not None:
        app.config["imgsvc.metrics"].watch_server(limits.budget, dispatcher, _listeners(server))
    return server


if __name__ == "__main__":
    sys.exit(main())
