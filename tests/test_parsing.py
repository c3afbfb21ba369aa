"""Request parsing under attack (issue 10): bounded bodies, and every client mistake a 4xx.

Bodies built to make a parser do a lot of work for few bytes: a URL-encoded form of many keys, a JSON
array of many empty objects, a multipart body of many parts or endless part headers. Each must be
refused through the real app (WebTest) within a second, raising the peak RSS by under 50 MB, and store
nothing. Then the inputs that used to end in a 500 or be silently replaced: lone surrogates, a form field
where the file part belongs, bytes that are not UTF-8, control characters and bidi overrides in labels
and file names, `objects=%FF`.
"""

from __future__ import annotations

import gc
import io
import json
import random
import time
import wsgiref.util

import pytest
from test_hostile import assert_nothing_kept, imgur_client

import ingest
import server
from fake_imgur import FakeImgur
from helpers import assert_problem, b64, jpeg, peak_rss_mb, reset_peak_rss, rss_mb

JPEG = jpeg()
FORM = "application/x-www-form-urlencoded"
BOUNDARY = "xYzZy0123"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
TIME_LIMIT = 1.0  # s, per refusal
RSS_LIMIT = 50.0  # MB of peak RSS growth, per refusal


def _bytes(text: bytes | str) -> bytes:
    return text.encode() if isinstance(text, str) else text


def part(name: bytes | str | None, content: bytes, filename: bytes | str | None = None, headers: bytes = b"") -> bytes:
    """One multipart part (without its delimiter), the Content-Disposition written by hand."""
    disposition = b"Content-Disposition: form-data"
    if name is not None:
        disposition += b'; name="' + _bytes(name) + b'"'
    if filename is not None:
        disposition += b'; filename="' + _bytes(filename) + b'"'
    return disposition + b"\r\n" + headers + b"\r\n" + content


def multipart(*parts: bytes) -> bytes:
    delimiter = b"--" + BOUNDARY.encode()
    return b"".join(delimiter + b"\r\n" + p + b"\r\n" for p in parts) + delimiter + b"--\r\n"


def post(service, path: str, body: bytes, content_type: str, status: int = 200):
    """POST raw bytes. (WebTest re-encodes a body whose content_type= is multipart; a header it leaves be.)"""
    return service.client.post(path, body, headers={"Content-Type": content_type}, status=status)


def measure(service, path: str, body: bytes, content_type: str, code: int):
    """POST `body`; assert a problem with status `code`; returns (detail, seconds, peak RSS growth MB)."""
    gc.collect()
    before = rss_mb()
    reset_peak_rss()
    start = time.perf_counter()
    res = post(service, path, body, content_type, code)
    seconds = time.perf_counter() - start
    grown = peak_rss_mb() - before
    return assert_problem(res, code), seconds, grown


# --------------------------------------------------------------------------------------------------------
# 1. CPU and memory while parsing bodies
# --------------------------------------------------------------------------------------------------------


def test_urlencoded_body_over_64kb_is_a_413_before_it_is_parsed(service):
    """3 MB of `0&1&2&...` (500,000 keys) as a URL-encoded form: 413 naming the 64 KB limit at once."""
    body = "&".join(str(i) for i in range(500_000)).encode()
    assert len(body) > 3_000_000
    detail, seconds, grown = measure(service, "/images", body, FORM, 413)
    assert "64 KB" in detail and "multipart/form-data" in detail, detail
    assert seconds < TIME_LIMIT and grown < RSS_LIMIT
    assert_nothing_kept(service)


def test_urlencoded_body_without_length_is_read_only_to_64kb(service):
    """No Content-Length (a chunked body, as waitress hands it on): the app reads 64 KB + 1 bytes of it,
    not the whole body limit, before refusing."""
    body = io.BytesIO(b"label=" + b"x" * 2_000_000)
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/images", "CONTENT_TYPE": FORM, "wsgi.input": body,
               "HTTP_TRANSFER_ENCODING": "chunked"}
    wsgiref.util.setup_testing_defaults(environ)
    answer = {}
    chunks = service.wsgi(environ, lambda status, headers, exc_info=None: answer.update(status=status))
    detail = json.loads(b"".join(chunks))["detail"]
    assert answer["status"].startswith("413") and "64 KB" in detail, (answer, detail)
    assert body.tell() <= 64 * 1024 + 1
    assert_nothing_kept(service)


