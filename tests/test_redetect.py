"""Detecting stored images again (issue 15): the `model`, `model_name` and `threshold` of every image and
the migration that added `model_name` (schema 4); `POST /images/{id}/detect`; `python ingest.py redetect`.

The real model, database and app (make_service); the command line as a process on a real database file.
"""

import hashlib
import os
import sqlite3
import threading

import pytest

import detect
import server
import store
from helpers import assert_problem, b64

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add(service, data, *, detect_=False, label=None, filename=None):
    body = {"image": b64(data), "detect": detect_}
    if label is not None:
        body["label"] = label
    if filename is not None:
        body["filename"] = filename
    return service.client.post_json("/images", body).json


def detection_rows(service, image_id: int) -> int:
    with service.store.connection():
        return service.store.database.execute_sql("SELECT COUNT(*) FROM detection WHERE image_id = ?", [image_id]).fetchone()[0]


# --------------------------------------------------------------------------------------------------------
# model, model_name, threshold
# --------------------------------------------------------------------------------------------------------


def test_an_image_never_detected_has_null_model_fields(service, photo):
    img = add(service, photo("pets.jpg"))
    assert (img["model"], img["model_name"], img["threshold"]) == (None, None, None)
    assert service.client.get(f"/images/{img['id']}").json["model"] is None


