"""Detecting stored images again (issue 15): the `model`, `model_name` and `threshold` of every image and
the migration that added `model_name` (schema 4); `POST /images/{id}/detect`; `python ingest.py redetect`.

The real model, database and app (make_service); the command line as a process on a real database file.
"""

import hashlib
import io
import os
import sqlite3
import subprocess
import sys
import threading

import pytest

import detect
import ingest
import server
import store
from helpers import assert_problem, b64

pytestmark = pytest.mark.both_backends

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
        db = service.store.database
        return db.execute_sql(f"SELECT COUNT(*) FROM detection WHERE image_id = {db.param}", [image_id]).fetchone()[0]


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


def test_a_version_3_database_migrates_to_the_current_version(tmp_path, photo):
    path = str(tmp_path / "v3.db")
    data = photo("pets.jpg")
    make_v3(path, data)
    s = store.Store(path)
    try:
        with s.connection():
            assert s.schema_version == store.SCHEMA_VERSION == 5
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
    s = store.Store(path)  # reopening a migrated file changes nothing
    try:
        with s.connection():
            assert s.schema_version == 5 and s.get(2).model_name == "ssd" and s.get(1).model == "0123456789abcdef"
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
        detail = assert_problem(res, 503)
        assert "DETECT_QUEUE" in detail and int(res.headers["Retry-After"]) >= 1
        assert "detect=false" not in detail, detail  # POST /images's advice: there is no image to send here
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


@pytest.mark.sqlite_only  # MIN_FREE_DISK_MB is SQLite's: PostgreSQL's disk is the server's
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


# --------------------------------------------------------------------------------------------------------
# python ingest.py redetect
# --------------------------------------------------------------------------------------------------------


def child(*argv, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "ingest.py", "redetect", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "MIN_FREE_DISK_MB": "0", **(env or {})},
    )


def state(service) -> dict[int, tuple]:
    """What redetect may change, by image: label, detection_enabled, threshold, model_name, detections."""
    out = {}
    for img in service.client.get("/images").json:
        boxes = tuple((d["label"], d["confidence"]) for d in img["detections"])
        out[img["id"]] = (img["label"], img["detection_enabled"], img["threshold"], img["model_name"], boxes)
    return out


def test_the_modes_of_the_command(make_service, photo, model_path):
    service = make_service()
    a = add(service, photo("pets.jpg"), detect_=True)["id"]  # detected at DETECT_THRESHOLD: up to date
    b = add(service, photo("cat.bmp"))["id"]  # never analysed
    c = add(service, photo("table.jpg"), detect_=True)["id"]
    service.client.post_json(f"/images/{c}/detect", {"threshold": 0.4})  # detected at another threshold: stale
    d = add(service, photo("kite_and_cold.jpg"), label="the beach")["id"]  # never analysed, a user's label
    db = ["--db", service.settings.db, "--model", model_path]

    before = state(service)
    run = child(*db)  # --stale is the default
    assert run.returncode == 0, run.stderr
    assert "1 re-detected, 0 skipped, 0 failed" in run.stdout
    after = state(service)
    assert after[c][2] == 0.5 and after[c][4] != before[c][4]
    assert {k: after[k] for k in (a, b, d)} == {k: before[k] for k in (a, b, d)}

    run = child("--undetected", *db)
    assert run.returncode == 0 and "2 re-detected" in run.stdout, run.stderr
    now = state(service)
    assert now[b][:3] == ("cat", True, 0.5) and now[b][3] == detect.Detector(model_path).model_name
    assert now[d][:3] == ("the beach", True, 0.5) and "kite" in {label for label, _ in now[d][4]}
    assert {k: now[k] for k in (a, c)} == {k: after[k] for k in (a, c)}

    run = child("--all", "--threshold", "0.3", *db)
    assert run.returncode == 0 and "4 re-detected" in run.stdout, run.stderr
    low = state(service)
    assert {v[2] for v in low.values()} == {0.3}
    assert low[a][0] == "3 dogs" and low[d][0] == "the beach"

    run = child("--objects", "dogs", *db)  # stale (0.3 is not 0.5) and holding a dog, in the words of a search
    assert run.returncode == 0 and "1 re-detected" in run.stdout, run.stderr
    last = state(service)
    assert last[a][:3] == ("2 dogs", True, 0.5)
    assert {k: last[k] for k in (b, c, d)} == {k: low[k] for k in (b, c, d)}
    run = child("--all", "--objects", "animal,person", "--dry-run", *db)  # cat, dogs, the kite's people
    assert run.returncode == 0 and "3 image(s)" in run.stdout, run.stderr


def test_a_dry_run_writes_nothing_not_even_a_migration(tmp_path, photo, model_path):
    path = str(tmp_path / "v3.db")
    make_v3(path, photo("pets.jpg"))
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    for which, n in (("--stale", 1), ("--undetected", 1), ("--all", 2)):
        run = child(which, "--dry-run", "--db", path, "--model", model_path)
        assert run.returncode == 0, run.stderr
        assert "nothing is written" in run.stdout and f" {n} image(s)" in run.stdout
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == digest
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM setting WHERE key = 'schema_version'").fetchone() == ("3",)
    assert conn.execute("SELECT COUNT(*) FROM detection").fetchone() == (1,)
    conn.close()
    run = child("--dry-run", "--db", str(tmp_path / "none.db"), "--model", model_path)
    assert run.returncode == 0 and "0 image(s)" in run.stdout and not (tmp_path / "none.db").exists()


