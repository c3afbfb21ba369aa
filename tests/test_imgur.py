"""imgur.py does not trust Imgur's answers: links, ids, sizes, time, file names, credit resets.

Each test plays a misbehaving Imgur with a small route on a loopback server of ours (tests/loopback.py);
deadlines and byte caps are shrunk through ImgurClient's constructor so every test takes well under 2 s.
"""

import email.parser
import email.policy
import json
import shutil
import socket
import ssl
import subprocess
import time

import pytest

import imgur
from fake_imgur import FakeImgur, answer
from helpers import jpeg
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
