"""Tests for fetch.py against loopback servers started here (no internet needed)."""

from __future__ import annotations

import gzip
import ipaddress
import json
import pickle
import socket
import ssl
import sys
import threading
import time
import zlib
from pathlib import Path
from struct import pack

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fetch  # noqa: E402
from fetch import (  # noqa: E402
    BlockedAddress,
    DownloadTimeout,
    Fetcher,
    InvalidURL,
    NotAnImage,
    TooLarge,
    TooManyRedirects,
    Unreachable,
    UpstreamStatus,
    blocked_reason,
    check_url,
)
from helpers import make_certificate  # noqa: E402
from loopback import Loopback, drip, dropped, ok, redirect, respond, status  # noqa: E402

PUBLIC_IP = "93.184.216.34"


def _png() -> bytes:
    """A valid 1x1 PNG built by hand, so the tests need no image library."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return pack(">I", len(body)) + kind + body + pack(">I", zlib.crc32(kind + body))

    header = pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


PNG = _png()


# --------------------------------------------------------------------------
# Loopback test server (tests/loopback.py) and the misbehaviours only these tests need

def _headers(h, fields: dict) -> None:
    """Send a 200 status line and `fields`; the route writes (or withholds) the body itself."""
    h.send_response(200)
    for name, value in fields.items():
        h.send_header(name, value)
    h.end_headers()


def _echo(h):
    respond(h, 200, json.dumps({"path": h.path, "headers": dict(h.headers.items())}).encode(), "image/x-test")


def _huge(h):
    _headers(h, {"Content-Type": "image/png", "Content-Length": str(1_000_000_000)})
    h.wfile.write(b"x" * 10)
    # Never send the rest: a client that tried to read it would time out.
    h.server.stopping.wait(10)


def _endless(h):
    _headers(h, {"Content-Type": "image/png", "Transfer-Encoding": "chunked"})
    piece = b"x" * 16384
    while not h.server.stopping.is_set():
        h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))


def _drip_headers(h):
    h.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    for _ in range(1000):
        if h.server.stopping.wait(0.2):
            return
        h.wfile.write(b"a")


def _garbage(h):
    h.wfile.write(b"THIS IS NOT HTTP\r\n\r\n")


ROUTES = {
    "/img": ok(PNG, "image/png"),
    "/img-ct": ok(PNG, "IMAGE/PNG ; charset=binary"),
    "/no-ct": lambda h: respond(h, 200, PNG, None),
    "/echo": _echo,
    "/echo/%C3%BC": _echo,
    "/404": status(404, b"not here"),
    "/500": status(500, b"oops"),
    "/html": ok(b"<html><body>hi</body></html>", "text/html; charset=utf-8"),
    "/json": ok(b"{}", "application/problem+json"),
    "/svg": ok(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"),
    "/chain/0": ok(PNG, "image/png"),
    # /chain/n redirects (relative on purpose) to /chain/n-1, with each redirect status in turn.
    **{f"/chain/{n}": redirect(f"/chain/{n - 1}", (301, 302, 303, 307, 308)[n % 5]) for n in range(1, 10)},
    "/loop/a": redirect("/loop/b"),
    "/no-location": lambda h: respond(h, 302, b"", None),
    "/to-file": redirect("file:///etc/passwd"),
    "/huge": _huge,
    "/endless": _endless,
    "/drip": drip(100, 0.2, "image/png"),
    "/drip-headers": _drip_headers,
    "/gzip": ok(gzip.compress(PNG), "image/png", {"Content-Encoding": "gzip"}),
    "/dropped": dropped(PNG[:10], 1000, "image/png"),
    "/garbage": _garbage,
}


def _loopback() -> Loopback:
    """A Loopback on ROUTES plus the absolute redirects that name its own port (not started yet)."""
    srv = Loopback(dict(ROUTES))
    srv.routes["/abs-redirect"] = redirect(srv.url("/img"), 301)
    srv.routes["/loop/b"] = redirect(srv.url("/loop/a"))
    srv.routes["/to-loopback"] = redirect(srv.url("/img"))
    return srv


@pytest.fixture(autouse=True)
def no_leftover_threads():
    before = set(threading.enumerate())
    yield
    leftovers = [t for t in threading.enumerate() if t not in before]
    for t in leftovers:
        t.join(2)
    assert not [t for t in leftovers if t.is_alive()], "a test left a thread running"


@pytest.fixture
def server():
    with _loopback() as srv:
        yield srv


def make(**kwargs) -> Fetcher:
    kwargs.setdefault("max_bytes", 1 << 20)
    kwargs.setdefault("timeout", 5.0)
    return Fetcher(**kwargs)


def never_connect(calls):
    def connect(address, timeout):
        calls.append(address)
        raise AssertionError(f"connect must not be called, got {address}")

    return connect


def fake_resolver(mapping, calls):
    """Names in `mapping` resolve as given (a list, or a list of lists per call); others go to the real resolver."""
    per_name_calls: dict[str, int] = {}

    def resolve(host, port):
        calls.append(host)
        if host not in mapping:
            return fetch.default_resolve(host, port)
        answer = mapping[host]
        if answer and isinstance(answer[0], list):
            n = per_name_calls.get(host, 0)
            per_name_calls[host] = n + 1
            return answer[min(n, len(answer) - 1)]
        return answer

    return resolve


def routed_connect(srv, record):
    """Send connections aimed at PUBLIC_IP to the loopback server; refuse anything else."""

    def connect(address, timeout):
        record.append(address)
        host, port = address
        assert host == PUBLIC_IP, f"unexpected connection to {address}"
        return socket.create_connection(("127.0.0.1", srv.port), timeout=timeout)

    return connect


# --------------------------------------------------------------------------
# Plain fetching (guard off so the loopback server is reachable)

def test_good_fetch(server):
    d = make(allow_private=True).fetch(server.url("/img"))
    assert d.data == PNG
    assert d.content_type == "image/png"
    assert d.url == d.final_url == server.url("/img")


def test_content_type_is_normalised_or_none(server):
    f = make(allow_private=True)
    assert f.fetch(server.url("/img-ct")).content_type == "image/png"
    assert f.fetch(server.url("/no-ct")).content_type is None
    assert f.fetch(server.url("/svg")).content_type == "image/svg+xml"


def test_request_headers_and_path_encoding(server):
    d = make(allow_private=True).fetch(server.url("/echo/ü?q=a%20b#frag"))
    seen = json.loads(d.data)
    assert seen["path"] == "/echo/%C3%BC?q=a%20b"
    headers = seen["headers"]
    assert headers["Host"] == f"127.0.0.1:{server.port}"
    assert headers["Accept"] == "image/*"
    assert headers["Accept-Encoding"] == "identity"
    assert headers["User-Agent"] == "imgsvc-fetch/1"


def test_environment_proxies_are_ignored(server, monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://192.0.2.1:3128")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert make(allow_private=True).fetch(server.url("/img")).data == PNG


def test_redirect_chain_is_followed(server):
    d = make(allow_private=True).fetch(server.url("/chain/2"))
    assert d.data == PNG
    assert d.url == server.url("/chain/2")
    assert d.final_url == server.url("/chain/0")
    assert server.hits == {"/chain/2": 1, "/chain/1": 1, "/chain/0": 1}


def test_absolute_redirect(server):
    d = make(allow_private=True).fetch(server.url("/abs-redirect"))
    assert d.final_url == server.url("/img")


def test_too_many_redirects(server):
    with pytest.raises(TooManyRedirects):
        make(allow_private=True).fetch(server.url("/chain/4"))
    assert "/chain/0" not in server.hits
    # The limit is configurable.
    assert make(allow_private=True, max_redirects=4).fetch(server.url("/chain/4")).data == PNG


def test_redirect_loop(server):
    with pytest.raises(TooManyRedirects, match="loop"):
        make(allow_private=True, max_redirects=10).fetch(server.url("/loop/a"))
    assert server.hits == {"/loop/a": 1, "/loop/b": 1}


@pytest.mark.parametrize("path", ["/no-location", "/to-file"])
def test_redirect_without_usable_location(server, path):
    with pytest.raises(TooManyRedirects):
        make(allow_private=True).fetch(server.url(path))


@pytest.mark.parametrize("status", [404, 500])
def test_upstream_status(server, status):
    with pytest.raises(UpstreamStatus) as info:
        make(allow_private=True).fetch(server.url(f"/{status}"))
    assert info.value.status == status
    assert str(status) in str(info.value)


def test_upstream_status_pickles():
    err = pickle.loads(pickle.dumps(UpstreamStatus(418, "teapot")))
    assert err.status == 418 and str(err) == "teapot"


@pytest.mark.parametrize("path", ["/html", "/json"])
def test_not_an_image(server, path):
    with pytest.raises(NotAnImage):
        make(allow_private=True).fetch(server.url(path))


def test_content_length_over_cap_is_refused_before_reading(server):
    start = time.monotonic()
    with pytest.raises(TooLarge):
        make(allow_private=True, timeout=5.0).fetch(server.url("/huge"))
    # The server never sends the body; reading it would have run into the timeout.
    assert time.monotonic() - start < 1.0


def test_streamed_body_over_cap(server):
    with pytest.raises(TooLarge):
        make(allow_private=True, max_bytes=100_000).fetch(server.url("/endless"))


def test_small_cap_applies_to_known_length(server):
    with pytest.raises(TooLarge):
        make(allow_private=True, max_bytes=len(PNG) - 1).fetch(server.url("/img"))
    assert make(allow_private=True, max_bytes=len(PNG)).fetch(server.url("/img")).data == PNG


@pytest.mark.parametrize("path", ["/drip", "/drip-headers"])
def test_slow_drip_hits_total_deadline(server, path):
    start = time.monotonic()
    with pytest.raises(DownloadTimeout):
        make(allow_private=True, timeout=1.0).fetch(server.url(path))
    elapsed = time.monotonic() - start
    assert 0.9 <= elapsed < 1.5


def test_deadline_uses_injected_clock():
    ticks = iter([0.0, 100.0, 200.0, 300.0, 400.0])
    calls = []
    f = make(allow_private=True, now=lambda: next(ticks), connect=never_connect(calls))
    with pytest.raises(DownloadTimeout):
        f.fetch("http://127.0.0.1:9/img")
    assert calls == []


def test_dropped_connection(server):
    with pytest.raises(Unreachable):
        make(allow_private=True).fetch(server.url("/dropped"))


def test_malformed_response(server):
    with pytest.raises(Unreachable):
        make(allow_private=True).fetch(server.url("/garbage"))


def test_refused_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(Unreachable):
        make(allow_private=True).fetch(f"http://127.0.0.1:{port}/img")


def test_dns_failure_is_unreachable():
    def resolve(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(Unreachable, match="nowhere.test"):
        make(resolve=resolve).fetch("http://nowhere.test/img")


def test_gzip_is_refused(server):
    with pytest.raises(Unreachable, match="Content-Encoding"):
        make(allow_private=True).fetch(server.url("/gzip"))


# --------------------------------------------------------------------------
# Guard on: nothing below may ever connect

GUARDED = [
    ("http://127.0.0.1:{port}/", BlockedAddress),
    ("http://localhost/", BlockedAddress),
    ("http://LOCALHOST./", BlockedAddress),
    ("http://foo.localhost/", BlockedAddress),
    ("http://2130706433/", BlockedAddress),
    ("http://0x7f.1/", BlockedAddress),
    ("http://0177.0.0.1/", BlockedAddress),
    ("http://127.1/", BlockedAddress),
    ("http://0.0.0.0/", BlockedAddress),
    ("http://0/", BlockedAddress),
    ("http://[::1]/", BlockedAddress),
    ("http://[::]/", BlockedAddress),
    ("http://[::ffff:127.0.0.1]/", BlockedAddress),
    ("http://169.254.169.254/latest/meta-data/", BlockedAddress),
    ("http://10.0.0.1/", BlockedAddress),
    ("http://172.31.0.1/", BlockedAddress),
    ("http://192.168.1.1/", BlockedAddress),
    ("http://100.64.0.1/", BlockedAddress),
    ("http://[fd00::1]/", BlockedAddress),
    ("http://[fe80::1]/", BlockedAddress),
    ("http://[64:ff9b::7f00:1]/", BlockedAddress),
    ("http://[2002:7f00:1::]/", BlockedAddress),
    ("http://224.0.0.1/", BlockedAddress),
    ("http://255.255.255.255/", BlockedAddress),
    ("https://127.0.0.1/", BlockedAddress),
    ("file:///etc/passwd", InvalidURL),
    ("ftp://example.com/x.png", InvalidURL),
    ("gopher://example.com/", InvalidURL),
    ("data:image/png;base64,AAAA", InvalidURL),
    ("http://user:pass@example.com/", InvalidURL),
    ("http://127.0.0.1:80\\@evil.example/", InvalidURL),
]


@pytest.mark.parametrize("url,expected", GUARDED)
def test_guard_blocks_without_connecting(server, url, expected):
    calls = []
    with pytest.raises(expected) as info:
        make(connect=never_connect(calls)).fetch(url.format(port=server.port))
    assert calls == []
    assert not server.hits
    assert str(info.value)  # a readable sentence, never empty


def test_blocked_message_names_host_address_and_reason(caplog):
    calls = []
    with caplog.at_level("DEBUG", logger="fetch"):
        with pytest.raises(BlockedAddress) as info:
            make(connect=never_connect(calls)).fetch("http://localhost/")
    message = str(info.value)
    assert "localhost" in message and "127.0.0.1" in message and "loopback" in message
    # DEBUG: one line per blocked URL at INFO let a job of blocked URLs fill the log (issue 10)
    assert any("loopback" in r.getMessage() for r in caplog.records if r.levelname == "DEBUG")


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "0177.0.0.1", "127.1", "127.0.0.1", "0x7f.1."])
def test_default_resolver_normalises_numeric_hosts(host):
    assert fetch.default_resolve(host, 80) == ["127.0.0.1"]


def test_default_resolver_other_literals():
    assert fetch.default_resolve("0", 80) == ["0.0.0.0"]
    assert fetch.default_resolve("::ffff:127.0.0.1", 80) == ["::ffff:7f00:1"]
    assert "127.0.0.1" in fetch.default_resolve("LOCALHOST.", 80)


# --------------------------------------------------------------------------
# Resolver and connect seams

def test_name_resolving_to_loopback_is_blocked():
    calls, resolved = [], []
    f = make(resolve=fake_resolver({"evil.test": ["127.0.0.1"]}, resolved), connect=never_connect(calls))
    with pytest.raises(BlockedAddress, match="evil.test"):
        f.fetch("http://evil.test/img.png")
    assert calls == []


def test_any_private_answer_blocks_the_host():
    calls, resolved = [], []
    resolve = fake_resolver({"mixed.test": [PUBLIC_IP, "10.1.2.3"]}, resolved)
    with pytest.raises(BlockedAddress) as info:
        make(resolve=resolve, connect=never_connect(calls)).fetch("http://mixed.test/img.png")
    assert "10.1.2.3" in str(info.value) and "private" in str(info.value)
    assert calls == []


def test_resolved_once_per_hop_and_connects_only_to_checked_address(server):
    resolved, connected = [], []
    resolve = fake_resolver({"rebind.test": [[PUBLIC_IP], ["127.0.0.1"]]}, resolved)
    f = make(resolve=resolve, connect=routed_connect(server, connected))
    d = f.fetch(f"http://rebind.test:{server.port}/echo")
    assert resolved == ["rebind.test"]
    assert connected == [(PUBLIC_IP, server.port)]
    # The Host header keeps the name from the URL, not the address.
    assert json.loads(d.data)["headers"]["Host"] == f"rebind.test:{server.port}"


def test_every_hop_is_resolved_and_checked(server):
    resolved, connected = [], []
    resolve = fake_resolver({"public.test": [PUBLIC_IP]}, resolved)
    d = make(resolve=resolve, connect=routed_connect(server, connected)).fetch(
        f"http://public.test:{server.port}/chain/2"
    )
    assert d.data == PNG
    assert resolved == ["public.test"] * 3
    assert connected == [(PUBLIC_IP, server.port)] * 3


def test_connect_tries_checked_addresses_in_order(server):
    resolved, connected = [], []
    other = "93.184.216.35"

    def connect(address, timeout):
        connected.append(address)
        if address[0] == other:
            raise ConnectionRefusedError(111, "Connection refused")
        return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)

    resolve = fake_resolver({"two.test": [other, PUBLIC_IP]}, resolved)
    assert make(resolve=resolve, connect=connect).fetch(f"http://two.test:{server.port}/img").data == PNG
    assert connected == [(other, server.port), (PUBLIC_IP, server.port)]


def test_public_url_redirecting_to_loopback_is_blocked(server):
    resolved, connected = [], []
    resolve = fake_resolver({"public.test": [PUBLIC_IP]}, resolved)
    f = make(resolve=resolve, connect=routed_connect(server, connected))
    with pytest.raises(BlockedAddress):
        f.fetch(f"http://public.test:{server.port}/to-loopback")
    assert server.hits == {"/to-loopback": 1}
    assert connected == [(PUBLIC_IP, server.port)]


# --------------------------------------------------------------------------
# allow_private lifts only the address check

@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "http://user:pass@127.0.0.1/", "gopher://127.0.0.1/", "http://127.0.0.1:0/"]
)
def test_allow_private_still_checks_syntax(url):
    calls = []
    with pytest.raises(InvalidURL):
        make(allow_private=True, connect=never_connect(calls)).fetch(url)
    assert calls == []


def test_allow_private_still_limits_size_and_redirects(server):
    f = make(allow_private=True, max_bytes=10)
    with pytest.raises(TooLarge):
        f.fetch(server.url("/img"))
    with pytest.raises(TooLarge):
        f.fetch(server.url("/huge"))
    with pytest.raises(TooManyRedirects):
        make(allow_private=True, max_redirects=1).fetch(server.url("/chain/2"))


# --------------------------------------------------------------------------
# check_url and blocked_reason

@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/a.png",
        "HTTPS://Example.COM:8443/a.png?x=1#y",
        "http://[2606:4700:4700::1111]/",
        "http://example.com./x",
        "http://example.com:/x",
        "http://example.com/ü.png",
    ],
)
def test_check_url_accepts(url):
    parts = check_url(url)
    assert parts.scheme in ("http", "https")


@pytest.mark.parametrize(
    "url",
    [
        "",
        "example.com/a.png",
        "http:///x",
        "http://:80/",
        "http://example.com:0/",
        "http://example.com:65536/",
        "http://example.com:8a/",
        "http://example.com:+80/",
        "http://exa mple.com/",
        "http://example.com/a b",
        "http://example.com/\t",
        "http://example.com/\n",
        "http://example.com/\x00",
        " http://example.com/",
        "http://example.com/\u202e",
        "http://example.com\\@127.0.0.1/",
        "http://@example.com/",
        "http://[::1/",
        "http://[evil.com]/",
        "http://::1/",
        "http://ex%61mple.com/",
        "http://bücher.example/",
        "javascript:alert(1)",
        "http://example.com/" + "a" * 2048,
    ],
)
def test_check_url_rejects(url):
    with pytest.raises(InvalidURL) as info:
        check_url(url)
    assert str(info.value)


@pytest.mark.parametrize(
    "address,reason",
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("192.168.0.1", "private"),
        ("169.254.169.254", "link-local"),
        ("100.64.0.1", "CGNAT"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "this-network"),
        ("255.255.255.255", "broadcast"),
        ("240.0.0.1", "reserved"),
        ("224.0.0.1", "multicast"),
        ("192.0.2.1", "documentation"),
        ("198.51.100.7", "documentation"),
        ("203.0.113.7", "documentation"),
        ("198.18.0.1", "benchmarking"),
        ("::", "unspecified"),
        ("::1", "loopback"),
        ("::ffff:8.8.8.8", "IPv4-mapped"),
        ("::8.8.8.8", "IPv4-compatible"),
        ("64:ff9b::808:808", "NAT64"),
        ("64:ff9b:1::1", "NAT64"),
        ("2002:808:808::1", "6to4"),
        ("2001::1", "Teredo"),
        ("2001:db8::1", "documentation"),
        ("fd00::1", "unique-local"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("ff02::1", "multicast"),
        ("4000::1", "not global unicast"),
    ],
)
def test_blocked_reason(address, reason):
    got = blocked_reason(ipaddress.ip_address(address))
    assert got is not None and reason in got


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", PUBLIC_IP, "2606:4700:4700::1111", "2a00:1450:4001:80b::200e"])
def test_blocked_reason_allows_public(address):
    assert blocked_reason(ipaddress.ip_address(address)) is None


def test_fetch_module_does_not_import_bottle():
    source = Path(fetch.__file__).read_text()
    assert "bottle" not in source


# --------------------------------------------------------------------------
# HTTPS: certificate checked against the URL's host, not the address

@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return make_certificate(tmp_path_factory.mktemp("tls"), "DNS:public.test")


@pytest.fixture
def tls_server(certificate):
    cert, key = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    srv = _loopback()
    # Handshake lazily in the handler thread so a stuck client cannot block accept().
    srv.server.socket = context.wrap_socket(srv.server.socket, server_side=True, do_handshake_on_connect=False)
    with srv:
        yield srv


def _tls_fetcher(srv, connected, context=None):
    resolve = fake_resolver({"public.test": [PUBLIC_IP], "other.test": [PUBLIC_IP]}, [])
    kwargs = {"ssl_context": context} if context is not None else {}
    return make(resolve=resolve, connect=routed_connect(srv, connected), **kwargs)


def test_https_fetch_verifies_against_url_host(tls_server, certificate):
    connected = []
    context = ssl.create_default_context(cafile=str(certificate[0]))
    d = _tls_fetcher(tls_server, connected, context).fetch(f"https://public.test:{tls_server.port}/echo")
    assert json.loads(d.data)["headers"]["Host"] == f"public.test:{tls_server.port}"
    assert connected == [(PUBLIC_IP, tls_server.port)]


def test_https_wrong_host_name_is_unreachable(tls_server, certificate):
    context = ssl.create_default_context(cafile=str(certificate[0]))
    with pytest.raises(Unreachable, match="TLS"):
        _tls_fetcher(tls_server, [], context).fetch(f"https://other.test:{tls_server.port}/img")
    assert not tls_server.hits


def test_https_untrusted_certificate_is_unreachable(tls_server):
    with pytest.raises(Unreachable, match="TLS"):
        _tls_fetcher(tls_server, []).fetch(f"https://public.test:{tls_server.port}/img")
    assert not tls_server.hits


def test_a_blocked_address_names_the_setting_that_allows_it():
    with pytest.raises(fetch.BlockedAddress, match="ALLOW_PRIVATE_URLS=1"):
        make(connect=never_connect([])).fetch("http://192.168.1.20/cam.jpg")