def test_urlencoded_form_of_too_many_fields_is_a_400(service):
    """Under 64 KB but 5,000 fields: 400 naming the limit of 8 fields."""
    body = b"&".join(b"f%d=1" % i for i in range(5000))
    detail, seconds, _ = measure(service, "/images", body, FORM, 400)
    assert "8 fields" in detail, detail
    assert seconds < TIME_LIMIT
    assert_nothing_kept(service)


def test_json_array_of_a_million_objects_is_a_400_before_json_loads(service):
    """`[{},{},...]`, 4.5 MB (1.5 million objects; json.loads would build about 100 MB of them)."""
    body = b"[" + b",".join([b"{}"] * 1_500_000) + b"]"
    detail, seconds, grown = measure(service, "/images", body, "application/json", 400)
    assert "1,000 JSON tokens" in detail, detail
    assert seconds < TIME_LIMIT and grown < RSS_LIMIT
    assert_nothing_kept(service)


@pytest.fixture
def fake():
    with FakeImgur() as f:
        yield f


def test_json_token_bound_on_upload_jobs(make_service, fake):
    """The same body on POST /v1/images/upload: refused before json.loads, nothing queued; the bound
    leaves room for the longest batch jobs.check looks at (10 x JOB_MAX_URLS), whose own message still comes."""
    service = make_service(uploader=imgur_client(fake), upload_workers=0, job_max_urls=100)
    body = b'{"urls": [' + b",".join([b"{}"] * 1_500_000) + b"]}"
    detail, seconds, grown = measure(service, "/v1/images/upload", body, "application/json", 400)
    assert "JSON tokens" in detail and "JOB_MAX_URLS" in detail, detail
    assert seconds < TIME_LIMIT and grown < RSS_LIMIT
    urls = [f"https://example.com/{i}.jpg" for i in range(1001)]
    res = service.client.post_json("/v1/images/upload", {"urls": urls}, status=400)
    assert "1,001 entries" in assert_problem(res, 400)
    assert service.jobs.stats() == {"jobs": 0, "backlog": 0, "running": 0}
    assert_nothing_kept(service, fake=fake)


def test_multipart_body_of_100000_parts_is_a_400_before_parsing(service):
    """100,000 small parts (5 MB): 400 naming the limit of 8 parts, before any part is built."""
    body = multipart(*[part(f"f{i}", b"v") for i in range(100_000)])
    detail, seconds, grown = measure(service, "/images", body, MULTIPART, 400)
    assert "8 parts" in detail, detail
    assert seconds < TIME_LIMIT and grown < RSS_LIMIT
    assert_nothing_kept(service)


def test_multipart_part_headers_are_bounded(service):
    """One part with 3 MB of header lines: 400 naming the 8 KB limit on a part's headers."""
    headers = b"X-Padding: " + b"a" * 50 + b"\r\n"
    body = multipart(part("image", JPEG, "a.jpg", headers=headers * 50_000))
    detail, seconds, grown = measure(service, "/images", body, MULTIPART, 400)
    assert "8 KB" in detail and "headers" in detail, detail
    assert seconds < TIME_LIMIT and grown < RSS_LIMIT
    assert_nothing_kept(service)


def test_json_scan_counts_tokens_outside_strings_only():
    """Brackets, braces, commas and colons inside strings are not tokens; an escaped quote does not end
    its string (it costs a token, which bounds the scan's steps)."""
    over = server.json_tokens_over
    assert not over(b'{"image": "' + b",:[]{}" * 10_000 + b'"}', 10)
    assert not over(b'{"image": "\\"' + b",[" * 10_000 + b'\\""}', 10)  # escaped quotes do not end it
    assert over(b'{"image": "\\\\"' + b",[" * 10_000 + b"}", 100)  # an escaped backslash, then the end
    assert over(b'{"image": "\\\\\\\\\\\\"' + b",1" * 200 + b"}", 100)
    assert not over(b'{"a": "\\\\\\"' + b",1" * 200 + b'"}', 100)  # \\ then \" : still inside
    assert over(b"[" + b"{}," * 400 + b"{}]", 1000)
    assert not over(b"[" + b"{}," * 300 + b"{}]", 1000)
    assert over(b'""' * 1001, 1000)  # strings are tokens too
    assert not over(b'{"a": "unterminated', 10)  # json.loads refuses it
    assert not over(b"", 10)
    assert over(b'"' + b'\\"' * 1001 + b'"', 1000)  # each escaped quote costs a look: a token
    assert not over(b'{"image": "' + b"ab\\/" * 100_000 + b'"}', 10)  # PHP escapes every /


