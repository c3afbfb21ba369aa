"""imgur.py does not trust Imgur's answers: links, ids, sizes, time, file names, credit resets.

Each test plays a misbehaving Imgur with a small route on a loopback server of ours (tests/loopback.py);
deadlines and byte caps are shrunk through ImgurClient's constructor so every test takes well under 2 s.
"""

import email.parser
import email.policy
import json
import socket
import ssl
import time

import pytest

import imgur
from fake_imgur import FakeImgur, answer
from helpers import jpeg, make_certificate
from loopback import Loopback, ok, read_body, respond

IMAGE = jpeg()
GOOD = {"id": "abc123", "link": "https://i.imgur.com/abc123.jpg", "deletehash": "Xy_9-z"}


class Sleeps:
    """Records the waits imgur.py asks for instead of waiting (moving `clock` along, if given)."""

    def __init__(self, clock=None):
        self.calls: list[float] = []
        self.clock = clock

    def __call__(self, seconds: float) -> None:
        self.calls.append(round(seconds, 3))
        if self.clock is not None:
            self.clock[0] += seconds


def answering(data: dict):
    """A route for /3/image: every upload gets 200 with `data` as its `data`."""
    body = json.dumps({"data": data, "success": True, "status": 200}).encode()

    def image(h):
        read_body(h)
        respond(h, 200, body, "application/json")

    return image


def imgur_answering(data: dict) -> Loopback:
    return Loopback({"/3/image": answering(data)})


def client(srv: Loopback, **kw) -> imgur.ImgurClient:
    kw.setdefault("sleep", Sleeps())
    return imgur.ImgurClient(client_id="test-client", api_url=srv.url(""), **kw)


# --------------------------------------------------------------------------------------------------------
# Which 200s count
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "link",
    [
        "javascript:alert(document.cookie)",
        "http://evil.example/a.jpg",
        ["https://i.imgur.com/a.jpg"],
        {"href": "https://i.imgur.com/a.jpg"},
        42,
        "http://i.imgur.com/a.jpg",  # Imgur's host, but not https
        "//i.imgur.com/a.jpg",
        "data:image/png;base64,iVBORw0KGgo=",
        "https://evilimgur.com/a.jpg",
        "https://i.imgur.com.evil.example/a.jpg",
        "https://evil.example\\.imgur.com/a.jpg",  # a browser goes to evil.example
        "https://i.imgur.com@evil.example/a.jpg",
        "https://user@i.imgur.com/a.jpg",
        "https://i.imgur.com:8443/a.jpg",
        "https://i.imgur.com/a b.jpg",
        "https://i.imgur.com/a.jpg\r\nSet-Cookie: x=1",
        "https://i.imgur.com/\u00e9.jpg",
        "https://i.imgur.com/" + "a" * 3000,
        "http://localhost:{port}/a.jpg",  # a stand-in's links must be on its own host as IMGUR_API_URL names it
    ],
)
def test_a_200_counts_only_with_an_https_link_on_imgur(link):
    with imgur_answering({}) as srv:
        if isinstance(link, str):
            link = link.replace("{port}", str(srv.port))
        srv.routes["/3/image"] = answering({**GOOD, "link": link})
        with pytest.raises(imgur.Rejected, match="the upload is not counted") as e:
            client(srv).upload(IMAGE)
        assert len(str(e.value)) < 300 and "\n" not in str(e.value)
        assert srv.hits["/3/image"] == 1  # not retried: the image may be on Imgur already


@pytest.mark.parametrize(
    "link",
    ["https://i.imgur.com/abc123.jpg", "https://imgur.com/abc123", "https://I.Imgur.COM/abc123.jpg", "http://127.0.0.1:{port}/abc123.jpg"],
)
def test_good_links_count(link):
    with imgur_answering({}) as srv:
        link = link.replace("{port}", str(srv.port))
        srv.routes["/3/image"] = answering({**GOOD, "link": link})
        assert client(srv).upload(IMAGE) == imgur.Upload("abc123", link, "Xy_9-z")


def test_a_stand_ins_own_host_counts_only_when_it_is_not_imgur():
    assert imgur.link_accepted("https://lan-imgur.example/a.jpg", "https://lan-imgur.example")
    assert imgur.link_accepted("http://lan-imgur.example:8080/a.jpg", "http://lan-imgur.example:8080")
    assert not imgur.link_accepted("http://lan-imgur.example/a.jpg", "https://lan-imgur.example")
    assert not imgur.link_accepted("http://api.imgur.com/a.jpg", "https://api.imgur.com")
    assert imgur.link_accepted("https://api.imgur.com/a.jpg", "https://api.imgur.com")


