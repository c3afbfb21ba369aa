"""The image API through the real app: real model, real SQLite file, real loopback image host."""

import base64
import hashlib
import io
import re
import sqlite3
import threading

import pytest
from PIL import Image

import detect
import ingest
import store
from helpers import ISO_MS, assert_problem, b64, jpeg  # noqa: E402
from loopback import Loopback, drip, ok, redirect, status

pytestmark = pytest.mark.both_backends


def post_json(service, body, status=200, **kw):
    return service.client.post_json("/images", body, status=status, **kw)





# --------------------------------------------------------------------------------------------------------
# POST /images
# --------------------------------------------------------------------------------------------------------


def test_base64_upload_with_detection(service, photo):
    data = photo("pets.jpg")
    res = post_json(service, {"image": b64(data), "detect": True})
    img = res.json
    assert res.headers["Location"] == f"/images/{img['id']}"
    assert img["objects"] == ["dog"] and [d["label"] for d in img["detections"]] == ["dog", "dog"]
    assert img["label"] == "2 dogs" and img["label_generated"] is True and img["detection_enabled"] is True
    assert (img["width"], img["height"], img["content_type"]) == (*Image.open(io.BytesIO(data)).size, "image/jpeg")
    assert img["size"] == len(data) and img["sha256"] == hashlib.sha256(data).hexdigest()
    assert img["source_url"] is None and ISO_MS.match(img["created_at"])
    assert img["file_url"] == f"/images/{img['id']}/file" and "data" not in img
    box = img["detections"][0]["box"]
    assert set(box) == {"x_min", "y_min", "x_max", "y_max"} and 0 <= box["x_min"] < box["x_max"] <= 1
    assert service.client.get(f"/images/{img['id']}").json == img


def test_base64_as_tools_write_it_decodes_to_the_same_bytes(service, photo):
    """Plain padded base64 takes the fast path; line breaks (MIME's 76 columns), the URL-safe alphabet and
    left-out padding take the loose one; both store exactly the bytes sent."""
    data = photo("pets.jpg") + b"\xfb\xff"  # bytes after the JPEG's end: '-' and '_' in the URL-safe text
    plain = base64.b64encode(data).decode()
    written = [
        plain,
        "\r\n".join(plain[i:i + 76] for i in range(0, len(plain), 76)),
        base64.urlsafe_b64encode(data).decode().rstrip("="),
        "data:image/jpeg;base64," + base64.encodebytes(data).decode(),
    ]
    assert "-" in written[2] or "_" in written[2]
    for text in written:
        img = post_json(service, {"image": text}).json
        assert img["sha256"] == hashlib.sha256(data).hexdigest() and img["size"] == len(data)


@pytest.mark.parametrize("text", ["aGVs$bG8=", "aGVsbG8=aGVsbG8=", "aGVsbG8===", "aGVsb", "aGVsbG8=é"])
def test_invalid_base64_is_refused_on_both_paths(service, text):
    assert "not valid base64" in assert_problem(post_json(service, {"image": text}, status=400), 400)


def test_base64_is_the_simd_one_when_installed():
    """requirements.txt pins pybase64 for its speed (0.6 ms, not 21, for a 3 MB photo): losing it silently
    would cost every large upload that much."""
    import server

    pytest.importorskip("pybase64")
    assert server.base64.__name__ == "pybase64"


def test_answers_are_written_by_orjson_when_installed_and_by_the_standard_library_past_it():
    import server

    pytest.importorskip("orjson")
    assert server.orjson is not None and isinstance(server._dumps({"a": [1, 0.5, "é"]}), bytes)
    assert server._dumps({"big": 2**70}) == '{"big": 1180591620717411303424}'  # past 64 bits: json writes it


