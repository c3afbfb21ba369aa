"""The DeepStack / CodeProject.AI-compatible routes (/v1/vision/*) on the real parts: model, SQLite, WebTest,
and the real process where waitress and the channel answer before the app does.

Custom models are copies of the test model in a temporary VISION_MODELS_DIR, under other names.
"""

import email.utils
import http.client
import io
import json
import logging
import os
import shutil
import socket
import time

import pytest
from PIL import Image
from test_server import start_server, stop_server

import detect
import imaging
import server
import settings as settings_mod
import store
import vision

DEEPSTACK_ERROR_KEYS = {"success", "error", "code", "duration"}
ANSWER_KEYS = {
    "success", "predictions", "count", "message", "inferenceMs", "processMs", "analysisRoundTripMs", "moduleId",
    "moduleName", "code", "command", "duration", "inferenceDevice", "processedBy", "timestampUTC",
}
PREDICTION_KEYS = {"label", "confidence", "x_min", "y_min", "x_max", "y_max"}
BOUNDARY = "imgsvc-test-boundary"


def multipart(*parts: tuple) -> tuple[bytes, str]:
    """(body, Content-Type) of a form of (name, value bytes, filename or None, Content-Type or None) parts."""
    out = io.BytesIO()
    for name, value, filename, kind in parts:
        out.write(f"--{BOUNDARY}\r\n".encode())
        disposition = f'Content-Disposition: form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out.write(disposition.encode() + b"\r\n")
        if kind is not None:
            out.write(f"Content-Type: {kind}\r\n".encode())
        out.write(b"\r\n" + (value if isinstance(value, bytes) else value.encode()) + b"\r\n")
    out.write(f"--{BOUNDARY}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={BOUNDARY}"


def post(service, path: str, image: bytes | None, status: int = 200, headers=None, **fields):
    parts = [(k, str(v), None, None) for k, v in fields.items()]
    if image is not None:
        parts.insert(0, ("image", image, "frame.jpg", "image/jpeg"))
    body, kind = multipart(*parts)
    return service.client.post(path, body, {"Content-Type": kind, **(headers or {})}, status=status)


def assert_json_with_length(res) -> None:
    assert res.headers["Content-Type"] == "application/json", res.headers
    assert int(res.headers["Content-Length"]) == len(res.body)
    assert "Transfer-Encoding" not in res.headers


def assert_deepstack_error(res, code: int) -> str:
    assert res.status_int == code, res.text[:300]
    assert_json_with_length(res)
    body = res.json
    assert set(body) == DEEPSTACK_ERROR_KEYS, body
    assert body["success"] is False and body["code"] == code and body["duration"] == 0
    assert isinstance(body["error"], str) and body["error"].strip() and "Traceback" not in body["error"]
    return body["error"]


@pytest.fixture
def shelf_dir(tmp_path, model_path):
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("front", "back", "side"):  # copies: a link to DETECT_MODEL is served by the service's detector
        shutil.copy(model_path, folder / f"{name}.tflite")
    return folder


# --------------------------------------------------------------------------------------------------------
# The 200 answer
# --------------------------------------------------------------------------------------------------------


def test_detection_answers_every_field(service, photo):
    started = time.time()
    res = post(service, "/v1/vision/detection", photo("coupleanddog.jpeg"))
    assert_json_with_length(res)
    body = res.json
    assert set(body) == ANSWER_KEYS
    assert body["success"] is True and body["code"] == 200 and body["command"] == "detect"
    assert body["moduleId"] == "imgsvc" and body["moduleName"] == "imgsvc object detection"
    assert body["inferenceDevice"] == "CPU" and body["processedBy"] == socket.gethostname()
    stamp = email.utils.parsedate_to_datetime(body["timestampUTC"])
    assert body["timestampUTC"].endswith(" GMT") and abs(stamp.timestamp() - started) < 60
    for key in ("inferenceMs", "processMs", "analysisRoundTripMs"):
        assert isinstance(body[key], int) and body[key] >= 0, key
    assert body["inferenceMs"] <= body["processMs"] <= body["analysisRoundTripMs"]
    assert body["duration"] == pytest.approx(body["processMs"] / 1000, abs=0.001)
    found = body["predictions"]
    assert body["count"] == len(found) > 0
    confidences = [p["confidence"] for p in found]
    assert confidences == sorted(confidences, reverse=True) and min(confidences) >= 0.4  # DeepStack's default
    width, height = Image.open(io.BytesIO(photo("coupleanddog.jpeg"))).size
    for p in found:
        assert set(p) == PREDICTION_KEYS
        assert all(isinstance(p[k], int) for k in ("x_min", "y_min", "x_max", "y_max"))
        assert 0 <= p["x_min"] <= p["x_max"] <= width and 0 <= p["y_min"] <= p["y_max"] <= height
    labels = [p["label"] for p in found]
    assert {"person", "dog"} <= set(labels)
    assert body["message"] == "Found " + ", ".join(dict.fromkeys(labels))


def test_nothing_found_says_so(service, photo):
    body = post(service, "/v1/vision/detection", photo("dragonfly.bmp"), min_confidence="0.9").json
    assert body["predictions"] == [] and body["count"] == 0 and body["message"] == "No objects found"


@pytest.mark.parametrize("filename, kind", [("image", None), ("x.bin", "application/octet-stream"), (None, None), ("a.png", "text/plain")])
def test_any_file_name_and_content_type_the_bytes_decide(service, photo, filename, kind):
    body, content_type = multipart(("image", photo("pets.jpg"), filename, kind), ("api_key", "", None, None))
    res = service.client.post("/v1/vision/detection", body, {"Content-Type": content_type})
    assert [p["label"] for p in res.json["predictions"]][:1] == ["dog"]


def test_labels_are_the_label_maps_own(service, photo, detector):
    labels = set(detector.load().labels) - {"???", ""}
    for name in ("pasta_wine_test_image.jpg", "kite_and_cold.jpg"):
        found = post(service, "/v1/vision/detection", photo(name), min_confidence="0").json["predictions"]
        assert found and {p["label"] for p in found} <= labels


def test_min_confidence_below_detect_threshold_returns_more(service, photo):
    data = photo("table.jpg")  # every score is below 0.5 with the test model
    assert service.client.post_json("/images", {"image": _b64(data), "detect": True}).json["detections"] == []
    low = post(service, "/v1/vision/detection", data, min_confidence="0.1").json["predictions"]
    assert low and all(p["confidence"] >= 0.1 for p in low)
    default = post(service, "/v1/vision/detection", data).json["predictions"]
    assert len(low) > len(default) and all(p["confidence"] >= 0.4 for p in default)


def test_min_confidence_zero_stops_at_the_floor(service, photo):
    t = time.monotonic()
    found = post(service, "/v1/vision/detection", photo("kite_and_cold.jpg"), min_confidence="0").json["predictions"]
    assert time.monotonic() - t < 30
    assert found and min(p["confidence"] for p in found) >= detect.CANDIDATE_FLOOR
    assert len(found) <= 20


def test_at_most_vision_max_predictions_highest_first(make_service, photo):
    data = photo("kite_and_cold.jpg")
    every = post(make_service(), "/v1/vision/detection", data, min_confidence="0.05").json["predictions"]
    assert len(every) > 3
    capped = post(make_service(vision_max_predictions=3), "/v1/vision/detection", data, min_confidence="0.05").json
    assert capped["predictions"] == every[:3] and capped["count"] == 3


@pytest.mark.parametrize("name", ["pets.jpg", "table.jpg", "kite_and_cold.jpg"])
def test_candidates_go_down_to_the_floor_and_detections_stay_at_the_threshold(detector, photo, name):
    result = detector.detect(photo(name))
    assert all(d.confidence >= detect.CANDIDATE_FLOOR for d in result.candidates)
    assert all(d.confidence >= detector.threshold for d in result.detections)
    assert set(result.detections) <= set(result.candidates)
    assert [d for d in result.candidates if d.confidence >= detector.threshold] == result.detections
    assert result.fingerprint == detector.fingerprint()  # what POST /images caches detections by
    assert result.above(0) == result.candidates and len(result.above(0.3)) <= len(result.candidates)


def test_the_default_cap_is_20(detector, photo):
    result = detector.detect(photo("pets.jpg"))
    box = detect.Box(0.1, 0.1, 0.5, 0.5)
    result.candidates = [detect.Detection("dog", round(0.9 - i * 0.01, 4), box) for i in range(30)]
    most = settings_mod.load([], {}).vision_max_predictions
    found = vision.predictions(result, 0.0, most)
    assert most == 20 and len(found) == 20 and found[0]["confidence"] == 0.9


@pytest.mark.parametrize("value", ["abc", "1.5", "-0.1", "nan", "0,5"])
def test_a_bad_min_confidence_is_400(service, photo, value):
    assert "min_confidence" in assert_deepstack_error(
        post(service, "/v1/vision/detection", photo("pets.jpg"), 400, min_confidence=value), 400
    )


# --------------------------------------------------------------------------------------------------------
# Boxes on the pixel grid as sent
# --------------------------------------------------------------------------------------------------------

# imaging shows the sent grid upright with imaging._ORIENTATION[o]; a sent image is made from an upright
# one with the inverse transpose.
_INVERSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def _sent_box(upright_size, box, orientation):
    """Where the pixel box (x0, y0, x1, y1) of the upright picture lies in the sent grid: drawn, transposed, found."""
    mask = Image.new("L", upright_size, 0)
    mask.paste(255, box)
    return mask.transpose(_INVERSE[orientation]).getbbox()


@pytest.mark.parametrize("orientation", range(2, 9))
def test_box_as_sent_inverts_each_orientation(orientation):
    size, box = (200, 120), (20, 10, 90, 40)
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    sent = mask.transpose(_INVERSE[orientation])
    assert imaging._ORIENTATION[orientation] is not None
    assert sent.transpose(imaging._ORIENTATION[orientation]).getbbox() == box  # _INVERSE is the inverse
    normal = detect.Box(box[0] / size[0], box[1] / size[1], box[2] / size[0], box[3] / size[1])
    x0, y0, x1, y1 = vision.box_as_sent(normal, orientation)
    w, h = sent.size
    assert (round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)) == sent.getbbox()