@pytest.mark.parametrize(
    "extra",
    [{"deletehash": ["x"]}, {"deletehash": "del 1\n"}, {"deletehash": "d" * 65}, {"id": 5}, {"id": {"a": 1}}, {"id": "x" * 1000}, {"id": ""}],
)
def test_a_200_with_a_malformed_id_or_deletehash_does_not_count(extra):
    with imgur_answering({**GOOD, **extra}) as srv:
        with pytest.raises(imgur.Rejected, match="the upload is not counted"):
            client(srv).upload(IMAGE)


def test_absent_id_and_deletehash_are_fine():
    with imgur_answering({"link": GOOD["link"]}) as srv:
        assert client(srv).upload(IMAGE) == imgur.Upload("", GOOD["link"], None)


def test_a_job_whose_imgur_answers_a_javascript_link_fails_that_url_and_lists_nothing(make_service):
    with imgur_answering({**GOOD, "link": "javascript:alert(1)"}) as fake, Loopback({"/a.jpg": ok(IMAGE, "image/jpeg")}) as host:
        service = make_service(uploader=client(fake), upload_workers=0)
        job = service.client.post_json("/v1/images/upload", {"urls": [host.url("/a.jpg")]}, status=202).json
        view = service.client.get(f"/v1/images/upload/{job['jobId']}").json
        assert view["uploaded"] == {"pending": [], "complete": [], "failed": [host.url("/a.jpg")]}
        assert "is not an https link on imgur.com" in view["items"][0]["error"]
        assert view["items"][0]["link"] is None and view["items"][0]["deletehash"] is None
        assert service.client.get("/v1/images").json == {"uploaded": []}


# --------------------------------------------------------------------------------------------------------
# At most max_answer_bytes of an answer
# --------------------------------------------------------------------------------------------------------