def _reference_tokens(text: str) -> int:
    """The token count json_tokens_over bounds, character by character."""
    tokens, i, inside = 0, 0, False
    while i < len(text):
        c = text[i]
        if inside and c == "\\":
            tokens += text[i + 1] == '"'
            i += 2
            continue
        if c == '"':
            inside = not inside
            tokens += inside
        elif not inside and c in "{}[],:":
            tokens += 1
        i += 1
    return tokens


def test_json_scan_matches_a_character_by_character_count():
    """On random documents (strings full of quotes, backslashes and punctuation), the scan's bound is exact."""
    rng = random.Random(10)
    alphabet = ['"', "\\", ",", ":", "[", "]", "{", "}", "a", " ", "\u00e9", "\u202e", "\n", "/"]

    def text(most):
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(most)))

    def value(depth):
        kind = rng.randrange(6 if depth < 4 else 3)
        if kind == 0:
            return text(12)
        if kind == 1:
            return rng.choice([0, -1.5, True, None])
        if kind == 2:
            return ""
        if kind == 3:
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return {text(6): value(depth + 1) for _ in range(rng.randrange(4))}

    for _ in range(300):
        doc = json.dumps(value(0), ensure_ascii=rng.random() < 0.5)
        n = _reference_tokens(doc)
        data = doc.encode()
        assert not server.json_tokens_over(data, n) and (n == 0 or server.json_tokens_over(data, n - 1)), doc


def test_json_token_scan_is_cheap_for_a_20mb_base64_body():
    """A 20 MB image as base64 JSON (28 MB) is scanned in a small fraction of what json.loads takes."""
    encoded = b64(bytes(range(256)) * (20 * 4096)).encode()
    body = b'{"image": "' + encoded + b'", "label": "a \\"b\\"", "detect": true}'
    assert len(body) > 27_000_000
    php = b'{"image": "' + encoded.replace(b"/", b"\\/") + b'"}'  # PHP's json_encode escapes every /

    def best(fn, n=3):
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    scan = best(lambda: server.json_tokens_over(body, server.JSON_MAX_TOKENS))
    parse = best(lambda: json.loads(body), n=1)
    assert not server.json_tokens_over(body, server.JSON_MAX_TOKENS)
    assert scan < 0.05 and scan < parse / 5
    assert best(lambda: server.json_tokens_over(php, server.JSON_MAX_TOKENS)) < 0.05


def test_large_base64_json_upload_still_works(service, photo):
    """A normal base64 body passes the scan: a real photo, with a label full of JSON punctuation."""
    label = 'a "quoted", {braced} [list]: \\ done'
    res = service.client.post_json("/images", {"image": b64(photo("pets.jpg")), "label": label})
    assert res.json["label"] == label and service.counts() == (1, 1)


# --------------------------------------------------------------------------------------------------------
# 2. Every client mistake is a 4xx, never a 500
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"image": "%s", "label": "a\\ud800b"}' % b64(JPEG).encode(),  # an escaped lone surrogate
        b'{"image": "%s", "label": "a\\udfffb"}' % b64(JPEG).encode(),
        b'{"image": "%s", "label": "a\xed\xa0\x80b"}' % b64(JPEG).encode(),  # one encoded as bytes
    ],
    ids=["escaped high", "escaped low", "raw bytes"],
)
def test_label_holding_a_lone_surrogate_is_a_400(service, raw):
    detail = assert_problem(post(service, "/images", raw, "application/json", 400), 400)
    assert "label" in detail or "UTF-8" in detail, detail
    assert_nothing_kept(service)


def test_a_surrogate_pair_is_one_character(service):
    body = b'{"image": "%s", "label": "dog \\ud83d\\udc36"}' % b64(JPEG).encode()
    res = post(service, "/images", body, "application/json")
    assert res.json["label"] == "dog \U0001f436"


