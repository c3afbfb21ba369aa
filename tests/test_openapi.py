"""openapi.json stays true: it lists exactly the app's routes, it is a well-formed OpenAPI 3.1 document,
and real answers of the real app (model, SQLite, loopback image host, fake Imgur) have a documented status,
content type, body schema and headers.

There is no OpenAPI 3.1 meta-schema offline, so the document's structure is checked by hand below, and
every schema in it against the JSON Schema 2020-12 meta-schema (the dialect of OpenAPI 3.1), which
jsonschema carries.
"""

import base64
import json
import os
import re
import threading
import uuid

import jsonschema
import pytest
import referencing
from referencing.jsonschema import DRAFT202012

import detect
import imgur
import server
from fake_imgur import FakeImgur
from helpers import b64  # noqa: E402
from loopback import Loopback, ok

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_PATH = os.path.join(ROOT, "openapi.json")
DOC_URI = "urn:imgsvc:openapi.json"
PROBLEM_JSON = "application/problem+json"
PROBLEM_REF = "#/components/schemas/Problem"
DEEPSTACK_REF = "#/components/schemas/DeepStackError"  # every error under /v1/vision/ (server.refusal)

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
TOP_FIELDS = {"openapi", "info", "jsonSchemaDialect", "servers", "paths", "webhooks", "components", "security", "tags", "externalDocs"}
PATH_ITEM_FIELDS = {"$ref", "summary", "description", "servers", "parameters"} | METHODS
OPERATION_FIELDS = {
    "tags", "summary", "description", "externalDocs", "operationId", "parameters", "requestBody", "responses",
    "callbacks", "deprecated", "security", "servers",
}
PARAMETER_FIELDS = {
    "name", "in", "description", "required", "deprecated", "allowEmptyValue", "style", "explode", "allowReserved",
    "schema", "example", "examples", "content",
}
HEADER_FIELDS = {"description", "required", "deprecated", "style", "explode", "schema", "example", "examples", "content"}
RESPONSE_FIELDS = {"description", "headers", "content", "links"}
MEDIA_TYPE_FIELDS = {"schema", "example", "examples", "encoding"}
COMPONENT_KINDS = {
    "schemas", "responses", "parameters", "examples", "requestBodies", "headers", "securitySchemes", "links",
    "callbacks", "pathItems",
}
# Components no operation can reference but the service really uses (405 can happen on any path).
USED_OUTSIDE_OPERATIONS = {"#/components/responses/MethodNotAllowed"}


# --------------------------------------------------------------------------------------------------------
# Reading the document
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def doc() -> dict:
    with open(DOC_PATH, encoding="utf-8") as f:
        return json.load(f)


def pointer(doc: dict, ref: str):
    assert ref.startswith("#/"), f"only local references are used: {ref}"
    node = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def deref(doc: dict, node):
    """An OpenAPI Reference Object followed to its target; sibling summary/description override (3.1)."""
    for _ in range(10):
        if not (isinstance(node, dict) and "$ref" in node):
            return node
        overrides = {k: v for k, v in node.items() if k in ("summary", "description")}
        node = {**pointer(doc, node["$ref"]), **overrides}
    raise AssertionError("reference chain too long")


def operations(doc: dict):
    """(path, method, path item, operation) for every operation."""
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield path, method, item, op


def walk(node, where=""):
    """Every (location, dict) in a JSON value."""
    if isinstance(node, dict):
        yield where, node
        for k, v in node.items():
            yield from walk(v, f"{where}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{where}/{i}")