def _with_orientation(photo_bytes: bytes, orientation: int) -> bytes:
    upright = Image.open(io.BytesIO(photo_bytes)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    upright.transpose(_INVERSE[orientation]).save(out, "JPEG", quality=95, exif=exif)
    return out.getvalue()


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_boxes_of_a_rotated_exif_photo_are_on_the_grid_as_sent(service, photo, orientation):
    data = photo("coupleanddog.jpeg")
    upright_size = Image.open(io.BytesIO(data)).size
    upright = post(service, "/v1/vision/detection", data).json["predictions"]
    rotated = _with_orientation(data, orientation)
    sent_size = Image.open(io.BytesIO(rotated)).size
    assert sent_size == (upright_size[::-1] if orientation in (6, 8) else upright_size)
    found = post(service, "/v1/vision/detection", rotated).json["predictions"]
    assert [p["label"] for p in found] == [p["label"] for p in upright]  # the model saw it upright
    tolerance = 0.04 * max(sent_size)
    for want, got in zip(upright, found, strict=True):
        expect = _sent_box(upright_size, (want["x_min"], want["y_min"], want["x_max"], want["y_max"]), orientation)
        box = (got["x_min"], got["y_min"], got["x_max"], got["y_max"])
        assert all(abs(a - b) <= tolerance for a, b in zip(box, expect, strict=True)), (box, expect)
        assert got["x_max"] <= sent_size[0] and got["y_max"] <= sent_size[1]


# --------------------------------------------------------------------------------------------------------
# Custom models
# --------------------------------------------------------------------------------------------------------


def test_custom_list_names_every_model_file(make_service, shelf_dir, tmp_path):
    (shelf_dir / "notes.txt").write_text("not a model")
    (shelf_dir / "list.tflite").write_bytes(b"reserved name")
    (shelf_dir / ".hidden.tflite").write_bytes(b"x")
    service = make_service(vision_models_dir=str(shelf_dir))
    res = service.client.post("/v1/vision/custom/list")
    assert_json_with_length(res)
    assert res.json == {"success": True, "models": ["back", "front", "side"]}
    empty = make_service(vision_models_dir=str(tmp_path / "no such folder"))
    assert empty.client.post("/v1/vision/custom/list").json == {"success": True, "models": []}


def test_custom_model_detects(make_service, shelf_dir, photo):
    service = make_service(vision_models_dir=str(shelf_dir))
    body = post(service, "/v1/vision/custom/front", photo("pets.jpg")).json
    assert set(body) == ANSWER_KEYS and body["predictions"][0]["label"] == "dog"
    assert service.parts.shelf.loaded() == ["front"]


def test_least_recently_used_models_are_unloaded(make_service, shelf_dir, photo, caplog):
    service = make_service(vision_models_dir=str(shelf_dir))  # VISION_MODELS_LOADED=2
    shelf, data = service.parts.shelf, photo("pets.jpg")
    with caplog.at_level(logging.INFO, logger="detect"):
        for name in ("front", "back", "front", "side", "front", "back"):
            post(service, f"/v1/vision/custom/{name}", data)
    loads = [r.getMessage() for r in caplog.records if r.name == "detect" and r.getMessage().startswith("loaded ")]
    # front, back; front is used again; side unloads back; front stays; back unloads side.
    assert [os.path.basename(m.split()[1]) for m in loads] == ["front.tflite", "back.tflite", "side.tflite", "back.tflite"]
    assert shelf.loads == 4 and shelf.loaded() == ["front", "back"]


def test_a_model_unloaded_while_in_use_finishes_its_detection(make_service, shelf_dir, photo):
    service = make_service(vision_models_dir=str(shelf_dir), vision_models_loaded=1)
    shelf, data = service.parts.shelf, photo("pets.jpg")
    with shelf.use("front") as front:
        post(service, "/v1/vision/custom/back", data)  # unloads front, which is still in use here
        assert shelf.loaded() == ["back"]
        assert front.detect(data).detections[0].label == "dog"
        assert front._model is not None
    assert front._model is None  # closed once its last user left
    assert post(service, "/v1/vision/custom/front", data).json["predictions"][0]["label"] == "dog"


def test_the_service_model_on_the_shelf_is_not_loaded_twice(make_service, tmp_path, model_path, photo, detector):
    folder = tmp_path / "shelf"
    folder.mkdir()
    os.symlink(model_path, folder / "main.tflite")
    service = make_service(vision_models_dir=str(folder))
    with service.parts.shelf.use("main") as used:
        assert used is detector
    post(service, "/v1/vision/custom/main", photo("pets.jpg"))
    assert service.parts.shelf.loads == 0


@pytest.mark.parametrize("path", [
    "/v1/vision/custom/nope", "/v1/vision/custom/..", "/v1/vision/custom/..%2Foutside", "/v1/vision/custom/%2Fetc%2Fpasswd",
    "/v1/vision/custom//etc/passwd", "/v1/vision/custom/front.tflite", "/v1/vision/custom/../outside",
])
def test_unknown_and_path_like_names_are_404(make_service, shelf_dir, photo, path):
    (shelf_dir.parent / "outside.tflite").symlink_to(shelf_dir / "front.tflite")
    service = make_service(vision_models_dir=str(shelf_dir))
    body, kind = multipart(("image", photo("pets.jpg"), "a.jpg", None))
    res = service.client.post(path, body, {"Content-Type": kind}, status="*")
    assert_deepstack_error(res, 404)
    assert service.parts.shelf.loads == 0


def test_a_file_that_is_not_a_model_is_400(make_service, shelf_dir, photo, caplog):
    (shelf_dir / "broken.tflite").write_bytes(b"this is not a flatbuffer" * 100)
    service = make_service(vision_models_dir=str(shelf_dir))
    with caplog.at_level(logging.WARNING, logger="vision"):
        for _ in range(3):
            error = assert_deepstack_error(post(service, "/v1/vision/custom/broken", photo("pets.jpg"), 400), 400)
    assert "broken" in error and str(shelf_dir) not in error  # where it lives is nobody else's business
    assert len([r for r in caplog.records if r.name == "vision"]) == 1  # not loaded again on each request
    assert post(service, "/v1/vision/custom/front", photo("pets.jpg")).status_int == 200


# --------------------------------------------------------------------------------------------------------
# Refusals, in DeepStack's shape
# --------------------------------------------------------------------------------------------------------


def test_no_image_or_not_an_image_is_400(service, photo):
    assert "image" in assert_deepstack_error(post(service, "/v1/vision/detection", None, 400, min_confidence="0.5"), 400)
    assert_deepstack_error(post(service, "/v1/vision/detection", b"not a picture at all", 400), 400)
    assert_deepstack_error(post(service, "/v1/vision/detection", photo("pets.jpg")[:2000], 400), 400)  # truncated
    assert_deepstack_error(post(service, "/v1/vision/detection", b"", 400), 400)
    res = service.client.post("/v1/vision/detection", b"raw bytes", {"Content-Type": "image/jpeg"}, status=400)
    assert_deepstack_error(res, 400)
    assert_deepstack_error(service.client.post_json("/v1/vision/detection", {"image": "x"}, status=400), 400)
    assert service.counts() == (0, 0)


@pytest.mark.parametrize("path", ["/v1/vision/face", "/v1/vision/face/recognize", "/v1/vision/scene", "/v1/vision/", "/v1/vision"])
def test_every_other_vision_route_is_404(service, photo, path):
    assert_deepstack_error(post(service, path, photo("pets.jpg"), 404), 404)


def test_a_wrong_method_is_405_in_deepstack_shape(service):
    res = service.client.get("/v1/vision/detection", status=405)
    assert_deepstack_error(res, 405)
    assert "POST" in res.headers["Allow"]


def test_too_large_is_413(make_service, photo, model_path):
    service = make_service(max_image_bytes=10_000)
    assert "MAX_IMAGE_BYTES" in assert_deepstack_error(post(service, "/v1/vision/detection", photo("pets.jpg"), 413), 413)
    big = Image.new("RGB", (4000, 3000))
    out = io.BytesIO()
    big.save(out, "PNG")
    small = detect.Detector(model_path, threads=1, pool=1, max_pixels=1_000_000)  # as build_parts makes it from MAX_PIXELS
    pixels = make_service(detector=small, max_pixels=1_000_000)
    assert "pixels" in assert_deepstack_error(post(pixels, "/v1/vision/detection", out.getvalue(), 413), 413)


def test_busy_is_503_with_retry_after(make_service, photo):
    service = make_service(detect_queue=0, admission_wait_ms=0)
    gate = service.parts.ingest.detections
    held = [gate.enter() for _ in range(gate.places)]
    for place in held:
        place.__enter__()
    try:
        res = post(service, "/v1/vision/detection", photo("pets.jpg"), 503)
        assert "DETECT_QUEUE" in assert_deepstack_error(res, 503)
        assert int(res.headers["Retry-After"]) >= 1
    finally:
        for place in held:
            place.__exit__(None, None, None)
    assert post(service, "/v1/vision/detection", photo("pets.jpg")).status_int == 200


def test_no_model_is_503_with_retry_after(make_service, tmp_path, photo):
    service = make_service(detector=detect.Detector(str(tmp_path / "absent.tflite"), pool=1, threads=1))
    res = post(service, "/v1/vision/detection", photo("pets.jpg"), 503)
    assert "model" in assert_deepstack_error(res, 503)
    assert res.headers["Retry-After"] == str(server.MODEL_RETRY_AFTER)


KEY = "vision-test-key-123"


def test_the_key_as_form_field_header_or_missing(make_service, photo):
    service = make_service(api_key=KEY)
    data = photo("pets.jpg")
    assert "API_KEY" in assert_deepstack_error(post(service, "/v1/vision/detection", data, 401), 401)
    assert_deepstack_error(post(service, "/v1/vision/detection", data, 401, api_key="wrong-key-456"), 401)
    assert_deepstack_error(post(service, "/v1/vision/detection", data, 401, api_key=""), 401)
    assert post(service, "/v1/vision/detection", data, api_key=KEY).json["success"] is True
    assert post(service, "/v1/vision/detection", data, headers={"X-API-Key": KEY}, api_key="").json["success"] is True
    res = service.client.post("/v1/vision/custom/list", status=401)
    assert_deepstack_error(res, 401)
    body, kind = multipart(("api_key", KEY, None, None))
    assert service.client.post("/v1/vision/custom/list", body, {"Content-Type": kind}).json["success"] is True
    # A wrong header key is not rescued by a right form field: the header was the client's answer.
    assert_deepstack_error(post(service, "/v1/vision/detection", data, 401, headers={"X-API-Key": "nope-nope"}, api_key=KEY), 401)


def test_wrong_form_keys_count_towards_auth_failures(make_service, photo):
    service = make_service(api_key=KEY, auth_failures=2)
    data = photo("pets.jpg")
    for _ in range(2):
        assert_deepstack_error(post(service, "/v1/vision/detection", data, 401, api_key="wrong-key-456"), 401)
    res = post(service, "/v1/vision/detection", data, 429, api_key=KEY)
    assert_deepstack_error(res, 429)
    assert int(res.headers["Retry-After"]) >= 1


def test_lan_refusals_take_deepstack_shape(service, photo):
    browser = {"User-Agent": "Mozilla/5.0", "Host": "rebind.attacker.example"}
    assert_deepstack_error(post(service, "/v1/vision/detection", photo("pets.jpg"), 421, headers=browser), 421)
    cross = {"Origin": "https://evil.example"}
    assert_deepstack_error(post(service, "/v1/vision/detection", photo("pets.jpg"), 403, headers=cross), 403)
    # Elsewhere the same refusal stays problem+json.
    res = service.client.post("/images", b"{}", {"Origin": "https://evil.example", "Content-Type": "application/json"}, status=403)
    assert res.content_type == "application/problem+json"


# --------------------------------------------------------------------------------------------------------
# Storing (VISION_STORE)
# --------------------------------------------------------------------------------------------------------


def test_nothing_is_stored_by_default(service, photo):
    post(service, "/v1/vision/detection", photo("pets.jpg"))
    assert service.counts() == (0, 0)


@pytest.mark.both_backends  # vision frames pruned under an advisory lock on PostgreSQL
def test_vision_store_stores_as_post_images_would(make_service, photo, detector):
    service = make_service(vision_store=True)
    data = photo("coupleanddog.jpeg")
    low = post(service, "/v1/vision/detection", data, min_confidence="0.1").json["predictions"]
    assert min(p["confidence"] for p in low) < 0.5
    (stored,) = service.client.get("/images").json
    want = detector.detect(data).detections  # at DETECT_THRESHOLD, as POST /images
    assert [d["label"] for d in stored["detections"]] == [d.label for d in want]
    assert all(d["confidence"] >= 0.5 for d in stored["detections"])
    assert stored["label_generated"] is True and "dog" in stored["label"] and stored["detection_enabled"] is True
    assert service.client.get("/images/%d/file" % stored["id"]).body == data
    assert [i["id"] for i in service.client.get("/images?objects=dog").json] == [stored["id"]]
    # The same bytes sent to POST /images reuse those detections (same model and threshold).
    again = service.client.post_json("/images", {"image": _b64(data), "detect": True}).json
    assert again["detections"] == stored["detections"]


@pytest.mark.both_backends  # vision frames pruned under an advisory lock on PostgreSQL
def test_vision_store_max_keeps_the_newest_frames_across_restarts(make_service, photo):
    service = make_service(vision_store=True, vision_store_max=2)
    mine = service.client.post_json("/images", {"image": _b64(photo("bird.bmp"))}).json["id"]
    for name in ("pets.jpg", "cat.bmp", "pets.jpg", "coupleanddog.jpeg"):
        post(service, "/v1/vision/detection", photo(name))
    ids = [i["id"] for i in service.client.get("/images").json]
    assert len(ids) == 3 and mine in ids  # two frames and the image POST /images stored
    with service.store.connection():
        frames = service.store.vision_frames()
        assert len(frames) == 2 and mine not in frames
        assert service.store.count()[1] == 3  # bytes of the deleted frames went too (pets.jpg twice, one blob)
    # A new Store on the same file (a restart) still knows which images are frames.
    reopened = store.Store(service.settings.db)
    try:
        with reopened.connection():
            assert reopened.vision_frames() == frames
    finally:
        reopened.shutdown()
    post(service, "/v1/vision/detection", photo("table.jpg"))
    with service.store.connection():
        assert service.store.vision_frames()[1:] == frames[:1]


def test_a_failed_store_still_answers_200_and_logs_once(make_service, photo, caplog):
    service = make_service(vision_store=True, min_free_disk_mb=10**9)  # below the disk floor: 507 for POST /images
    with caplog.at_level(logging.WARNING, logger="server"):
        for _ in range(3):
            assert post(service, "/v1/vision/detection", photo("pets.jpg")).json["predictions"][0]["label"] == "dog"
    warnings = [r.getMessage() for r in caplog.records if "VISION_STORE" in r.getMessage()]
    assert len(warnings) == 1 and "MIN_FREE_DISK_MB" in warnings[0]
    assert service.counts() == (0, 0)


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


# --------------------------------------------------------------------------------------------------------
# The real process: what waitress and the channel answer before the app runs
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory, model_path):
    tmp = tmp_path_factory.mktemp("vision")
    env = {"BODY_BUFFER_MB": "1", "BODY_TIMEOUT": "1", "MAX_IMAGE_BYTES": str(2 * 1024 * 1024)}
    proc, base, _ = start_server(tmp, "--model", model_path, env=env)
    host, port = base.removeprefix("http://").split(":")
    try:
        yield host, int(port)
    finally:
        stop_server(proc)


