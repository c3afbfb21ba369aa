"""Upload image bytes to Imgur (never Imgur's upload-by-link).

`ImgurClient.upload(data)` sends `POST {api}/3/image` as multipart with the bytes in the `image` part.
Anonymous uploads authenticate with `Client-ID`; with a client secret and a refresh token, uploads go to
that account with a Bearer token fetched from `/oauth2/token`, kept until it expires and refreshed once
on a 401/403 that says the token is invalid.

Imgur's errors come in several shapes (`{"data": {"error": ...}}`, `{"errors": [{"detail": ...}]}`, a
413 JSON, an HTML "over capacity" page); `reason_from()` turns any of them into one readable sentence.
429, 5xx, over capacity, connection errors and timeouts are retried up to 3 times with exponential
backoff and jitter, honouring Retry-After / X-Post-Rate-Limit-Reset. When the response says the user's
or the client's credits are used up, every upload pauses until the reset instead of burning requests.

Imgur's answers are not trusted further than they must be: each attempt (connect, send, the whole answer)
ends at one deadline, max(timeout, size / min_upload_rate); at most max_answer_bytes of an answer are
read; a 200 counts only with an https link on imgur.com (or on the API URL's own host when that is a
stand-in) and a sane id and deletehash. The file name sent is reduced to characters that cannot break
out of its multipart header.

This module never imports Bottle; it raises the errors below and server.py / jobs.py deal with them.
"""

from __future__ import annotations

import argparse
import base64
import email.utils
import http.client
import io
import json
import logging
import math
import random
import re
import secrets
import socket
import ssl
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

log = logging.getLogger(__name__)

# Imgur's limit for still images; animated GIFs may be larger (200 MB), but our downloads stop at
# MAX_IMAGE_BYTES anyway.
MAX_STILL_BYTES = 20 * 1024 * 1024

# A credit reset further away than this is not believed: Imgur's credits come back within a day.
MAX_CREDIT_PAUSE = 24 * 3600.0
# An id or deletehash: Imgur's are a few base-62 characters.
_HANDLE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A host name as DNS spells it; anything else (a backslash, a percent sign) a browser may read differently.
_DNS_NAME = re.compile(r"[a-z0-9-]+(\.[a-z0-9-]+)*")
_MAX_LINK = 2048

_FORMATS = (
    (b"\xff\xd8\xff", "JPEG", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "PNG", "image/png"),
    (b"GIF87a", "GIF", "image/gif"),
    (b"GIF89a", "GIF", "image/gif"),
    (b"BM", "BMP", "image/bmp"),
    (b"II*\x00", "TIFF", "image/tiff"),
    (b"MM\x00*", "TIFF", "image/tiff"),
)


class ImgurError(Exception):
    """Base of this module's errors; the message is the reason a person reads."""


class NotConfigured(ImgurError):
    """No IMGUR_CLIENT_ID: uploads are off."""


class NotUploadable(ImgurError):
    """The bytes are not an image Imgur takes, or too large for it. Not retried."""


class Rejected(ImgurError):
    """Imgur refused the upload (400, 413, a bad token after a refresh...). Not retried."""

    def __init__(self, reason: str, status: int | None = None):
        super().__init__(reason)
        self.status = status


class Unavailable(ImgurError):
    """Imgur could not be reached or kept failing (429, 5xx, timeouts) after the retries."""


class Stopped(ImgurError):
    """The client was closed while the upload waited."""


@dataclass(frozen=True)
class Upload:
    id: str
    link: str
    deletehash: str | None


def sniff(data: bytes) -> tuple[str, str]:
    """(format, content type) of bytes Imgur takes, judged by their first bytes, not by any header.

    Raises NotUploadable for anything else, and for still images over Imgur's 20 MB limit.
    """
    head = data[:16]
    found = next(((fmt, ct) for magic, fmt, ct in _FORMATS if head.startswith(magic)), None)
    if found is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        found = ("WEBP", "image/webp")
    if found is None:
        raise NotUploadable(
            "the downloaded bytes are not an image Imgur takes (JPEG, PNG, GIF, WebP, BMP or TIFF)"
        )
    if found[0] != "GIF" and len(data) > MAX_STILL_BYTES:
        raise NotUploadable(
            f"the image is {len(data):,} bytes; Imgur takes still images up to {MAX_STILL_BYTES:,} bytes"
        )
    return found


def reason_from(status: int, body: bytes, content_type: str | None = None) -> str:
    """A readable reason from any of Imgur's error shapes."""
    text = body.decode("utf-8", "replace").strip()
    message = None
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested deeper than Python recurses
        doc = None
    if isinstance(doc, dict):
        data = doc.get("data")
        if isinstance(data, dict):
            error = data.get("error")
            if isinstance(error, dict):  # {"data": {"error": {"message": ..., "code": ...}}}
                message = error.get("message") or error.get("type")
            elif error:
                message = str(error)
        errors = doc.get("errors")
        if not message and isinstance(errors, list) and errors and isinstance(errors[0], dict):
            first = errors[0]
            message = first.get("detail") or first.get("title") or first.get("code")
        if not message and isinstance(doc.get("error"), (str, dict)):
            message = str(doc["error"])
    elif text:
        if "over capacity" in text.lower():
            message = "Imgur is over capacity"
        else:
            # An HTML page: its <title>, else its first words.
            title = re.search(r"<title>(.*?)</title>", text, re.I | re.S)
            plain = title.group(1) if title else re.sub(r"<[^>]+>", " ", text)
            message = plain
    # One line of bounded length: the reason is kept with the job, shown to its owner and logged.
    message = " ".join(str(message).split())[:200] if message else None
    phrase = http.client.responses.get(status, "error")
    return f"Imgur answered {status} {phrase}" + (f": {message}" if message else "")


