"""The attack catalogue: hostile URLs, hostile content and hostile bodies against the whole service.

Organised by attack. Every test names what it attacks and asserts the whole consequence: the HTTP status
and its problem+json shape, that nothing was stored (`service.counts() == (0, 0)`), fetched (the
loopback servers' `.hits`, the addresses the `connect` seam was asked for) or sent on (the fake Imgur's
`.uploads`), and that the service still answers `GET /health` afterwards.

The address guard is always the real code of fetch.py: tests only use Fetcher's `resolve` (fake DNS) and
`connect` (records every address it is asked for; sends the stand-in public address to a loopback "public"
host and loopback addresses to a loopback trap, so a guard failure would really reach something).
Lower-level unit tests of the guard live in test_fetch.py; this file drives the HTTP API.
"""

from __future__ import annotations

import collections
import gzip
import http.client
import io
import ipaddress
import json
import socket
import struct
import threading
import time
import urllib.parse
import urllib.request
import zlib

import pytest
from PIL import Image
from test_server import start_server, stop_server

import imgur
from fake_imgur import FakeImgur
from helpers import PROBLEM_KEYS, assert_problem, b64, jpeg, peak_rss_mb, reset_peak_rss, rss_mb  # noqa: E402
from loopback import Loopback, drip, ok, redirect, respond

PUBLIC_IP = "93.184.216.34"  # stands in for a host on the internet; `connect` sends it to a loopback server
MAX_BYTES = 20 * 1024 * 1024  # MAX_IMAGE_BYTES' default, which these tests keep


# --------------------------------------------------------------------------------------------------------
# Payloads, built by hand so they are small and fast to make
# --------------------------------------------------------------------------------------------------------





JPEG = jpeg()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG whose header claims width x height RGB pixels (2.7 GB decoded at 30000x30000) in ~70 bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")


def gif_with_frames(frames: int = 10_000, side: int = 500) -> bytes:
    """An animated GIF of `frames` frames of side x side pixels: one frame encoded by Pillow, repeated.

    About 8.8 MB (under MAX_IMAGE_BYTES) for 10,000 frames of 500x500. Decoding every frame takes
    several seconds (about 8 s here); the first one, milliseconds.
    """
    buf = io.BytesIO()
    Image.new("P", (side, side), 0).save(buf, "GIF")
    one = buf.getvalue()
    # GIF87a, logical screen (7 bytes), a 2-colour global table (6 bytes), then the image descriptor.
    assert one[19:20] == b"," and one.endswith(b";"), one[:32]
    control = b"\x21\xf9\x04\x00\x01\x00\x00\x00"  # graphic control: 10 ms per frame
    loop = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    return b"GIF89a" + one[6:19] + loop + (control + one[19:-1]) * frames + b";"


def gif_frame_bigger_than_screen(side: int = 9000) -> bytes:
    """A 1x1 GIF screen whose first frame claims side x side pixels (81 MP) with 5 bytes of pixel data."""
    screen = b"GIF89a" + struct.pack("<HH", 1, 1) + b"\x80\x00\x00" + b"\x00\x00\x00\xff\xff\xff"
    return screen + b"," + struct.pack("<HHHH", 0, 0, side, side) + b"\x00" + b"\x02\x02\x44\x01\x00" + b";"


_GZIP_BOMB: list[bytes] = []


def gzip_bomb() -> bytes:
    """About 1 MB that inflates to 1 GiB: 64 gzip members of 16 MiB of zeros each (a valid gzip stream)."""
    if not _GZIP_BOMB:
        _GZIP_BOMB.append(gzip.compress(b"\0" * (16 << 20), 9) * 64)
    return _GZIP_BOMB[0]


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"
DOS_EPS = b"\xc5\xd0\xd3\xc6" + struct.pack("<IIII", 30, len(EPS), 0, 0) + b"\xff\xff" + EPS
PDF = b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
PSD = b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 3, 10, 10, 8, 3) + b"\x00" * 64





# --------------------------------------------------------------------------------------------------------
# Assertions
# --------------------------------------------------------------------------------------------------------


def assert_still_serving(service) -> None:
    res = service.client.get("/health")
    assert res.status_int == 200 and res.json["status"] == "ok"


def assert_nothing_kept(service, *servers, fake=None, connected=None) -> None:
    """Nothing stored, nothing fetched from `servers`, nothing connected, nothing sent to Imgur; still up."""
    assert service.counts() == (0, 0)
    assert service.client.get("/images").json == []
    for srv in servers:
        assert sum(srv.hits.values()) == 0, f"{srv.url('')} was fetched: {dict(srv.hits)}"
    if connected is not None:
        assert connected == [], f"the fetcher connected to {connected}"
    if fake is not None:
        assert fake.uploads == [] and fake.received == []
        assert service.client.get("/v1/images").json == {"uploaded": []}
    assert service.jobs.stats()["backlog"] == 0 and service.jobs.stats()["running"] == 0
    assert_still_serving(service)


def post_image(service, body: dict, status: int):
    return service.client.post_json("/images", body, status=status)


def run_job(service, url: str) -> tuple[dict, dict]:
    """Submit a one-URL job (workers=0: it runs inside the request) and return (job view, its item)."""
    res = service.client.post_json("/v1/images/upload", {"urls": [url]}, status=202)
    job_id = res.json["jobId"]
    assert res.headers["Location"] == f"/v1/images/upload/{job_id}"
    assert service.jobs.wait(job_id, timeout=30)
    view = service.client.get(f"/v1/images/upload/{job_id}").json
    assert view["status"] == "complete" and view["finished"] is not None
    (item,) = view["items"]
    return view, item


