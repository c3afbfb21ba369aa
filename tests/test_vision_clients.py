"""The DeepStack / CodeProject.AI API (issue 13) as clients that no one here wrote call it.

Everything runs against the real `python server.py` on a loopback port (tests/test_server.py `start_server`):

- deepstack-python 0.9 (what Home Assistant's deepstack_object integration uses): `DeepstackObject(ip, port,
  api_key=...)`, `detect(image_bytes)`, and its `custom_model=`. It posts the file part `image` with the
  filename "image" and no Content-Type, and the form fields `api_key` and `min_confidence` (0.45 unless
  told); any status but 200 raises its DeepstackException.
- codeproject-ai-api 0.1: `CodeProjectAIObject(ip, port).detect(image_bytes)`, the same request without
  `api_key` (it cannot send one).
- Frigate's `deepstack` detector, replayed: a 320x320 JPEG encoded as Frigate encodes its tensor, posted with
  a `requests.Session` as `image` with `api_key=""` and no `min_confidence`, and the answer read by Frigate's
  rules (frigate/detectors/plugins/deepstack.py): a fixed array of 20 rows; stop at the first prediction
  below 0.4 or whose label is not in its label map ("truck" counts as "car"); boxes divided by the 320 size.
  The answer must be such that every prediction is read.
- http.client, for what the libraries hide: every answer, refusals included, is JSON with a Content-Length
  and never chunked (Blue Iris breaks on chunked bodies, Frigate's detector process on a body that is not
  JSON), refusals in DeepStack's shape.

Frigate's label map is test data, not code of ours: `labelmap.txt` of blakeblackshear/frigate (MIT licence,
Copyright (c) 2026 Frigate, Inc.) at commit e3fa70189324e5eb3b1dba756c153f6696f457de, sha256
6884be1f4f35344c499f944a1c168a34d837f7f7578f203fba95b3ede42fac09. Like the photos it is not in this
repository (what a snapshot of another repository brings is not committed here): it is read from
TESTDATA_DIR/frigate_labelmap.txt. The replay runs twice: with the test model's own label map, always (every
rule of Frigate's but the label names), and with Frigate's, skipped where that file is absent.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import urllib.parse

import codeprojectai.core
import deepstack.core
import numpy as np
import pytest
import requests
from PIL import Image
from test_server import start_server, stop_server

import detect
from conftest import MODEL_PATH, TESTDATA_DIR

API_KEY = "vision-clients-test-key"
SMALL_MAX_BYTES = 200_000  # the key server's MAX_IMAGE_BYTES: pets.jpg (171 KB) fits, cat_1080p.jpg (212 KB) does not
FRIGATE_SIZE = 320  # Frigate's default detector input: width = height = 320
FRIGATE_ROWS = 20  # Frigate's detector fills np.zeros((20, 6)); a 21st prediction would not fit
FRIGATE_MIN_CONFIDENCE = 0.4  # Frigate stops reading at the first prediction below this
FRIGATE_LABELMAP_SHA256 = "6884be1f4f35344c499f944a1c168a34d837f7f7578f203fba95b3ede42fac09"
DEEPSTACK_ERROR_KEYS = {"success", "error", "code", "duration"}
TIMEOUT = 30  # s, per request: a shared 2-core machine; Frigate's own default of 0.1 s is about a Pi's speed


# --------------------------------------------------------------------------------------------------------
# The servers: one open with a folder of custom models, one with API_KEY and a small MAX_IMAGE_BYTES
# --------------------------------------------------------------------------------------------------------


class Running:
    def __init__(self, proc, base: str):
        self.proc, self.base = proc, base
        parts = urllib.parse.urlsplit(base)
        self.host, self.port = parts.hostname, parts.port


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, model_path):
    """VISION_MODELS_DIR: the test model as `coco`, and `broken`, a .tflite file that is no model."""
    folder = tmp_path_factory.mktemp("vision-models")
    (folder / "coco.tflite").symlink_to(model_path)
    (folder / "broken.tflite").write_bytes(b"this is not a TFLite model\n" * 40)
    return folder


@pytest.fixture(scope="module")
def open_server(tmp_path_factory, model_path, models_dir):
    proc, base, _ = start_server(
        tmp_path_factory.mktemp("vision-open"), "--model", model_path, env={"VISION_MODELS_DIR": str(models_dir)},
    )
    yield Running(proc, base)
    log = stop_server(proc)
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def key_server(tmp_path_factory, model_path):
    proc, base, _ = start_server(
        tmp_path_factory.mktemp("vision-key"), "--model", model_path,
        env={"API_KEY": API_KEY, "MAX_IMAGE_BYTES": str(SMALL_MAX_BYTES)},
    )
    yield Running(proc, base)
    log = stop_server(proc)
    assert "Traceback" not in log, log


# --------------------------------------------------------------------------------------------------------
# What the shared photos must give
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labels(model_path) -> set[str]:
    """The test model's label names ("???" marks its unused slots, never to be answered)."""
    return set(detect.load_labels(model_path)) - {"???"}