def _raw(address, head: bytes, body: bytes = b"", timeout: float = 15):
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(head + body)
        res = http.client.HTTPResponse(sock, method="POST")
        res.begin()
        data = res.read()
        return res.status, dict(res.getheaders()), data


def _head(path: str, length: int, kind: str = f"multipart/form-data; boundary={BOUNDARY}") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {kind}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def _assert_raw_error(status, headers, data, code) -> dict:
    assert status == code, data[:300]
    assert headers["Content-Type"] == "application/json" and int(headers["Content-Length"]) == len(data)
    body = json.loads(data)
    assert set(body) == DEEPSTACK_ERROR_KEYS and body["code"] == code and body["success"] is False
    return body


def test_real_process_answers_json_with_a_content_length(real, photo):
    body, _ = multipart(("image", photo("pets.jpg"), "image", None), ("api_key", "", None, None))
    status, headers, data = _raw(real, _head("/v1/vision/detection", len(body)), body)
    assert status == 200 and int(headers["Content-Length"]) == len(data) and "Transfer-Encoding" not in headers
    assert json.loads(data)["predictions"][0]["label"] == "dog"
    _assert_raw_error(*_raw(real, _head("/v1/vision/scene", len(body)), body), 404)


def test_waitress_own_413_is_deepstack_json(real):
    # Past the largest body accepted (MAX_IMAGE_BYTES as base64 plus 64 KB): waitress refuses from the headers.
    body = _assert_raw_error(*_raw(real, _head("/v1/vision/detection", 3_000_000 * 2)), 413)
    assert "MAX_IMAGE_BYTES" in body["error"]