CAP = 64 * 1024
BIG = json.dumps({"data": {**GOOD, "pad": [{}] * (CAP // 2)}, "success": True, "status": 200}).encode()  # ~4 x CAP


def declared(h):
    read_body(h)
    respond(h, 200, BIG, "application/json")


def lied_length(h):  # says 10 GB: nothing may be allocated for it
    read_body(h)
    h.send_response(200)
    h.send_header("Content-Length", str(10 * 2**30))
    h.end_headers()
    h.wfile.write(BIG)


def close_delimited(h):
    read_body(h)
    h.send_response(200)
    h.send_header("Content-Type", "application/json")
    h.send_header("Connection", "close")
    h.end_headers()
    h.close_connection = True
    for i in range(0, len(BIG), 4096):
        h.wfile.write(BIG[i : i + 4096])


def chunked(h):
    read_body(h)
    h.send_response(200)
    h.send_header("Content-Type", "application/json")
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    for i in range(0, len(BIG), 4096):
        piece = BIG[i : i + 4096]
        h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
    h.wfile.write(b"0\r\n\r\n")


def many_headers(h):
    read_body(h)
    h.send_response(200)
    for i in range(60):
        h.send_header(f"X-Pad-{i}", "p" * 2000)
    body = json.dumps({"data": GOOD}).encode()
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


@pytest.mark.parametrize("route", [declared, lied_length, close_delimited, chunked, many_headers])
def test_an_answer_over_the_cap_fails_the_url_unretried(route):
    with Loopback({"/3/image": route}) as srv:
        c = client(srv, max_answer_bytes=CAP)
        started = time.monotonic()
        with pytest.raises(imgur.Rejected, match="larger than 65,536 bytes .IMGUR_MAX_ANSWER_BYTES"):
            c.upload(IMAGE)
        assert time.monotonic() - started < 2 and srv.hits["/3/image"] == 1
        srv.routes["/3/image"] = answering(GOOD)  # the connection it came on is not used again
        assert c.upload(IMAGE).link == GOOD["link"]
        c.close()


def test_an_answer_just_under_the_cap_is_read():
    body = json.dumps({"data": GOOD, "pad": "x" * (CAP - 1000)}).encode()
    with Loopback({"/3/image": lambda h: (read_body(h), respond(h, 200, body, "application/json"))}) as srv:
        assert client(srv, max_answer_bytes=CAP).upload(IMAGE).link == GOOD["link"]


# --------------------------------------------------------------------------------------------------------
# One deadline per attempt
# --------------------------------------------------------------------------------------------------------


def drip_headers(h):
    read_body(h)
    for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Slow: " + b"s" * 200:
        if h.server.stopping.wait(0.02):
            return
        h.wfile.write(bytes([byte]))
        h.wfile.flush()


def drip_body(h):
    read_body(h)
    body = json.dumps({"data": GOOD}).encode() + b" " * 500
    h.send_response(200)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    for byte in body:
        if h.server.stopping.wait(0.02):
            return
        h.wfile.write(bytes([byte]))
        h.wfile.flush()


def never_reads(h):
    h.server.stopping.wait(5)  # takes no body: the client's send blocks once the socket buffers are full


@pytest.mark.parametrize("route, size", [(drip_headers, 0), (drip_body, 0), (never_reads, 16 * 2**20)])
def test_an_attempt_ends_at_its_deadline_however_imgur_dribbles(route, size):
    data = IMAGE + b"\0" * size
    with Loopback({"/3/image": route}) as srv:
        sleeps = Sleeps()
        c = client(srv, timeout=0.3, min_upload_rate=1e12, retries=1, sleep=sleeps)
        started = time.monotonic()
        with pytest.raises(imgur.Unavailable, match=r"did not answer within 0.3 s .*IMGUR_TIMEOUT.*gave up after 2 attempts"):
            c.upload(data)
        took = time.monotonic() - started
        assert 0.6 <= took < 1.5, took  # two attempts of 0.3 s each, however long each recv or send waits
        assert len(sleeps.calls) == 1  # a slow attempt is retried, like any timeout
        c.close()


def test_a_big_upload_gets_longer_in_proportion_to_its_size():
    c = imgur.ImgurClient(client_id="x")
    assert c.attempt_seconds(1000) == 60.0
    assert c.attempt_seconds(20 * 2**20) == 160.0  # 20 MB at 128 KB/s

    def slow(h):
        read_body(h)
        h.server.stopping.wait(0.5)
        respond(h, 200, json.dumps({"data": GOOD}).encode(), "application/json")

    with Loopback({"/3/image": slow}) as srv:
        with pytest.raises(imgur.Unavailable, match="within 0.2 s"):
            client(srv, timeout=0.2, retries=0).upload(IMAGE)
        # The same image and the same slow answer, at a rate that gives this size 1.5 s:
        assert client(srv, timeout=0.2, min_upload_rate=len(IMAGE) / 1.5, retries=0).upload(IMAGE).link


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return make_certificate(tmp_path_factory.mktemp("tls"), "IP:127.0.0.1")


def test_https_keeps_one_verified_connection_and_its_handshake_is_under_the_deadline(certificate):
    cert, key = certificate
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    with Loopback({"/3/image": answering(GOOD)}) as srv:
        srv.server.socket = server_context.wrap_socket(srv.server.socket, server_side=True, do_handshake_on_connect=False)
        c = imgur.ImgurClient(client_id="x", api_url=f"https://127.0.0.1:{srv.port}", ssl_context=trusting)
        assert [c.upload(IMAGE).link for _ in range(2)] == [GOOD["link"]] * 2
        assert srv.server.connections_made == 1
        c.close()
        with pytest.raises(imgur.Unavailable, match="could not reach Imgur"):  # the system's CAs do not trust it
            imgur.ImgurClient(client_id="x", api_url=f"https://127.0.0.1:{srv.port}", retries=0).upload(IMAGE)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (in the kernel), never says a word
        c = imgur.ImgurClient(client_id="x", api_url=f"https://127.0.0.1:{silent.getsockname()[1]}", ssl_context=trusting, timeout=0.3, retries=0)
        started = time.monotonic()
        with pytest.raises(imgur.Unavailable, match="within 0.3 s"):
            c.upload(IMAGE)
        assert time.monotonic() - started < 1


# --------------------------------------------------------------------------------------------------------
# The file name sent
# --------------------------------------------------------------------------------------------------------


def _parts(content_type: str, body: bytes):
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    return list(message.iter_parts())


@pytest.mark.parametrize(
    "name, sent",
    [
        ('q";name="title', "q__name__title"),
        ("a.jpg\r\nContent-Type: text/html", "a.jpg__Content-Type__text_html"),
        ("back\\slash.png", "back_slash.png"),
        ("caf\u00e9.jpg", "caf_.jpg"),
        ("", "image"),
        ("n" * 300, "n" * 100),
    ],
)
def test_the_file_name_cannot_break_out_of_its_multipart_header(name, sent):
    seen = {}

    def image(h):
        seen["type"], seen["body"] = h.headers["Content-Type"], read_body(h)
        respond(h, 200, json.dumps({"data": GOOD}).encode(), "application/json")

    with Loopback({"/3/image": image}) as srv:
        client(srv).upload(IMAGE, filename=name)
    parts = _parts(seen["type"], seen["body"])
    assert [p["Content-Disposition"] for p in parts] == ['form-data; name="type"', f'form-data; name="image"; filename="{sent}"']
    assert parts[1].get_payload(decode=True) == IMAGE


# --------------------------------------------------------------------------------------------------------
# Credit resets, and other numbers and texts from Imgur
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake():
    with FakeImgur() as f:
        yield f


def credits_client(fake, clock, **kw):
    sleeps = Sleeps(clock)
    return imgur.ImgurClient(client_id=fake.client_id, api_url=fake.url, now=lambda: clock[0], sleep=sleeps, **kw), sleeps


def test_a_user_reset_sent_as_seconds_from_now_pauses_that_long(fake):
    clock = [1_800_000_000.0]
    c, sleeps = credits_client(fake, clock, max_pause=7200)
    fake.success_headers = {"X-RateLimit-UserRemaining": "0", "X-RateLimit-UserReset": "3600"}  # as seen in 2025
    c.upload(IMAGE)
    fake.success_headers = {}
    c.upload(IMAGE)
    assert sleeps.calls == [3600.0] and len(fake.uploads) == 2


def test_a_user_reset_in_seconds_beyond_max_pause_fails_fast_without_burning_a_request(fake):
    clock = [1_800_000_000.0]
    c, sleeps = credits_client(fake, clock, max_pause=600)
    fake.success_headers = {"X-RateLimit-UserRemaining": "0", "X-RateLimit-UserReset": "3600"}
    c.upload(IMAGE)
    with pytest.raises(imgur.Unavailable, match="credits are used up until 2027-01-15 09:00 UTC"):
        c.upload(IMAGE)
    assert len(fake.uploads) == 1


@pytest.mark.parametrize("reset, pause", [("1e300", 86400.0), ("99999999999999999999", 86400.0), ("inf", 3600.0), ("nan", 3600.0)])
def test_an_absurd_reset_is_capped_at_a_day(fake, reset, pause):
    clock = [1_800_000_000.0]
    c, sleeps = credits_client(fake, clock, max_pause=2 * 86400)
    fake.success_headers = {"X-RateLimit-UserRemaining": "0", "X-RateLimit-UserReset": reset}
    c.upload(IMAGE)
    fake.success_headers = {}
    c.upload(IMAGE)
    assert sleeps.calls == [pause]  # a day at most; "inf" and "nan" are no reset at all: an hour


def test_json_nested_too_deep_is_a_reason_not_a_crash(fake):
    assert imgur.reason_from(500, b"[" * 100_000) == "Imgur answered 500 Internal Server Error: " + "[" * 200
    fake.script.append(answer(200, b"[" * 100_000))
    with pytest.raises(imgur.Rejected, match="200 without a link"):
        imgur.ImgurClient(client_id=fake.client_id, api_url=fake.url).upload(IMAGE)


def test_a_huge_error_message_becomes_a_short_single_line_reason():
    reason = imgur.reason_from(400, json.dumps({"data": {"error": "bad\r\nimage " * 50_000}}).encode())
    assert reason.startswith("Imgur answered 400 Bad Request: bad image bad image") and len(reason) < 260 and "\n" not in reason


def test_a_malformed_access_token_is_a_rejection_not_a_crash():
    def token(h):
        read_body(h)
        respond(h, 200, json.dumps({"access_token": "tok\r\nX-Evil: 1", "expires_in": 3600}).encode(), "application/json")

    with Loopback({"/oauth2/token": token}) as srv:
        c = imgur.ImgurClient(client_id="c", client_secret="s", refresh_token="r", api_url=srv.url(""), sleep=Sleeps())
        with pytest.raises(imgur.Rejected, match="malformed access token"):
            c.upload(IMAGE)
        assert srv.hits["/3/image"] == 0
