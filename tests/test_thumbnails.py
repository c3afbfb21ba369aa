"""Thumbnails, annotated renders and file names (issue 14): the real app, model and SQLite file.

GET /images/{id}/thumbnail: sizes, no enlarging, EXIF orientation, WebP by Accept, caching headers, kept
in the database once made (not below the disk floor), gone with the bytes, purged on demand, made by
two requests at once, refused with 503 when the decode budget is taken. GET /images/{id}/annotated: its
ETag follows the detections. `filename` from each way in, and the schema migration that added it.
"""

from __future__ import annotations

import hashlib
import io
import sqlite3
import subprocess
import sys
import threading

import pytest
from PIL import Image
from test_decode import CASES as DECODE_CASES
from test_decode import MB, Recording, _peak_of
from test_server import ROOT

import imaging
import ingest
import store
from helpers import assert_problem, b64, jpeg, wait_for
from loopback import Loopback, ok

pytestmark = pytest.mark.both_backends

EVERY_DISK = 2**40  # MB: more than any disk has free
WEBP = {"Accept": "image/avif,image/webp,image/apng,image/*,*/*;q=0.8"}  # what Chromium sends for <img>


def upload(service, data: bytes, name: str = "photo.jpg", detect: bool = False) -> dict:
    fields = {"detect": "true" if detect else "false"}
    return service.client.post("/images", fields, upload_files=[("image", name, data)]).json


def picture(res) -> Image.Image:
    img = Image.open(io.BytesIO(res.body))
    img.load()
    return img


