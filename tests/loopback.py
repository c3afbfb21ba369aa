"""A tiny HTTP server on 127.0.0.1 and a free port, played by the tests (image hosts, a model host, Imgur).

    with Loopback({"/good": ok(b"...", "image/png"), "/gone": status(404)}) as srv:
        srv.url("/good")

A route is a function taking the request handler; it writes the whole response itself, so a test can
misbehave on purpose (drop the connection, dribble bytes, lie in Content-Length). Routes answer every
method; `h.command` says which, and `read_body(h)` reads a request body. `srv.hits` counts requests
per path. A route that waits should wait on `h.server.stopping`, which is set when the server closes:
closing joins every handler thread, so no test leaves one running.
"""

from __future__ import annotations

import collections
import http.server
import socket
import threading
from typing import Callable

Route = Callable[[http.server.BaseHTTPRequestHandler], None]


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = False  # handler threads are joined by server_close()
    block_on_close = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.open_connections: set = set()
        self.connections_made = 0
        self._connections_lock = threading.Lock()

    def process_request(self, request, client_address):
        with self._connections_lock:
            self.open_connections.add(request)
            self.connections_made += 1
        # Headers and body go out in two writes; without NODELAY the second waits for the client's
        # delayed ACK (40 ms) on a kept-alive connection. Real servers set it too.
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._connections_lock:
            self.open_connections.discard(request)
        super().shutdown_request(request)

    def hang_up(self) -> None:
        """End idle keep-alive connections, so their handler threads finish now, not at their timeout."""
        with self._connections_lock:
            connections = list(self.open_connections)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        pass  # clients hanging up on purpose, TLS clients refusing a certificate


class Loopback:
    def __init__(self, routes: dict[str, Route]):
        self.routes = routes
        self.hits: collections.Counter = collections.Counter()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 5  # a silent client never pins a handler thread for long

            def _dispatch(self):
                path = self.path.split("?", 1)[0]
                outer.hits[path] += 1
                route = outer.routes.get(path, status(404))
                try:
                    route(self)
                except OSError:
                    self.close_connection = True  # the client hung up, which some tests do on purpose

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _dispatch

            def log_message(self, *args):  # keep test output clean
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.server.stopping = threading.Event()
        self.stopping = self.server.stopping
        self.port = self.server.server_address[1]
        # A short poll: shutdown() waits up to one interval, and the suites start hundreds of servers.
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, name="loopback", daemon=True
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> "Loopback":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.hang_up()
        self.server.server_close()
        self._thread.join(5)


def read_body(h: http.server.BaseHTTPRequestHandler) -> bytes:
    return h.rfile.read(int(h.headers.get("Content-Length") or 0))


def respond(h, code: int, body: bytes = b"", content_type: str | None = "application/octet-stream", headers: dict | None = None) -> None:
    h.send_response(code)
    if content_type:
        h.send_header("Content-Type", content_type)
    h.send_header("Content-Length", str(len(body)))
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


def ok(body: bytes, content_type: str = "application/octet-stream", headers: dict | None = None) -> Route:
    return lambda h: respond(h, 200, body, content_type, headers)


def status(code: int, body: bytes = b"", content_type: str = "text/plain") -> Route:
    return lambda h: respond(h, code, body, content_type)


def redirect(location: str, code: int = 302) -> Route:
    return lambda h: respond(h, code, b"", None, {"Location": location})


def drip(total: int, every: float, content_type: str = "image/jpeg") -> Route:
    """Announce `total` bytes and send one each `every` seconds (until the server closes)."""

    def route(h):
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(total))
        h.end_headers()
        for _ in range(total):
            if h.server.stopping.wait(every):
                return
            h.wfile.write(b"x")
            h.wfile.flush()

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
