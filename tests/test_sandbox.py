"""`python imgur.py --sandbox`: the local stand-in for Imgur's upload API that README's commands use.

In-process for its answers and bounds (with the real ImgurClient as the client), and once end to end:
the sandbox and the server as real processes, a job of URLs served by a loopback host.
"""

import base64
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from test_server import ROOT, start_listening, start_server, stop_server

import imgur
from helpers import jpeg
from loopback import Loopback, ok


@pytest.fixture
def sandbox():
    with imgur.Sandbox(port=0) as s:
        yield s


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as res:
            return res.status, res.headers["Content-Type"], res.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def post(s: imgur.Sandbox, path: str, body: bytes, headers: dict) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection(s.host, s.port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers=headers)
        res = conn.getresponse()
        return res.status, dict(res.getheaders()), json.loads(res.read())
    finally:
        conn.close()


def form(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = "b0undary"
    out = b""
    for name, value in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    for name, data in files.items():
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="x"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


AUTH = {"Authorization": "Client-ID anything"}


def test_the_real_client_uploads_and_the_link_serves_the_same_bytes(sandbox, photo):
    client = imgur.ImgurClient(client_id="anything", api_url=sandbox.url)
    try:
        for name, content_type in (("pets.jpg", "image/jpeg"), ("cat.bmp", "image/bmp")):
            up = client.upload(photo(name), filename=name)
            assert re.fullmatch(rf"{re.escape(sandbox.url)}/[A-Za-z0-9]{{7}}\.(jpg|bmp)", up.link)
            assert re.fullmatch(r"[A-Za-z0-9]{15}", up.deletehash)
            assert get(up.link) == (200, content_type, photo(name))
    finally:
        client.close()
    assert len(sandbox.images) == 2


def test_answers_like_imgur(sandbox):
    data = jpeg()
    body, content_type = form({"type": "file", "title": "Rex"}, {"image": data})
    code, headers, doc = post(sandbox, "/3/image", body, {**AUTH, "Content-Type": content_type})
    assert code == 200 and doc["success"] is True and doc["status"] == 200
    d = doc["data"]
    assert d["type"] == "image/jpeg" and d["size"] == len(data) and d["title"] == "Rex" and d["link"].endswith(f"/{d['id']}.jpg")
    assert headers["Content-Type"] == "application/json"
    assert int(headers["X-RateLimit-ClientRemaining"]) > 0 and int(headers["X-RateLimit-UserRemaining"]) > 0
    assert int(headers["X-RateLimit-UserReset"]) > time.time()


def test_base64_in_a_form_field_as_imgur_takes_it(sandbox):
    data = jpeg()
    body, content_type = form({"image": base64.b64encode(data).decode(), "type": "base64"}, {})
    code, _, doc = post(sandbox, "/3/image", body, {**AUTH, "Content-Type": content_type})
    assert code == 200 and get(doc["data"]["link"])[2] == data


@pytest.mark.parametrize("headers, fields, files, code, said", [
    ({}, {}, {"image": jpeg()}, 401, "Authentication required"),
    ({"Authorization": "Client-ID "}, {}, {"image": jpeg()}, 401, "Authentication required"),
    ({"Authorization": "Bearer made-up"}, {}, {"image": jpeg()}, 403, "The access token provided is invalid."),
    (AUTH, {}, {"image": b"<html>not an image</html>"}, 400, "File type invalid"),
    (AUTH, {"type": "url", "image": "https://example.com/a.jpg"}, {}, 400, "does not download URLs"),
    (AUTH, {"title": "no image"}, {}, 400, "No image data"),
    (AUTH, {"image": "not base64!"}, {}, 400, "neither a file nor valid base64"),
])
def test_refusals_come_in_imgurs_shape(sandbox, headers, fields, files, code, said):
    body, content_type = form(fields, files)
    status, _, doc = post(sandbox, "/3/image", body, {**headers, "Content-Type": content_type})
    assert status == code and doc["status"] == code and doc["success"] is False
    assert said in doc["data"]["error"] and doc["data"]["request"] == "/3/image" and doc["data"]["method"] == "POST"
    assert len(sandbox.images) == 0
    assert said in imgur.reason_from(status, json.dumps(doc).encode())  # what a job's failed URL would say


def test_account_uploads_get_a_token_from_the_sandbox(sandbox):
    client = imgur.ImgurClient(client_id="anything", client_secret="s", refresh_token="r", api_url=sandbox.url)
    try:
        up = client.upload(jpeg())
    finally:
        client.close()
    assert get(up.link)[0] == 200


def test_a_deletehash_deletes(sandbox):
    client = imgur.ImgurClient(client_id="anything", api_url=sandbox.url)
    try:
        up = client.upload(jpeg())
    finally:
        client.close()
    req = urllib.request.Request(f"{sandbox.url}/3/image/{up.deletehash}", method="DELETE", headers=AUTH)
    with urllib.request.urlopen(req, timeout=10) as res:
        assert json.load(res) == {"data": True, "success": True, "status": 200}
    assert get(up.link)[0] == 404 and len(sandbox.images) == 0


def test_links_are_on_the_host_the_client_reached(sandbox):
    body, content_type = form({}, {"image": jpeg()})
    for host, expected in ((f"localhost:{sandbox.port}", f"http://localhost:{sandbox.port}/"),
                           ('evil"><script>', f"http://127.0.0.1:{sandbox.port}/")):
        _, _, doc = post(sandbox, "/3/image", body, {**AUTH, "Content-Type": content_type, "Host": host})
        assert doc["data"]["link"].startswith(expected)


# -- bounds ----------------------------------------------------------------------------------------------


def test_memory_is_bounded_by_count_and_bytes_oldest_dropped_first():
    images = imgur.SandboxImages(max_images=3, max_bytes=2500)
    links = [images.add(bytes([i]) * 1000, "image/png", "http://h")["id"] for i in range(2)]
    assert len(images) == 2 and images.bytes == 2000
    third = images.add(b"c" * 1000, "image/png", "http://h")["id"]  # 3000 bytes > 2500: the oldest goes
    assert images.get(links[0]) is None and images.get(links[1]) and images.get(third)
    assert images.bytes == 2000
    for i in range(3):
        images.add(bytes([i]) * 10, "image/gif", "http://h")
    assert len(images) == 3 and images.get(links[1]) is None and images.get(third) is None  # by count
    with pytest.raises(ValueError, match="--max-total-mb"):
        images.add(b"x" * 2501, "image/png", "http://h")


def test_an_oversized_body_is_413_and_the_client_sees_it():
    with imgur.Sandbox(port=0, max_upload=10_000) as s:
        body, content_type = form({}, {"image": b"\xff\xd8\xff" + b"x" * 50_000})
        code, headers, doc = post(s, "/3/image", body, {**AUTH, "Content-Type": content_type})
        assert code == 413 and headers["Connection"] == "close"
        assert "10,000 bytes" in doc["data"]["error"]["message"] and len(s.images) == 0
        reason = imgur.reason_from(code, json.dumps(doc).encode())
        assert reason.startswith("Imgur answered 413 Request Entity Too Large: File is over the size limit")


def test_a_body_without_content_length_is_411(sandbox):
    with socket.create_connection((sandbox.host, sandbox.port), timeout=10) as sock:
        sock.sendall(b"POST /3/image HTTP/1.1\r\nHost: x\r\nAuthorization: Client-ID a\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        assert sock.recv(1000).startswith(b"HTTP/1.1 411 ")


def test_connections_are_capped():
    with imgur.Sandbox(port=0, max_connections=1) as s:
        with socket.create_connection((s.host, s.port), timeout=10):  # holds the one slot, silent
            status, _, body = get(f"{s.url}/")
            assert status == 503 and b"already serves 1 connection(s)" in body
        deadline = time.monotonic() + 10
        while get(f"{s.url}/")[0] != 200:  # the slot comes back once that connection is gone
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_parse_multipart():
    body = (b'--q\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n'
            b'--q\r\nContent-Disposition: form-data; name=f; filename="x.jpg"\r\n\r\n\r\n--not-the-end\r\n'
            b"--q--\r\n")
    assert imgur.parse_multipart('multipart/form-data; boundary="q"', body) == ({"a": "1"}, {"f": b"\r\n--not-the-end"})
    assert imgur.parse_multipart("application/json", b"{}") == ({}, {})
    with pytest.raises(ValueError):
        imgur.parse_multipart("multipart/form-data; boundary=q", body[:-8])  # no closing boundary
    with pytest.raises(ValueError, match="more than 2"):
        imgur.parse_multipart("multipart/form-data; boundary=q", body.replace(b"--q--", b"--q\r\nContent-Disposition: form-data; name=c\r\n\r\n\r\n--q--"), max_parts=2)


# -- end to end: README's commands, as processes -------------------------------------------------------------


def start_sandbox() -> tuple[subprocess.Popen, str, list[str]]:
    return start_listening(["imgur.py", "--sandbox", "--port", "0"], None, "the sandbox")


def test_a_job_end_to_end_against_the_sandbox_process(tmp_path, model_path, photo):
    sandbox, api, sandbox_log = start_sandbox()
    routes = {"/pets.jpg": ok(photo("pets.jpg"), "image/jpeg"), "/cat.bmp": ok(photo("cat.bmp"), "image/bmp")}
    try:
        with Loopback(routes) as host:
            env = {"IMGUR_CLIENT_ID": "anything", "IMGUR_API_URL": api, "ALLOW_PRIVATE_URLS": "1"}
            server, base, _ = start_server(tmp_path, "--model", model_path, env=env)
            try:
                urls = [host.url("/pets.jpg"), host.url("/cat.bmp")]
                req = urllib.request.Request(f"{base}/v1/images/upload", json.dumps({"urls": urls}).encode(),
                                             {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=10) as res:
                    job_id = json.load(res)["jobId"]
                deadline = time.monotonic() + 30
                while True:  # another process: nothing to wait on but its answers
                    with urllib.request.urlopen(f"{base}/v1/images/upload/{job_id}", timeout=10) as res:
                        job = json.load(res)
                    if job["status"] == "complete":
                        break
                    assert time.monotonic() < deadline, job
                    time.sleep(0.05)
            finally:
                stop_server(server)
        assert job["uploaded"]["failed"] == [] and len(job["uploaded"]["complete"]) == 2
        for item, (name, content_type) in zip(job["items"], (("pets.jpg", "image/jpeg"), ("cat.bmp", "image/bmp")), strict=True):
            assert item["status"] == "complete" and item["link"].startswith(api + "/")
            assert get(item["link"]) == (200, content_type, photo(name))
    finally:
        sandbox.send_signal(signal.SIGTERM)
        sandbox.wait(10)
        sandbox.drain.join(5)
    assert sum("sandbox: kept" in line for line in sandbox_log) == 2


def test_the_command_line_wants_sandbox():
    done = subprocess.run([sys.executable, "imgur.py"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "nothing to do: --sandbox starts" in done.stderr