def test_a_detected_image_says_what_produced_its_detections(service, photo, detector):
    img = add(service, photo("pets.jpg"), detect_=True)
    with open(detector.model_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert img["model"] == digest[:16]
    assert img["model_name"] == os.path.splitext(os.path.basename(detector.model_path))[0]
    assert img["threshold"] == detector.threshold == 0.5
    assert service.client.get(f"/images/{img['id']}").json == img
    assert service.client.get("/images").json == [img]
    again = add(service, photo("pets.jpg"), detect_=True)  # detections reused from the first: the same fields
    assert (again["model"], again["model_name"], again["threshold"]) == (img["model"], img["model_name"], 0.5)


V3_SCHEMA = """
CREATE TABLE "setting" ("key" TEXT NOT NULL PRIMARY KEY, "value" TEXT NOT NULL);
CREATE TABLE "blob" ("sha256" CHAR(64) NOT NULL PRIMARY KEY, "data" BLOB NOT NULL);
CREATE TABLE "image" ("id" INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, "sha256" CHAR(64) NOT NULL,
  "label" TEXT NOT NULL, "label_generated" INTEGER NOT NULL, "detection_enabled" INTEGER NOT NULL,
  "detected_with" TEXT, "content_type" TEXT NOT NULL, "size" INTEGER NOT NULL, "width" INTEGER NOT NULL,
  "height" INTEGER NOT NULL, "source_url" TEXT, "created_ms" INTEGER NOT NULL, "filename" TEXT);
CREATE INDEX "image_sha256" ON "image" ("sha256");
CREATE TABLE "detection" ("id" INTEGER NOT NULL PRIMARY KEY, "image_id" INTEGER NOT NULL, "name" TEXT NOT NULL,
  "label" TEXT NOT NULL, "confidence" REAL NOT NULL, "x_min" REAL NOT NULL, "y_min" REAL NOT NULL,
  "x_max" REAL NOT NULL, "y_max" REAL NOT NULL, FOREIGN KEY ("image_id") REFERENCES "image" ("id") ON DELETE CASCADE);
CREATE INDEX "detection_image_id_confidence" ON "detection" ("image_id", "confidence");
CREATE INDEX "detection_name_image_id_confidence" ON "detection" ("name", "image_id", "confidence");
CREATE TABLE "thumbnail" ("sha256" CHAR(64) NOT NULL, "size" INTEGER NOT NULL, "format" TEXT NOT NULL,
  "data" BLOB NOT NULL, "width" INTEGER NOT NULL, "height" INTEGER NOT NULL, "created_ms" INTEGER NOT NULL,
  PRIMARY KEY ("sha256", "size", "format"));
CREATE TABLE "visionframe" ("image_id" INTEGER NOT NULL PRIMARY KEY,
  FOREIGN KEY ("image_id") REFERENCES "image" ("id") ON DELETE CASCADE);
INSERT INTO setting VALUES ('schema_version', '3');
"""


def make_v3(path: str, data: bytes) -> None:
    """The tables as version 3 wrote them (store.py at 8df96d9): one image detected, one not."""
    conn = sqlite3.connect(path)
    conn.executescript(V3_SCHEMA)
    sha = hashlib.sha256(data).hexdigest()
    conn.execute("INSERT INTO blob VALUES (?, ?)", (sha, data))
    for label, detected_with in (("detected", "0123456789abcdef@0.45"), ("never", None)):
        conn.execute("INSERT INTO image (sha256, label, label_generated, detection_enabled, detected_with, content_type, "
                     "size, width, height, created_ms, filename) VALUES (?, ?, 0, ?, ?, 'image/jpeg', ?, 512, 430, 1, 'pets.jpg')",
                     (sha, label, detected_with is not None, detected_with, len(data)))
    conn.execute("INSERT INTO detection (image_id, name, label, confidence, x_min, y_min, x_max, y_max) "
                 "VALUES (1, 'dog', 'dog', 0.9, 0.1, 0.1, 0.5, 0.5)")
    conn.commit()
    conn.close()


def test_a_version_3_database_migrates_to_4(tmp_path, photo):
    path = str(tmp_path / "v3.db")
    data = photo("pets.jpg")
    make_v3(path, data)
    s = store.Store(path)
    try:
        with s.connection():
            assert s.schema_version == store.SCHEMA_VERSION == 4
            detected, never = s.get(1), s.get(2)
            shown = server.image_json(detected)
            assert (shown["model"], shown["model_name"], shown["threshold"]) == ("0123456789abcdef", None, 0.45)
            assert shown["objects"] == ["dog"] and shown["label"] == "detected"
            shown = server.image_json(never)
            assert (shown["model"], shown["model_name"], shown["threshold"]) == (None, None, None)
            # The migrated table takes the new column: a replace writes the name.
            rec = s.replace_detections(2, [store.Found("cat", 0.7, 0, 0, 1, 1)], "fedcba9876543210@0.5", "ssd")
            assert (rec.model, rec.model_name, rec.threshold, rec.objects) == ("fedcba9876543210", "ssd", 0.5, ["cat"])
            assert s.database.execute_sql("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        s.shutdown()
    s = store.Store(path)  # reopening a version 4 file changes nothing
    try:
        with s.connection():
            assert s.schema_version == 4 and s.get(2).model_name == "ssd" and s.get(1).model == "0123456789abcdef"
    finally:
        s.shutdown()


# --------------------------------------------------------------------------------------------------------
# POST /images/{id}/detect
# --------------------------------------------------------------------------------------------------------


def test_detect_analyses_an_image_stored_with_detection_off(service, photo, detector):
    img = add(service, photo("pets.jpg"), filename="pets.jpg")
    assert not img["detection_enabled"] and img["detections"] == [] and img["label"] == "pets"
    res = service.client.post(f"/images/{img['id']}/detect")
    new = res.json
    assert res.status_int == 200 and res.content_type == "application/json"
    assert new["detection_enabled"] is True and new["objects"] == ["dog"] and len(new["detections"]) == 2
    assert new["label"] == "2 dogs" and new["label_generated"] is True  # the generated label follows the detections
    assert new["model"] == detector.fingerprint().partition("@")[0] and new["threshold"] == 0.5
    assert new["model_name"] == detector.model_name
    assert {k: v for k, v in new.items() if k not in ("detections", "objects", "label", "detection_enabled", "model",
                                                      "model_name", "threshold")} == \
        {k: v for k, v in img.items() if k not in ("detections", "objects", "label", "detection_enabled", "model",
                                                   "model_name", "threshold")}
    assert service.client.get(f"/images/{img['id']}").json == new  # stored, not only answered
    assert service.client.get("/images?objects=dog").json == [new]
    assert service.client.get("/objects").json == [{"name": "dog", "images": 1}]


def test_a_threshold_replaces_the_detections_and_is_recorded(service, photo):
    img = add(service, photo("pets.jpg"), detect_=True)
    assert len(img["detections"]) == 2 and img["label"] == "2 dogs"
    low = service.client.post_json(f"/images/{img['id']}/detect", {"threshold": 0.3}).json
    assert low["threshold"] == 0.3 and len(low["detections"]) == 3 and low["label"] == "3 dogs"
    assert min(d["confidence"] for d in low["detections"]) >= 0.3
    assert detection_rows(service, img["id"]) == 3  # replaced, not added to
    high = service.client.post_json(f"/images/{img['id']}/detect", {"threshold": 0.8}).json
    assert high["threshold"] == 0.8 and len(high["detections"]) == 1 and high["label"] == "dog"
    assert detection_rows(service, img["id"]) == 1


def test_a_users_label_is_kept(service, photo):
    img = add(service, photo("pets.jpg"), label="Rex and Fido")
    new = service.client.post(f"/images/{img['id']}/detect").json
    assert new["label"] == "Rex and Fido" and new["label_generated"] is False and new["objects"] == ["dog"]


def test_nothing_found_gives_a_label_from_the_file_name(service, photo):
    img = add(service, photo("table.jpg"), detect_=True, filename="kitchen.jpg")
    assert img["detections"] == [] and img["label"] == "kitchen"
    found = service.client.post_json(f"/images/{img['id']}/detect", {"threshold": 0.4}).json
    assert "cup" in found["objects"] and found["label"] != "kitchen"
    none = service.client.post_json(f"/images/{img['id']}/detect", {"threshold": 1}).json
    assert none["detections"] == [] and none["label"] == "kitchen" and none["threshold"] == 1


@pytest.mark.parametrize("threshold", [0.05, 1])
def test_the_threshold_bounds_are_accepted(service, photo, threshold):
    img = add(service, photo("pets.jpg"))
    new = service.client.post_json(f"/images/{img['id']}/detect", {"threshold": threshold}).json
    assert new["threshold"] == threshold
    assert all(d["confidence"] >= threshold for d in new["detections"])


@pytest.mark.parametrize("threshold", [0.04, 0, -1, 1.01, 2, "0.4", True, None, [0.4], 1e400])
def test_a_threshold_outside_the_bounds_is_400_and_changes_nothing(service, photo, threshold):
    img = add(service, photo("pets.jpg"))
    if threshold is None:  # null is the default, like a missing field
        assert service.client.post_json(f"/images/{img['id']}/detect", {"threshold": None}).json["threshold"] == 0.5
        return
    res = service.client.post_json(f"/images/{img['id']}/detect", {"threshold": threshold}, status=400)
    assert "0.05 to 1" in assert_problem(res, 400)
    assert service.client.get(f"/images/{img['id']}").json == img


@pytest.mark.parametrize("body, words", [
    ({"threshold": 0.4, "detect": True}, "unknown field(s) detect"),
    ({"treshold": 0.4}, "unknown field(s) treshold"),
    ([0.4], "must be a JSON object"),
])
def test_unknown_fields_and_other_bodies_are_400(service, photo, body, words):
    img = add(service, photo("pets.jpg"))
    res = service.client.post_json(f"/images/{img['id']}/detect", body, status=400)
    assert words in assert_problem(res, 400)
    assert service.client.get(f"/images/{img['id']}").json == img


def test_a_body_that_is_not_json_is_415_and_a_query_is_400(service, photo):
    img = add(service, photo("pets.jpg"))
    res = service.client.post(f"/images/{img['id']}/detect", b"threshold=0.4", content_type="application/x-www-form-urlencoded",
                              status=415)
    assert "application/json" in assert_problem(res, 415)
    assert "no query parameters" in assert_problem(service.client.post(f"/images/{img['id']}/detect?threshold=0.4", status=400), 400)
    assert service.client.get(f"/images/{img['id']}").json == img


def test_an_unknown_image_is_404(service):
    for path in ("/images/999/detect", "/images/nope/detect", "/images/0/detect"):
        assert_problem(service.client.post(path, status=404), 404)


def test_no_model_is_503_and_changes_nothing(make_service, photo, tmp_path):
    service = make_service(detector=detect.Detector(str(tmp_path / "none.tflite"), threads=1, pool=1))
    img = add(service, photo("pets.jpg"))
    assert "model" in assert_problem(service.client.post(f"/images/{img['id']}/detect", status=503), 503)
    assert service.client.get(f"/images/{img['id']}").json == img


def test_a_full_detection_queue_is_503_with_retry_after(make_service, photo):
    service = make_service(admission_wait_ms=0)
    img = add(service, photo("pets.jpg"))
    gate = service.parts.ingest.detections
    holds = [gate.enter() for _ in range(gate.places)]
    for hold in holds:
        hold.__enter__()
    try:
        res = service.client.post(f"/images/{img['id']}/detect", status=503)
        assert "DETECT_QUEUE" in assert_problem(res, 503) and int(res.headers["Retry-After"]) >= 1
    finally:
        for hold in holds:
            hold.__exit__(None, None, None)
    assert service.client.get(f"/images/{img['id']}").json == img
    assert service.client.post(f"/images/{img['id']}/detect").json["objects"] == ["dog"]  # and works once free


def test_detection_passes_the_decode_budget(make_service, photo):
    """While other decodes hold the service's decoding memory, the detection waits DECODE_WAIT_MS, then 503."""
    service = make_service(decode_wait_ms=50)
    img = add(service, photo("pets.jpg"))
    budget = service.parts.ingest.budget
    with budget.reserve(budget.limit - 1024):  # another decode holding nearly all of it
        res = service.client.post(f"/images/{img['id']}/detect", status=503)
    assert "DECODE_MEMORY_MB" in assert_problem(res, 503) and int(res.headers["Retry-After"]) >= 1
    assert service.client.get(f"/images/{img['id']}").json == img


def test_the_api_key_and_cross_site_rules_apply(make_service, photo):
    keyed = make_service(api_key="correct-horse-battery")
    key = {"X-API-Key": "correct-horse-battery"}
    img = keyed.client.post_json("/images", {"image": b64(photo("pets.jpg"))}, headers=key).json
    assert_problem(keyed.client.post(f"/images/{img['id']}/detect", status=401), 401)
    assert keyed.client.get(f"/images/{img['id']}", headers=key).json["detections"] == []
    assert keyed.client.post(f"/images/{img['id']}/detect", headers=key).json["objects"] == ["dog"]
    open_ = make_service()
    img = add(open_, photo("pets.jpg"))
    res = open_.client.post(f"/images/{img['id']}/detect", headers={"Host": "127.0.0.1:8080", "Origin": "http://evil.test"},
                            status=403)
    assert_problem(res, 403)
    assert open_.client.get(f"/images/{img['id']}").json == img


def test_the_cache_never_serves_detections_made_at_another_threshold(service, photo):
    """POST /images reuses detections stored for the same bytes by the same model and threshold: after a
    re-detection at 0.3 the image's detections are 0.3's, so new bytes at 0.5 must not take them."""
    data = photo("pets.jpg")
    first = add(service, data)
    service.client.post_json(f"/images/{first['id']}/detect", {"threshold": 0.3})
    second = add(service, data, detect_=True)
    assert second["threshold"] == 0.5 and len(second["detections"]) == 2
    service.client.post_json(f"/images/{first['id']}/detect", {"threshold": 0.5})
    with service.store.connection():
        fp = service.detector.fingerprint()
        assert len(service.store.cached_detections(hashlib.sha256(data).hexdigest(), fp)) == 2
        assert service.store.cached_detections(hashlib.sha256(data).hexdigest(), service.detector.fingerprint(0.3)) is None


def test_an_image_deleted_while_it_is_detected_is_not_resurrected(make_service, model_path, photo):
    """The detection is held inside the detector (its `observe` hook, called once the model has run) until
    the image is deleted; the write that follows must find it gone: 404, nothing written."""
    inside, go = threading.Event(), threading.Event()

    def hold(name, timings):
        inside.set()
        assert go.wait(30)

    service = make_service(detector=detect.Detector(model_path, threads=1, pool=1, observe=hold))
    data = photo("pets.jpg")
    img = add(service, data)
    answers = []
    worker = threading.Thread(target=lambda: answers.append(service.client.post(f"/images/{img['id']}/detect", status="*")))
    worker.start()
    try:
        assert inside.wait(30)
        service.client.delete(f"/images/{img['id']}", status=204)
    finally:
        go.set()
        worker.join(30)
    (res,) = answers
    assert "deleted" in assert_problem(res, 404)
    assert service.client.get(f"/images/{img['id']}", status=404)
    assert detection_rows(service, img["id"]) == 0 and service.counts() == (0, 0)


def test_a_failed_write_stores_nothing(make_service, photo):
    """Below the disk floor the replace is refused (507) and the old detections stay."""
    service = make_service()
    img = add(service, photo("pets.jpg"), detect_=True)
    service.store.min_free_mb = 10**9  # more than any disk has
    res = service.client.post_json(f"/images/{img['id']}/detect", {"threshold": 0.3}, status=507)
    assert "MIN_FREE_DISK_MB" in assert_problem(res, 507)
    service.store.min_free_mb = 0
    assert service.client.get(f"/images/{img['id']}").json == img and detection_rows(service, img["id"]) == 2


def test_ingest_redetect_directly(service, photo):
    """The pipeline's method, as the command line calls it: a NotFound for an id that is not there."""
    img = add(service, photo("cat.bmp"))
    rec = service.parts.ingest.redetect(img["id"], 0.3)
    assert rec.objects == ["cat", "chair", "couch"] and rec.threshold == 0.3 and rec.detection_enabled
    with pytest.raises(store.NotFound):
        service.parts.ingest.redetect(img["id"] + 1)