def check_predictions(name: str, spec: dict, predictions: list[dict], data: bytes, min_confidence: float,
                      labels: set[str]) -> None:
    """`predictions` of photo `name` (bytes `data`) as a client asked with `min_confidence`: the contract's
    shape, and the objects expected.json says the test model finds at >= 0.5 (its scores within 0.05)."""
    width, height = Image.open(io.BytesIO(data)).size  # the pixel grid as sent: no EXIF rotation
    assert len(predictions) <= 20, (name, len(predictions))  # VISION_MAX_PREDICTIONS' default
    confidences = [p["confidence"] for p in predictions]
    assert confidences == sorted(confidences, reverse=True), (name, confidences)
    for p in predictions:
        assert {"label", "confidence", "x_min", "y_min", "x_max", "y_max"} <= set(p), p
        assert p["label"] in labels, (name, p)
        assert min_confidence <= p["confidence"] <= 1, (name, p)
        box = [p["x_min"], p["y_min"], p["x_max"], p["y_max"]]
        assert all(type(v) is int for v in box), (name, p)  # integer pixels
        assert 0 <= p["x_min"] <= p["x_max"] <= width and 0 <= p["y_min"] <= p["y_max"] <= height, (name, p, width, height)
    sure = {p["label"] for p in predictions if p["confidence"] >= 0.5}
    assert set(spec["must"]) <= sure, (name, predictions)
    assert not set(spec.get("must_not", ())) & sure, (name, predictions)
    if spec.get("nothing"):
        assert not sure, (name, predictions)
    for label in spec["must"]:
        best = max(p["confidence"] for p in predictions if p["label"] == label)
        assert abs(best - max(spec["seen"][label])) <= 0.05, (name, label, best, spec["seen"][label])


def photos(expected: dict, images_dir: str):
    for name, spec in expected["images"].items():
        with open(os.path.join(images_dir, name), "rb") as f:
            yield name, spec, f.read()


# --------------------------------------------------------------------------------------------------------
# deepstack-python and codeproject-ai-api
# --------------------------------------------------------------------------------------------------------


def test_deepstack_python_finds_the_expected_objects(open_server, expected, images_dir, labels):
    client = deepstack.core.DeepstackObject(open_server.host, open_server.port, timeout=TIMEOUT)
    for name, spec, data in photos(expected, images_dir):
        check_predictions(name, spec, client.detect(data), data, deepstack.core.DEFAULT_MIN_CONFIDENCE, labels)


def test_deepstack_python_min_confidence_below_the_service_threshold(open_server, photo):
    """Home Assistant sends 0.1, below DETECT_THRESHOLD (0.5): candidates down to it come back. (table.jpg:
    the test model's best scores there are just below 0.5; it answers at most 10 boxes, and in kite_and_cold.jpg
    all 10 are above 0.5.)"""
    data = photo("table.jpg")
    low = deepstack.core.DeepstackObject(open_server.host, open_server.port, timeout=TIMEOUT, min_confidence=0.1)
    high = deepstack.core.DeepstackObject(open_server.host, open_server.port, timeout=TIMEOUT, min_confidence=0.5)
    below, above = low.detect(data), high.detect(data)
    assert any(p["confidence"] < 0.5 for p in below) and all(p["confidence"] >= 0.1 for p in below), below
    assert len(above) < len(below) and all(p["confidence"] >= 0.5 for p in above), above


def test_codeproject_ai_api_finds_the_expected_objects(open_server, expected, images_dir, labels):
    client = codeprojectai.core.CodeProjectAIObject(open_server.host, open_server.port, timeout=TIMEOUT)
    for name, spec, data in photos(expected, images_dir):
        check_predictions(name, spec, client.detect(data), data, codeprojectai.core.DEFAULT_MIN_CONFIDENCE, labels)