def test_detection_is_off_by_default_and_the_label_falls_back(service, photo):
    data = photo("pets.jpg")
    img = post_json(service, {"image": b64(data)}).json
    assert img["detection_enabled"] is False and img["objects"] == [] and img["detections"] == []
    assert img["label"] == f"untitled {hashlib.sha256(data).hexdigest()[:8]}" and img["label_generated"]


def test_user_label_is_trimmed_and_kept(service, photo):
    img = post_json(service, {"image": b64(photo("pets.jpg")), "label": "  my dogs  ", "detect": True}).json
    assert (img["label"], img["label_generated"], img["objects"]) == ("my dogs", False, ["dog"])
    assert post_json(service, {"image": b64(jpeg()), "label": "   "}).json["label_generated"] is True


def test_data_uri_and_include_data(service, photo):
    data = photo("coupleanddog.jpeg")
    res = service.client.post_json("/images?include=data", {"image": "data:image/jpeg;base64," + b64(data), "detect": True})
    assert base64.b64decode(res.json["data"]) == data
    assert res.json["label"] == "2 people and dog"


def test_multipart_upload(service, photo):
    data = photo("pets.jpg")
    res = service.client.post("/images", {"detect": "on"}, upload_files=[("image", "pets.jpg", data)])
    assert res.json["objects"] == ["dog"] and res.json["size"] == len(data)
    plain = service.client.post("/images", {"label": ""}, upload_files=[("image", "golden-retriever.jpg", jpeg())]).json
    assert (plain["label"], plain["label_generated"], plain["detection_enabled"]) == ("golden-retriever", True, False)


def test_exif_rotated_upload_reports_displayed_size(service):
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (64, 48), "blue").save(buf, "JPEG", exif=exif.tobytes())
    img = post_json(service, {"image": b64(buf.getvalue())}).json
    assert (img["width"], img["height"]) == (48, 64)


def test_identical_bytes_are_stored_once_and_analysed_once(make_service, detector, photo):
    calls = []

    class Counting(detect.Detector):
        def detect(self, data, threshold=None, budget=None):
            calls.append(len(data))
            return super().detect(data, threshold, budget)

    counting = Counting(detector.model_path, threads=1, pool=1)
    service = make_service(detector=counting)
    data = photo("pets.jpg")
    first = post_json(service, {"image": b64(data), "detect": True}).json
    second = post_json(service, {"image": b64(data), "detect": True}).json
    assert len(calls) == 1  # the second reuses the stored detections
    assert second["detections"] == first["detections"] and second["id"] != first["id"]
    assert service.counts() == (2, 1)
    post_json(service, {"image": b64(data)})  # without detection: stored, not analysed
    assert len(calls) == 1 and service.counts() == (3, 1)


# --------------------------------------------------------------------------------------------------------
# POST /images by URL
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def host(photo):
    """A loopback image host: good photos, errors, and misbehaviour."""

    routes = {
        "/photos/golden-retriever.jpg": ok(photo("pets.jpg"), "image/jpeg"),
        "/text": ok(b"<html>hello</html>", "text/html"),
        "/fake.jpg": ok(b"<html>hello</html>", "image/jpeg"),
        "/slow.jpg": drip(1000, 0.1),
        "/huge.jpg": ok(photo("kite_and_cold.jpg"), "image/jpeg"),
        "/missing.jpg": status(404),
        "/r1": redirect("/r2"),
        "/r2": redirect("/photos/golden-retriever.jpg"),
    }
    with Loopback(routes) as srv:
        yield srv


def test_url_ingestion(service, host):
    url = host.url("/photos/golden-retriever.jpg")
    img = post_json(service, {"url": url, "detect": True}).json
    assert img["source_url"] == url and img["objects"] == ["dog"] and img["label"] == "2 dogs"
    plain = post_json(service, {"url": url}).json
    assert (plain["label"], plain["label_generated"]) == ("golden-retriever", True)
    form = service.client.post("/images", {"url": host.url("/r1"), "detect": "1"}).json
    assert form["objects"] == ["dog"] and form["source_url"] == host.url("/r1")