def assert_job_failed(service, url: str, *words: str) -> str:
    view, item = run_job(service, url)
    assert item["status"] == "failed" and item["link"] is None and item["deletehash"] is None, item
    for word in words:
        assert word in item["error"], (word, item["error"])
    assert view["uploaded"] == {"pending": [], "complete": [], "failed": [url]}
    return item["error"]


def assert_batch_refused(service, urls, *words: str) -> str:
    """POST /v1/images/upload answers 400 naming the bad entry, and queues nothing."""
    res = service.client.post_json("/v1/images/upload", {"urls": urls}, status=400)
    detail = assert_problem(res, 400, ("errors",))
    for word in words:
        assert word in detail, (word, detail)
    assert service.jobs.stats() == {"jobs": 0, "backlog": 0, "running": 0}
    return detail


# --------------------------------------------------------------------------------------------------------
# Fixtures: the trap, a stand-in public host, the network seams, the fake Imgur
# --------------------------------------------------------------------------------------------------------


class Net:
    """Fetcher's seams. `dns` maps names to answers (a list, or a list of lists: one per lookup; other names
    go to fetch.default_resolve). `connect` records every (address, port) it is asked for, sends PUBLIC_IP
    to `public`, loopback-ish addresses really to 127.0.0.1 (where the trap listens), and refuses the rest
    (a guard failure must never send a test onto the LAN)."""

    def __init__(self, dns: dict | None = None, public: Loopback | None = None):
        import fetch

        self._default_resolve = fetch.default_resolve
        self.dns = dns or {}
        self.public = public
        self.resolved: list[str] = []
        self.connected: list[tuple[str, int]] = []
        self._lookups: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def resolve(self, host: str, port: int) -> list[str]:
        with self._lock:
            self.resolved.append(host)
            n = self._lookups[host]
            self._lookups[host] += 1
        if host not in self.dns:
            return self._default_resolve(host, port)
        answer = self.dns[host]
        if answer and isinstance(answer[0], list):
            return answer[min(n, len(answer) - 1)]
        return answer

    def connect(self, address: tuple[str, int], timeout: float) -> socket.socket:
        with self._lock:
            self.connected.append(address)
        host, port = address
        if host == PUBLIC_IP and self.public is not None:
            return socket.create_connection(("127.0.0.1", self.public.port), timeout=timeout)
        ip = ipaddress.ip_address(host)
        mapped = getattr(ip, "ipv4_mapped", None)
        if ip.is_loopback or ip.is_unspecified or (mapped is not None and mapped.is_loopback):
            return socket.create_connection(("127.0.0.1", port), timeout=timeout)
        raise ConnectionRefusedError(f"test network: {host} is not routed")


@pytest.fixture
def trap():
    """What an attacker wants to reach: a server on 127.0.0.1 holding a real image at every path tried."""
    routes = {p: ok(JPEG, "image/jpeg") for p in ("/", "/latest/meta-data/", "/secret.jpg", "/admin")}
    with Loopback(routes) as srv:
        yield srv


@pytest.fixture
def public(trap):
    """A loopback server standing in for PUBLIC_IP, a host on the internet (reached only through Net)."""
    routes = {
        "/photo.jpg": ok(JPEG, "image/jpeg"),
        "/hop": redirect("/photo.jpg"),  # same host again: a second lookup
        "/to-loopback": redirect(trap.url("/secret.jpg")),
        "/to-localhost": redirect(trap.url("/admin").replace("127.0.0.1", "localhost")),
        "/to-metadata": redirect("http://169.254.169.254/latest/meta-data/"),
        "/to-decimal": redirect(f"http://2130706433:{trap.port}/secret.jpg"),
        "/loop/a": redirect("http://public.example/loop/b"),
        "/loop/b": redirect("/loop/a"),
    }
    with Loopback(routes) as srv:
        yield srv


@pytest.fixture
def fake():
    with FakeImgur() as f:
        yield f


def imgur_client(fake: FakeImgur) -> imgur.ImgurClient:
    return imgur.ImgurClient(client_id=fake.client_id, api_url=fake.url, sleep=lambda s: None)


@pytest.fixture
def guarded(make_service, fake):
    """guarded(net) -> a service with the address guard ON, Imgur configured (the fake), jobs run inline."""

    def make(net: Net, **overrides):
        return make_service(
            uploader=imgur_client(fake), upload_workers=0, allow_private_urls=False,
            resolve=net.resolve if net.dns else None, connect=net.connect, **overrides,
        )

    return make


# --------------------------------------------------------------------------------------------------------
# 1. URLs: every non-public address, every spelling of it, through both endpoints, guard ON
# --------------------------------------------------------------------------------------------------------