def schema_validator(doc: dict, schema: dict) -> jsonschema.Draft202012Validator:
    """A validator for a schema of the document; its "#/components/..." references resolve into the document."""

    def absolute(node):
        if isinstance(node, dict):
            return {k: (DOC_URI + v if k == "$ref" and v.startswith("#") else absolute(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [absolute(v) for v in node]
        return node

    registry = referencing.Registry().with_resource(DOC_URI, DRAFT202012.create_resource(doc))
    return jsonschema.Draft202012Validator(
        absolute(schema), registry=registry, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def assert_valid(doc: dict, value, schema: dict, what: str) -> None:
    errors = sorted(schema_validator(doc, schema).iter_errors(value), key=lambda e: list(e.absolute_path))
    assert not errors, f"{what} does not match the document:\n" + "\n".join(
        f"  at {'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors[:10]
    )


# --------------------------------------------------------------------------------------------------------
# The document and the app have the same routes
# --------------------------------------------------------------------------------------------------------


def test_document_lists_exactly_the_apps_routes(service, doc):
    app_routes = {(r.method, re.sub(r"<(\w+)(:[^>]*)?>", r"{\1}", r.rule)) for r in service.wsgi.routes}
    documented = {(method.upper(), path) for path, method, _, _ in operations(doc)}
    assert documented - app_routes == set(), "documented but not served"
    assert app_routes - documented == set(), "served but not documented"


def test_openapi_json_serves_the_document_with_the_server_version(service, doc):
    res = service.client.get("/openapi.json")
    assert res.content_type == "application/json"
    assert res.json == {**doc, "info": {**doc["info"], "version": server.__version__}}


# --------------------------------------------------------------------------------------------------------
# The document is well-formed OpenAPI 3.1
# --------------------------------------------------------------------------------------------------------


def test_document_is_pretty_printed_json():
    with open(DOC_PATH, encoding="utf-8") as f:
        text = f.read()
    assert text == json.dumps(json.loads(text), indent=2, ensure_ascii=False) + "\n", (
        "format openapi.json with json.dumps(doc, indent=2, ensure_ascii=False) plus a final newline"
    )


def test_document_is_structurally_openapi_3_1(doc):
    assert set(doc) <= TOP_FIELDS, set(doc) - TOP_FIELDS
    assert re.fullmatch(r"3\.1\.\d+", doc["openapi"]), f"openapi must be 3.1.x, not {doc['openapi']}"
    assert isinstance(doc["info"]["title"], str) and isinstance(doc["info"]["version"], str)
    tags = {t["name"] for t in doc.get("tags", [])}

    # Every reference resolves, and every component is used.
    refs = {node["$ref"] for _, node in walk(doc) if isinstance(node.get("$ref"), str)}
    for ref in refs:
        pointer(doc, ref)
    assert set(doc["components"]) <= COMPONENT_KINDS
    for kind, named in doc["components"].items():
        for name in named:
            assert re.fullmatch(r"[a-zA-Z0-9._-]+", name), name
            ref = f"#/components/{kind}/{name}"
            if kind == "securitySchemes":  # named by security requirements, not referenced
                assert any(name in req for _, node in walk(doc) for req in node.get("security", [])), ref
                continue
            assert ref in refs or ref in USED_OUTSIDE_OPERATIONS, f"{ref} is never used"

    operation_ids = []
    for path, item in doc["paths"].items():
        assert path.startswith("/") and set(item) <= PATH_ITEM_FIELDS, path
    for path, method, item, op in operations(doc):
        where = f"{method.upper()} {path}"
        assert set(op) <= OPERATION_FIELDS, (where, set(op) - OPERATION_FIELDS)
        assert op.get("summary") and op.get("operationId"), where
        operation_ids.append(op["operationId"])
        assert set(op.get("tags", [])) <= tags, where

        # Parameters: path-level ones, overridden by the operation's (by name and location).
        params = {}
        for p in item.get("parameters", []) + op.get("parameters", []):
            p = deref(doc, p)
            assert set(p) <= PARAMETER_FIELDS and p["in"] in {"query", "header", "path", "cookie"}, (where, p)
            assert ("schema" in p) != ("content" in p), (where, p["name"])
            assert p.get("description"), (where, p["name"])
            if p["in"] == "path":
                assert p.get("required") is True, (where, p["name"])
            params[(p["name"], p["in"])] = p
        templated = set(re.findall(r"\{([^}/]+)\}", path))
        assert {name for name, where_ in params if where_ == "path"} == templated, where

        if "requestBody" in op:
            body = deref(doc, op["requestBody"])
            assert body["content"], where
            for media in body["content"].values():
                assert set(media) <= MEDIA_TYPE_FIELDS, where

        assert op["responses"], where
        for code, response in op["responses"].items():
            assert re.fullmatch(r"[1-5](\d\d|XX)|default", code), (where, code)
            response = deref(doc, response)
            assert set(response) <= RESPONSE_FIELDS and response.get("description"), (where, code)
            for name, header in response.get("headers", {}).items():
                header = deref(doc, header)
                assert set(header) <= HEADER_FIELDS and header.get("description"), (where, code, name)
                assert name.lower() != "content-type", "Content-Type is described by `content`"
            content = response.get("content", {})
            if code[0] in "45" and path.startswith("/v1/vision/"):
                assert content == {"application/json": {"schema": {"$ref": DEEPSTACK_REF}}}, (where, code)
            elif code[0] in "45":
                assert content == {PROBLEM_JSON: {"schema": {"$ref": PROBLEM_REF}}}, (where, code)
            elif code in ("204", "304"):
                assert not content, (where, code)
            for media in content.values():
                assert set(media) <= MEDIA_TYPE_FIELDS, (where, code)
        assert "500" in op["responses"], f"{where}: any route can fail unexpectedly"
    assert len(operation_ids) == len(set(operation_ids)), "operationId must be unique"


def test_every_schema_is_valid_json_schema_2020_12(doc):
    """Component schemas and every inline schema (parameters, headers, media types)."""
    schemas = [(f"#/components/schemas/{name}", s) for name, s in doc["components"]["schemas"].items()]
    for where, node in walk(doc):
        if where.startswith("/components/schemas"):
            continue
        if isinstance(node.get("schema"), dict):
            schemas.append((where + "/schema", node["schema"]))
    assert len(schemas) > len(doc["components"]["schemas"])
    for where, schema in schemas:
        jsonschema.Draft202012Validator.check_schema(schema)
        for at, sub in walk(schema, where):
            # A required name that is not a property is a typo when nothing else is allowed.
            if "required" in sub and "properties" in sub and sub.get("additionalProperties") is False:
                assert set(sub["required"]) <= set(sub["properties"]), at


# --------------------------------------------------------------------------------------------------------
# Real answers match the document
# --------------------------------------------------------------------------------------------------------


class Checker:
    """Checks each answer against the operation it came from, and remembers which operations were seen."""

    def __init__(self, doc: dict):
        self.doc = doc
        self.seen: set[tuple[str, str]] = set()

    def __call__(self, res, method: str, path: str, expect: int | str):
        """`expect` is a status, or a class such as "2xx" where the document decides the exact one."""
        got = res.status_int if isinstance(expect, int) else f"{res.status_int // 100}xx"
        assert got == expect, f"{method} {path}: expected {expect}, got {res.status}: {res.text[:300]}"
        op = self.doc["paths"][path][method.lower()]
        code = str(res.status_int)
        assert code in op["responses"], f"{method} {path} answered {code}, not documented ({sorted(op['responses'])})"
        self.seen.add((method.lower(), path))
        self.response(res, deref(self.doc, op["responses"][code]), f"{method} {path} {code}")
        return res

    def response(self, res, response: dict, what: str) -> None:
        for name, header in response.get("headers", {}).items():
            header = deref(self.doc, header)
            value = res.headers.get(name)
            if header.get("required"):
                assert value is not None, f"{what}: the {name} header is missing"
            if value is not None:
                assert_valid(self.doc, value, header["schema"], f"{what}: header {name}")
        content = response.get("content")
        if not content:
            assert res.body == b"", f"{what}: documented without a body"
            return
        assert res.content_type in content, f"{what}: {res.content_type} is not documented ({sorted(content)})"
        media = content[res.content_type]
        if res.content_type.endswith("json"):
            assert_valid(self.doc, res.json, media["schema"], what)
            if res.content_type == PROBLEM_JSON:
                assert res.json["status"] == res.status_int
            elif res.status_int >= 400:
                assert res.json["code"] == res.status_int
        else:
            assert res.body, f"{what}: empty body"





def test_real_answers_match_the_document(service, make_service, photo, doc):
    client, check = service.client, Checker(doc)
    schemas = doc["components"]["schemas"]
    data = photo("pets.jpg")

    def post_json(url, body, expect):
        if expect == "2xx":
            assert_valid(doc, body, schemas["NewImageJson"], "the request body")
        return check(client.post_json(url, body, status="*"), "POST", "/images", expect)

    check(client.get("/health", status="*"), "GET", "/health", 200)

    # Three ways in: base64 JSON with detection, multipart, a URL.
    first = post_json("/images", {"image": b64(data), "detect": True}, "2xx").json
    assert "dog" in first["objects"] and first["detection_enabled"] and "data" not in first

    fields = {"label": "pets", "detect": "yes"}
    assert_valid(doc, {**fields, "image": "(file)"}, schemas["NewImageForm"], "the multipart form")
    res = client.post("/images?include=data", fields, upload_files=[("image", "pets.jpg", data)], status="*")
    second = check(res, "POST", "/images", "2xx").json
    assert base64.b64decode(second["data"]) == data and second["label"] == "pets"

    with Loopback({"/pets.jpg": ok(data, "image/jpeg")}) as host:
        third = post_json("/images", {"url": host.url("/pets.jpg"), "detect": True}, "2xx").json
        assert third["source_url"] == host.url("/pets.jpg")
        post_json("/images", {"url": host.url("/missing.jpg")}, 422)  # the host answers 404

    # Listing: pages linked by the Link header, and search by object.
    page = check(client.get("/images?limit=2", status="*"), "GET", "/images", 200)
    assert [i["id"] for i in page.json] == [third["id"], second["id"]]
    link = re.fullmatch(r'<([^>]+)>; rel="next"', page.headers["Link"]).group(1)
    last = check(client.get(link, status="*"), "GET", "/images", 200)
    assert [i["id"] for i in last.json] == [first["id"]] and "Link" not in last.headers
    dogs = check(client.get("/images?objects=dog&min_confidence=0.5", status="*"), "GET", "/images", 200).json
    assert [i["id"] for i in dogs] == [third["id"], second["id"], first["id"]]
    words = check(client.get("/images?objects=dogs&objects=cat&limit=1", status="*"), "GET", "/images", 200)
    assert [i["id"] for i in words.json] == [third["id"]] and "objects=dogs&objects=cat" in words.headers["Link"]
    check(client.get("/images?object=dog", status="*"), "GET", "/images", 400)
    check(client.get("/images?include=data", status="*"), "GET", "/images", 400)

    # One image, its bytes, a revalidation, its deletion.
    path = f"/images/{first['id']}"
    assert check(client.get(path, status="*"), "GET", "/images/{id}", 200).json == first
    with_data = check(client.get(path + "?include=data", status="*"), "GET", "/images/{id}", 200).json
    assert base64.b64decode(with_data.pop("data")) == data and with_data == first
    check(client.get(path + "?include=bogus", status="*"), "GET", "/images/{id}", 400)
    res = check(client.get(path + "/file", status="*"), "GET", "/images/{id}/file", 200)
    assert res.body == data and res.content_type == "image/jpeg"
    etag = res.headers["ETag"]
    res = client.get(path + "/file", headers={"If-None-Match": etag}, status="*")
    check(res, "GET", "/images/{id}/file", 304)
    webp = {"Accept": "image/avif,image/webp,*/*"}
    res = check(client.get(path + "/thumbnail?size=160", headers=webp, status="*"), "GET", "/images/{id}/thumbnail", 200)
    assert res.content_type == "image/webp"
    res = client.get(path + "/thumbnail?size=160", headers={**webp, "If-None-Match": res.headers["ETag"]}, status="*")
    check(res, "GET", "/images/{id}/thumbnail", 304)
    assert check(client.get(path + "/thumbnail", status="*"), "GET", "/images/{id}/thumbnail", 200).content_type == "image/jpeg"
    check(client.get(path + "/thumbnail?size=100", status="*"), "GET", "/images/{id}/thumbnail", 400)
    res = check(client.get(path + "/annotated?size=320", status="*"), "GET", "/images/{id}/annotated", 200)
    res = client.get(path + "/annotated?size=320", headers={"If-None-Match": res.headers["ETag"]}, status="*")
    check(res, "GET", "/images/{id}/annotated", 304)
    check(client.get(path + "/annotated?size=big", status="*"), "GET", "/images/{id}/annotated", 400)
    again = check(client.post_json(path + "/detect", {"threshold": 0.4}, status="*"), "POST", "/images/{id}/detect", 200)
    assert again.json["threshold"] == 0.4 and again.json["model_name"]
    check(client.post(path + "/detect", status="*"), "POST", "/images/{id}/detect", 200)  # no body: DETECT_THRESHOLD
    check(client.post_json(path + "/detect", {"threshold": 2}, status="*"), "POST", "/images/{id}/detect", 400)
    res = client.post(path + "/detect", b"threshold=0.4", content_type="application/x-www-form-urlencoded", status="*")
    check(res, "POST", "/images/{id}/detect", 415)
    check(client.delete(path, status="*"), "DELETE", "/images/{id}", 204)
    check(client.post(path + "/detect", status="*"), "POST", "/images/{id}/detect", 404)
    check(client.delete(path, status="*"), "DELETE", "/images/{id}", 404)
    check(client.get(path, status="*"), "GET", "/images/{id}", 404)
    check(client.get(path + "/file", status="*"), "GET", "/images/{id}/file", 404)
    check(client.get(path + "/thumbnail", status="*"), "GET", "/images/{id}/thumbnail", 404)
    check(client.get(path + "/annotated", status="*"), "GET", "/images/{id}/annotated", 404)
    check(client.get("/images/not-an-id", status="*"), "GET", "/images/{id}", 404)

    objects = check(client.get("/objects", status="*"), "GET", "/objects", 200).json
    assert {"name": "dog", "images": 2} in objects
    check(client.get("/objects?limit=5", status="*"), "GET", "/objects", 400)
    check(client.get("/openapi.json", status="*"), "GET", "/openapi.json", 200)
    check(client.get("/metrics", status="*"), "GET", "/metrics", 200)  # tests/test_metrics.py reads it
    # Sessions, with the API open (tests/test_lan.py checks them with a key, and every refusal).
    check(client.post_json("/session", {"key": "anything"}, status="*"), "POST", "/session", 409)
    check(client.delete("/session", status="*"), "DELETE", "/session", 204)
    assert client.head("/objects", status="*").status_int == 200  # info.description: GET routes answer HEAD

    # Client mistakes.
    res = client.post("/images", "{not json", content_type="application/json", status="*")
    check(res, "POST", "/images", 400)
    res = client.post("/images", b"hello", content_type="text/plain", status="*")
    check(res, "POST", "/images", 415)
    post_json("/images", {"image": b64(b"these bytes are no picture")}, 422)
    check(client.get("/images?limit=0", status="*"), "GET", "/images", 400)
    check(client.get("/images?match=all", status="*"), "GET", "/images", 400)
    # Bodies the document refuses, the server refuses too.
    for body in ({}, {"image": "aGk=", "url": "https://example.com/a.jpg"}, {"image": "aGk=", "tags": []},
                 {"image": "aGk=", "detect": "yes"}, {"image": "aGk=", "label": "x" * 201}):
        assert list(schema_validator(doc, schemas["NewImageJson"]).iter_errors(body)), body
        post_json("/images", body, 400)

    # Wrong method and unknown path: not operations, but documented reusable answers.
    res = client.post("/health", status="*")
    assert res.status_int == 405 and "post" not in doc["paths"]["/health"]
    check.response(res, deref(doc, {"$ref": "#/components/responses/MethodNotAllowed"}), "POST /health 405")
    res = client.get("/nope", status="*")
    assert res.status_int == 404
    check.response(res, deref(doc, {"$ref": "#/components/responses/NotFound"}), "GET /nope 404")

    # The demo page and its files.
    check(client.get("/"), "GET", "/", 200)
    for name in ("style.css", "js/app.js"):
        check(client.get(f"/static/{name}"), "GET", "/static/{filepath}", 200)
    check(client.get("/static/nope.js", status="*"), "GET", "/static/{filepath}", 404)
    check(client.get("/static/../server.py", status="*"), "GET", "/static/{filepath}", 404)

    imgur_jobs(service, make_service, check, data)
    vision_routes(make_service, check, data)

    documented = {(method, path) for path, method, _, _ in operations(doc)}
    assert documented - check.seen == set(), "operations this test never called: add them above"


def imgur_jobs(service, make_service, check: Checker, data: bytes) -> None:
    """The Imgur job routes, off (`service` has no uploader) and on: a fake Imgur and an image host on
    loopback, one real worker thread."""
    doc = check.doc
    schemas = doc["components"]["schemas"]
    job_path = "/v1/images/upload/{jobId}"

    def submit(client, body, expect):
        if expect == 202:
            assert_valid(doc, body, schemas["NewUploadJob"], "the request body")
        return check(client.post_json("/v1/images/upload", body, status="*"), "POST", "/v1/images/upload", expect)

    def job(client, job_id, expect=200):
        return check(client.get(f"/v1/images/upload/{job_id}", status="*"), "GET", job_path, expect)

    # Not configured (no IMGUR_CLIENT_ID): no job is taken, the lists are empty.
    off = service.client
    assert check(off.get("/v1/images", status="*"), "GET", "/v1/images", 200).json == {"uploaded": []}
    res = submit(off, {"urls": ["https://example.com/a.jpg"]}, 503)
    assert "IMGUR_CLIENT_ID" in res.json["detail"] and "Retry-After" not in res.headers
    job(off, uuid.uuid4(), 404)

    # Configured. One worker, and a host whose photo waits for the test: the job is seen under way.
    started, gate = threading.Event(), threading.Event()

    def held_photo(h):
        started.set()
        gate.wait(10)
        ok(data, "image/jpeg")(h)

    with FakeImgur() as fake, Loopback({"/pets.jpg": held_photo}) as host:
        uploader = imgur.ImgurClient(client_id=fake.client_id, api_url=fake.url, sleep=lambda s: None)
        on = make_service(uploader=uploader, upload_workers=1, upload_backlog=2)
        client = on.client
        try:
            good, missing = host.url("/pets.jpg"), host.url("/missing.jpg")  # the host answers 404 for the latter
            res = submit(client, {"urls": [good, missing, good]}, 202)
            job_id = res.json["jobId"]
            assert res.headers["Location"] == f"/v1/images/upload/{job_id}"

            assert started.wait(10), "the worker never asked the image host"
            view = job(client, job_id).json
            assert view["id"] == job_id and view["status"] == "in-progress" and view["finished"] is None
            assert [(i["url"], i["status"]) for i in view["items"]] == [(good, "in-progress"), (missing, "pending")]
            assert view["uploaded"] == {"pending": [good, missing], "complete": [], "failed": []}

            # Both URLs wait or run, and the backlog holds 2: the next job must come back later.
            res = submit(client, {"urls": ["https://example.com/later.jpg"]}, 503)
            assert "Retry-After" in res.headers
        finally:
            gate.set()
        assert on.jobs.wait(job_id, timeout=30), "the job did not finish"

        view = job(client, job_id).json
        assert view["status"] == "complete" and view["finished"] >= view["created"]
        (link,) = view["uploaded"]["complete"]
        assert view["uploaded"]["pending"] == [] and view["uploaded"]["failed"] == [missing]
        good_item, missing_item = view["items"]
        assert good_item["status"] == "complete" and good_item["link"] == link
        assert missing_item["status"] == "failed" and "404" in missing_item["error"]
        assert fake.received == [data]  # the bytes were uploaded, not the link
        assert check(client.get("/v1/images", status="*"), "GET", "/v1/images", 200).json == {"uploaded": [link]}

        # Client mistakes, refused by the document as well as by the server.
        res = client.post("/v1/images/upload", "{not json", content_type="application/json", status="*")
        check(res, "POST", "/v1/images/upload", 400)
        res = client.post("/v1/images/upload", b"urls=x", content_type="text/plain", status="*")
        check(res, "POST", "/v1/images/upload", 415)
        for body, words in (
            ({}, "urls"), ({"urls": []}, "empty"), ({"urls": good}, "array"), ({"urls": [good, 7]}, "line 2 is a number"),
            ({"urls": ["ftp://example.com/a.jpg"]}, "line 1 (ftp://example.com/a.jpg) is not an http or https URL"),
            ({"urls": [good], "priority": 1}, "unknown field"),
        ):
            assert list(schema_validator(doc, schemas["NewUploadJob"]).iter_errors(body)), body
            assert words in submit(client, body, 400).json["detail"], body
        job(client, "not-a-job", 404)
        job(client, uuid.uuid4(), 404)

        # Shutting down: no new job, and no Retry-After (there is no knowing when it is back).
        on.jobs.close(timeout=5)
        res = submit(client, {"urls": [good]}, 503)
        assert "shutting down" in res.json["detail"] and "Retry-After" not in res.headers


def vision_routes(make_service, check: Checker, data: bytes) -> None:
    """The DeepStack-compatible routes: a detection, the model list, a custom model, and their refusals."""
    import shutil

    import conftest

    service = make_service()
    client = service.client
    form = [("min_confidence", "0.3")]
    res = client.post("/v1/vision/detection", form, upload_files=[("image", "frame.jpg", data)], status="*")
    assert check(res, "POST", "/v1/vision/detection", 200).json["predictions"][0]["label"] == "dog"
    res = client.post("/v1/vision/detection", form, upload_files=[("image", "frame.jpg", b"no picture")], status="*")
    check(res, "POST", "/v1/vision/detection", 400)
    check(client.post("/v1/vision/detection", form, status="*"), "POST", "/v1/vision/detection", 400)
    check(client.post("/v1/vision/custom/list", status="*"), "POST", "/v1/vision/custom/list", 200)
    res = client.post("/v1/vision/custom/nope", form, upload_files=[("image", "a.jpg", data)], status="*")
    check(res, "POST", "/v1/vision/custom/{name}", 404)
    tmp = service.settings.db + ".models"
    os.makedirs(tmp)
    shutil.copy(conftest.MODEL_PATH, os.path.join(tmp, "door.tflite"))
    client = make_service(vision_models_dir=tmp).client
    assert check(client.post("/v1/vision/custom/list", status="*"), "POST", "/v1/vision/custom/list", 200).json["models"] == ["door"]
    res = client.post("/v1/vision/custom/door", form, upload_files=[("image", "a.jpg", data)], status="*")
    check(res, "POST", "/v1/vision/custom/{name}", 200)
    res = client.get("/v1/vision/detection", status="*")
    check.response(res, deref(check.doc, {"$ref": "#/components/responses/MethodNotAllowed"}) | {
        "content": {"application/json": {"schema": {"$ref": DEEPSTACK_REF}}}}, "GET /v1/vision/detection 405")


def test_answers_without_a_model_match_the_document(make_service, tmp_path, photo, doc):
    missing = detect.Detector(str(tmp_path / "missing.tflite"), threads=1, pool=1)
    client, check = make_service(detector=missing).client, Checker(doc)
    health = check(client.get("/health", status="*"), "GET", "/health", 200).json
    assert health["detector"]["ready"] is False
    res = client.post_json("/images", {"image": b64(photo("pets.jpg")), "detect": True}, status="*")
    assert "make model" in check(res, "POST", "/images", 503).json["detail"]


def test_health_while_the_model_file_is_gone_matches_the_document(make_service, tmp_path, model_path, doc):
    import shutil

    path = tmp_path / "model.tflite"
    shutil.copy(model_path, path)
    served = detect.Detector(str(path), threads=1, pool=1)
    served.load()
    path.unlink()  # the loaded model keeps serving; /health says the file is gone
    client, check = make_service(detector=served).client, Checker(doc)
    health = check(client.get("/health", status="*"), "GET", "/health", 200).json
    assert health["detector"]["ready"] is True and "gone" in health["detector"]["error"]