@pytest.mark.parametrize(
    "path, code, words",
    [
        ("/missing.jpg", 422, "404"),
        ("/text", 422, "text/html"),
        ("/fake.jpg", 422, "not an image"),
        ("/slow.jpg", 504, ""),
    ],
)
def test_url_failures(make_service, host, path, code, words):
    service = make_service(fetch_timeout=1.0)
    detail = assert_problem(post_json(service, {"url": host.url(path), "detect": True}, status=code), code)
    assert words in detail
    assert service.counts() == (0, 0)


def test_url_over_the_size_limit(make_service, host):
    service = make_service(max_image_bytes=1_000_000)
    assert_problem(post_json(service, {"url": host.url("/huge.jpg")}, status=413), 413)
    assert service.counts() == (0, 0)


def test_url_to_a_closed_port_is_502(service):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    assert_problem(post_json(service, {"url": f"http://127.0.0.1:{port}/x.jpg"}, status=502), 502)


def test_guard_on_refuses_loopback_and_fetches_nothing(make_service, host):
    service = make_service(allow_private_urls=False)
    for url in (host.url("/photos/golden-retriever.jpg"), host.url("/r1").replace("127.0.0.1", "localhost")):
        detail = assert_problem(post_json(service, {"url": url}, status=400), 400)
        assert "127.0.0.1" in detail or "loopback" in detail
    assert sum(host.hits.values()) == 0 and service.counts() == (0, 0)


# --------------------------------------------------------------------------------------------------------
# Errors: the right status, nothing stored
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, code",
    [
        ({}, 400),
        ({"image": "aGVsbG8=", "url": "https://example.com/a.jpg"}, 400),
        ({"image": "not base64 !!!"}, 400),
        ({"image": 5}, 400),
        ({"image": "aGVsbG8=", "detect": "yes please"}, 400),
        ({"image": "aGVsbG8=", "label": 5}, 400),
        ({"image": "aGVsbG8=", "label": "x" * 201}, 400),
        ({"image": "aGVsbG8=", "colour": "red"}, 400),
        ({"url": "ftp://example.com/a.jpg"}, 400),
        ({"url": "file:///etc/passwd"}, 400),
        ({"url": "http://user:pass@example.com/a.jpg"}, 400),
        ({"url": 7}, 400),
        ({"image": "data:image/png,abc"}, 400),
        ({"image": b64(b"hello, these are not image bytes")}, 422),
        ({"image": b64(b"%PDF-1.7\n")}, 422),
    ],
)
def test_bad_json_bodies(service, body, code):
    assert assert_problem(post_json(service, body, status=code), code)
    assert service.counts() == (0, 0)


@pytest.mark.parametrize("raw", [b"{not json", b"null", b"[]", b'"a string"', b"[" * 100_000, b""])
def test_malformed_json(service, raw):
    res = service.client.post("/images", raw, content_type="application/json", status=400)
    assert_problem(res, 400)


def test_wrong_content_type_is_415(service):
    res = service.client.post("/images", b"hello", content_type="text/plain", status=415)
    assert "multipart/form-data" in assert_problem(res, 415)


def test_image_over_max_bytes_is_413(make_service):
    service = make_service(max_image_bytes=1000)
    assert_problem(post_json(service, {"image": b64(b"x" * 2000)}, status=413), 413)
    res = service.client.post("/images", upload_files=[("image", "big.jpg", b"x" * 2000)], status=413)
    assert_problem(res, 413)
    assert service.counts() == (0, 0)


def test_too_many_pixels_is_413(service):
    buf = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buf, "PNG")  # 64 MP, tiny file
    detail = assert_problem(post_json(service, {"image": b64(buf.getvalue())}, status=413), 413)
    assert "8000x8000 (64,000,000 pixels)" in detail and "(MAX_PIXELS)" in detail  # the refusal names its setting