BLOCKED_URLS = [
    # (url, the reason the refusal must name); {port} is the trap's, so a guard failure would reach it
    ("http://127.0.0.1:{port}/", "loopback"),
    ("http://localhost:{port}/", "loopback"),
    ("http://LOCALHOST.:{port}/", "loopback"),
    ("http://2130706433:{port}/", "loopback"),
    ("http://0x7f.1:{port}/", "loopback"),
    ("http://0177.0.0.1:{port}/", "loopback"),
    ("http://127.1:{port}/", "loopback"),
    ("http://0.0.0.0:{port}/", "unspecified"),
    ("http://0:{port}/", "unspecified"),
    ("http://[::1]:{port}/", "loopback"),
    ("http://[::]:{port}/", "unspecified"),
    ("http://[::ffff:127.0.0.1]:{port}/", "IPv4-mapped"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://10.0.0.1/", "private"),
    ("http://172.31.0.1/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://100.64.0.1/", "CGNAT"),
    ("http://[fd00::1]/", "unique-local"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[64:ff9b::7f00:1]/", "NAT64"),
    ("http://[2002:7f00:1::]/", "6to4"),
    ("http://224.0.0.1/", "multicast"),
    ("http://255.255.255.255/", "broadcast"),
    # a few more spellings and targets of the same attacks
    ("https://127.0.0.1:{port}/", "loopback"),
    ("HTTP://127.0.0.1:{port}/admin", "loopback"),
    ("http://127.0.0.1.:{port}/", "loopback"),
    ("http://0x7f000001:{port}/", "loopback"),
    ("http://017700000001:{port}/", "loopback"),
    ("http://foo.localhost:{port}/", "loopback"),
    ("http://[::127.0.0.1]:{port}/", "IPv4-compatible"),
    ("http://[0:0:0:0:0:ffff:a00:1]/", "IPv4-mapped"),
    ("http://100.100.100.200/latest/meta-data/", "CGNAT"),  # Alibaba Cloud metadata
    ("http://[fd00:ec2::254]/latest/meta-data/", "unique-local"),  # AWS metadata over IPv6
    ("http://[::1%25lo]:{port}/", "loopback"),  # a zone index passes the syntax check; the address is still checked
]


@pytest.mark.parametrize("template, reason", BLOCKED_URLS, ids=[u for u, _ in BLOCKED_URLS])
def test_non_public_address_is_refused_by_both_endpoints(guarded, fake, trap, template, reason):
    """SSRF by address: POST /images answers 400 naming the block; a job accepts the syntactically valid
    URL (202) and fails its item with the block's reason. Neither ever connects or fetches."""
    net = Net()
    service = guarded(net)
    url = template.format(port=trap.port)
    detail = assert_problem(post_image(service, {"url": url}, 400), 400)
    assert "not a public internet address" in detail and reason in detail, detail
    assert_job_failed(service, url, "not a public internet address", reason)
    assert_nothing_kept(service, trap, fake=fake, connected=net.connected)


NOT_FETCHABLE = [
    # (url, words of the refusal): refused by syntax, before any lookup
    ("file:///etc/passwd", "'file'"),
    ("ftp://example.com/a.jpg", "'ftp'"),
    ("gopher://127.0.0.1:6379/_SET%20pwned%201", "'gopher'"),
    ("data:image/png;base64,iVBORw0KGgo=", "'data'"),
    ("http://user:pass@example.com/a.jpg", "user name or password"),
    ("http://user:pass@127.0.0.1:{port}/", "user name or password"),
    ("http://127.0.0.1:80\\@evil.example/", "backslash"),
    ("http://evil.example\\@127.0.0.1:{port}/", "backslash"),
    ("http://127.0.0.1:{port}%2F@evil.example/", "user name or password"),
    ("http://127.0.0.1:{port}/\r\nX-Injected: 1", "control character"),
    ("javascript:alert(1)", "'javascript'"),
]


@pytest.mark.parametrize("template, words", NOT_FETCHABLE, ids=[u for u, _ in NOT_FETCHABLE])
def test_unfetchable_url_is_a_400_at_both_endpoints(guarded, fake, trap, template, words):
    """Schemes other than http(s), user:password, backslash tricks, control characters: 400 at submit
    from both endpoints, naming the problem; the job endpoint names the bad entry and queues nothing."""
    net = Net()
    service = guarded(net)
    url = template.format(port=trap.port)
    assert words in assert_problem(post_image(service, {"url": url}, 400), 400)
    res = service.client.post("/images", {"url": url}, status=400)  # the form field url= too
    assert words in assert_problem(res, 400)
    assert_batch_refused(service, ["https://example.com/fine.jpg", url], "line 2", words)
    assert_nothing_kept(service, trap, fake=fake, connected=net.connected)
    assert net.resolved == []


def test_name_resolving_to_loopback_is_refused(guarded, fake, trap):
    """DNS pointing a harmless-looking name at 127.0.0.1: refused at both endpoints, never connected."""
    net = Net({"innocent.example": ["127.0.0.1"]})
    service = guarded(net)
    url = f"http://innocent.example:{trap.port}/secret.jpg"
    detail = assert_problem(post_image(service, {"url": url}, 400), 400)
    assert "innocent.example" in detail and "127.0.0.1" in detail and "loopback" in detail
    assert_job_failed(service, url, "127.0.0.1", "loopback")
    assert net.resolved == ["innocent.example", "innocent.example"]  # one lookup per request
    assert_nothing_kept(service, trap, fake=fake, connected=net.connected)


def test_name_with_one_public_and_one_private_answer_is_refused(guarded, fake, public, trap):
    """A name answering a public AND a private address: any private answer blocks the host, even though
    the public one would be tried first."""
    net = Net({"mixed.example": [PUBLIC_IP, "10.0.0.1"]}, public)
    service = guarded(net)
    url = "http://mixed.example/photo.jpg"
    detail = assert_problem(post_image(service, {"url": url}, 400), 400)
    assert "10.0.0.1" in detail and "private" in detail
    assert_job_failed(service, url, "10.0.0.1", "private")
    assert_nothing_kept(service, public, trap, fake=fake, connected=net.connected)


def test_dns_rebinding_connects_only_to_the_checked_address(guarded, fake, public, trap):
    """Rebinding: the name answers a public address to the check and 127.0.0.1 to any later lookup. One
    lookup per hop, and the connection goes to the address that was checked: the public host serves
    the image (stored, uploaded: the legitimate outcome), the loopback trap is never reached."""
    net = Net({"rebind.example": [[PUBLIC_IP], ["127.0.0.1"]]}, public)
    service = guarded(net)
    url = "http://rebind.example/photo.jpg"
    img = post_image(service, {"url": url}, 200).json
    assert img["source_url"] == url and img["size"] == len(JPEG)
    assert net.resolved == ["rebind.example"] and net.connected == [(PUBLIC_IP, 80)]
    assert public.hits == {"/photo.jpg": 1} and sum(trap.hits.values()) == 0
    assert service.counts() == (1, 1)

    job_net = Net({"rebind.example": [[PUBLIC_IP], ["127.0.0.1"]]}, public)
    job_service = guarded(job_net)
    _, item = run_job(job_service, url)
    assert item["status"] == "complete", item
    assert job_net.resolved == ["rebind.example"] and job_net.connected == [(PUBLIC_IP, 80)]
    assert fake.received == [JPEG] and sum(trap.hits.values()) == 0
    assert_still_serving(service)
    assert_still_serving(job_service)


def test_dns_rebinding_on_a_redirect_to_the_same_host_is_refused(guarded, fake, public, trap):
    """Rebinding across hops: the first hop is checked public and redirects to the same name, whose second
    lookup answers 127.0.0.1. Each hop is looked up and checked again, so the second hop is refused."""
    net = Net({"rebind.example": [[PUBLIC_IP], ["127.0.0.1"]]}, public)
    service = guarded(net)
    url = "http://rebind.example/hop"
    detail = assert_problem(post_image(service, {"url": url}, 400), 400)
    assert "127.0.0.1" in detail and "loopback" in detail
    assert net.resolved == ["rebind.example"] * 2 and net.connected == [(PUBLIC_IP, 80)]
    assert public.hits == {"/hop": 1}

    job_net = Net({"rebind.example": [[PUBLIC_IP], ["127.0.0.1"]]}, public)
    job_service = guarded(job_net)
    assert_job_failed(job_service, url, "127.0.0.1", "loopback")
    assert job_net.connected == [(PUBLIC_IP, 80)]
    assert public.hits == {"/hop": 2}
    for s in (service, job_service):
        assert_nothing_kept(s, trap, fake=fake)


@pytest.mark.parametrize(
    "path, reason",
    [("/to-loopback", "loopback"), ("/to-localhost", "loopback"), ("/to-decimal", "loopback"), ("/to-metadata", "link-local")],
)
def test_public_url_redirecting_to_a_private_address_is_refused(guarded, fake, public, trap, path, reason):
    """A public URL that redirects to 127.0.0.1 (or localhost, its decimal form, the metadata address):
    the redirect target is checked like the first URL, so nothing past the public hop is reached."""
    net = Net({"public.example": [PUBLIC_IP]}, public)
    service = guarded(net)
    url = f"http://public.example{path}"
    detail = assert_problem(post_image(service, {"url": url}, 400), 400)
    assert reason in detail and "not a public internet address" in detail
    assert_job_failed(service, url, reason)
    assert net.connected == [(PUBLIC_IP, 80)] * 2  # the public hop only, once per request
    assert public.hits == {path: 2}
    assert_nothing_kept(service, trap, fake=fake)


def test_redirect_loop_is_a_502_and_ends(guarded, fake, public, trap):
    """A redirect loop (a -> b -> a): 502 naming the loop after two hops, not an endless fetch."""
    net = Net({"public.example": [PUBLIC_IP]}, public)
    service = guarded(net)
    url = "http://public.example/loop/a"
    started = time.monotonic()
    detail = assert_problem(post_image(service, {"url": url}, 502), 502)
    assert "redirect loop" in detail
    assert_job_failed(service, url, "redirect loop")
    assert time.monotonic() - started < 5
    assert public.hits == {"/loop/a": 2, "/loop/b": 2}
    assert net.connected == [(PUBLIC_IP, 80)] * 4
    assert_nothing_kept(service, trap, fake=fake)


# --------------------------------------------------------------------------------------------------------
# 2. Content: what a (loopback) image host sends back, guard off so it can be reached
# --------------------------------------------------------------------------------------------------------


def _lying_length(h) -> None:
    """Announce 1 GB, send 10 bytes, then hold the connection until the test ends."""
    h.send_response(200)
    h.send_header("Content-Type", "image/jpeg")
    h.send_header("Content-Length", str(1_000_000_000))
    h.end_headers()
    h.wfile.write(b"\xff\xd8\xff\xe0" + b"\0" * 6)
    h.wfile.flush()
    h.server.stopping.wait(15)


def _endless_chunked(h) -> None:
    h.send_response(200)
    h.send_header("Content-Type", "image/jpeg")
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    piece = b"\0" * 65536
    while not h.server.stopping.is_set():
        h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))