def test_the_body_budget_refusal_is_deepstack_json(real):
    # Under the body limit but over BODY_BUFFER_MB (1 MB).
    body = _assert_raw_error(*_raw(real, _head("/v1/vision/detection", 1_500_000)), 413)
    assert "BODY_BUFFER_MB" in body["error"]


def test_a_body_past_its_deadline_is_a_deepstack_408(real):
    status, headers, data = _raw(real, _head("/v1/vision/detection", 5000), b"--" + BOUNDARY.encode())
    body = _assert_raw_error(status, headers, data, 408)
    assert "BODY_TIMEOUT" in body["error"]


@pytest.mark.both_backends  # vision frames pruned under an advisory lock on PostgreSQL
def test_a_pruned_frame_takes_its_thumbnails_with_its_bytes(make_service, photo):
    service = make_service(vision_store=True, vision_store_max=1)
    post(service, "/v1/vision/detection", photo("pets.jpg"))
    (first,) = service.client.get("/images").json
    assert service.client.get(first["thumbnail_url"]).status_int == 200
    with service.store.connection():
        assert service.store.thumbnail_count()[0] == 1
    post(service, "/v1/vision/detection", photo("cat.bmp"))  # pets.jpg's frame goes, and nothing else holds it
    with service.store.connection():
        assert service.store.thumbnail_count()[0] == 0 and service.store.count()[1] == 1