def test_an_image_deleted_meanwhile_is_skipped_and_counted(make_service, photo, model_path):
    """One worker, so the first detection is the first image's: the detector's `observe` hook (called once the
    model has run) deletes that image before its write, which then finds it gone."""
    service = make_service()
    ids = [add(service, photo(name))["id"] for name in ("pets.jpg", "cat.bmp", "table.jpg")]
    deleted = []

    def delete_first(name, timings):
        if not deleted:
            with service.store.connection():
                service.store.delete(ids[0])
            deleted.append(ids[0])

    pipeline = ingest.Ingest(
        images=service.store, detector=detect.Detector(model_path, threads=1, pool=1, observe=delete_first),
        fetcher=service.fetcher,
    )
    out = io.StringIO()
    with ingest.Progress(3, "redetect", unit="image", stream=out, tty=False, words={"added": "re-detected"}) as progress:
        redetector = ingest.Redetector(pipeline, progress, threshold=0.5, workers=1)
        fp = pipeline.detector.fingerprint(0.5)
        with service.store.connection():
            until = service.store.last_id()
        redetector.run(redetector.ids("undetected", fp, (), until))
    assert progress.counts == {"added": 2, "skipped": 1}
    assert progress.reasons == {("skipped", "deleted meanwhile"): 1}
    assert "1 skipped (deleted meanwhile: 1)" in progress.summary()
    service.client.get(f"/images/{ids[0]}", status=404)
    assert detection_rows(service, ids[0]) == 0
    assert all(service.client.get(f"/images/{i}").json["detection_enabled"] for i in ids[1:])


def test_an_image_that_fails_is_counted_and_the_exit_status_is_1(make_service, photo, model_path):
    service = make_service()
    small = add(service, photo("pets.jpg"))["id"]  # 512 x 430
    large = add(service, photo("cat_1080p.jpg"))["id"]  # 1920 x 1080, over the MAX_PIXELS set below
    run = child("--undetected", "--db", service.settings.db, "--model", model_path, env={"MAX_PIXELS": "1000000"})
    assert run.returncode == 1, run.stderr
    assert "1 re-detected, 0 skipped, 1 failed" in run.stdout and f"failed image {large}" in run.stderr
    assert service.client.get(f"/images/{small}").json["detection_enabled"] is True
    assert service.client.get(f"/images/{large}").json["detection_enabled"] is False


@pytest.mark.parametrize("argv, words", [
    (["--threshold", "0.01"], "0.05 to 1"),
    (["--threshold", "high"], "0.05 to 1"),
    (["--undetected", "--objects", "dog"], "--objects goes with --stale or --all"),
    (["--stale", "--all"], "not allowed with argument"),
])
def test_usage_errors_exit_2(tmp_path, model_path, argv, words):
    run = child(*argv, "--db", str(tmp_path / "a.db"), "--model", model_path)
    assert run.returncode == 2 and words in run.stderr
    assert not (tmp_path / "a.db").exists()


def test_without_a_model_it_says_so_and_exits_2(make_service, photo, tmp_path):
    service = make_service()
    img = add(service, photo("pets.jpg"))
    run = child("--undetected", "--db", service.settings.db, "--model", str(tmp_path / "none.tflite"))
    assert run.returncode == 2 and "no detection model" in run.stderr
    assert service.client.get(f"/images/{img['id']}").json == img


def test_sigterm_finishes_the_images_under_way_and_keeps_them(new_db, photo, model_path):
    """Stopped after its first image (a progress line for each: --log-every 0), it says so, exits 143, and the
    images its summary counts as re-detected are exactly those stored with detection."""
    path = new_db()
    data = photo("pets.jpg")
    sha = hashlib.sha256(data).hexdigest()
    s = store.Store(path)
    s.add_many(store.NewImage(data, sha, "image/jpeg", 512, 430, f"untitled {sha[:8]}", True, False) for _ in range(400))
    s.shutdown()
    proc = subprocess.Popen(
        [sys.executable, "ingest.py", "redetect", "--undetected", "--db", path, "--model", model_path, "--log-every", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "MIN_FREE_DISK_MB": "0"},
    )
    try:
        for line in proc.stderr:
            if "1/400 images" in line:
                break
        proc.send_signal(15)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "interrupted" in out
    done = int(out.split(" re-detected")[0].rsplit(" ", 1)[1])
    s = store.Store(path)
    try:
        with s.connection():
            stored = s.database.execute_sql("SELECT COUNT(*) FROM image WHERE detection_enabled").fetchone()[0]
            labels = {row[0] for row in s.database.execute_sql("SELECT label FROM image WHERE detection_enabled")}
    finally:
        s.shutdown()
    assert 1 <= done < 400 and stored == done and labels == {"2 dogs"}