def _gzip_bomb(h) -> None:
    respond(h, 200, gzip_bomb(), "image/png", {"Content-Encoding": "gzip"})


@pytest.fixture
def content_host(photo):
    pets = photo("pets.jpg")
    routes = {
        "/html.jpg": ok(b"<!doctype html><html><body><script>alert(1)</script></body></html>", "image/jpeg"),
        "/1gb.jpg": _lying_length,
        "/endless.jpg": _endless_chunked,
        "/drip.jpg": drip(100, 1.0),
        "/gzip-bomb.png": _gzip_bomb,
        "/bomb.png": ok(png_header_bomb(), "image/png"),
        "/bomb.gif": ok(gif_frame_bigger_than_screen(), "image/gif"),
        "/frames.gif": ok(gif_with_frames(), "image/gif"),
        "/truncated.jpg": ok(pets[: len(pets) // 2], "image/jpeg"),
        "/eps.jpg": ok(EPS, "image/jpeg"),
        "/dos-eps.jpg": ok(DOS_EPS, "image/jpeg"),
        "/pdf.jpg": ok(PDF, "image/jpeg"),
        "/psd.jpg": ok(PSD, "image/jpeg"),
        "/empty.jpg": ok(b"", "image/jpeg"),
    }
    with Loopback(routes) as srv:
        yield srv


@pytest.fixture
def open_service(make_service, fake):
    """open_service(**settings) -> guard OFF (the loopback host is reachable), Imgur = the fake, jobs inline."""

    def make(**overrides):
        return make_service(uploader=imgur_client(fake), upload_workers=0, allow_private_urls=True, **overrides)

    return make


CONTENT = [
    # (path, POST /images status, words in its detail, words in the job's failure or None when a job
    #  rightly forwards the bytes (Imgur takes them; only POST /images decodes), fetch timeout)
    ("/html.jpg", 422, "not an image", "not an image Imgur takes", 10.0),
    ("/1gb.jpg", 413, "1000000000 bytes", "1000000000 bytes", 10.0),
    ("/endless.jpg", 413, f"larger than the {MAX_BYTES} bytes", f"larger than the {MAX_BYTES} bytes", 10.0),
    ("/drip.jpg", 504, "took longer than 1 seconds", "took longer than 1 seconds", 1.0),
    ("/gzip-bomb.png", 502, "Content-Encoding: gzip", "Content-Encoding: gzip", 10.0),
    ("/bomb.png", 413, "50,000,000 pixels", None, 10.0),
    ("/bomb.gif", 413, "9000x9000", None, 10.0),
    ("/truncated.jpg", 422, "truncated", None, 10.0),
    ("/eps.jpg", 422, "EPS", "not an image Imgur takes", 10.0),
    ("/dos-eps.jpg", 422, "EPS", "not an image Imgur takes", 10.0),
    ("/pdf.jpg", 422, "PDF", "not an image Imgur takes", 10.0),
    ("/psd.jpg", 422, "Photoshop", "not an image Imgur takes", 10.0),
    ("/empty.jpg", 422, "empty", "not an image Imgur takes", 10.0),
]


@pytest.mark.parametrize("path, code, words, job_words, timeout", CONTENT, ids=[c[0] for c in CONTENT])
def test_hostile_content_from_a_url(open_service, fake, content_host, path, code, words, job_words, timeout):
    """A host serving a web page as image/jpeg, a 1 GB Content-Length, an endless chunked body, a byte a
    second, a gzip bomb, pixel bombs, a truncated JPEG, EPS/PDF/PSD named .jpg, zero bytes: POST /images
    refuses each with its own status and reason, within the deadline; a job fails the URL with its reason
    and sends Imgur nothing."""
    service = open_service(fetch_timeout=timeout)
    url = content_host.url(path)
    for detect in (False, True):
        started = time.monotonic()
        detail = assert_problem(post_image(service, {"url": url, "detect": detect}, code), code)
        assert words in detail, detail
        assert time.monotonic() - started < timeout + 3, "the refusal took far longer than the deadline"
    assert content_host.hits[path] == 2
    if job_words is not None:
        assert_job_failed(service, url, job_words)
        assert content_host.hits[path] == 3
    assert_nothing_kept(service, fake=fake)


def test_gif_with_10000_frames_costs_one_frame(open_service, content_host):
    """An 8.8 MB GIF of 10,000 500x500 frames (all of them decoded: about 8 s). The service reads the
    first frame only (imaging.preprocess seeks frame 0), so it is accepted quickly, with the right size,
    both with and without detection, and memory does not grow by anything like 10,000 frames."""
    service = open_service()
    url = content_host.url("/frames.gif")
    reset_peak_rss()
    rss_before = rss_mb()
    for detect in (False, True):
        started = time.monotonic()
        img = post_image(service, {"url": url, "detect": detect}, 200).json
        assert time.monotonic() - started < 2, "the service decoded more than the first frame"
        assert (img["content_type"], img["width"], img["height"]) == ("image/gif", 500, 500)
    assert peak_rss_mb() - rss_before < 300  # MB: one frame, not 10,000
    assert service.counts() == (2, 1)  # two images, one copy of the bytes
    assert_still_serving(service)


@pytest.mark.parametrize(
    "name, data, code, words",
    [
        ("bomb.png", png_header_bomb(), 413, "50,000,000 pixels"),
        ("bomb.gif", gif_frame_bigger_than_screen(), 413, "9000x9000"),
        ("eps.jpg", EPS, 422, "EPS"),
        ("dos-eps.jpg", DOS_EPS, 422, "EPS"),
        ("pdf.jpg", PDF, 422, "PDF"),
        ("psd.jpg", PSD, 422, "Photoshop"),
        ("truncated.jpg", jpeg(size=(640, 480))[:2000], 422, "truncated"),
        ("html.jpg", b"<html><body>not a photo</body></html>", 422, "not an image"),
    ],
)
def test_hostile_content_uploaded(open_service, name, data, code, words):
    """The same content sent directly, as base64 JSON and as a multipart upload named .jpg/.png: refused
    from the header or the decoder, with or without detection; the 30000x30000 PNG is ~70 bytes."""
    service = open_service()
    for detect in (False, True):
        res = post_image(service, {"image": b64(data), "detect": detect}, code)
        assert words in assert_problem(res, code)
        res = service.client.post(
            "/images", {"detect": "true" if detect else "false"}, upload_files=[("image", name, data)], status=code
        )
        assert words in assert_problem(res, code)
    assert_nothing_kept(service)


def test_zero_bytes_uploaded(open_service):
    """An empty image as base64 and as a multipart part: 400, nothing stored."""
    service = open_service()
    assert "empty" in assert_problem(post_image(service, {"image": ""}, 400), 400)
    assert "empty" in assert_problem(post_image(service, {"image": "data:image/jpeg;base64,"}, 400), 400)
    res = service.client.post("/images", upload_files=[("image", "empty.jpg", b"")], status=400)
    assert "empty" in assert_problem(res, 400)
    assert_nothing_kept(service)


# --------------------------------------------------------------------------------------------------------
# 3. Bodies and parameters, through the app (webtest)
# --------------------------------------------------------------------------------------------------------

JSON = "application/json"

IMAGE_BODIES = [
    # (what, content type, raw body, status, words in the detail)
    ("bad base64", JSON, b'{"image": "not base64 !!!"}', 400, "base64"),
    ("base64 with non-ASCII", JSON, json.dumps({"image": "aGVsbG8\u00e9"}).encode(), 400, "base64"),
    ("base64 of padding only", JSON, b'{"image": "===="}', 400, "base64"),
    ("base64 one character", JSON, b'{"image": "a"}', 400, "base64"),
    ("data URI without base64", JSON, b'{"image": "data:image/png,abc"}', 400, "base64"),
    ("empty body", JSON, b"", 400, "JSON object"),
    ("{}", JSON, b"{}", 400, "exactly one"),
    ("null", JSON, b"null", 400, "JSON object"),
    ("[]", JSON, b"[]", 400, "JSON object"),
    ("a JSON string", JSON, b'"aGVsbG8="', 400, "JSON object"),
    ("a JSON number", JSON, b"42", 400, "JSON object"),
    ("100,000 nested [", JSON, b"[" * 100_000, 400, "JSON tokens"),
    ("100,000 nested {", JSON, b'{"a":' * 100_000, 400, "JSON tokens"),
    ("invalid UTF-8", JSON, b'{"image": "\xff\xfe"}', 400, "not valid JSON"),
    ("duplicate keys, the last one wins", JSON, b'{"image": "aGVsbG8=", "image": 5}', 400, "base64 string"),
    ("both image and url", JSON, json.dumps({"image": b64(JPEG), "url": "https://example.com/a.jpg"}).encode(), 400, "exactly one"),
    ("image is an object", JSON, b'{"image": {"$ne": null}}', 400, "base64 string"),
    ("label of 10,000 characters", JSON, json.dumps({"image": b64(JPEG), "label": "x" * 10_000}).encode(), 400, "10000 characters"),
    ("label is a list", JSON, json.dumps({"image": b64(JPEG), "label": ["a"]}).encode(), 400, "label"),
    ('detect "yes please"', JSON, json.dumps({"image": b64(JPEG), "detect": "yes please"}).encode(), 400, "detect"),
    ("detect 1", JSON, json.dumps({"image": b64(JPEG), "detect": 1}).encode(), 400, "detect"),
    ("unknown field", JSON, json.dumps({"image": b64(JPEG), "__proto__": {}}).encode(), 400, "unknown field"),
    ("text/plain", "text/plain", json.dumps({"image": b64(JPEG)}).encode(), 415, "Content-Type"),
    ("application/xml", "application/xml", b"<image/>", 415, "Content-Type"),
    ("octet-stream", "application/octet-stream", JPEG, 415, "Content-Type"),
    ("image/jpeg", "image/jpeg", JPEG, 415, "Content-Type"),
]


@pytest.mark.parametrize("what, content_type, raw, code, words", IMAGE_BODIES, ids=[b[0] for b in IMAGE_BODIES])
def test_hostile_body_on_post_images(service, what, content_type, raw, code, words):
    """Malformed, mistyped, oversized-field and wrong-type bodies on POST /images: a 4xx naming the
    problem, nothing stored."""
    res = service.client.post("/images", raw, content_type=content_type, status=code)
    assert words in assert_problem(res, code)
    assert_nothing_kept(service)


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"label": "x" * 10_000}, "10000 characters"),
        ({"detect": "yes please"}, "detect"),
        ({"url": "https://example.com/a.jpg"}, "exactly one"),
    ],
)
def test_hostile_form_fields_on_post_images(service, fields, words):
    """The same field attacks through a multipart form: 400, nothing stored."""
    res = service.client.post("/images", fields, upload_files=[("image", "a.jpg", JPEG)], status=400)
    assert words in assert_problem(res, 400)
    assert_nothing_kept(service)