def test_deepstack_python_with_the_api_key(key_server, photo):
    data = photo("pets.jpg")
    right = deepstack.core.DeepstackObject(key_server.host, key_server.port, api_key=API_KEY, timeout=TIMEOUT)
    assert {p["label"] for p in right.detect(data)} == {"dog"}
    for wrong in ("not-the-key-at-all", ""):  # "" is what the library sends when no key is configured
        client = deepstack.core.DeepstackObject(key_server.host, key_server.port, api_key=wrong, timeout=TIMEOUT)
        with pytest.raises(deepstack.core.DeepstackException, match="status code: 401"):
            client.detect(data)


def test_codeproject_ai_api_cannot_send_a_key_and_is_refused(key_server, photo):
    client = codeprojectai.core.CodeProjectAIObject(key_server.host, key_server.port, timeout=TIMEOUT)
    with pytest.raises(codeprojectai.core.CodeProjectAIException, match="error: 401"):
        client.detect(photo("pets.jpg"))


def test_custom_models_with_both_clients(open_server, photo):
    data = photo("pets.jpg")
    ds = deepstack.core.DeepstackObject(open_server.host, open_server.port, timeout=TIMEOUT, custom_model="coco")
    cp = codeprojectai.core.CodeProjectAIObject(open_server.host, open_server.port, timeout=TIMEOUT, custom_model="coco")
    assert {p["label"] for p in ds.detect(data)} == {"dog"}
    assert {p["label"] for p in cp.detect(data)} == {"dog"}
    unknown = deepstack.core.DeepstackObject(open_server.host, open_server.port, timeout=TIMEOUT, custom_model="nope")
    with pytest.raises(deepstack.core.DeepstackException, match="Bad url"):  # how it reports a 404
        unknown.detect(data)


# --------------------------------------------------------------------------------------------------------
# Frigate's deepstack detector, replayed
# --------------------------------------------------------------------------------------------------------


def model_labelmap() -> dict[int, str]:
    """The test model's own label map, as a Frigate configured with that model's labels would hold it."""
    return {i: label for i, label in enumerate(detect.load_labels(MODEL_PATH)) if label != "???"}


def frigate_labelmap() -> dict[int, str]:
    """TESTDATA_DIR/frigate_labelmap.txt read as Frigate reads a label map: `<index> <label>` lines over a
    prefill of 91 "unknown" entries."""
    path = os.path.join(TESTDATA_DIR, "frigate_labelmap.txt")
    if not os.path.isfile(path):
        pytest.skip(f"{path} is absent: put Frigate's labelmap.txt there (the commit is in this module's docstring)")
    with open(path, "rb") as f:
        raw = f.read()
    assert hashlib.sha256(raw).hexdigest() == FRIGATE_LABELMAP_SHA256, "not the labelmap.txt this test was written for"
    labels = dict.fromkeys(range(91), "unknown")
    for line in raw.decode("utf-8").splitlines():
        index, label = line.split(" ", 1)
        labels[int(index)] = label.strip()
    return labels