def safe_filename(name: str) -> str:
    """`name` with every character but A-Z a-z 0-9 . _ - replaced by "_", at most 100 of them.

    The name comes from a job's URL; a quote, CR/LF or backslash in it could otherwise end the
    `filename="..."` parameter and add fields of its own. Multipart escaping rules differ between
    servers, so the name is reduced instead of escaped.
    """
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100] or "image"


def _multipart(fields: dict[str, str], file_field: str, data: bytes, filename: str, content_type: str) -> tuple[bytes, str]:
    filename = safe_filename(filename)
    boundary = uuid.uuid4().hex
    out = bytearray()
    for name, value in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    out += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    out += data
    out += f"\r\n--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


@dataclass
class _Response:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except (ValueError, RecursionError):
            return None


class _Retry(Exception):
    """One attempt failed in a way worth retrying."""

    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.wait = wait


class _AnswerTooLarge(Exception):
    """Imgur's answer passed the byte budget of one attempt."""


class _BoundedReader(io.RawIOBase):
    """The socket of one answer: every recv waits at most until the deadline, and stops at the budget.

    http.client reads an answer in many recv calls; a plain socket timeout restarts with each, so an
    answer dripped one byte at a time would never time out.
    """

    def __init__(self, raw: io.RawIOBase, sock: socket.socket, left: Callable[[], float], budget: int):
        super().__init__()
        self._raw, self._sock, self._left, self._budget = raw, sock, left, budget

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._budget <= 0:
            raise _AnswerTooLarge()
        self._sock.settimeout(self._left())
        view = memoryview(buffer)
        n = self._raw.readinto(view[: min(len(view), self._budget)])
        self._budget -= n or 0
        return n

    def close(self) -> None:
        self._raw.close()  # releases the socket's file reference, as http.client's own reader does
        super().close()


class _BoundedSocket:
    """What http.client.HTTPResponse takes from a socket: makefile(), here deadline- and budget-bound."""

    def __init__(self, sock: socket.socket, left: Callable[[], float], budget: int):
        self._sock, self._left, self._budget = sock, left, budget

    def makefile(self, mode: str = "rb", *args, **kwargs) -> io.BufferedReader:
        raw = self._sock.makefile("rb", buffering=0)
        return io.BufferedReader(_BoundedReader(raw, self._sock, self._left, self._budget))


class _Connection(http.client.HTTPConnection):
    """A kept-alive connection to Imgur on which each exchange ends at `deadline` (time.monotonic()).

    Connecting, the TLS handshake, sending and every read of the answer get only the time left, so one
    attempt never outlives its deadline however the other side dribbles; an answer stops at `budget`
    bytes, status line and headers included.
    """

    def __init__(self, host: str, port: int | None, ssl_context: ssl.SSLContext | None, budget: int):
        if ssl_context is not None:
            self.default_port = http.client.HTTPS_PORT
        super().__init__(host, port)
        self._ssl_context = ssl_context
        self.budget = budget
        self.deadline = math.inf
        self.response_class = self._bounded_response

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the attempt's deadline passed")
        return left

    def connect(self) -> None:
        self.timeout = self.left()
        super().connect()
        if self._ssl_context is not None:
            self.sock.settimeout(self.left())
            self.sock = self._ssl_context.wrap_socket(self.sock, server_hostname=self.host)

    def send(self, data) -> None:
        if self.sock is None:
            self.connect()
        self.sock.settimeout(self.left())  # sendall's timeout bounds the whole call (Python 3.5+)
        super().send(data)

    def _bounded_response(self, sock: socket.socket, *args, **kwargs) -> http.client.HTTPResponse:
        return http.client.HTTPResponse(_BoundedSocket(sock, self.left, self.budget), *args, **kwargs)