def test_body_over_the_limit_is_refused_by_the_app_before_reading(make_service):
    """A Content-Length over the body limit reaching the app (webtest: no waitress in front) is a 413
    problem before the body is parsed; a base64 image decoding past MAX_IMAGE_BYTES too."""
    service = make_service(max_image_bytes=1000)
    limit = 1000 * 4 // 3 + 64 * 1024
    raw = b'{"image": "' + b"A" * (limit + 10) + b'"}'
    assert "larger than" in assert_problem(service.client.post("/images", raw, content_type=JSON, status=413), 413)
    assert "larger than" in assert_problem(post_image(service, {"image": b64(b"\xff" * 2000)}, 413), 413)
    assert_nothing_kept(service)


def _urls_entries(n: int) -> list[str]:
    return [f"https://example.com/{i}.jpg" for i in range(n)]


JOB_BODIES = [
    # (what, content type, raw body, status, words)
    ("10,001 URLs", JSON, json.dumps({"urls": _urls_entries(10_001)}).encode(), 400, "10,001 entries"),
    ("1,001 different URLs", JSON, json.dumps({"urls": _urls_entries(1_001)}).encode(), 400, "at most 1,000"),
    ("URLs that are numbers", JSON, b'{"urls": [1, 2.5, -3]}', 400, "line 1 is a number"),
    ("URLs that are objects", JSON, b'{"urls": [{"url": "https://example.com/a.jpg"}]}', 400, "line 1 is an object"),
    ("URLs that are lists", JSON, b'{"urls": [["https://example.com/a.jpg"]]}', 400, "line 1 is a list"),
    ("a null URL", JSON, b'{"urls": ["https://example.com/a.jpg", null]}', 400, "line 2 is empty (null)"),
    ("urls is a string", JSON, b'{"urls": "https://example.com/a.jpg"}', 400, "array"),
    ("urls is an object", JSON, b'{"urls": {"0": "https://example.com/a.jpg"}}', 400, "array"),
    ("urls is null", JSON, b'{"urls": null}', 400, "array"),
    ("urls is empty", JSON, b'{"urls": []}', 400, "empty"),
    ("empty body", JSON, b"", 400, "JSON object"),
    ("{}", JSON, b"{}", 400, "array"),
    ("null", JSON, b"null", 400, "JSON object"),
    ("[]", JSON, b"[]", 400, "JSON object"),
    ("a JSON string", JSON, b'"https://example.com/a.jpg"', 400, "JSON object"),
    ("100,000 nested [", JSON, b"[" * 100_000, 400, "JSON tokens"),
    ("unknown field", JSON, b'{"urls": ["https://example.com/a.jpg"], "callback": "http://127.0.0.1/"}', 400, "unknown field"),
    ("text/plain", "text/plain", b'{"urls": ["https://example.com/a.jpg"]}', 415, "application/json"),
    ("a form", "application/x-www-form-urlencoded", b"urls=https://example.com/a.jpg", 415, "application/json"),
]