def frigate_frame(data: bytes) -> bytes:
    """A 320x320 frame of a photo (its centre square, as Frigate's square regions), turned into the uint8
    RGB tensor Frigate hands its detector, and encoded as the detector does: Image.fromarray, JPEG, Pillow's
    defaults."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    tensor = np.asarray(img.crop((left, top, left + side, top + side)).resize((FRIGATE_SIZE, FRIGATE_SIZE)))[None]
    frame = Image.fromarray(np.squeeze(tensor).astype(np.uint8))
    out = io.BytesIO()
    frame.save(out, format="JPEG")
    return out.getvalue()


def frigate_read(answer: dict, labels: dict[int, str]) -> tuple[np.ndarray, int]:
    """Frigate's reading of an answer: (its 20x6 array of [label index, confidence, y_min, x_min, y_max,
    x_max] with the box divided by the frame's size, how many predictions it read before it stopped).
    A prediction past the 20th raises IndexError, as in Frigate."""
    rows = np.zeros((FRIGATE_ROWS, 6), np.float32)
    read = 0
    for i, p in enumerate(answer["predictions"]):
        if p["confidence"] < FRIGATE_MIN_CONFIDENCE:
            break
        name = "car" if p["label"].lower() == "truck" else p["label"].lower()
        index = next((k for k, v in labels.items() if v == name), -1)
        if index < 0:
            break
        rows[i] = [index, float(p["confidence"]), p["y_min"] / FRIGATE_SIZE, p["x_min"] / FRIGATE_SIZE,
                   p["y_max"] / FRIGATE_SIZE, p["x_max"] / FRIGATE_SIZE]
        read += 1
    return rows, read


@pytest.mark.parametrize("labelmap", ["model", "frigate"])
def test_frigate_reads_every_prediction(open_server, expected, images_dir, labelmap):
    labels = frigate_labelmap() if labelmap == "frigate" else model_labelmap()
    session = requests.Session()  # Frigate keeps one session: one kept-alive connection
    found = {}
    for name, _spec, data in photos(expected, images_dir):
        frame = frigate_frame(data)
        res = session.post(
            f"{open_server.base}/v1/vision/detection", data={"api_key": ""}, files={"image": frame}, timeout=TIMEOUT,
        )
        assert res.status_code == 200, (name, res.text[:300])
        assert "chunked" not in res.headers.get("Transfer-Encoding", "") and int(res.headers["Content-Length"]) == len(res.content)
        answer = res.json()
        assert answer["success"] is True and answer["predictions"] is not None, answer
        predictions = answer["predictions"]
        assert len(predictions) <= FRIGATE_ROWS, (name, len(predictions))
        rows, read = frigate_read(answer, labels)
        assert read == len(predictions), (name, predictions)  # no prediction is left unread
        assert ((rows[:read, 2:] >= 0) & (rows[:read, 2:] <= 1)).all(), (name, rows[:read])
        assert (rows[:read, 2] <= rows[:read, 4]).all() and (rows[:read, 3] <= rows[:read, 5]).all(), (name, rows[:read])
        assert answer["count"] == read, answer
        found[name] = {labels[int(r[0])] for r in rows[:read]}
    assert "dog" in found["pets.jpg"] and "cat" in found["cat_1080p.jpg"] and "car" in found["traffic_0001.bmp"], found
    assert sum(len(v) for v in found.values()) >= 10, found  # the frames are not all empty


# --------------------------------------------------------------------------------------------------------
# Every answer: JSON, a Content-Length, never chunked; refusals in DeepStack's shape
# --------------------------------------------------------------------------------------------------------


def multipart(fields: dict[str, str], files: dict[str, tuple[str | None, bytes, str | None]]) -> tuple[bytes, str]:
    """(body, Content-Type) of a multipart/form-data request; a file is (filename or None, bytes, type or None)."""
    boundary = "vision-clients-7c1e0b2d"
    out = io.BytesIO()
    for key, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    for key, (filename, data, kind) in files.items():
        disposition = f'form-data; name="{key}"' + (f'; filename="{filename}"' if filename is not None else "")
        out.write(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode())
        out.write((f"Content-Type: {kind}\r\n" if kind else "").encode() + b"\r\n" + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def raw_post(server: Running, path: str, body: bytes | None, content_type: str | None, method: str = "POST"):
    """One request on its own connection: (status, headers as a list, `chunked`, body bytes)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT)
    try:
        headers = {"Content-Type": content_type} if content_type else {}
        conn.request(method, path, body=body, headers=headers)
        res = conn.getresponse()
        chunked = res.chunked
        return res.status, res.getheaders(), chunked, res.read()
    finally:
        conn.close()


def assert_json_answer(status: int, headers: list, chunked: bool, body: bytes, want: int | tuple[int, ...]) -> dict:
    """A whole JSON answer with status `want` (or one of them): Content-Length, not chunked; a refusal in
    DeepStack's shape."""
    got = {k.lower(): v for k, v in headers}
    assert status in (want if isinstance(want, tuple) else (want,)), (status, body[:300])
    assert not chunked and "transfer-encoding" not in got, headers
    assert int(got["content-length"]) == len(body), headers
    assert got["content-type"].split(";")[0].strip() == "application/json", headers
    answer = json.loads(body)
    if status >= 400:
        assert set(answer) == DEEPSTACK_ERROR_KEYS, answer
        assert answer["success"] is False and answer["code"] == status and answer["duration"] == 0, answer
        assert isinstance(answer["error"], str) and answer["error"].strip(), answer
        assert "Traceback" not in answer["error"], answer
    return answer


def _image(data: bytes, filename: str | None = "frame.jpg", kind: str | None = "image/jpeg", **fields):
    return multipart(fields, {"image": (filename, data, kind)})


