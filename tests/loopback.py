"""A tiny HTTP server on 127.0.0.1 and a free port, played by the tests (model host, image host, ...).

    with Loopback({"/good": ok(b"...", "image/png"), "/gone": status(404)}) as srv:
        srv.url("/good")

A route is a function taking the request handler; it writes the whole response itself, so a test can
misbehave on purpose (drop the connection, dribble bytes, lie in Content-Length). `srv.hits` counts the
requests per path.
"""

from __future__ import annotations

import collections
import http.server
import threading
from typing import Callable

Route = Callable[[http.server.BaseHTTPRequestHandler], None]


class Loopback:
    def __init__(self, routes: dict[str, Route]):
        self.routes = routes
        self.hits: collections.Counter = collections.Counter()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                outer.hits[path] += 1
                route = outer.routes.get(path)
                if route is None:
                    status(404)(self)
                else:
                    route(self)

            def log_message(self, *args):  # keep test output clean
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="loopback", daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> "Loopback":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


def ok(body: bytes, content_type: str = "application/octet-stream", headers: dict | None = None) -> Route:
    def route(h):
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    return route


def status(code: int, body: bytes = b"", content_type: str = "text/plain") -> Route:
    def route(h):
        h.send_response(code)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return route


def dropped(body: bytes, claimed: int, content_type: str = "application/octet-stream") -> Route:
    """Announce `claimed` bytes, send `body`, then close the connection."""

    def route(h):
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(claimed))
        h.end_headers()
        h.wfile.write(body)
        h.wfile.flush()
        h.close_connection = True
        h.connection.shutdown(2)

    return route