@pytest.mark.parametrize("what, content_type, raw, code, words", JOB_BODIES, ids=[b[0] for b in JOB_BODIES])
def test_hostile_body_on_post_upload_job(make_service, fake, what, content_type, raw, code, words):
    """Malformed batches on POST /v1/images/upload: a 4xx naming the problem, no job, nothing queued,
    downloaded or sent to Imgur."""
    service = make_service(uploader=imgur_client(fake), upload_workers=0)
    res = service.client.post("/v1/images/upload", raw, content_type=content_type, status=code)
    assert words in assert_problem(res, code, ("errors",) if words.startswith("line ") else ())
    assert service.jobs.stats() == {"jobs": 0, "backlog": 0, "running": 0}
    assert_nothing_kept(service, fake=fake)


@pytest.mark.parametrize(
    "query, words",
    [
        ("objects=", "objects"),
        ("objects=,,,", "objects"),
        ("objects=" + ",".join(f"o{i}" for i in range(21)), "more than 20"),
        ("limit=-1", "limit"),
        ("limit=0", "limit"),
        ("limit=1e9", "limit"),
        ("limit=1000000000", "limit"),
        ("limit=99999999999999999999999", "limit"),
        ("limit=", "limit"),
        ("before=abc", "before"),
        ("before=0", "before"),
        ("before=1%20OR%201=1", "before"),
        ("objects=dog&min_confidence=nan", "min_confidence"),
        ("objects=dog&match=some", "match"),
        ("match=all", "objects"),
    ],
)
def test_hostile_query_on_list_images(service, query, words):
    """Bad paging and search parameters on GET /images: 400 naming the parameter."""
    assert words in assert_problem(service.client.get(f"/images?{query}", status=400), 400)
    assert_nothing_kept(service)