def kept(service) -> int:
    with service.store.connection():
        return service.store.thumbnail_count()[0]


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference per channel, 0..255, of two pictures of one size."""
    assert a.size == b.size
    pa, pb = a.convert("RGB").tobytes(), b.convert("RGB").tobytes()
    return sum(abs(x - y) for x, y in zip(pa, pb, strict=True)) / len(pa)


# --------------------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def big_photo(photo) -> bytes:
    """A 1920x1080 photo of the shared test data (a JPEG: draft decoding applies)."""
    data = photo("cat_1080p.jpg")
    assert Image.open(io.BytesIO(data)).size == (1920, 1080)
    return data


@pytest.mark.parametrize("size, expect", [(None, (320, 180)), (160, (160, 90)), (320, (320, 180)),
                                          (640, (640, 360)), (1280, (1280, 720))])
def test_each_size_is_the_longest_side(service, big_photo, size, expect):
    image = upload(service, big_photo)
    assert image["thumbnail_url"] == f"/images/{image['id']}/thumbnail"
    res = service.client.get(image["thumbnail_url"] + ("" if size is None else f"?size={size}"))
    assert res.content_type == "image/jpeg"
    thumb = picture(res)
    assert thumb.format == "JPEG" and thumb.size == expect
    # The right picture, not just the right size: close to the original scaled down.
    original = Image.open(io.BytesIO(big_photo)).convert("RGB").resize(expect, Image.Resampling.LANCZOS)
    assert mean_difference(thumb, original) < 6


@pytest.mark.parametrize("size", ["0", "100", "321", "2560", "320px", "", "-320", "0320", "3.2e2"])
def test_any_other_size_is_a_400_naming_the_sizes(service, size):
    image = upload(service, jpeg())
    for route in ("thumbnail", "annotated"):
        res = service.client.get(f"/images/{image['id']}/{route}?size={size}", status=400)
        assert "160, 320, 640 or 1280" in assert_problem(res, 400)


def test_a_smaller_picture_comes_at_its_own_size_whatever_the_size_asked(service, photo):
    image = upload(service, photo("pets.jpg"))  # 512x430
    etags = set()
    for size in (640, 1280):
        res = service.client.get(f"{image['thumbnail_url']}?size={size}")
        assert picture(res).size == (512, 430)
        etags.add(res.headers["ETag"])
    assert len(etags) == 1 and kept(service) == 1  # one picture, kept once, for every size past its own
    assert picture(service.client.get(f"{image['thumbnail_url']}?size=320")).size == (320, 269)


def test_exif_orientation_is_applied(service, photo):
    """A photo stored on its side with EXIF orientation 6 (turn 90 degrees clockwise to show) comes back upright."""
    upright = Image.open(io.BytesIO(photo("pets.jpg"))).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    sideways = upload(service, buf.getvalue(), "sideways.jpg")
    assert (sideways["width"], sideways["height"]) == (512, 430)  # as displayed
    thumb = picture(service.client.get(sideways["thumbnail_url"]))
    assert thumb.size == (320, 269)
    straight = picture(service.client.get(upload(service, photo("pets.jpg"))["thumbnail_url"]))
    assert mean_difference(thumb, straight) < 4  # the same picture (but for one more JPEG round)
    assert mean_difference(thumb, straight.transpose(Image.Transpose.ROTATE_180)) > 20  # the test can tell a wrong turn


def test_a_transparent_png_is_kept_transparent_in_webp_and_on_white_in_jpeg(service):
    buf = io.BytesIO()
    Image.new("RGBA", (400, 200), (255, 0, 0, 0)).save(buf, "PNG")  # fully transparent red
    image = upload(service, buf.getvalue(), "clear.png")
    as_webp = picture(service.client.get(image["thumbnail_url"], headers=WEBP))
    assert as_webp.mode == "RGBA" and as_webp.getpixel((10, 10))[3] == 0
    as_jpeg = picture(service.client.get(image["thumbnail_url"]))
    assert as_jpeg.size == (320, 160) and all(v > 245 for v in as_jpeg.getpixel((10, 10)))


# --------------------------------------------------------------------------------------------------------
# Format and caching
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("accept, fmt", [
    (WEBP["Accept"], "webp"), ("image/webp", "webp"), ("image/png,image/webp;q=0.5", "webp"),
    (None, "jpeg"), ("*/*", "jpeg"), ("image/*", "jpeg"), ("image/webp;q=0", "jpeg"), ("image/jpeg", "jpeg"),
])
def test_webp_when_accept_names_it_else_jpeg(service, photo, accept, fmt):
    image = upload(service, photo("pets.jpg"))
    res = service.client.get(image["thumbnail_url"], headers={"Accept": accept} if accept else {})
    assert res.content_type == f"image/{fmt}" and picture(res).format == fmt.upper()
    assert res.headers["ETag"] == f'"{image["sha256"]}-320-{fmt}"'


def test_caching_headers_and_304(service, photo):
    image = upload(service, photo("pets.jpg"))
    res = service.client.get(image["thumbnail_url"], headers=WEBP)
    assert res.headers["Vary"] == "Accept"
    assert res.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert res.headers["X-Content-Type-Options"] == "nosniff"
    etag = res.headers["ETag"]
    again = service.client.get(image["thumbnail_url"], headers={**WEBP, "If-None-Match": etag}, status=304)
    assert again.body == b"" and again.headers["ETag"] == etag and again.headers["Vary"] == "Accept"
    # The JPEG has its own tag: a WebP's tag does not validate it.
    jpeg_res = service.client.get(image["thumbnail_url"], headers={"If-None-Match": etag}, status=200)
    assert jpeg_res.headers["ETag"] != etag and jpeg_res.content_type == "image/jpeg"
    service.client.get(image["thumbnail_url"], headers={"If-None-Match": f'W/{jpeg_res.headers["ETag"]}'}, status=304)


def test_behind_an_api_key_no_shared_cache_keeps_them(make_service, photo):
    service = make_service(api_key="k" * 32)
    headers = {"Authorization": "Bearer " + "k" * 32}
    res = service.client.post("/images", upload_files=[("image", "pets.jpg", photo("pets.jpg"))], headers=headers)
    thumb = service.client.get(res.json["thumbnail_url"], headers=headers)
    assert thumb.headers["Cache-Control"] == "private, max-age=31536000, immutable"
    annotated = service.client.get(f"/images/{res.json['id']}/annotated", headers=headers)
    assert annotated.headers["Cache-Control"] == "private, no-cache"
    service.client.get(res.json["thumbnail_url"], status=401)


def test_missing_images_are_404(service):
    for path in ("/images/99/thumbnail", "/images/99/annotated", "/images/abc/thumbnail", "/images/0/annotated"):
        assert_problem(service.client.get(path, status=404), 404)


# --------------------------------------------------------------------------------------------------------
# Kept in the database
# --------------------------------------------------------------------------------------------------------


def test_made_on_first_request_and_kept_once_per_size_and_format(service, photo):
    image = upload(service, photo("pets.jpg"))
    assert kept(service) == 0  # nothing made at upload
    first = service.client.get(image["thumbnail_url"]).body
    assert kept(service) == 1
    assert service.client.get(image["thumbnail_url"]).body == first and kept(service) == 1  # served as kept
    service.client.get(image["thumbnail_url"], headers=WEBP)
    service.client.get(image["thumbnail_url"] + "?size=160")
    assert kept(service) == 3
    with service.store.connection():
        rows = service.store.database.execute_sql("SELECT sha256, size, format FROM thumbnail ORDER BY size, format").fetchall()
    assert rows == [(image["sha256"], 160, "jpeg"), (image["sha256"], 320, "jpeg"), (image["sha256"], 320, "webp")]
    # Another image with the same bytes shares them.
    twin = upload(service, photo("pets.jpg"), "twin.jpg")
    assert service.client.get(twin["thumbnail_url"]).body == first and kept(service) == 3


def test_what_is_served_is_what_is_kept(service, photo):
    image = upload(service, photo("pets.jpg"))
    served = service.client.get(image["thumbnail_url"]).body
    with service.store.connection():
        thumb = service.store.thumbnail(image["sha256"], 320, "jpeg")
    assert thumb.data == served and (thumb.width, thumb.height) == (320, 269)


@pytest.mark.sqlite_only  # MIN_FREE_DISK_MB is SQLite's: PostgreSQL's disk is the server's
def test_below_the_disk_floor_a_thumbnail_is_served_without_being_kept(make_service, photo):
    service = make_service(min_free_disk_mb=EVERY_DISK)
    service.store.min_free_mb = 0  # the image is stored before the disk "fills"
    image = upload(service, photo("pets.jpg"))
    service.store.min_free_mb = EVERY_DISK
    for _ in range(2):
        res = service.client.get(image["thumbnail_url"])
        assert picture(res).size == (320, 269)
    assert kept(service) == 0
    service.store.min_free_mb = 0
    service.client.get(image["thumbnail_url"])
    assert kept(service) == 1


def test_deleting_the_last_image_of_some_bytes_deletes_their_thumbnails(service, photo):
    a = upload(service, photo("pets.jpg"), "a.jpg")
    b = upload(service, photo("pets.jpg"), "b.jpg")
    other = upload(service, photo("table.jpg"))
    for image in (a, other):
        service.client.get(image["thumbnail_url"])
        service.client.get(image["thumbnail_url"], headers=WEBP)
    assert kept(service) == 4
    service.client.delete(f"/images/{a['id']}", status=204)
    assert kept(service) == 4  # b still uses those bytes
    service.client.delete(f"/images/{b['id']}", status=204)
    assert kept(service) == 2
    with service.store.connection():
        assert service.store.thumbnail(a["sha256"], 320, "jpeg") is None
        assert service.store.thumbnail(other["sha256"], 320, "jpeg") is not None


def test_a_thumbnail_of_bytes_deleted_meanwhile_is_not_kept(new_db):
    images = store.Store(new_db())
    try:
        with images.connection():
            assert images.keep_thumbnail("a" * 64, 320, "jpeg", store.Thumbnail(b"x", 1, 1)) is False
            assert images.thumbnail_count() == (0, 0)
    finally:
        images.shutdown()


def test_one_call_purges_every_thumbnail_and_they_are_made_again(service, photo):
    images = [upload(service, photo(name)) for name in ("pets.jpg", "table.jpg")]
    for image in images:
        service.client.get(image["thumbnail_url"])
    assert kept(service) == 2
    with service.store.connection():
        assert service.store.purge_thumbnails() == 2
    assert kept(service) == 0
    assert picture(service.client.get(images[0]["thumbnail_url"])).size == (320, 269)
    assert kept(service) == 1


def test_purge_from_the_command_line(service, photo):
    image = upload(service, photo("pets.jpg"))
    service.client.get(image["thumbnail_url"])
    service.client.get(image["thumbnail_url"], headers=WEBP)
    result = subprocess.run(
        [sys.executable, "store.py", "purge-thumbnails", "--db", service.settings.db],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "deleted 2 thumbnail(s)" in result.stdout
    assert kept(service) == 0 and service.counts() == (1, 1)  # the images stay
    missing = subprocess.run(
        [sys.executable, "store.py", "purge-thumbnails", "--db", service.settings.db + ".nope"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_two_stores_keeping_the_same_thumbnail_both_succeed(new_db, photo):
    """Two processes (two stores on one database) making the same thumbnail: the second insert is ignored."""
    path = new_db()
    one, two = store.Store(path), store.Store(path)
    data = photo("pets.jpg")
    sha = hashlib.sha256(data).hexdigest()
    try:
        with one.connection():
            one.add(store.NewImage(data, sha, "image/jpeg", 512, 430, "pets", False, False))
        made = imaging.thumbnail(data, 320)
        with one.connection(), two.connection():
            assert one.keep_thumbnail(sha, 320, "jpeg", store.Thumbnail(made.data, made.width, made.height))
            assert two.keep_thumbnail(sha, 320, "jpeg", store.Thumbnail(b"other", 1, 1))
            assert two.thumbnail(sha, 320, "jpeg").data == made.data  # the first one stays
            assert one.thumbnail_count()[0] == 1
    finally:
        one.shutdown()
        two.shutdown()


def test_concurrent_first_requests_all_succeed(service, big_photo):
    image = upload(service, big_photo)
    n = 4
    start, answers, errors = threading.Barrier(n), [None] * n, []

    def get(i):
        try:
            start.wait(timeout=10)
            answers[i] = service.client.get(image["thumbnail_url"] + "?size=640", status="*")
        except Exception as e:  # reported below; a thread must not die silently
            errors.append(e)

    threads = [threading.Thread(target=get, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert [a.status_int for a in answers] == [200] * n
    assert len({a.body for a in answers}) == 1
    assert kept(service) == 1


def test_a_first_answer_does_not_wait_for_the_database_write(tmp_path, photo):
    """The real server writes a new thumbnail's bytes, then keeps it: with the database's write lock held
    elsewhere (as by another process's commit) the answer still comes at once, and it is kept once the
    lock is free. (Kept before answering, the request waited for the lock, up to the busy timeout.)"""
    import json
    import time
    import urllib.request

    from test_server import start_server, stop_server

    proc, base, _ = start_server(tmp_path)
    try:
        body = json.dumps({"image": b64(photo("pets.jpg")), "detect": False}).encode()
        send = urllib.request.Request(base + "/images", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(send, timeout=30) as res:
            image = json.loads(res.read())
        holder = sqlite3.connect(str(tmp_path / "images.db"), isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")  # the write lock, until ROLLBACK
            with urllib.request.urlopen(base + image["thumbnail_url"], timeout=5) as res:
                data = res.read()
                assert res.status == 200 and int(res.headers["Content-Length"]) == len(data) > 0
            assert holder.execute("SELECT COUNT(*) FROM thumbnail").fetchone() == (0,)  # not kept yet
            holder.execute("ROLLBACK")
            deadline = time.monotonic() + 10
            while holder.execute("SELECT COUNT(*) FROM thumbnail").fetchone() != (1,):
                assert time.monotonic() < deadline, "the thumbnail was not kept once the write lock was free"
                time.sleep(0.02)
            assert holder.execute("SELECT data FROM thumbnail").fetchone()[0] == data
        finally:
            holder.close()
    finally:
        log = stop_server(proc)
    assert "Traceback" not in log and " ERROR " not in log


# --------------------------------------------------------------------------------------------------------
# Made ahead for a listed page (THUMBNAIL_READ_AHEAD)
# --------------------------------------------------------------------------------------------------------


class Making:
    """imaging.thumbnail as the read-ahead calls it, recorded, and held back while `hold` is set."""

    def __init__(self, hold_first: bool = False):
        self.calls: list[tuple[int, str, str]] = []  # (size, format, thread name)
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, data, size, fmt, *args, **kw):
        self.calls.append((size, fmt, threading.current_thread().name))
        self.entered.set()
        assert self.release.wait(10)
        return imaging.thumbnail(data, size, fmt, *args, **kw)


def records(service):
    with service.store.connection():
        return service.store.list(limit=100)[0]


def test_a_listed_page_has_its_grid_thumbnails_made_ahead(service, photo, big_photo):
    """GET /images starts making the 320 px WebP of each image on the page that has none, in the
    background; the browser's request for it, a moment later, is served what was kept."""
    small = upload(service, photo("pets.jpg"))
    large = upload(service, big_photo)
    assert kept(service) == 0
    service.client.get("/images")
    wait_for(lambda: kept(service) == 2)
    with service.store.connection():
        rows = service.store.database.execute_sql("SELECT sha256, size, format FROM thumbnail ORDER BY size").fetchall()
    pets = Image.open(io.BytesIO(photo("pets.jpg"))).size
    assert sorted(rows) == sorted([(small["sha256"], min(320, max(pets)), "webp"), (large["sha256"], 320, "webp")])
    with service.store.connection():
        kept_webp = service.store.thumbnail(large["sha256"], 320, "webp").data
    assert service.client.get(large["thumbnail_url"], headers=WEBP).body == kept_webp
    service.client.get("/images")  # a second listing finds them kept: nothing is made again
    service.parts.thumbnails.close()
    assert kept(service) == 2


def test_read_ahead_off_makes_nothing_ahead(make_service, photo):
    service = make_service(thumbnail_read_ahead=0)
    image = upload(service, photo("pets.jpg"))
    service.client.get("/images")
    assert service.parts.thumbnails.read_ahead(records(service)) == 0
    assert kept(service) == 0
    service.client.get(image["thumbnail_url"], headers=WEBP)
    assert kept(service) == 1


def test_only_the_first_images_of_a_page_are_made_ahead(service, photo):
    for name in ("pets.jpg", "cat_1080p.jpg", "kite_and_cold.jpg"):
        upload(service, photo(name))
    making = Making()
    ahead = ingest.Thumbnails(service.store, read_ahead=2, make=making)
    try:
        newest = records(service)
        assert ahead.read_ahead(newest) == 2
        wait_for(lambda: kept(service) == 2)
        assert ahead.read_ahead(newest) == 2  # queued again: found kept, not made again
    finally:
        ahead.close()
    assert len(making.calls) == 2 and {c[1] for c in making.calls} == {"webp"}
    with service.store.connection():
        shas = {r[0] for r in service.store.database.execute_sql("SELECT sha256 FROM thumbnail").fetchall()}
    assert shas == {newest[0].sha256, newest[1].sha256}


def test_a_request_for_one_being_made_ahead_waits_for_it_rather_than_making_it_twice(service, big_photo):
    image = upload(service, big_photo)
    making = Making(hold_first=True)
    ahead = ingest.Thumbnails(service.store, read_ahead=4, make=making)
    try:
        ahead.read_ahead(records(service))
        assert making.entered.wait(10)
        got = []
        asker = threading.Thread(target=lambda: got.append(ahead.get(image["id"], image["sha256"], 320, "webp")))
        asker.start()
        asker.join(0.2)
        assert asker.is_alive()  # waiting for the one under way
        making.release.set()
        asker.join(10)
        thumb, was_kept = got[0]
        assert was_kept and picture_of(thumb.data).size == (320, 180)
        assert len(making.calls) == 1 and making.calls[0][2].startswith("thumbnails-ahead")
    finally:
        ahead.close()


def test_a_request_for_one_still_queued_takes_it_off_the_queue(service, photo, big_photo):
    first = upload(service, photo("pets.jpg"))
    upload(service, big_photo)  # the newest: made ahead first
    making = Making(hold_first=True)
    ahead = ingest.Thumbnails(service.store, read_ahead=4, workers=1, make=making)
    try:
        assert ahead.read_ahead(records(service)) == 2
        assert making.entered.wait(10)  # the one worker is held on the newest; the other waits in the queue
        threading.Timer(0.2, making.release.set).start()
        thumb, was_kept = ahead.get(first["id"], first["sha256"], min(320, max(first["width"], first["height"])), "webp")
        assert not was_kept and picture_of(thumb.data).size == imaging.fitted(first["width"], first["height"], 320)
    finally:
        making.release.set()
        ahead.close()
    # Made twice in all: the newest by the worker, the queued one by the request (taken off the queue).
    assert [c[2] for c in making.calls] == [making.calls[0][2], threading.current_thread().name]
    assert making.calls[0][2].startswith("thumbnails-ahead")


def test_an_image_deleted_before_its_turn_is_skipped(service, photo):
    image = upload(service, photo("pets.jpg"))
    listed = records(service)
    service.client.delete(f"/images/{image['id']}")
    ahead = ingest.Thumbnails(service.store, read_ahead=4, make=Making())
    try:
        ahead.read_ahead(listed)
    finally:
        ahead.close()  # waits for the one under way
    assert kept(service) == 0


def test_a_picture_that_cannot_be_made_is_not_tried_again_ahead_of_every_listing(service, photo):
    """Bytes stored straight through the store (bench/api.py's synthetic library) that are no picture:
    the read-ahead tries once, remembers, and a later listing queues nothing for it."""
    junk = b"not a picture at all"
    service.store.add_many([store.NewImage(junk, hashlib.sha256(junk).hexdigest(), "image/jpeg", 640, 480, "junk", True, False)])
    upload(service, photo("pets.jpg"))
    making = Making()
    ahead = ingest.Thumbnails(service.store, read_ahead=4, make=making)
    try:
        assert ahead.read_ahead(records(service)) == 2
        wait_for(lambda: len(making.calls) == 2 and not ahead._pending)
        assert ahead.read_ahead(records(service)) == 1  # the photo's is checked again (found kept), the junk's not
        wait_for(lambda: not ahead._pending)
    finally:
        ahead.close()
    assert len(making.calls) == 2 and kept(service) == 1


def test_close_drops_what_is_queued_and_lets_the_one_under_way_finish(service, photo):
    for name in ("pets.jpg", "cat_1080p.jpg", "kite_and_cold.jpg"):
        upload(service, photo(name))
    making = Making(hold_first=True)
    ahead = ingest.Thumbnails(service.store, read_ahead=4, workers=1, make=making)
    assert ahead.read_ahead(records(service)) == 3
    assert making.entered.wait(10)
    threading.Timer(0.2, making.release.set).start()
    ahead.close()
    assert len(making.calls) == 1 and kept(service) == 1
    assert ahead.read_ahead(records(service)) == 0  # closed: nothing is queued any more


def picture_of(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_a_full_decode_budget_is_a_503_with_retry_after(make_service, big_photo):
    service = make_service(decode_wait_ms=50)
    image = upload(service, big_photo)
    budget = service.parts.ingest.budget
    with budget.reserve(budget.limit):  # every byte of the budget taken, as by other decodes
        for route in ("thumbnail", "annotated"):
            res = service.client.get(f"/images/{image['id']}/{route}", status=503)
            assert "DECODE_MEMORY_MB" in assert_problem(res, 503)
            assert res.headers["Retry-After"] == "1"
    assert kept(service) == 0
    assert picture(service.client.get(image["thumbnail_url"])).size == (320, 180)  # room again
    assert budget.used == 0


# --------------------------------------------------------------------------------------------------------
# Annotated renders
# --------------------------------------------------------------------------------------------------------


def test_annotated_is_the_picture_with_its_detections_and_revalidated(service, photo):
    image = upload(service, photo("pets.jpg"), detect=True)
    assert image["objects"] == ["dog"]
    url = f"/images/{image['id']}/annotated"
    res = service.client.get(url)
    assert res.content_type == "image/jpeg" and res.headers["Cache-Control"] == "no-cache"
    drawn = picture(res)
    assert drawn.size == (512, 430)  # the original's size, under the 1280 cap
    plain = Image.open(io.BytesIO(photo("pets.jpg"))).convert("RGB")
    assert picture(service.client.get(url + "?size=160")).size == (160, 134)
    etag = res.headers["ETag"]
    assert service.client.get(url, headers={"If-None-Match": etag}, status=304).body == b""
    assert kept(service) == 0  # not kept: made on each request that is not a 304

    # The detections change (a re-detection, a new model): the old copy no longer validates.
    with service.store.connection():
        db = service.store.database
        db.execute_sql(f"UPDATE detection SET confidence = 0.99 WHERE image_id = {db.param}", [image["id"]])
    changed = service.client.get(url, headers={"If-None-Match": etag}, status=200)
    assert changed.headers["ETag"] != etag and changed.body != res.body
    with service.store.connection():
        db.execute_sql(f"DELETE FROM detection WHERE image_id = {db.param}", [image["id"]])
    bare = service.client.get(url)
    assert bare.headers["ETag"] not in (etag, changed.headers["ETag"])
    # Nothing drawn: the picture itself, re-encoded; the first render had boxes and tags on it.
    assert mean_difference(picture(bare), plain) < 8
    assert sum(_coloured_diff(drawn, picture(bare))) > 2000


def _coloured_diff(a: Image.Image, b: Image.Image):
    """1 for each pixel where two pictures differ strongly (drawn lines and tags), else 0."""
    pa, pb = a.convert("RGB").tobytes(), b.convert("RGB").tobytes()
    return (1 if max(abs(pa[i + c] - pb[i + c]) for c in range(3)) > 80 else 0 for i in range(0, len(pa), 3))


class Box:
    def __init__(self, label, confidence, x_min, y_min, x_max, y_max):
        self.label, self.confidence = label, confidence
        self.x_min, self.y_min, self.x_max, self.y_max = x_min, y_min, x_max, y_max


def _coloured(img: Image.Image, x: int, y: int) -> bool:
    r, g, b = img.getpixel((x, y))[:3]
    return max(r, g, b) - min(r, g, b) > 60  # the white picture is grey-free; boxes and tags are colours


@pytest.mark.parametrize("longest", [160, 1280])
def test_tags_stay_inside_the_picture_and_scale_with_it(longest):
    buf = io.BytesIO()
    Image.new("RGB", (longest, longest * 3 // 4), (255, 255, 255)).save(buf, "JPEG", quality=95)
    # A box in the bottom right corner: its tag can go neither above (no: it fits above) nor right of it.
    box = Box("giraffe", 0.876, 0.96, 0.0, 1.0, 0.05)
    out = Image.open(io.BytesIO(imaging.annotate(buf.getvalue(), [box], longest).data)).convert("RGB")
    width, height = out.size
    x0 = round(0.96 * width)
    row = 2  # inside the tag, which sits in the box's top edge (no room above it)
    assert _coloured(out, width - 2, row)
    assert _coloured(out, x0 - 10, row)  # the tag was moved left to stay inside the picture
    tag_height = next(y for y in range(height) if not _coloured(out, x0 - 10, y))
    assert longest / 60 <= tag_height <= longest / 15  # text that scales: legible at 160 px and at 1280


# --------------------------------------------------------------------------------------------------------
# File names
# --------------------------------------------------------------------------------------------------------


def multipart(filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize("sent, shown", [
    ("dog.jpg", "dog.jpg"),
    ("C:/Users/me/Pictures/My  Dog.jpg", "My Dog.jpg"),
    ("../../etc/passwd", "passwd"),
    ("evil\u202egpj.exe", "evilgpj.exe"),
    ("..", None),
    ("", None),
])
def test_the_uploaded_file_name_is_kept_as_a_display_string(service, sent, shown):
    body, content_type = multipart(sent, jpeg())
    created = service.client.post("/images", body, headers={"Content-Type": content_type}).json
    assert created["filename"] == shown
    assert service.client.get(f"/images/{created['id']}").json["filename"] == shown
    assert service.client.get("/images").json[0]["filename"] == shown


def test_base64_json_takes_an_optional_filename(service):
    created = service.client.post_json("/images", {"image": b64(jpeg()), "filename": "folder\\beach.jpg"}).json
    assert created["filename"] == "beach.jpg" and created["label"] == "beach"  # a generated label uses it too
    assert service.client.post_json("/images", {"image": b64(jpeg())}).json["filename"] is None
    long = service.client.post_json("/images", {"image": b64(jpeg()), "filename": "x" * 1000 + ".jpg"}).json
    assert long["filename"] == "x" * 255
    for body, words in (({"image": b64(jpeg()), "filename": 7}, "`filename` must be a string"),
                        ({"url": "https://example.com/a.jpg", "filename": "a.jpg"}, "goes with `image`")):
        assert words in assert_problem(service.client.post_json("/images", body, status=400), 400)
    assert service.counts() == (3, 1)


def test_a_url_is_named_by_its_last_path_segment(service, photo):
    data = photo("pets.jpg")
    routes = {"/photos/golden%20retriever.jpg": ok(data, "image/jpeg"), "/photos/": ok(data, "image/jpeg"),
              "/a%2Fb.jpg": ok(data, "image/jpeg")}
    with Loopback(routes) as host:
        named = service.client.post_json("/images", {"url": host.url("/photos/golden%20retriever.jpg?w=1#top")}).json
        folder = service.client.post_json("/images", {"url": host.url("/photos/")}).json
        slashed = service.client.post("/images", {"url": host.url("/a%2Fb.jpg")}).json  # a form's url= too
    assert named["filename"] == "golden retriever.jpg"
    assert folder["filename"] is None
    assert slashed["filename"] == "b.jpg"  # an encoded slash makes no folder


# --------------------------------------------------------------------------------------------------------
# Schema version 3
# --------------------------------------------------------------------------------------------------------

V2_SCHEMA = """
CREATE TABLE "setting" ("key" TEXT NOT NULL PRIMARY KEY, "value" TEXT NOT NULL);
CREATE TABLE "blob" ("sha256" CHAR(64) NOT NULL PRIMARY KEY, "data" BLOB NOT NULL);
CREATE TABLE "image" ("id" INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, "sha256" CHAR(64) NOT NULL,
  "label" TEXT NOT NULL, "label_generated" INTEGER NOT NULL, "detection_enabled" INTEGER NOT NULL,
  "detected_with" TEXT, "content_type" TEXT NOT NULL, "size" INTEGER NOT NULL, "width" INTEGER NOT NULL,
  "height" INTEGER NOT NULL, "source_url" TEXT, "created_ms" INTEGER NOT NULL);
CREATE INDEX "image_sha256" ON "image" ("sha256");
CREATE TABLE "detection" ("id" INTEGER NOT NULL PRIMARY KEY, "image_id" INTEGER NOT NULL, "name" TEXT NOT NULL,
  "label" TEXT NOT NULL, "confidence" REAL NOT NULL, "x_min" REAL NOT NULL, "y_min" REAL NOT NULL,
  "x_max" REAL NOT NULL, "y_max" REAL NOT NULL, FOREIGN KEY ("image_id") REFERENCES "image" ("id") ON DELETE CASCADE);
CREATE INDEX "detection_image_id_confidence" ON "detection" ("image_id", "confidence");
CREATE INDEX "detection_name_image_id_confidence" ON "detection" ("name", "image_id", "confidence");
INSERT INTO setting VALUES ('schema_version', '2');
"""


def test_a_version_2_database_migrates_to_3(tmp_path, photo):
    """The tables as version 2 wrote them (store.py at af97755), two images in them."""
    path = str(tmp_path / "v2.db")
    conn = sqlite3.connect(path)
    conn.executescript(V2_SCHEMA)
    data = photo("pets.jpg")
    sha = hashlib.sha256(data).hexdigest()
    conn.execute("INSERT INTO blob VALUES (?, ?)", (sha, data))
    for label in ("first", "second"):
        conn.execute("INSERT INTO image (sha256, label, label_generated, detection_enabled, content_type, size, "
                     "width, height, created_ms) VALUES (?, ?, 0, 1, 'image/jpeg', ?, 512, 430, 1)", (sha, label, len(data)))
    conn.execute("INSERT INTO detection (image_id, name, label, confidence, x_min, y_min, x_max, y_max) "
                 "VALUES (1, 'dog', 'dog', 0.9, 0.1, 0.1, 0.5, 0.5)")
    conn.commit()
    conn.close()

    s = store.Store(path)
    try:
        with s.connection():
            assert s.schema_version == store.SCHEMA_VERSION  # and on past 3
            records, _ = s.list()
            assert [(r.id, r.label, r.filename, r.objects) for r in records] == [(2, "second", None, []), (1, "first", None, ["dog"])]
            new = s.add(store.NewImage(b"new", hashlib.sha256(b"new").hexdigest(), "image/png", 1, 1, "n", False, False,
                                       filename="new.png"))
            assert new.id == 3 and s.get(3).filename == "new.png"
            assert s.keep_thumbnail(sha, 320, "jpeg", store.Thumbnail(b"t", 1, 1)) and s.thumbnail_count()[0] == 1
            s.delete(1)
            s.delete(2)  # the last image of those bytes: its thumbnails go
            assert s.thumbnail_count()[0] == 0
            assert s.database.execute_sql("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        s.shutdown()
    s = store.Store(path)  # reopening a migrated file changes nothing
    try:
        with s.connection():
            assert s.schema_version == store.SCHEMA_VERSION and s.get(3).filename == "new.png"
    finally:
        s.shutdown()


# --------------------------------------------------------------------------------------------------------
# Inside the decode budget
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_what_a_thumbnail_reserves_covers_what_it_costs(name):
    """Each kind of image the decoder treats differently (tests/test_decode.py's cases): the reservation
    made from the header is at least the peak memory of making a thumbnail or an annotated render."""
    data = DECODE_CASES[name]()
    box = Box("dog", 0.9, 0.1, 0.1, 0.9, 0.9)
    calls = (
        lambda b: imaging.thumbnail(data, 1280, "webp", budget=b),
        lambda b: imaging.thumbnail(data, 320, "jpeg", budget=b),
        lambda b: imaging.annotate(data, [box], 1280, budget=b),
    )
    for call in calls:
        call(imaging.DecodeBudget(2**40))  # once first, so imports and caches are not counted
        budget = Recording(2**40)
        peak = _peak_of(lambda: call(budget))  # noqa: B023 - called at once
        (asked,) = budget.asked
        assert peak <= asked / MB + 1, f"{name}: reserved {asked / MB:.1f} MB, the peak was {peak:.1f} MB"