def test_image_sent_as_a_form_field_is_a_400_naming_the_at_sign(service, photo):
    """`curl -F "image=<pets.jpg"` sends the file's bytes as a text field, not a file part."""
    for content in (photo("pets.jpg"), b"not a file"):
        body = multipart(part("image", content))
        detail = assert_problem(post(service, "/images", body, MULTIPART, 400), 400)
        assert "file part" in detail and "image=@" in detail, detail
    assert_nothing_kept(service)


@pytest.mark.parametrize(
    "body, words",
    [
        (multipart(part("image", JPEG, "a.jpg"), part("label", b"\xff\xfe")), "`label` is not UTF-8"),
        (multipart(part("image", JPEG, "a.jpg"), part("detect", b"\xff")), "`detect` is not UTF-8"),
        (multipart(part("image", JPEG, b"\xff\xfe.jpg")), "not UTF-8"),
        (multipart(part(b"ima\xffge", JPEG, "a.jpg")), "not UTF-8"),
        (multipart(part("url", b"https://example.com/\xff.jpg")), "`url` is not UTF-8"),
        (multipart(part("image", JPEG, "a.jpg"), part("image", JPEG, "b.jpg")), "more than once"),
        (multipart(part("image", JPEG, "a.jpg"), part("labels", b"x")), "unknown field"),
        (multipart(part("image", JPEG, "a.jpg"), part("label", b"x", "label.txt")), "text field"),
        (multipart(part(None, JPEG, "a.jpg")), "name"),
        (b"--" + BOUNDARY.encode() + b"\r\nX-Other: 1\r\n\r\nabc\r\n--" + BOUNDARY.encode() + b"--\r\n", "Content-Disposition"),
        (b"--" + BOUNDARY.encode() + b"\r\n" + part("image", JPEG, "a.jpg"), "closing boundary"),
        (b"no boundary at all", "boundary"),
        (b"--" + BOUNDARY.encode() + b"--\r\n", "exactly one"),
    ],
    ids=["label", "detect", "filename", "name", "url", "twice", "unknown", "label as file", "no name",
         "no disposition", "unterminated", "no boundary", "no parts"],
)
def test_malformed_multipart_is_a_400(service, body, words):
    detail = assert_problem(post(service, "/images", body, MULTIPART, 400), 400)
    assert words in detail, detail
    assert_nothing_kept(service)


def test_multipart_without_a_boundary_parameter_is_a_400(service):
    body = multipart(part("image", JPEG, "a.jpg"))
    detail = assert_problem(post(service, "/images", body, "multipart/form-data", 400), 400)
    assert "boundary" in detail
    assert_nothing_kept(service)