HOSTILE_IDS = [
    "1 OR 1=1",
    "1' OR '1'='1",
    "1;DELETE FROM image",
    "\x00",
    "1\x00",
    "../../etc/passwd",
    "..",
    "0",
    "-1",
    "01",
    "1e0",
    "99999999999999999999",
]


@pytest.mark.parametrize("raw_id", HOSTILE_IDS, ids=[repr(i) for i in HOSTILE_IDS])
def test_hostile_image_id(service, raw_id):
    """SQL, NUL bytes and path traversal as the image id of GET/DELETE /images/{id} and GET .../file:
    404 problem every time, and the one stored image is untouched (still there, same bytes)."""
    stored = post_image(service, {"image": b64(JPEG), "label": "keep me"}, 200).json
    assert stored["id"] == 1
    quoted = urllib.parse.quote(raw_id, safe="")
    paths = [f"/images/{quoted}", f"/images/{quoted}/file"]
    if "/" in raw_id or raw_id == "..":
        paths += [f"/images/{raw_id}", f"/images/{raw_id}/file"]  # unencoded too
    for path in paths:
        assert_problem(service.client.get(path, status=404, expect_errors=True), 404)
        if not path.endswith("/file"):
            assert_problem(service.client.delete(path, status=404, expect_errors=True), 404)
    assert service.client.get("/images/1").json == stored
    assert service.client.get("/images/1/file").body == JPEG
    assert service.counts() == (1, 1)
    assert_still_serving(service)


# --------------------------------------------------------------------------------------------------------
# 3b. The real process: what waitress refuses before the app sees anything
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    """`python server.py` on a free port (no model: these requests never get that far)."""
    tmp = tmp_path_factory.mktemp("hostile-real")
    proc, base, _ = start_server(tmp, "--model", str(tmp / "none.tflite"))
    parts = urllib.parse.urlsplit(base)
    yield parts.hostname, parts.port
    err = stop_server(proc)
    assert "Traceback" not in err, err


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    res = http.client.HTTPResponse(sock, method="POST")
    res.begin()
    body = res.read()
    return res.status, {k.lower(): v for k, v in res.getheaders()}, body