def test_multipart_errors(service):
    assert_problem(service.client.post("/images", {"label": "x"}, status=400), 400)
    res = service.client.post("/images", {"url": "https://example.com/a.jpg"}, upload_files=[("image", "a.jpg", jpeg())], status=400)
    assert_problem(res, 400)
    res = service.client.post("/images", {"detect": "perhaps"}, upload_files=[("image", "a.jpg", jpeg())], status=400)
    assert "detect" in assert_problem(res, 400)
    assert service.counts() == (0, 0)


def test_detection_without_a_model_is_503_and_stores_nothing(make_service, tmp_path, host):
    service = make_service(detector=detect.Detector(str(tmp_path / "none.tflite"), threads=1, pool=1))
    detail = assert_problem(post_json(service, {"image": b64(jpeg()), "detect": True}, status=503), 503)
    assert "make model" in detail
    assert_problem(post_json(service, {"url": host.url("/photos/golden-retriever.jpg"), "detect": True}, status=503), 503)
    assert sum(host.hits.values()) == 0  # refused before downloading
    assert service.counts() == (0, 0)
    assert post_json(service, {"image": b64(jpeg())}).json["detection_enabled"] is False  # storing still works


# --------------------------------------------------------------------------------------------------------
# Reading, searching, paging
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def gallery(service, photo):
    """pets (dogs), cat, coupleanddog (people, dog), traffic (cars), dragonfly (nothing): ids 1..5."""
    names = ["pets.jpg", "cat.bmp", "coupleanddog.jpeg", "traffic_0001.bmp", "dragonfly.bmp"]
    ids = [post_json(service, {"image": b64(photo(n)), "detect": True}).json["id"] for n in names]
    return service, dict(zip(names, ids, strict=True))


def ids_of(res):
    return [img["id"] for img in res.json]


def test_list_newest_first(gallery):
    service, ids = gallery
    assert ids_of(service.client.get("/images")) == sorted(ids.values(), reverse=True)


def test_search_any_all_case_and_quotes(gallery):
    service, ids = gallery
    get = service.client.get
    assert ids_of(get("/images?objects=dog")) == [ids["coupleanddog.jpeg"], ids["pets.jpg"]]
    assert ids_of(get("/images?objects=dog,cat")) == [ids["coupleanddog.jpeg"], ids["cat.bmp"], ids["pets.jpg"]]
    assert ids_of(get('/images?objects="Dog, CAT"')) == ids_of(get("/images?objects=dog,cat"))
    assert ids_of(get("/images?objects=dog,person&match=all")) == [ids["coupleanddog.jpeg"]]
    assert ids_of(get("/images?objects=dog,cat&match=all")) == []
    assert get("/images?objects=unicorn").json == []
    assert ids_of(get("/images?objects=dog&min_confidence=0.7")) == [ids["pets.jpg"]]


def test_paging_with_link_header(gallery):
    service, ids = gallery
    first = service.client.get("/images?limit=2")
    assert len(first.json) == 2
    seen = ids_of(first)
    link = first.headers["Link"]
    while link:
        url = re.match(r'<([^>]+)>; rel="next"', link).group(1)
        page = service.client.get(url)
        seen += ids_of(page)
        link = page.headers.get("Link")
    assert seen == sorted(ids.values(), reverse=True)
    search = service.client.get("/images?objects=dog,cat&limit=1")
    assert "objects=dog%2Ccat" in search.headers["Link"] and "match=any" in search.headers["Link"]
    last = service.client.get("/images?limit=5")
    assert "Link" not in last.headers


@pytest.mark.parametrize(
    "query",
    ["limit=-1", "limit=0", "limit=1e9", "limit=1001", "limit=abc", "before=abc", "before=0", "objects=",
     "objects=,,", "objects=dog&match=some", "objects=dog&min_confidence=2", "objects=dog&min_confidence=nan",
     "min_confidence=0.5"],
)
def test_bad_query_parameters(service, query):
    assert_problem(service.client.get(f"/images?{query}", status=400), 400)