class ImgurClient:
    """Uploads to Imgur. Thread-safe; `close()` ends every wait at once.

    Each attempt (connect, send, the whole answer) has max(`timeout`, size / `min_upload_rate`) seconds;
    at most `max_answer_bytes` of an answer are read. `now`, `sleep`, `rand` and `ssl_context` are seams
    for tests.
    """

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: str = "",
        refresh_token: str = "",
        api_url: str = "https://api.imgur.com",
        timeout: float = 60.0,
        min_upload_rate: float = 128 * 1024,
        max_answer_bytes: int = 1024 * 1024,
        retries: int = 3,
        backoff: float = 1.0,
        max_wait: float = 120.0,
        max_pause: float = 3600.0,
        now: Callable[[], float] = time.time,
        sleep: Callable[[float], None] | None = None,
        rand: Callable[[], float] = random.random,
        ssl_context: ssl.SSLContext | None = None,
    ):
        if not client_id:
            raise NotConfigured("Imgur uploads are off: set IMGUR_CLIENT_ID (and optionally the secret and refresh token)")
        parts = urllib.parse.urlsplit(api_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"IMGUR_API_URL must be an http(s) URL, got {api_url!r}")
        if not timeout > 0 or not min_upload_rate > 0 or not max_answer_bytes > 0:
            raise ValueError("timeout, min_upload_rate and max_answer_bytes must be positive")
        self.client_id = client_id
        self.client_secret = client_secret
        self.refresh_token = refresh_token
        self.api_url = api_url.rstrip("/")
        self._parts = parts
        self.timeout = timeout  # seconds an attempt may take at least, however small the image
        self.min_upload_rate = min_upload_rate  # bytes/s: a big image's attempt may take size / rate
        self.max_answer_bytes = max_answer_bytes  # Imgur's answers are about 1 KB
        self.retries = retries
        self.backoff = backoff
        self.max_wait = max_wait  # longest Retry-After we wait for before giving up on a URL
        self.max_pause = max_pause  # longest credit pause we wait for
        self.now = now
        self._stopping = threading.Event()
        self._sleep = sleep or self._interruptible_sleep
        self._rand = rand
        self._ssl_context = ssl_context
        if parts.scheme == "https" and ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        self._lock = threading.Lock()
        self._local = threading.local()
        # Its own lock: a token refresh makes a request while holding self._lock.
        self._connections_lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._token: str | None = None
        self._token_expires = 0.0
        self._paused_until = 0.0

    @property
    def account(self) -> bool:
        """True when uploads go to an account (secret and refresh token set), not anonymously."""
        return bool(self.client_secret and self.refresh_token)

    def close(self) -> None:
        """End every wait at once and close the kept-alive connections."""
        self._stopping.set()
        with self._connections_lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            conn.close()

    def _interruptible_sleep(self, seconds: float) -> None:
        self._stopping.wait(max(0.0, seconds))

    def _wait(self, seconds: float) -> None:
        if self._stopping.is_set():
            raise Stopped("the service is shutting down")
        self._sleep(seconds)
        if self._stopping.is_set():
            raise Stopped("the service is shutting down")

    # -- HTTP --------------------------------------------------------------------------------------------

    def _connection(self) -> tuple[_Connection, bool]:
        """This thread's keep-alive connection to Imgur, and whether it was just made.

        Reusing it saves a TCP and TLS handshake per upload, which on the real Imgur costs more than
        everything else we do for a URL.
        """
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, False
        conn = _Connection(self._parts.hostname, self._parts.port, self._ssl_context, self.max_answer_bytes)
        self._local.conn = conn
        with self._connections_lock:
            self._connections.add(conn)
        return conn, True

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            with self._connections_lock:
                self._connections.discard(conn)

    def attempt_seconds(self, size: int) -> float:
        """How long one attempt that sends `size` bytes may take: connect, send and the whole answer."""
        return max(self.timeout, size / self.min_upload_rate)

    def _request(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> _Response:
        """One HTTP exchange, ending at its deadline.

        Connection errors and a passed deadline become _Retry: both are what a busy or distant Imgur
        does now and then, and the retries are few. An answer over max_answer_bytes is Rejected, not
        retried: Imgur's are about 1 KB, so whatever sent it is broken or hostile, the upload may have
        gone through already, and trying again would send the whole image into the same thing.
        """
        target = (self._parts.path.rstrip("/") or "") + path
        headers = {"Content-Length": str(len(body)), **headers}
        seconds = self.attempt_seconds(len(body))
        deadline = time.monotonic() + seconds
        while True:
            conn, fresh = self._connection()
            conn.deadline = deadline
            try:
                conn.request(method, target, body=body, headers=headers)
                res = conn.getresponse()
                if res.length is not None and res.length > self.max_answer_bytes:
                    raise _AnswerTooLarge()
                data = res.read()
            except _AnswerTooLarge:
                self._drop_connection()
                raise Rejected(f"Imgur's answer is larger than {self.max_answer_bytes:,} bytes (IMGUR_MAX_ANSWER_BYTES); not retried") from None
            except (socket.timeout, TimeoutError) as e:
                self._drop_connection()
                raise _Retry(
                    f"Imgur did not answer within {seconds:g} s (the deadline per attempt: IMGUR_TIMEOUT, "
                    "or the size at IMGUR_MIN_UPLOAD_RATE bytes/s for a big image)"
                ) from e
            except (OSError, http.client.HTTPException) as e:
                self._drop_connection()
                if not fresh and isinstance(e, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
                    continue  # the server closed an idle keep-alive connection: open a new one, once
                raise _Retry(f"could not reach Imgur at {self.api_url}: {e}") from e
            if res.will_close:
                self._drop_connection()
            return _Response(res.status, {k.lower(): v for k, v in res.getheaders()}, data)

    # -- credits and tokens ------------------------------------------------------------------------------

    def _note_credits(self, res: _Response) -> None:
        """Pause every upload when the user's or the client's credits are used up."""
        h = res.headers
        until = 0.0
        if h.get("x-ratelimit-userremaining", "").strip() == "0":
            until = max(until, _reset_at(h.get("x-ratelimit-userreset"), self.now()))
        if h.get("x-ratelimit-clientremaining", "").strip() == "0":
            # Imgur documents no reset for the daily client credits; an hour unless one is sent.
            until = max(until, _reset_at(h.get("x-ratelimit-clientreset"), self.now()))
        if until > self.now():  # a reset already past: the credits are back
            with self._lock:
                if until > self._paused_until:
                    self._paused_until = until
                    log.warning(
                        "Imgur credits are used up; uploads pause until %s",
                        time.strftime("%H:%M:%S UTC", time.gmtime(until)),
                    )

    def _respect_pause(self) -> None:
        with self._lock:
            left = self._paused_until - self.now()
        if left <= 0:
            return
        if left > self.max_pause:
            raise Unavailable(
                f"Imgur credits are used up until {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(self._paused_until))}; "
                "submit this URL again after that"
            )
        self._wait(left)

    def _auth_header(self, force_refresh: bool = False) -> str:
        if not self.account:
            return f"Client-ID {self.client_id}"
        with self._lock:
            if force_refresh or not self._token or self.now() >= self._token_expires:
                self._token, self._token_expires = self._refresh()
            return f"Bearer {self._token}"

    def _refresh(self) -> tuple[str, float]:
        body = urllib.parse.urlencode(
            {
                "refresh_token": self.refresh_token,
                "client_id": self.client_id,
                "client_secret": self.client_secret,
                "grant_type": "refresh_token",
            }
        ).encode()
        try:
            res = self._request("POST", "/oauth2/token", body, {"Content-Type": "application/x-www-form-urlencoded"})
        except _Retry as e:
            raise Unavailable(f"could not refresh the Imgur access token: {e.reason}") from e
        except Rejected as e:
            raise Rejected(f"could not refresh the Imgur access token: {e}", e.status) from None
        doc = res.json()
        token = doc.get("access_token") if isinstance(doc, dict) else None
        # It goes into a header: printable ASCII without spaces, of sane length.
        if isinstance(token, str) and not re.fullmatch(r"[\x21-\x7e]{1,2048}", token):
            raise Rejected(f"Imgur's token endpoint answered a malformed access token ({_shown(token)})", res.status)
        if res.status != 200 or not token:
            raise Rejected(
                "could not refresh the Imgur access token ("
                + reason_from(res.status, res.body)
                + "); check IMGUR_CLIENT_ID, IMGUR_CLIENT_SECRET and IMGUR_REFRESH_TOKEN",
                res.status,
            )
        expires_in = _number(str(doc.get("expires_in", ""))) or 3600
        log.info("refreshed the Imgur access token (valid for %d s)", expires_in)
        # Refresh a minute early so a token never expires between our check and Imgur's.
        return token, self.now() + max(0.0, expires_in - 60)

    # -- upload ------------------------------------------------------------------------------------------

    def upload(self, data: bytes, *, filename: str = "image", title: str | None = None) -> Upload:
        """Upload `data`; retries what is worth retrying. Raises NotUploadable, Rejected, Unavailable, Stopped."""
        fmt, content_type = sniff(data)
        fields = {"type": "file"}
        if title:
            fields["title"] = title
        body, multipart_type = _multipart(fields, "image", data, filename, content_type)
        refreshed = False
        attempt = 0
        while True:
            self._respect_pause()
            headers = {"Authorization": self._auth_header(), "Content-Type": multipart_type, "Accept": "application/json"}
            try:
                res = self._request("POST", "/3/image", body, headers)
                self._note_credits(res)
                return self._read_upload(res)
            except _Retry as e:
                if attempt >= self.retries:
                    raise Unavailable(f"{e.reason} (gave up after {attempt + 1} attempts)") from None
                delay = self._delay(attempt, e.wait)
                log.info("Imgur upload attempt %d failed (%s); retrying in %.1f s", attempt + 1, e.reason, delay)
                self._wait(delay)
                attempt += 1
            except _TokenInvalid as e:
                if refreshed or not self.account:
                    raise Rejected(str(e), 401) from None
                refreshed = True
                self._auth_header(force_refresh=True)

    def _delay(self, attempt: int, asked: float | None) -> float:
        if asked is not None:
            if asked > self.max_wait:
                raise Unavailable(f"Imgur asks to wait {asked:.0f} s before the next upload; submit this URL again later")
            return asked
        # Exponential backoff with "equal jitter": between half and all of base * 2^attempt.
        ceiling = self.backoff * (2**attempt)
        return ceiling / 2 + self._rand() * ceiling / 2

    def _read_upload(self, res: _Response) -> Upload:
        status = res.status
        doc = res.json()
        if status == 200 and isinstance(doc, dict) and isinstance(doc.get("data"), dict) and doc["data"].get("link"):
            return self._checked_upload(doc["data"])
        reason = reason_from(status, res.body)
        over_capacity = "over capacity" in reason.lower()
        if status in (401, 403) and not over_capacity and _says_token_invalid(status, reason):
            raise _TokenInvalid(reason)
        if status == 429 or status >= 500 or over_capacity:
            wait = _retry_after(res.headers, self.now())
            raise _Retry(reason, wait)
        if status == 200:  # 200 without a link: not what Imgur promises, not worth repeating
            raise Rejected(f"Imgur answered 200 without a link: {res.body[:200]!r}", status)
        raise Rejected(reason, status)

    def _checked_upload(self, d: dict) -> Upload:
        """The Upload a 200 describes, or Rejected (not retried: the image may be on Imgur already)."""
        link = d["link"]
        if not link_accepted(link, self.api_url):
            raise Rejected(
                f"Imgur answered 200, but its link {_shown(link)} is not an https link on imgur.com; "
                "the upload is not counted",
                200,
            )
        for name in ("id", "deletehash"):
            value = d.get(name)
            if value is not None and not (isinstance(value, str) and _HANDLE.fullmatch(value)):
                raise Rejected(
                    f"Imgur answered 200, but its {name} {_shown(value)} is not up to 64 letters, digits, "
                    "'_' or '-'; the upload is not counted",
                    200,
                )
        return Upload(d.get("id") or "", link, d.get("deletehash"))


def link_accepted(link: Any, api_url: str) -> bool:
    """True for an https link on imgur.com or a subdomain, or on `api_url`'s own host when that is not
    Imgur's (a stand-in in tests or on a LAN). Nothing else an answer says counts as an upload."""
    if not isinstance(link, str) or len(link) > _MAX_LINK or not link.isascii():
        return False
    if any(c <= " " or c in "\x7f\\" for c in link):  # spaces, controls, a backslash browsers read as "/"
        return False
    try:
        parts = urllib.parse.urlsplit(link)
        port = parts.port
    except ValueError:
        return False
    host = parts.hostname or ""
    if parts.username is not None or parts.password is not None or not host:
        return False
    api = urllib.parse.urlsplit(api_url)
    api_host = (api.hostname or "").lower()
    if _is_imgur(host):
        return parts.scheme == "https" and port in (None, 443) and bool(_DNS_NAME.fullmatch(host))
    return not _is_imgur(api_host) and host == api_host and parts.scheme in ("https", api.scheme)


def _is_imgur(host: str) -> bool:
    return host == "imgur.com" or host.endswith(".imgur.com")


def _shown(value: Any) -> str:
    """A value from an answer, quoted and cut short enough to go into a reason."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _TokenInvalid(Exception):
    pass


def _says_token_invalid(status: int, reason: str) -> bool:
    text = reason.lower()
    return status == 401 or "token" in text or "unauthorized" in text or "authentication" in text


def _number(value: str | None) -> float | None:
    try:
        n = float(value) if value is not None and value.strip() else None
    except ValueError:
        return None
    return n if n is not None and n >= 0 and math.isfinite(n) else None


def _reset_at(value: str | None, now: float) -> float:
    """When used-up credits come back, from an X-RateLimit-*Reset header.

    Imgur documents a Unix time, and has been seen (2025) sending seconds from now instead
    (`x-ratelimit-userreset: 3600`): a number below 1e9 (2001) is taken as seconds. Absent or 0 means
    an hour; more than a day away is not believed.
    """
    reset = _number(value)
    if not reset:
        return now + 3600
    return min(reset if reset > 1e9 else now + reset, now + MAX_CREDIT_PAUSE)


def _retry_after(headers: dict[str, str], now: float) -> float | None:
    """Seconds to wait that the response asks for: Retry-After (seconds or a date) or X-Post-Rate-Limit-Reset."""
    value = headers.get("retry-after")
    if value:
        seconds = _number(value)
        if seconds is not None:
            return seconds
        try:
            when = email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError):
            when = None
        if when is not None:
            return max(0.0, when - now)
    return _number(headers.get("x-post-rate-limit-reset"))


# ---------------------------------------------------------------------------------------------------------
# Command line: `python imgur.py --sandbox`, a local stand-in for Imgur's upload API
# ---------------------------------------------------------------------------------------------------------
#
# Imgur stopped registering new API clients in 2025, so a newcomer may have no client id to try the
# upload jobs with. The sandbox answers `POST /3/image` as Imgur does (the same JSON, error shapes and
# rate-limit headers), takes any `Client-ID`, keeps the images in memory and serves each one at the link
# it returned, on its own host and port, so `IMGUR_API_URL=http://127.0.0.1:8090` runs jobs end to end.
# Everything is bounded: --max-images images and --max-total-mb bytes (oldest dropped first), one request
# body at most SANDBOX_MAX_UPLOAD bytes, SANDBOX_MAX_CONNECTIONS connections at once.

SANDBOX_PORT = 8090
SANDBOX_MAX_IMAGES = 100
SANDBOX_MAX_TOTAL = 64 * 1024 * 1024
# Imgur's limit for a still image, and room for the multipart framing around it.
SANDBOX_MAX_UPLOAD = MAX_STILL_BYTES + 64 * 1024
SANDBOX_MAX_CONNECTIONS = 32
_SANDBOX_MAX_FIELDS = 20
# Imgur's credit headers, sent with every API answer. The sandbox enforces no limit: they never run out.
_SANDBOX_CREDITS = {
    "X-RateLimit-ClientLimit": "12500", "X-RateLimit-ClientRemaining": "12500",
    "X-RateLimit-UserLimit": "2000", "X-RateLimit-UserRemaining": "2000",
    "X-Post-Rate-Limit-Limit": "1250", "X-Post-Rate-Limit-Remaining": "1250", "X-Post-Rate-Limit-Reset": "3600",
}
_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/gif": "gif", "image/webp": "webp",
               "image/bmp": "bmp", "image/tiff": "tiff"}
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
# A Host header fit to be put in a link: a name or an IP literal, and a port.
_HOST_HEADER = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def parse_multipart(content_type: str, body: bytes, max_parts: int = _SANDBOX_MAX_FIELDS) -> tuple[dict[str, str], dict[str, bytes]]:
    """(fields, files) of a multipart/form-data body; ({}, {}) for any other type. Raises ValueError when malformed."""
    m = re.search(r'boundary=(?:"([^"]+)"|([^;\s]+))', content_type, re.I)
    if not content_type.lower().startswith("multipart/form-data") or not m:
        return {}, {}
    delimiter = b"\r\n--" + (m.group(1) or m.group(2)).encode("latin-1")
    chunks = (b"\r\n" + body).split(delimiter)  # [preamble, part, part, ..., "--" epilogue]
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise ValueError("the multipart body does not end with its closing boundary")
    if len(chunks) - 2 > max_parts:
        raise ValueError(f"more than {max_parts} multipart parts")
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for chunk in chunks[1:-1]:
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a multipart part has no blank line after its headers")
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.decode("utf-8", "replace").partition(":")
            headers[name.strip().lower()] = value.strip()
        disposition = headers.get("content-disposition", "")
        name = re.search(r';\s*name=(?:"([^"]*)"|([^;\s]+))', disposition)
        if not name:
            raise ValueError("a multipart part has no name")
        key = name.group(1) if name.group(1) is not None else name.group(2)
        if re.search(r";\s*filename\*?=", disposition):
            files[key] = payload
        else:
            fields[key] = payload.decode("utf-8", "replace")
    return fields, files


@dataclass
class _Kept:
    data: bytes
    info: dict


class SandboxImages:
    """The images the sandbox received, in memory: at most `max_images` of them and `max_bytes` in all,
    the oldest dropped first. Thread-safe."""

    def __init__(self, max_images: int = SANDBOX_MAX_IMAGES, max_bytes: int = SANDBOX_MAX_TOTAL,
                 now: Callable[[], float] = time.time):
        self.max_images, self.max_bytes, self.now = max_images, max_bytes, now
        self._kept: dict[str, _Kept] = {}  # by id, oldest first
        self._ids_by_deletehash: dict[str, str] = {}
        self.bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._kept)

    def add(self, data: bytes, content_type: str, link_base: str, *, title: str | None = None,
            description: str | None = None) -> dict:
        """Keep `data`; return Imgur's `data` object for it, its link under `link_base` (http://host:port)."""
        if len(data) > self.max_bytes:
            raise ValueError(f"the sandbox keeps at most {self.max_bytes:,} bytes of images (--max-total-mb)")
        with self._lock:
            image_id = self._new(lambda i: i in self._kept, 7)
            deletehash = self._new(lambda h: h in self._ids_by_deletehash, 15)
            info = {
                "id": image_id, "title": title, "description": description, "datetime": int(self.now()),
                "type": content_type, "animated": False, "size": len(data), "views": 0, "bandwidth": 0,
                "deletehash": deletehash, "name": "", "link": f"{link_base}/{image_id}.{_EXTENSIONS[content_type]}",
            }
            self._kept[image_id] = _Kept(data, info)
            self._ids_by_deletehash[deletehash] = image_id
            self.bytes += len(data)
            while len(self._kept) > self.max_images or self.bytes > self.max_bytes:
                self._drop(next(iter(self._kept)))
        return dict(info)

    def get(self, image_id: str) -> tuple[bytes, str] | None:
        """(bytes, content type) of a kept image."""
        with self._lock:
            kept = self._kept.get(image_id)
            return (kept.data, kept.info["type"]) if kept else None

    def delete(self, deletehash: str) -> bool:
        with self._lock:
            image_id = self._ids_by_deletehash.get(deletehash)
            if image_id is None:
                return False
            self._drop(image_id)
            return True

    def _drop(self, image_id: str) -> None:
        kept = self._kept.pop(image_id)
        del self._ids_by_deletehash[kept.info["deletehash"]]
        self.bytes -= len(kept.data)

    @staticmethod
    def _new(taken: Callable[[str], bool], length: int) -> str:
        while True:
            value = "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))
            if not taken(value):
                return value


class _SandboxServer(ThreadingHTTPServer):
    daemon_threads = False  # handler threads are joined by server_close()
    block_on_close = True

    def __init__(self, address, handler, sandbox: "Sandbox", max_connections: int):
        self.sandbox = sandbox
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            body = json.dumps({"data": {"error": f"the sandbox already serves {self.max_connections} connection(s), its most at once: try again"},
                               "success": False, "status": 503}).encode()
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        with self._open_lock:
            self._open.add(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown_request(self, request):
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def hang_up(self) -> None:
        """End the kept-alive connections, so that their threads finish now rather than at their timeout."""
        with self._open_lock:
            connections = list(self._open)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        log.debug("sandbox: connection from %s ended with an error", client_address, exc_info=True)


class _SandboxHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "imgur-sandbox"
    timeout = 30  # a silent client holds a connection slot for 30 s at most

    # -- answers -----------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, doc: dict) -> None:
        credits = {**_SANDBOX_CREDITS, "X-RateLimit-UserReset": str(int(time.time()) + 3600)}
        self._send(status, json.dumps(doc).encode(), "application/json", credits)

    def _error(self, status: int, error: str | dict) -> None:
        path = self.path.split("?", 1)[0]
        self._json(status, {"data": {"error": error, "request": path, "method": self.command}, "success": False, "status": status})

    def log_message(self, format, *args):  # noqa: A002 (the name BaseHTTPRequestHandler gives it)
        log.debug("sandbox: %s %s", self.address_string(), format % args)

    # -- requests ----------------------------------------------------------------------------------------

    def _body(self) -> bytes | None:
        """The request body, or None after answering 411/413 (or when the client went away)."""
        length = self.headers.get("Content-Length", "")
        if self.headers.get("Transfer-Encoding") or not length.isdigit():
            self.close_connection = True
            self._error(411, "send the body with a Content-Length (the sandbox takes no chunked bodies)")
            return None
        size, limit = int(length), self.server.sandbox.max_upload
        if size > limit:
            # Read and drop what the client is sending (up to a bound), so that it sees the 413, not a reset.
            left = size if size <= 4 * limit else 0
            while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
                left -= len(chunk)
            self.close_connection = True
            self._error(413, {"code": 1003, "type": "ImgurException",
                              "message": f"File is over the size limit: the sandbox takes request bodies up to {limit:,} bytes "
                                         "(Imgur's limit for still images, with room for the multipart framing)"})
            return None
        body = self.rfile.read(size)
        if len(body) != size:
            self.close_connection = True
            return None
        return body

    def _authorized(self) -> bool:
        scheme, _, credential = self.headers.get("Authorization", "").partition(" ")
        credential = credential.strip()
        if scheme == "Client-ID" and credential:
            return True
        if scheme == "Bearer" and self.server.sandbox.token_valid(credential):
            return True
        if scheme == "Bearer":
            self._error(403, "The access token provided is invalid.")
        else:
            self._error(401, "Authentication required: send Authorization: Client-ID <any id> (the sandbox takes any)")
        return False

    def _link_base(self) -> str:
        # The host the client reached us by: the service accepts links on IMGUR_API_URL's own host.
        host = self.headers.get("Host", "")
        if not (len(host) <= 262 and _HOST_HEADER.fullmatch(host)):
            bound, port = self.server.server_address[:2]
            host = f"{'127.0.0.1' if bound in ('0.0.0.0', '') else bound}:{port}"
        return f"http://{host}"

    def do_POST(self):  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0].rstrip("/")
        body = self._body()
        if body is None:
            return
        if path == "/oauth2/token":
            return self._token(body)
        if path not in ("/3/image", "/3/upload"):
            return self._error(404, f"there is no POST {path} in the sandbox: uploads go to POST /3/image")
        if not self._authorized():
            return
        content_type = self.headers.get("Content-Type", "")
        try:
            if content_type.lower().startswith("application/x-www-form-urlencoded"):
                fields = dict(urllib.parse.parse_qsl(body.decode("latin-1"), max_num_fields=_SANDBOX_MAX_FIELDS))
                files: dict[str, bytes] = {}
            else:
                fields, files = parse_multipart(content_type, body)
        except ValueError as e:
            return self._error(400, f"the form could not be read: {e}")
        if fields.get("type") == "url" or fields.get("image", "").startswith(("http://", "https://")):
            return self._error(400, "the sandbox does not download URLs: send the image bytes (imgsvc always does)")
        if "image" in files:
            data = files["image"]
        elif "image" in fields:
            try:
                data = base64.b64decode(fields["image"], validate=True)
            except ValueError:
                return self._error(400, "the image field is neither a file nor valid base64")
        else:
            return self._error(400, "No image data was sent to the upload api")
        try:
            _, image_type = sniff(data)
        except NotUploadable as e:
            if len(data) > MAX_STILL_BYTES:
                return self._error(413, {"code": 1003, "type": "ImgurException", "message": str(e)})
            return self._error(400, "File type invalid (1): the uploaded bytes are not an image Imgur takes "
                                    "(JPEG, PNG, GIF, WebP, BMP or TIFF)")
        try:
            info = self.server.sandbox.images.add(
                data, image_type, self._link_base(),
                title=fields.get("title", "")[:255] or None,
                description=fields.get("description", "")[:1000] or None,
            )
        except ValueError as e:
            return self._error(413, str(e))
        log.info("sandbox: kept %s (%s, %d bytes) at %s", info["id"], image_type, len(data), info["link"])
        self._json(200, {"data": info, "success": True, "status": 200})

    def _token(self, body: bytes) -> None:
        form = dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace"), max_num_fields=_SANDBOX_MAX_FIELDS))
        if form.get("grant_type") != "refresh_token" or not form.get("refresh_token") or not form.get("client_id"):
            return self._error(400, "Invalid grant_type parameter or parameter missing")
        token = self.server.sandbox.new_token()
        self._send(200, json.dumps({
            "access_token": token, "expires_in": 3600, "token_type": "bearer", "scope": None,
            "refresh_token": form["refresh_token"], "account_id": 0, "account_username": "sandbox",
        }).encode(), "application/json")

    def do_GET(self):  # noqa: N802
        path = self.path.split("?", 1)[0]
        sandbox = self.server.sandbox
        if path == "/":
            return self._send(200, json.dumps({
                "sandbox": "a local stand-in for Imgur's upload API: POST /3/image with Authorization: Client-ID <anything>",
                "images": len(sandbox.images), "bytes": sandbox.images.bytes,
                "max_images": sandbox.images.max_images, "max_bytes": sandbox.images.max_bytes,
            }).encode(), "application/json")
        found = sandbox.images.get(path[1:].rsplit(".", 1)[0]) if path.count("/") == 1 else None
        if found is None:
            return self._error(404, f"the sandbox has no {path}: it keeps the last {sandbox.images.max_images} images, in memory")
        data, content_type = found
        self._send(200, data, content_type, {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    do_HEAD = do_GET

    def do_DELETE(self):  # noqa: N802
        path = self.path.split("?", 1)[0]
        if self.headers.get("Content-Length", "0") not in ("", "0"):
            self.close_connection = True  # a body we will not read
        if not path.startswith("/3/image/"):
            return self._error(404, f"there is no DELETE {path} in the sandbox: DELETE /3/image/<deletehash>")
        if not self._authorized():
            return
        if not self.server.sandbox.images.delete(path.removeprefix("/3/image/")):
            return self._error(404, "Unable to find an image with that deletehash")
        self._json(200, {"data": True, "success": True, "status": 200})


class Sandbox:
    """`python imgur.py --sandbox`: an HTTP server that answers like Imgur's upload API.

    `serve_forever()` in this thread, or `with Sandbox(port=0) as s:` in a thread of its own; `url`,
    `images` (a SandboxImages), `close()`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = SANDBOX_PORT, *, images: SandboxImages | None = None,
                 max_upload: int = SANDBOX_MAX_UPLOAD, max_connections: int = SANDBOX_MAX_CONNECTIONS):
        self.images = images if images is not None else SandboxImages()
        self.max_upload = max_upload
        self._tokens: dict[str, float] = {}  # access token -> expiry, the 100 newest
        self._tokens_lock = threading.Lock()
        self._httpd = _SandboxServer((host, port), _SandboxHandler, self, max_connections)
        self.host, self.port = self._httpd.server_address[:2]
        self._thread: threading.Thread | None = None
        self._serving = threading.Event()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def new_token(self) -> str:
        token = secrets.token_hex(20)
        with self._tokens_lock:
            self._tokens[token] = time.time() + 3600
            while len(self._tokens) > 100:
                del self._tokens[next(iter(self._tokens))]
        return token

    def token_valid(self, token: str) -> bool:
        with self._tokens_lock:
            return self._tokens.get(token, 0) > time.time()

    def serve_forever(self) -> None:
        self._serving.set()
        self._httpd.serve_forever(poll_interval=0.1)

    def close(self) -> None:
        """Stop serving, end open connections, join every thread."""
        if self._serving.is_set():
            self._httpd.shutdown()
        self._httpd.hang_up()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "Sandbox":
        self._serving.set()
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                         name="imgur-sandbox", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="imgur.py",
        description="A local stand-in for Imgur's upload API (--sandbox), to try imgsvc's upload jobs without an "
                    "Imgur client id. Real uploads need a real one (IMGUR_CLIENT_ID).",
    )
    parser.add_argument("--sandbox", action="store_true",
                        help="answer POST /3/image as Imgur does, keep the images in memory, serve them at the links returned")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s; it takes any client id: keep it private)")
    parser.add_argument("--port", type=int, default=SANDBOX_PORT, help="TCP port (default %(default)s; 0 picks a free one and logs it)")
    parser.add_argument("--max-images", type=int, default=SANDBOX_MAX_IMAGES,
                        help="images kept; the oldest goes first (default %(default)s)")
    parser.add_argument("--max-total-mb", type=float, default=SANDBOX_MAX_TOTAL / 2**20,
                        help="megabytes of images kept; the oldest go first (default %(default)g)")
    args = parser.parse_args(argv)
    if not args.sandbox:
        parser.error("nothing to do: --sandbox starts the local stand-in for Imgur's upload API")
    if args.max_images < 1 or args.max_total_mb <= 0:
        parser.error("--max-images and --max-total-mb must be above 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    images = SandboxImages(args.max_images, int(args.max_total_mb * 2**20))
    try:
        sandbox = Sandbox(args.host, args.port, images=images)
    except OSError as e:
        log.error("the sandbox cannot listen on %s:%s (%s); pick another --port", args.host, args.port, e)
        return 1
    log.info("Imgur sandbox listening on %s (keeps %d images / %g MB in memory)", sandbox.url, args.max_images, args.max_total_mb)
    log.info("point imgsvc at it: IMGUR_CLIENT_ID=sandbox IMGUR_API_URL=%s python server.py", sandbox.url)
    try:
        sandbox.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        sandbox.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