def _get_health(host: str, port: int) -> dict:
    with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=10) as res:
        assert res.status == 200
        return json.load(res)


def _assert_nothing_stored(host: str, port: int) -> None:
    with urllib.request.urlopen(f"http://{host}:{port}/images", timeout=10) as res:
        assert json.load(res) == []


def test_30mb_body_is_refused_by_the_server_before_the_app_reads_it(real_server):
    """A POST announcing 30 MB (over the 28 MB body limit: 20 MB of image as base64 plus room) gets 413
    from the server as soon as the headers arrive, before a single body byte is sent; the server then
    reads and drops the 30 MB without keeping them (a lingering close: a client that sends its whole
    body before reading sees the 413 too, tests/test_slow_senders.py) and hangs up once they have come.
    /health still answers."""
    host, port = real_server
    size = 30 * 1024 * 1024
    sock = socket.create_connection((host, port), timeout=10)
    try:
        sock.sendall(
            f"POST /images HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n".encode()
        )
        status, headers, body = _read_response(sock)  # no body byte sent yet
        assert status == 413, (status, body[:300])
        assert headers.get("connection", "").lower() == "close"
        sock.sendall(b"A" * size)  # read and dropped
        assert sock.recv(1) == b"", "the server did not hang up once the refused body had come"
    finally:
        sock.close()
    _assert_nothing_stored(host, port)
    assert _get_health(host, port)["status"] == "ok"


def test_chunked_body_is_cut_off_at_the_limit(real_server):
    """A body with no Content-Length (Transfer-Encoding: chunked), so its size is only known by reading:
    the server must stop at its limit (~28 MB) with 413 and hang up, not buffer the whole 100 MB the
    client streams and hand it to the app. /health still answers."""
    host, port = real_server
    sock = socket.create_connection((host, port), timeout=20)
    total = 100
    progress = {"sent": 0, "completed": False}

    def send():
        try:
            sock.sendall(
                f"POST /images HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                "Transfer-Encoding: chunked\r\n\r\n".encode()
            )
            piece = b"A" * (1 << 20)
            frame = b"%x\r\n%s\r\n" % (len(piece), piece)
            for _ in range(total):
                sock.sendall(frame)
                progress["sent"] += len(piece)
            sock.sendall(b"0\r\n\r\n")
            progress["completed"] = True
        except OSError:  # the server answered and hung up: what should happen
            pass

    sender = threading.Thread(target=send, name="hostile-chunked-sender", daemon=True)
    sender.start()
    try:
        status, _, body = _read_response(sock)
        assert status == 413, (status, body[:300])
    finally:
        sender.join(20)
        sock.close()
    assert not sender.is_alive()
    assert not progress["completed"], "the server read the whole 100 MB body before refusing it"
    assert progress["sent"] < 60 << 20, progress
    _assert_nothing_stored(host, port)
    assert _get_health(host, port)["status"] == "ok"


def _send_huge_headers(host: str, port: int, head: bytes) -> tuple[int, dict[str, str], bytes]:
    sock = socket.create_connection((host, port), timeout=10)
    errors: list[OSError] = []

    def send():
        try:
            sock.sendall(head)
        except OSError as e:  # the server answered and hung up mid-way: fine
            errors.append(e)

    sender = threading.Thread(target=send, name="hostile-header-sender", daemon=True)
    sender.start()
    try:
        return _read_response(sock)
    finally:
        sender.join(10)
        sock.close()


HUGE_HEADERS = {
    "one 300 KB header": lambda: b"X-Fill: " + b"a" * (300 * 1024) + b"\r\n",
    "3,200 headers of 100 bytes": lambda: b"".join(b"X-Fill-%04d: %s\r\n" % (i, b"a" * 86) for i in range(3200)),
    "a 300 KB request line": lambda: b"",
}


@pytest.mark.parametrize("what", list(HUGE_HEADERS))
def test_300kb_of_request_headers_is_431(real_server, what):
    """300 KB of request headers (one huge header, thousands of small ones, or a huge request target):
    waitress stops reading at its 256 KB header limit and answers 431 Request Header Fields Too Large."""
    host, port = real_server
    target = "/health" if what != "a 300 KB request line" else "/images?objects=" + "a" * (300 * 1024)
    head = f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\n".encode() + HUGE_HEADERS[what]() + b"\r\n"
    assert len(head) > 300 * 1024
    status, headers, body = _send_huge_headers(host, port, head)
    assert status == 431, (status, body[:300])
    _assert_nothing_stored(host, port)
    assert _get_health(host, port)["status"] == "ok"


@pytest.mark.parametrize("attack", ["30 MB body", "300 KB headers"])
def test_refusals_by_the_server_itself_are_problem_json(real_server, attack):
    """README: "Every error, unknown routes and wrong methods included, is application/problem+json".
    That must hold for the 413 and 431 that waitress answers before the app runs, too."""
    host, port = real_server
    if attack == "30 MB body":
        sock = socket.create_connection((host, port), timeout=10)
        try:
            sock.sendall(
                f"POST /images HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {30 * 1024 * 1024}\r\n\r\n".encode()
            )
            status, headers, body = _read_response(sock)
        finally:
            sock.close()
        code = 413
    else:
        head = f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\nX-Fill: ".encode() + b"a" * (300 * 1024) + b"\r\n\r\n"
        status, headers, body = _send_huge_headers(host, port, head)
        code = 431
    assert status == code
    assert headers.get("content-type", "").split(";")[0] == "application/problem+json", (headers, body[:300])
    problem = json.loads(body)
    assert set(problem) == PROBLEM_KEYS and problem["status"] == code and problem["detail"]
    assert _get_health(host, port)["status"] == "ok"