def test_get_one_and_404s(gallery):
    service, ids = gallery
    assert service.client.get(f"/images/{ids['cat.bmp']}").json["objects"] == ["cat"]
    for bad in ("999", "abc", "1%20OR%201=1", "%00", "..%2F..%2Fetc%2Fpasswd", "-1", "0"):
        assert_problem(service.client.get(f"/images/{bad}", status=404), 404)


def test_file_with_etag_and_cache_headers(gallery, photo):
    service, ids = gallery
    res = service.client.get(f"/images/{ids['pets.jpg']}/file")
    assert res.body == photo("pets.jpg") and res.content_type == "image/jpeg"
    etag = res.headers["ETag"]
    assert etag == f'"{hashlib.sha256(photo("pets.jpg")).hexdigest()}"'
    assert "immutable" in res.headers["Cache-Control"] and "max-age=31536000" in res.headers["Cache-Control"]
    assert service.client.get(f"/images/{ids['cat.bmp']}/file").content_type == "image/bmp"
    not_modified = service.client.get(f"/images/{ids['pets.jpg']}/file", headers={"If-None-Match": etag}, status=304)
    assert not_modified.body == b""
    service.client.get(f"/images/{ids['pets.jpg']}/file", headers={"If-None-Match": '"other"'}, status=200)
    assert_problem(service.client.get("/images/999/file", status=404), 404)


def test_delete_keeps_shared_bytes_until_the_last_image(service, photo):
    data = photo("cat.bmp")
    a = post_json(service, {"image": b64(data), "detect": True}).json["id"]
    b = post_json(service, {"image": b64(data)}).json["id"]
    assert service.counts() == (2, 1)
    service.client.delete(f"/images/{a}", status=204)
    assert_problem(service.client.get(f"/images/{a}", status=404), 404)
    assert service.client.get(f"/images/{b}/file").body == data
    assert service.counts() == (1, 1)
    service.client.delete(f"/images/{b}", status=204)
    assert service.counts() == (0, 0)
    assert_problem(service.client.delete(f"/images/{b}", status=404), 404)
    assert service.client.get("/objects").json == []


def test_objects_vocabulary(gallery):
    service, _ = gallery
    counts = {o["name"]: o["images"] for o in service.client.get("/objects").json}
    assert counts["dog"] == 2 and counts["cat"] == 1 and counts["person"] == 1 and counts["car"] == 1
    objects = service.client.get("/objects").json
    assert objects == sorted(objects, key=lambda o: (-o["images"], o["name"]))


# --------------------------------------------------------------------------------------------------------
# The store underneath
# --------------------------------------------------------------------------------------------------------


