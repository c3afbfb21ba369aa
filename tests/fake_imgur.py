"""A fake Imgur on loopback (real sockets), for the tests and bench/jobs.py.

It answers `POST /3/image` and `POST /oauth2/token` as Imgur does, checks the Authorization header,
refuses upload-by-link, and records the bytes it received, so a test can prove re-upload. `script`
holds canned answers given (in order) before the normal one: a test queues a 429, a 500, a 400 "bad
image", the HTML over-capacity page or an invalid-token 403. Grown into a tool for people, without
the scripting and the recording, it is `python imgur.py --sandbox` (tests/test_sandbox.py).
"""

from __future__ import annotations

import collections
import itertools
import json
import threading
import time

import imgur
from loopback import Loopback, read_body, respond

OVER_CAPACITY = b"<html><head><title>Imgur is over capacity!</title></head><body>over capacity</body></html>"


class FakeImgur:
    def __init__(self, *, client_id: str = "test-client", client_secret: str = "s3cret", refresh_token: str = "refresh-1", delay: float = 0.0, token_lifetime: int = 3600):
        self.client_id, self.client_secret, self.refresh_token = client_id, client_secret, refresh_token
        self.delay = delay  # seconds each upload takes (bench)
        self.token_lifetime = token_lifetime
        self.script: collections.deque = collections.deque()  # (status, body, headers) answered first
        self.received: list[bytes] = []  # bytes of every accepted upload, in order
        self.uploads: list[dict] = []  # {"auth", "fields", "filename", "bytes"} of every upload request
        self.valid_tokens: set[str] = set()
        self.refreshes = 0
        self.success_headers: dict[str, str] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.server = Loopback({"/3/image": self._image, "/oauth2/token": self._token})

    @property
    def url(self) -> str:
        return self.server.url("")

    def __enter__(self) -> "FakeImgur":
        self.server.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.server.__exit__(*exc)

    def invalidate_tokens(self) -> None:
        self.valid_tokens.clear()

    # -- routes ------------------------------------------------------------------------------------------

    def _token(self, h) -> None:
        form = dict(pair.split("=", 1) for pair in read_body(h).decode().split("&") if "=" in pair)
        expected = {"refresh_token": self.refresh_token, "client_id": self.client_id, "client_secret": self.client_secret, "grant_type": "refresh_token"}
        if form != expected:
            return respond(h, 400, json.dumps({"data": {"error": "Invalid refresh token"}, "success": False, "status": 400}).encode(), "application/json")
        with self._lock:
            self.refreshes += 1
            token = f"tok-{self.refreshes}"
            self.valid_tokens.add(token)
        body = {"access_token": token, "expires_in": self.token_lifetime, "token_type": "bearer", "refresh_token": self.refresh_token}
        respond(h, 200, json.dumps(body).encode(), "application/json")

    def _image(self, h) -> None:
        arrived = time.monotonic()
        body = read_body(h)
        fields, files = _parse_multipart(h.headers.get("Content-Type", ""), body)
        auth = h.headers.get("Authorization", "")
        with self._lock:
            self.uploads.append({"auth": auth, "fields": fields, "files": files})
            scripted = self.script.popleft() if self.script else None
        if auth.startswith("Bearer "):
            if auth.removeprefix("Bearer ") not in self.valid_tokens:
                return _json(h, 403, {"data": {"error": "The access token provided is invalid.", "request": "/3/image", "method": "POST"}, "success": False, "status": 403})
        elif auth != f"Client-ID {self.client_id}":
            return _json(h, 403, {"data": {"error": "Authentication required", "request": "/3/image", "method": "POST"}, "success": False, "status": 403})
        if scripted is not None:
            status, payload, headers = scripted
            content_type = "text/html" if payload.startswith(b"<") else "application/json"
            return respond(h, status, payload, content_type, headers)
        if fields.get("type") == "url" or "image" not in files:
            return _json(h, 400, {"data": {"error": "upload-by-link is not allowed in these tests", "request": "/3/image", "method": "POST"}, "success": False, "status": 400})
        if self.delay:  # `delay` per upload from the request's arrival, however long parsing took
            h.server.stopping.wait(max(0.0, self.delay - (time.monotonic() - arrived)))
        with self._lock:
            n = next(self._ids)
            self.received.append(files["image"])
        data = {"id": f"img{n}", "link": f"https://i.imgur.com/img{n}.jpg", "deletehash": f"del{n}", "type": "image/jpeg", "size": len(files["image"])}
        _json(h, 200, {"data": data, "success": True, "status": 200}, self.success_headers)


def _json(h, status: int, doc: dict, headers: dict | None = None) -> None:
    respond(h, status, json.dumps(doc).encode(), "application/json", headers)


# The sandbox's parser (imgur.py's command-line section): one multipart reader for the fake and the tool.
_parse_multipart = imgur.parse_multipart


def answer(status: int, error: str | bytes | dict | None = None, headers: dict | None = None) -> tuple:
    """A scripted answer: answer(429, "Too many", {"Retry-After": "2"}), answer(403, OVER_CAPACITY)."""
    if isinstance(error, bytes):
        payload = error
    elif isinstance(error, dict):
        payload = json.dumps(error).encode()
    else:
        payload = json.dumps({"data": {"error": error or "error", "request": "/3/image", "method": "POST"}, "success": False, "status": status}).encode()
    return (status, payload, headers or {})