OPEN_CASES = {
    # name: (method, path, request builder: photo -> (body, content type), status)
    "a photo, any filename, no Content-Type": ("POST", "/v1/vision/detection", lambda ph: _image(ph("pets.jpg"), "x", None), 200),
    "a photo without a filename": ("POST", "/v1/vision/detection", lambda ph: _image(ph("pets.jpg"), None, "application/octet-stream"), 200),
    "min_confidence 0": ("POST", "/v1/vision/detection", lambda ph: _image(ph("kite_and_cold.jpg"), min_confidence="0"), 200),
    "no image part": ("POST", "/v1/vision/detection", lambda ph: multipart({"min_confidence": "0.5"}, {}), 400),
    "no body": ("POST", "/v1/vision/detection", lambda ph: (None, None), 400),
    "not an image": ("POST", "/v1/vision/detection", lambda ph: _image(b"no picture here " * 64), 400),
    "min_confidence not a number": ("POST", "/v1/vision/detection", lambda ph: _image(ph("pets.jpg"), min_confidence="high"), 400),
    "min_confidence above 1": ("POST", "/v1/vision/detection", lambda ph: _image(ph("pets.jpg"), min_confidence="1.5"), 400),
    "face route": ("POST", "/v1/vision/face", lambda ph: _image(ph("pets.jpg")), 404),
    "face recognize route": ("POST", "/v1/vision/face/recognize", lambda ph: _image(ph("pets.jpg")), 404),
    "scene route": ("POST", "/v1/vision/scene", lambda ph: _image(ph("pets.jpg")), 404),
    "unknown custom model": ("POST", "/v1/vision/custom/nope", lambda ph: _image(ph("pets.jpg")), 404),
    "custom name that is a path": ("POST", "/v1/vision/custom/..%2Fcoco", lambda ph: _image(ph("pets.jpg")), 404),
    "a custom file that is no model": ("POST", "/v1/vision/custom/broken", lambda ph: _image(ph("pets.jpg")), 400),
    "custom model": ("POST", "/v1/vision/custom/coco", lambda ph: _image(ph("pets.jpg")), 200),
    "list of custom models": ("POST", "/v1/vision/custom/list", lambda ph: (None, None), 200),
    "a GET of the detection route": ("GET", "/v1/vision/detection", lambda ph: (None, None), (404, 405)),
}


@pytest.mark.parametrize("case", list(OPEN_CASES))
def test_every_answer_is_json_with_a_length(open_server, photo, case):
    method, path, build, want = OPEN_CASES[case]
    body, kind = build(photo)
    answer = assert_json_answer(*raw_post(open_server, path, body, kind, method), want)
    if want == 200 and path.endswith("/list"):
        assert answer == {"success": True, "models": ["broken", "coco"]}, answer
    elif want == 200:
        assert answer["success"] is True and answer["count"] == len(answer["predictions"]), answer
        assert 0 < len(answer["predictions"]) <= 20, answer  # min_confidence 0: neither nothing nor every anchor


def test_every_refusal_under_the_key_is_json_with_a_length(key_server, photo):
    pets, cat, kite = photo("pets.jpg"), photo("cat_1080p.jpg"), photo("kite_and_cold.jpg")
    assert len(pets) <= SMALL_MAX_BYTES < len(cat) and len(kite) > 5 * SMALL_MAX_BYTES  # kite: past waitress's body limit
    cases = [
        ("the right key", _image(pets, api_key=API_KEY), 200),
        ("a wrong key", _image(pets, api_key="not-the-key-at-all"), 401),
        ("no key", _image(pets), 401),
        ("an empty key, as Frigate sends by default", _image(pets, api_key=""), 401),
        ("an image over MAX_IMAGE_BYTES", _image(cat, api_key=API_KEY), 413),
        ("a body over waitress's limit, refused before the app", _image(kite, api_key=API_KEY), 413),
    ]
    for what, (body, kind), want in cases:
        try:
            assert_json_answer(*raw_post(key_server, "/v1/vision/detection", body, kind), want)
        except AssertionError as e:
            raise AssertionError(f"{what}: {e}") from None
    assert_json_answer(*raw_post(key_server, "/v1/vision/face", *_image(pets, api_key="wrong-key-here")), 401)


def test_without_a_model_the_refusal_is_json_with_a_length_and_retry_after(tmp_path, photo):
    proc, base, _ = start_server(tmp_path, "--model", str(tmp_path / "absent.tflite"))
    try:
        status, headers, chunked, body = raw_post(Running(proc, base), "/v1/vision/detection", *_image(photo("pets.jpg")))
    finally:
        stop_server(proc)
    assert_json_answer(status, headers, chunked, body, 503)
    assert int(dict((k.lower(), v) for k, v in headers)["retry-after"]) > 0, headers