@pytest.mark.sqlite_only  # SQLite's PRAGMAs and its file
def test_database_pragmas_schema_version_and_reopen(service, photo):
    img = post_json(service, {"image": b64(photo("pets.jpg")), "detect": True}).json
    service.store.shutdown()
    conn = sqlite3.connect(service.settings.db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT value FROM setting WHERE key='schema_version'").fetchone()[0] == str(store.SCHEMA_VERSION)
    conn.close()
    reopened = store.Store(service.settings.db)
    with reopened.connection():
        assert reopened.database.execute_sql("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert reopened.database.execute_sql("PRAGMA busy_timeout").fetchone()[0] >= 1000
        assert reopened.get(img["id"]).objects == ["dog"]


def test_a_database_from_a_newer_version_is_refused(new_db):
    path = new_db()
    s = store.Store(path)
    with s.connection():
        s.database.execute_sql("UPDATE setting SET value='99' WHERE key='schema_version'")
    s.shutdown()
    with pytest.raises(store.StoreUnavailable, match="newer"):
        store.Store(path)


def test_concurrent_writers(service):
    errors = []

    def write(k):
        try:
            for i in range(5):
                post_json(service, {"image": b64(jpeg(color=(k * 20, i * 40, 7)))})
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(8)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert not errors
    assert service.counts()[0] == 40
    assert len(service.client.get("/images?limit=1000").json) == 40


@pytest.mark.parametrize(
    "labels, phrase",
    [
        (["dog", "dog"], "2 dogs"),
        (["person", "dog"], "person and dog"),
        (["person", "person", "dog"], "2 people and dog"),
        (["wine glass", "wine glass", "bottle", "pizza"], "2 wine glasses, bottle and pizza"),
        (["bus", "bus", "knife", "knife", "sheep", "sheep"], "2 buses, 2 knives and 2 sheep"),
        (["person", "kite", "car", "dog", "cat"], "person, kite and 3 more"),
        ([], None),
    ],
)
def test_describe(labels, phrase):
    assert ingest.describe(labels) == phrase


@pytest.mark.parametrize(
    "hint, label",
    [
        ("https://example.com/photos/golden-retriever.jpg?size=large", "golden-retriever"),
        ("https://example.com/a/My%20Dog.png", "My Dog"),
        ("https://example.com/", None),
        ("C:\\Users\\me\\beach day.jpeg", "beach day"),
        ("noextension", "noextension"),
        (None, None),
    ],
)
def test_name_hint(hint, label):
    assert ingest.name_hint(hint) == label


def test_a_new_store_never_reuses_connections_to_the_previous_file(new_db):
    first = store.Store(new_db())
    with first.connection():
        first.add(store.NewImage(b"x", "0" * 64, "image/png", 1, 1, "a", False, False))
    first.close()  # back to the pool, still open on a.db
    second = store.Store(new_db())
    try:
        with second.connection():
            assert second.count() == (0, 0)
    finally:
        second.shutdown()


def test_two_stores_in_one_process_are_independent(new_db):
    """Each Store owns its database: writes, reads and closing one never touch the other."""
    a, b = store.Store(new_db()), store.Store(new_db())
    try:
        errors = []

        def fill(s, label, n):
            try:
                with s.connection():
                    for i in range(n):
                        data = f"{label}{i}".encode()
                        s.add(store.NewImage(data, hashlib.sha256(data).hexdigest(), "image/png", 1, 1, label, False, False))
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=fill, args=(a, "a", 20)), threading.Thread(target=fill, args=(b, "b", 7))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        a.shutdown()  # closing one store's connections leaves the other working
        with b.connection():
            assert b.count() == (7, 7) and {r.label for r in b.list()[0]} == {"b"}
        with a.connection():
            assert a.count() == (20, 20) and {r.label for r in a.list()[0]} == {"a"}
    finally:
        a.shutdown()
        b.shutdown()


def test_match_all_with_a_name_nothing_has_is_empty(gallery):
    service, _ = gallery
    assert service.client.get("/images?objects=person,unicorn&match=all").json == []


def test_a_full_disk_is_store_full_not_a_rollback_error(tmp_path):
    """SQLite rolls back by itself on a full disk; peewee's ROLLBACK then fails and used to hide why."""
    s = store.Store(str(tmp_path / "full.db"))
    try:
        with s.connection():
            pages = s.database.execute_sql("PRAGMA page_count").fetchone()[0]
            s.database.execute_sql(f"PRAGMA max_page_count = {pages + 30}")  # about 120 KB more, per connection
            stored = 0
            with pytest.raises(store.StoreFull, match="disk holding the database is full"):
                for i in range(100):
                    data = bytes([i]) * 50_000
                    s.add(store.NewImage(data, hashlib.sha256(data).hexdigest(), "image/png", 1, 1, "x", False, False))
                    stored += 1
            assert 0 < stored < 100
            assert s.count() == (stored, stored)  # the failed one left nothing behind
            assert s.database.execute_sql("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        s.shutdown()


def test_an_id_is_never_reused_after_a_delete(service, photo):
    a = post_json(service, {"image": b64(photo("pets.jpg"))}).json["id"]
    service.client.delete(f"/images/{a}", status=204)
    b = post_json(service, {"image": b64(photo("cat.bmp"))}).json["id"]
    assert b > a  # /images/{a}/file was served as immutable: it must never name other bytes
    assert_problem(service.client.get(f"/images/{a}/file", status=404), 404)


def test_a_version_1_database_is_migrated_keeping_ids_and_detections(tmp_path, photo):
    """v1's image table had a plain INTEGER PRIMARY KEY (ids reused); v2 adds AUTOINCREMENT."""
    path = str(tmp_path / "v1.db")
    s = store.Store(path)
    with s.connection():
        for name, label in (("pets.jpg", "dog"), ("cat.bmp", "cat"), ("table.jpg", "cup")):
            data = photo(name)
            s.add(store.NewImage(data, hashlib.sha256(data).hexdigest(), "image/jpeg", 10, 10, name, False, True,
                                 (store.Found(label, 0.9, 0, 0, 1, 1),)))
    s.shutdown()
    # Turn it into what version 1 wrote: the same table without AUTOINCREMENT, and version 1.
    conn = sqlite3.connect(path)
    ddl = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'image'").fetchone()[0]
    assert "AUTOINCREMENT" in ddl
    conn.executescript(
        "PRAGMA foreign_keys = OFF; BEGIN;"
        + ddl.replace('"image"', '"image_old"', 1).replace(" AUTOINCREMENT", "") + ";"
        + "INSERT INTO image_old SELECT * FROM image; DROP TABLE image; ALTER TABLE image_old RENAME TO image;"
        + "CREATE INDEX image_sha256 ON image (sha256);"
        + "DELETE FROM sqlite_sequence; UPDATE setting SET value = '1' WHERE key = 'schema_version'; COMMIT;"
    )
    conn.close()

    s = store.Store(path)
    try:
        with s.connection():
            assert s.schema_version == store.SCHEMA_VERSION
            assert [(r.id, r.objects) for r in s.list()[0]] == [(3, ["cup"]), (2, ["cat"]), (1, ["dog"])]
            s.delete(3)
            data = b"new bytes"
            new = s.add(store.NewImage(data, hashlib.sha256(data).hexdigest(), "image/png", 1, 1, "n", False, False))
            assert new.id == 4
            assert s.database.execute_sql("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert s.database.execute_sql("PRAGMA foreign_key_check").fetchall() == []
            assert "AUTOINCREMENT" in s.database.execute_sql("SELECT sql FROM sqlite_master WHERE name = 'image'").fetchone()[0]
            s.delete(1)  # the cascade to detections still works on the rebuilt table
            assert s.database.execute_sql("SELECT COUNT(*) FROM detection WHERE image_id = 1").fetchone()[0] == 0
    finally:
        s.shutdown()


@pytest.mark.parametrize("include", ["foo", "data,foo", "", "DATA"])
def test_an_unknown_include_is_400_and_stores_nothing(service, include):
    res = service.client.post_json(f"/images?include={include}", {"image": b64(jpeg())}, status=400)
    assert "include" in assert_problem(res, 400)
    assert service.counts() == (0, 0)


@pytest.mark.parametrize("body", [{"image": None, "url": "https://example.com/a.jpg"}, {"url": None, "image": "aGk="}, {"image": None}])
def test_an_explicit_null_image_or_url_is_not_absent(service, body):
    assert_problem(post_json(service, body, status=400), 400)
    assert service.counts() == (0, 0)


def test_a_null_label_means_generate_one(service):
    assert post_json(service, {"image": b64(jpeg()), "label": None}).json["label_generated"] is True


def test_the_415_names_every_accepted_type(service):
    res = service.client.post("/images", b"x", content_type="text/plain", status=415)
    detail = assert_problem(res, 415)
    assert "application/json" in detail and "multipart/form-data" in detail and "x-www-form-urlencoded" in detail


# --------------------------------------------------------------------------------------------------------
# A large image's bytes are written while the model runs (ingest._Staging, Store.stage_blob)
# --------------------------------------------------------------------------------------------------------


def noise_jpeg(seed: int = 3, size=(1800, 1350)) -> bytes:
    """A camera-sized JPEG (noise at quality 95: past ingest.STAGE_BYTES)."""
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    assert len(data) >= ingest.STAGE_BYTES
    return data


def staged_rows(service) -> int:
    with service.store.connection():
        return service.store.database.execute_sql("SELECT COUNT(*) FROM staged_blob").fetchone()[0]


def test_a_large_upload_is_stored_whole_and_leaves_nothing_staged(service):
    data = noise_jpeg()
    img = post_json(service, {"image": b64(data), "detect": True}).json
    assert service.client.get(img["file_url"]).body == data
    assert service.counts() == (1, 1) and staged_rows(service) == 0


def test_a_large_upload_that_fails_in_detection_stores_nothing(service):
    broken = noise_jpeg()[: ingest.STAGE_BYTES + 1000]  # a JPEG cut off: it fails while the model's input is made
    assert_problem(post_json(service, {"image": b64(broken), "detect": True}, status=422), 422)
    assert service.counts() == (0, 0) and staged_rows(service) == 0


@pytest.mark.sqlite_only  # MIN_FREE_DISK_MB is SQLite's: PostgreSQL's disk is the server's
def test_a_large_upload_refused_by_the_disk_floor_while_staging_stores_nothing(make_service):
    service = make_service(min_free_disk_mb=2**40)
    assert_problem(post_json(service, {"image": b64(noise_jpeg()), "detect": True}, status=507), 507)
    assert service.counts() == (0, 0) and staged_rows(service) == 0


def test_bytes_staged_for_another_image_are_shared_not_written_twice(service):
    data = noise_jpeg()
    first = post_json(service, {"image": b64(data), "detect": True}).json
    with service.store.connection():
        assert service.store.stage_blob(first["sha256"], data) is False  # stored already: nothing written
    second = post_json(service, {"image": b64(data), "detect": True, "label": "again"}).json
    assert service.counts() == (2, 1) and second["sha256"] == first["sha256"]


def test_bytes_a_delete_took_meanwhile_are_written_again_by_the_add(service):
    """Staged bytes belong to no image until the add: a delete of another image with the same bytes may
    take them in between; the add writes them again, so the new image is never without its bytes."""
    data = noise_jpeg()
    sha = hashlib.sha256(data).hexdigest()
    s = service.store
    with s.connection():
        assert s.stage_blob(sha, data) is True
        s.database.execute_sql(f"DELETE FROM blob WHERE sha256 = {s.database.param}", [sha])  # what that delete does
        rec = s.add(store.NewImage(data, sha, "image/jpeg", 1800, 1350, "x", False, False))
        assert s.file(rec.id)[0] == data
    assert staged_rows(service) == 0


def test_bytes_staged_by_a_process_that_stopped_are_deleted_at_the_next_start(new_db):
    path = new_db()
    data, kept = noise_jpeg(1), noise_jpeg(2)
    s = store.Store(path)
    try:
        with s.connection():
            s.stage_blob(hashlib.sha256(data).hexdigest(), data)  # then the process is killed
            s.stage_blob(hashlib.sha256(kept).hexdigest(), kept)
            s.add(store.NewImage(kept, hashlib.sha256(kept).hexdigest(), "image/jpeg", 1800, 1350, "k", False, False))
    finally:
        s.shutdown()
    again = store.Store(path)
    try:
        with again.connection():
            assert again.count() == (1, 1)  # the unfinished upload's bytes are gone, the image's stay
            assert again.database.execute_sql("SELECT COUNT(*) FROM staged_blob").fetchone()[0] == 0
    finally:
        again.shutdown()