@pytest.mark.parametrize(
    "filename, label",
    [
        ("a\x00b.jpg", "ab"),
        ("a\rb.jpg", "a b"),
        ("a\x1b[31mred.jpg", "a[31mred"),
        ("\u202egpj.exe", "gpj"),
        ("x\u2066y\u2069.png", "xy"),
        ("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645.jpg", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"),
    ],
    ids=["NUL", "CR", "ESC", "RLO", "isolates", "ZWNJ kept"],
)
def test_file_names_with_controls_give_clean_labels(service, filename, label):
    """Control characters and bidi controls are stripped from a label made from a file name (CR and the
    like become a space first); joiners stay."""
    res = post(service, "/images", multipart(part("image", JPEG, filename)), MULTIPART)
    assert (res.json["label"], res.json["label_generated"]) == (label, True)


def test_generated_labels_from_urls_are_stripped_too():
    assert ingest.name_hint("https://example.com/%E2%80%AEgpj.exe") == "gpj"
    assert ingest.name_hint("https://example.com/a%00b%1b.jpg") == "ab"
    assert ingest.name_hint("\x00\u202e.jpg") is None
    label, generated = ingest.make_label(None, (), "\u202e\x00", "0123456789abcdef")
    assert (label, generated) == ("untitled 01234567", True)


BAD_LABELS = ["a\x00b", "tab\there", "line\nbreak", "cr\rhere", "esc\x1b[2J", "del\x7f", "c1\x85x", "\u202egpj.exe",
              "\u202aa", "\u202db", "\u2066x\u2069", "\u2068y"]


@pytest.mark.parametrize("label", BAD_LABELS, ids=[repr(x) for x in BAD_LABELS])
def test_given_label_with_control_or_bidi_characters_is_a_400(service, label):
    detail = assert_problem(service.client.post_json("/images", {"image": b64(JPEG), "label": label}, status=400), 400)
    assert "`label`" in detail and "U+" in detail, detail
    form = multipart(part("image", JPEG, "a.jpg"), part("label", label.encode()))
    detail = assert_problem(post(service, "/images", form, MULTIPART, 400), 400)
    assert "`label`" in detail and "U+" in detail, detail
    assert_nothing_kept(service)


@pytest.mark.parametrize(
    "label",
    ["\U0001f468\u200d\U0001f469\u200d\U0001f467 family", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
     "\u200e\u05e9\u05dc\u05d5\u05dd"],
    ids=["ZWJ emoji", "ZWNJ Persian", "LRM"],
)
def test_labels_with_joiners_are_kept(service, label):
    """Joiners (U+200C, U+200D) stay: emoji sequences and Persian need them (and marks such as LRM)."""
    res = service.client.post_json("/images", {"image": b64(JPEG), "label": label})
    assert (res.json["label"], res.json["label_generated"]) == (label, False)


def test_surrounding_whitespace_is_trimmed_before_the_check(service):
    res = service.client.post_json("/images", {"image": b64(JPEG), "label": "\r\n dog \n"})
    assert res.json["label"] == "dog"


def test_check_label_refuses_what_the_store_cannot_hold():
    with pytest.raises(ingest.InvalidLabel, match="surrogate"):
        ingest.check_label("a\ud800")
    with pytest.raises(ingest.InvalidLabel, match="U\\+202E"):
        ingest.check_label("\u202egpj.exe")
    assert ingest.check_label("a\u200db") == "a\u200db"


def test_objects_that_is_not_utf8_is_a_400(service):
    service.client.post_json("/images", {"image": b64(JPEG), "label": "kept"})
    for query in ("objects=%FF", "objects=dog,%C3", "objects=%ED%A0%80"):
        detail = assert_problem(service.client.get(f"/images?{query}", status=400), 400)
        assert "`objects`" in detail and "UTF-8" in detail, detail
    assert service.client.get("/images?objects=%C3%A9").json == []  # valid UTF-8 (é): no such object


def test_urlencoded_field_that_is_not_utf8_is_a_400(service):
    """`label=%FF` used to be dropped silently (a label was generated); `url=%FF` said "send exactly one"."""
    for body, name in ((b"url=https://example.com/a.jpg&label=%FF", "label"), (b"url=%FF", "url"),
                       (b"url=https://example.com/a.jpg&detect=%FF", "detect"), (b"url=https://example.com/\xff", "body")):
        detail = assert_problem(post(service, "/images", body, FORM, 400), 400)
        assert "UTF-8" in detail and name in detail, detail
    assert_nothing_kept(service)


def test_urlencoded_form_still_works(make_service, photo):
    """A form with only `url` (what a browser sends as URL-encoded): downloaded, labelled, stored."""
    from loopback import Loopback, ok

    with Loopback({"/golden-retriever.jpg": ok(photo("pets.jpg"), "image/jpeg")}) as host:
        service = make_service()
        body = f"url={host.url('/golden-retriever.jpg')}&label=&detect=off".encode()
        res = post(service, "/images", body, FORM)
        assert res.json["label"] == "golden-retriever" and res.json["source_url"] == host.url("/golden-retriever.jpg")
        dup = post(service, "/images", body + b"&label=x", FORM, 400)
        assert "more than once" in assert_problem(dup, 400)


def test_deep_nesting_under_the_token_bound_is_still_a_400(make_service, fake):
    """20,000 nested `[` fit a job's token bound (21,000); json.loads' recursion limit refuses them."""
    service = make_service(uploader=imgur_client(fake), upload_workers=0)
    res = post(service, "/v1/images/upload", b'{"urls": ' + b"[" * 20_000, "application/json", 400)
    assert "not valid JSON" in assert_problem(res, 400)
    assert_nothing_kept(service, fake=fake)
