"""Safe on a LAN (lan.py, wired in server.make_app): the Host check (421), cross-site writes (403), the API
key and sessions (401, 429), CORS, security headers. Through the real app (WebTest), the real process
where waitress takes part (TRUSTED_PROXY, start-up), and lan.Guard directly where a clock is needed."""

import json
import logging
import os
import socket
import tracemalloc
import urllib.error
import urllib.request

import pytest
from test_openapi import Checker, deref
from test_server import ROOT, _one_line_failure, _run_server, start_server, stop_server

import lan
import settings
from helpers import assert_problem, b64, jpeg  # noqa: E402

KEY = "correct-horse-battery"
HERE = "127.0.0.1:8080"
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36"
# Each of these alone makes a request a browser's.
BROWSER_SIGNS = {
    "Origin": {"Origin": "http://rebind.test:8080"},
    "Sec-Fetch-Mode": {"Sec-Fetch-Mode": "cors"},
    "Sec-Fetch-Site": {"Sec-Fetch-Site": "same-origin"},
    "Referer": {"Referer": "http://rebind.test:8080/"},
    "Accept-Language": {"Accept-Language": "en-US,en;q=0.9"},
    "User-Agent": {"User-Agent": BROWSER},
    "cookie": {"Cookie": f"theme=dark; {lan.SESSION_COOKIE}=v1.1.x.y"},
}


def add_image(service, **headers) -> int:
    res = service.client.post_json("/images", {"image": b64(jpeg())}, headers=headers)
    return res.json["id"]


def count(service) -> int:
    return service.counts()[0]


@pytest.fixture
def keyed(make_service):
    return make_service(api_key=KEY)


def with_key(**headers):
    return {"X-API-Key": KEY, **headers}


# --------------------------------------------------------------------------------------------------------
# 1. DNS rebinding: 421 for a browser naming the service by a host that is not its own
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sign", sorted(BROWSER_SIGNS))
def test_a_browser_with_a_foreign_host_gets_421_on_every_route(service, sign):
    for path in ("/", "/static/index.html", "/static/js/app.js", "/health", "/images", "/objects", "/openapi.json", "/nope"):
        res = service.client.get(path, headers={"Host": "rebind.test:8080", **BROWSER_SIGNS[sign]}, status="*")
        detail = assert_problem(res, 421)
        assert "ALLOWED_HOSTS" in detail and "rebind.test" in detail, path


def test_a_rebinding_delete_deletes_nothing(service):
    image = add_image(service)
    res = service.client.delete(f"/images/{image}", headers={"Host": "rebind.test:8080", "Origin": "http://rebind.test:8080"}, status="*")
    assert_problem(res, 421)
    assert service.client.get(f"/images/{image}").json["id"] == image


@pytest.mark.parametrize("host", [
    HERE, "192.168.1.20:8080", "[::1]:8080", "[fe80::1%25eth0]:8080", "localhost:8080", "LOCALHOST.:8080",
    f"{socket.gethostname()}:8080", f"{socket.gethostname().split('.')[0]}.local:8080", "10.0.0.7",
])
def test_the_names_of_this_service_pass(service, host):
    res = service.client.get("/images", headers={"Host": host, "User-Agent": BROWSER, "Origin": f"http://{host}"})
    assert res.status_int == 200


@pytest.mark.parametrize("host, allowed", [
    ("pi4.lan:8080", True), ("PI4.LAN", True), ("photos.home.arpa", True), ("home.arpa", True),
    ("evilhome.arpa", False), ("pi4.lan.evil.example", False), ("pi4.lan@evil.example", False), ("", False),
])
def test_allowed_hosts_names_and_suffixes(make_service, host, allowed):
    client = make_service(allowed_hosts=("pi4.lan", ".home.arpa")).client
    res = client.get("/images", headers={"Host": host, "User-Agent": BROWSER}, status="*")
    assert res.status_int == (200 if allowed else 421)


def test_allowed_hosts_star_allows_any(make_service):
    client = make_service(allowed_hosts=("*",)).client
    assert client.get("/images", headers={"Host": "anything.example", "User-Agent": BROWSER}).status_int == 200


@pytest.mark.parametrize("agent", ["curl/8.5.0", "python-requests/2.32.3", "Python/3.12 aiohttp/3.9.5", None])
def test_clients_that_are_not_browsers_are_not_held_to_the_list(service, agent):
    headers = {"Host": "imgsvc:8080"} | ({"User-Agent": agent} if agent else {})
    image = add_image(service, **headers)
    assert service.client.get("/images", headers=headers).json[0]["id"] == image
    assert service.client.delete(f"/images/{image}", headers=headers).status_int == 204


# --------------------------------------------------------------------------------------------------------
# 2. Cross-site writes: 403
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.test"},
    {"Origin": "http://127.0.0.1:9999"},  # another port is another origin
    {"Origin": "http://127.0.0.1"},
    {"Origin": "null"},  # a sandboxed frame, a data: page
    {"Sec-Fetch-Site": "cross-site"},
    {"Origin": f"http://{HERE}", "Sec-Fetch-Site": "cross-site"},
])
def test_cross_site_writes_are_refused_and_change_nothing(service, headers):
    image = add_image(service)
    headers = {"Host": HERE, **headers}
    res = service.client.post_json("/images", {"image": b64(jpeg((1, 2, 3)))}, headers=headers, status="*")
    assert "ALLOWED_ORIGINS" in assert_problem(res, 403)
    res = service.client.post("/images", {"url": "http://127.0.0.1:1/x.jpg"}, headers=headers, status="*")
    assert_problem(res, 403)
    assert_problem(service.client.delete(f"/images/{image}", headers=headers, status="*"), 403)
    assert count(service) == 1


@pytest.mark.parametrize("host, origin", [
    (HERE, f"http://{HERE}"),
    (HERE, f"https://{HERE}"),  # the scheme may differ: TLS ends at a proxy
    ("pi4.local:8080", "http://PI4.local:8080"),
    ("photos.example", "https://photos.example"),  # no port: the origin's scheme's default
    ("photos.example:443", "https://photos.example"),
    ("[::1]:8080", "http://[::1]:8080"),
])
def test_writes_from_this_service_s_own_origin_pass(make_service, host, origin):
    service = make_service(allowed_hosts=("photos.example", "pi4.local"))
    image = add_image(service, Host=host, Origin=origin, **{"Sec-Fetch-Site": "same-origin"})
    assert service.client.delete(f"/images/{image}", headers={"Host": host, "Origin": origin}).status_int == 204


def test_reads_from_other_origins_are_not_refused(service):
    # A cross-origin read is the browser's to protect (CORS): without Access-Control-Allow-Origin it cannot read.
    res = service.client.get("/images", headers={"Host": HERE, "Origin": "http://evil.test", "Sec-Fetch-Site": "cross-site"})
    assert res.status_int == 200 and "Access-Control-Allow-Origin" not in res.headers


def test_listed_origins_may_write_and_get_cors_answers(make_service):
    dash = "https://dash.lan:3000"
    service = make_service(allowed_origins=(dash + "/", "HTTP://Other.LAN:80"), api_key=KEY)
    client = service.client
    headers = {"Host": HERE, "Origin": dash, "Sec-Fetch-Site": "cross-site"}
    pre = client.options("/images", headers={**headers, "Access-Control-Request-Method": "POST",
                                             "Access-Control-Request-Headers": "x-api-key, content-type"})
    assert pre.status_int == 204 and pre.body == b""  # no key needed: preflights carry none
    assert pre.headers["Access-Control-Allow-Origin"] == dash
    assert "POST" in pre.headers["Access-Control-Allow-Methods"] and "DELETE" in pre.headers["Access-Control-Allow-Methods"]
    assert {"authorization", "x-api-key", "content-type"} <= {
        h.strip().lower() for h in pre.headers["Access-Control-Allow-Headers"].split(",")
    }
    res = client.post_json("/images", {"image": b64(jpeg())}, headers=with_key(**headers))
    assert res.headers["Access-Control-Allow-Origin"] == dash and "Location" in res.headers["Access-Control-Expose-Headers"]
    assert res.headers["Vary"] == "Origin"
    # Its refusals are readable by it too.
    res = client.get("/images", headers=headers, status=401)
    assert res.headers["Access-Control-Allow-Origin"] == dash
    # The other listed origin, written in another case and with its default port.
    assert client.get("/images", headers=with_key(Host=HERE, Origin="http://other.lan")).headers[
        "Access-Control-Allow-Origin"] == "http://other.lan"
    # An origin not listed: no preflight answer, no CORS header, and its writes are refused.
    evil = {"Host": HERE, "Origin": "https://evil.test"}
    res = client.options("/images", headers={**evil, "Access-Control-Request-Method": "POST"}, status="*")
    assert res.status_int != 204 and "Access-Control-Allow-Origin" not in res.headers
    assert_problem(client.post_json("/images", {"image": b64(jpeg())}, headers=with_key(**evil), status="*"), 403)


@pytest.mark.parametrize("env, words", [
    ({"ALLOWED_ORIGINS": "*"}, "ALLOWED_ORIGINS"),
    ({"ALLOWED_ORIGINS": "https://dash.lan/app"}, "ALLOWED_ORIGINS"),
    ({"ALLOWED_ORIGINS": "dash.lan:3000"}, "ALLOWED_ORIGINS"),
    ({"ALLOWED_HOSTS": "pi4.lan:8080"}, "ALLOWED_HOSTS"),
    ({"ALLOWED_HOSTS": "http://pi4.lan"}, "ALLOWED_HOSTS"),
    ({"TRUSTED_PROXY": "proxy.lan"}, "TRUSTED_PROXY"),
    ({"SESSION_HOURS": "0"}, "SESSION_HOURS"),
    ({"AUTH_FAILURES": "0"}, "AUTH_FAILURES"),
])
def test_bad_lan_settings_name_the_variable(env, words):
    with pytest.raises(settings.SettingError, match=words):
        settings.load([], env)


def test_lan_settings_are_read():
    s = settings.load([], {"ALLOWED_HOSTS": "Pi4.lan, .home.arpa", "ALLOWED_ORIGINS": "https://dash.lan:3000/",
                           "TRUSTED_PROXY": "::1", "API_KEY": KEY, "SESSION_HOURS": "0.5"})
    assert s.allowed_hosts == ("pi4.lan", ".home.arpa") and s.allowed_origins == ("https://dash.lan:3000",)
    assert s.trusted_proxy == "::1" and s.session_hours == 0.5
    assert KEY not in repr(s) and s.public()["api_key"] is True


# --------------------------------------------------------------------------------------------------------
# The order: 421, then 403, then 401
# --------------------------------------------------------------------------------------------------------


def test_checks_run_in_order_421_403_401(keyed):
    client = keyed.client
    everything_wrong = {"Host": "rebind.test:8080", "Origin": "http://evil.test"}
    assert_problem(client.delete("/images/1", headers=everything_wrong, status="*"), 421)
    assert_problem(client.delete("/images/1", headers={**everything_wrong, "Host": HERE}, status="*"), 403)
    assert_problem(client.delete("/images/1", headers={"Host": HERE}, status="*"), 401)
    # And a right key does not lift the first two.
    assert_problem(client.delete("/images/1", headers=with_key(**everything_wrong), status="*"), 421)
    assert_problem(client.delete("/images/1", headers=with_key(**{**everything_wrong, "Host": HERE}), status="*"), 403)


# --------------------------------------------------------------------------------------------------------
# 3. The API key
# --------------------------------------------------------------------------------------------------------

NEEDS_KEY = [
    ("GET", "/images"), ("GET", "/images/1"), ("GET", "/images/1/file"), ("DELETE", "/images/1"),
    ("POST", "/images"), ("GET", "/objects"), ("GET", "/openapi.json"), ("GET", "/v1/images"),
    ("POST", "/v1/images/upload"), ("GET", "/v1/images/upload/6f2b0a58-8d2c-4c52-9d1e-3f0f3c6a1b7e"),
    ("DELETE", "/session"), ("GET", "/nope"), ("HEAD", "/objects"), ("OPTIONS", "/images"),
]


@pytest.mark.parametrize("method, path", NEEDS_KEY)
def test_with_a_key_every_route_needs_it(keyed, method, path):
    res = keyed.client.request(path, method=method, status="*")
    assert res.status_int == 401 and res.headers["WWW-Authenticate"] == "Bearer"
    if method != "HEAD":
        assert "API_KEY" in assert_problem(res, 401)


@pytest.mark.parametrize("method, path", [("GET", "/"), ("GET", "/static/style.css"), ("GET", "/static/js/app.js"),
                                          ("GET", "/health"), ("HEAD", "/health"), ("HEAD", "/")])
def test_the_page_its_files_and_health_need_no_key(keyed, method, path):
    assert keyed.client.request(path, method=method).status_int == 200


@pytest.mark.parametrize("headers", [
    {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"bearer  {KEY} "}, {"X-API-Key": KEY},
])
def test_the_key_as_bearer_or_x_api_key(keyed, headers):
    image = add_image(keyed, **headers)
    assert keyed.client.get(f"/images/{image}/file", headers=headers).content_type == "image/jpeg"
    assert keyed.client.delete(f"/images/{image}", headers=headers).status_int == 204


@pytest.mark.parametrize("headers", [
    {"X-API-Key": KEY + "x"}, {"X-API-Key": KEY[:-1]}, {"Authorization": "Bearer wrong-key-here"},
    {"Authorization": f"Basic {KEY}"}, {"X-API-Key": ""}, {"Authorization": "Bearer é"},
])
def test_a_wrong_or_malformed_key_is_a_401(keyed, headers):
    res = keyed.client.get("/images", headers=headers, status="*")
    assert "API_KEY" in assert_problem(res, 401) and res.headers["WWW-Authenticate"] == "Bearer"
    assert count(keyed) == 0


def test_behind_a_key_files_are_cached_privately_only(service, keyed):
    for svc, kind, headers in ((service, "public", {}), (keyed, "private", with_key())):
        image = add_image(svc, **headers)
        res = svc.client.get(f"/images/{image}/file", headers=headers)
        assert res.headers["Cache-Control"] == f"{kind}, max-age=31536000, immutable"


def test_a_right_header_key_is_not_overruled_by_a_stale_cookie(keyed):
    res = keyed.client.get("/images", headers=with_key(Cookie=f"{lan.SESSION_COOKIE}=v1.1.aa.bb"))
    assert res.status_int == 200


def test_the_key_from_a_file(make_service, tmp_path):
    path = tmp_path / "key"
    path.write_text(KEY + "\n")
    service = make_service(api_key_file=str(path))
    assert service.client.get("/images", status="*").status_int == 401
    assert service.client.get("/images", headers={"X-API-Key": KEY}).status_int == 200


@pytest.mark.parametrize("content, words", [
    ("", "empty"), ("short\n", "at least 8"), ("two words here", "printable ASCII"), ("clé-secrète-longue", "ASCII"),
    ("x" * 5000, "larger than"),
])
def test_an_unusable_key_file_says_what_is_wrong(make_service, tmp_path, content, words):
    path = tmp_path / "key"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(lan.KeyUnusable, match=words) as e:
        make_service(api_key_file=str(path))
    assert "API_KEY_FILE" in str(e.value)


def test_key_and_key_file_together_or_a_missing_file_are_refused(make_service, tmp_path):
    with pytest.raises(lan.KeyUnusable, match="not both"):
        make_service(api_key=KEY, api_key_file=str(tmp_path / "key"))
    with pytest.raises(lan.KeyUnusable, match="cannot read"):
        make_service(api_key_file=str(tmp_path / "missing"))
    with pytest.raises(lan.KeyUnusable, match="API_KEY is 3 characters"):
        make_service(api_key="abc")


def test_health_says_whether_a_key_is_needed(service, keyed):
    assert service.client.get("/health").json["auth"] == "open"
    assert keyed.client.get("/health").json["auth"] == "key"


# --------------------------------------------------------------------------------------------------------
# Wrong keys: 429 after AUTH_FAILURES a minute, bounded memory, rate-limited logs, the key never logged
# --------------------------------------------------------------------------------------------------------


def test_ten_wrong_keys_in_a_minute_then_429_even_for_the_right_key(keyed):
    client = keyed.client
    mallory, alice = {"REMOTE_ADDR": "192.168.1.66"}, {"REMOTE_ADDR": "192.168.1.10"}
    for i in range(10):
        res = client.get("/images", headers={"X-API-Key": f"guess-{i:04d}"}, extra_environ=mallory, status="*")
        assert res.status_int == 401, i
    for attempt in (client.get("/images", headers=with_key(), extra_environ=mallory, status="*"),
                    client.post_json("/session", {"key": KEY}, extra_environ=mallory, status="*")):
        detail = assert_problem(attempt, 429)
        assert "AUTH_FAILURES" in detail and 55 <= int(attempt.headers["Retry-After"]) <= 60
    # Others are not held back, nor are the routes that need no key.
    assert client.get("/images", headers=with_key(), extra_environ=alice).status_int == 200
    assert client.get("/health", extra_environ=mallory).status_int == 200


def test_wrong_session_keys_count_too(keyed):
    client = keyed.client
    for _ in range(10):
        assert_problem(client.post_json("/session", {"key": "not-the-key"}, status="*"), 401)
    assert_problem(client.get("/images", headers=with_key(), status="*"), 429)


def test_the_wait_ends_after_a_minute_and_old_failures_expire():
    t = [1000.0]
    guard = lan.Guard(key=KEY, failures_per_minute=3, now=lambda: t[0], hostname="pi")
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/images", "HTTP_HOST": HERE, "REMOTE_ADDR": "10.0.0.5"}
    wrong = {**env, "HTTP_X_API_KEY": "wrong-wrong"}
    right = {**env, "HTTP_X_API_KEY": KEY}
    assert guard.check(wrong).status == 401
    t[0] += 61  # the first failure left the window
    assert guard.check(wrong).status == 401 and guard.check(wrong).status == 401
    assert guard.check(right) is None
    assert guard.check(wrong).status == 401  # three within a minute
    answer = guard.check(right)
    assert answer.status == 429 and dict(answer.headers)["Retry-After"] == "60"
    t[0] += 30
    assert dict(guard.check(right).headers)["Retry-After"] == "30"
    t[0] += 30.5
    assert guard.check(right) is None and guard.check(wrong).status == 401  # counting starts afresh


def test_the_failure_table_is_bounded():
    limiter = lan.FailureLimiter(limit=10, capacity=lan.TRACKED_CLIENTS)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(5000):
            limiter.fail(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
        for _ in range(10):  # a full client: ten timestamps
            limiter.fail("192.168.1.66")
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(limiter) == lan.TRACKED_CLIENTS
    assert used < 1024 * 1024, used  # README: about 1,024 addresses, bounded memory
    assert limiter.wait("192.168.1.66") == 60 and limiter.wait("10.0.0.0") == 0  # the oldest went first


def test_one_wrong_key_a_minute_is_enough_when_so_set():
    limiter = lan.FailureLimiter(limit=1)
    assert limiter.fail("a") == (1, True) and limiter.wait("a") == 60


def test_ipv6_clients_are_counted_by_their_64():
    same = [lan.client_of({"REMOTE_ADDR": a}) for a in ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9")]
    assert same[0] == same[1] == "2001:db8:1:2::/64"
    assert lan.client_of({"REMOTE_ADDR": "2001:db8:1:3::1"}) != same[0]
    assert lan.client_of({"REMOTE_ADDR": "::ffff:192.0.2.7"}) == "192.0.2.7"
    assert lan.client_of({}) == "unknown"


def test_wrong_keys_are_logged_rate_limited_and_no_key_ever_is(make_service, caplog):
    service = make_service(api_key=KEY, auth_failures=3)
    guesses = [f"guess-{i:04d}-secret" for i in range(40)]
    with caplog.at_level(logging.DEBUG):
        for i, guess in enumerate(guesses):
            service.client.get("/images", headers={"Authorization": f"Bearer {guess}"},
                               extra_environ={"REMOTE_ADDR": f"192.168.1.{i // 4}"}, status="*")
        service.client.post_json("/session", {"key": KEY}, extra_environ={"REMOTE_ADDR": "192.168.2.1"})
        service.client.get("/images", headers=with_key())
    lines = [r.getMessage() for r in caplog.records if r.name == "lan"]
    assert len(lines) == lan.LOG_LINES_PER_WINDOW, lines
    assert any("wrong API key from 192.168.1.0" in line for line in lines)
    assert any("refused (429) for 60 s" in line for line in lines)
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert KEY not in everything and not any(g in everything for g in guesses)


def test_held_back_log_lines_are_counted_into_the_next():
    t = [0.0]
    guard = lan.Guard(key=KEY, failures_per_minute=1000, now=lambda: t[0])
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/images", "HTTP_HOST": HERE, "HTTP_X_API_KEY": "wrong-wrong"}
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("lan").addHandler(handler)
    try:
        for _ in range(lan.LOG_LINES_PER_WINDOW + 5):
            guard.check(env)
        t[0] += lan.FAILURE_WINDOW
        guard.check(env)
    finally:
        logging.getLogger("lan").removeHandler(handler)
    assert len(records) == lan.LOG_LINES_PER_WINDOW + 1
    assert "(5 more not logged)" in records[-1].getMessage()


# --------------------------------------------------------------------------------------------------------
# 4. Sessions: POST /session sets a signed, expiring cookie; DELETE /session clears it
# --------------------------------------------------------------------------------------------------------


def cookie_attributes(header: str) -> tuple[str, str, dict[str, str]]:
    first, *rest = [p.strip() for p in header.split(";")]
    name, _, value = first.partition("=")
    attrs = {}
    for part in rest:
        k, _, v = part.partition("=")
        attrs[k.lower()] = v
    return name, value, attrs


def test_sign_in_sets_an_http_only_strict_cookie_that_works_everywhere(keyed):
    client = keyed.client
    image = add_image(keyed, **with_key())
    res = client.post_json("/session", {"key": KEY})
    assert res.status_int == 204 and res.body == b""
    name, token, attrs = cookie_attributes(res.headers["Set-Cookie"])
    assert name == lan.SESSION_COOKIE and KEY not in token and token.startswith("v1.")
    assert {"httponly", "path", "samesite", "max-age"} <= set(attrs) and "secure" not in attrs
    assert attrs["samesite"] == "Strict" and attrs["path"] == "/" and attrs["max-age"] == str(24 * 3600)
    # The cookie (WebTest's jar sends it back) authenticates reads, files and writes.
    assert client.get("/images").json[0]["id"] == image
    assert client.get(f"/images/{image}/file").content_type == "image/jpeg"
    assert client.delete(f"/images/{image}", headers={"Origin": "http://localhost"}).status_int == 204
    res = client.delete("/session")
    assert res.status_int == 204
    _, token, attrs = cookie_attributes(res.headers["Set-Cookie"])
    assert token == "" and attrs["max-age"] == "0"
    assert_problem(client.get("/images", status="*"), 401)


def test_the_cookie_is_secure_over_https_and_follows_session_hours(make_service):
    service = make_service(api_key=KEY, session_hours=2)
    res = service.client.post_json("/session", {"key": KEY}, extra_environ={"wsgi.url_scheme": "https"})
    _, _, attrs = cookie_attributes(res.headers["Set-Cookie"])
    assert "secure" in attrs and attrs["max-age"] == "7200"


def test_a_wrong_session_key_sets_no_cookie(keyed):
    res = keyed.client.post_json("/session", {"key": KEY + "!"}, status="*")
    assert "wrong" in assert_problem(res, 401) and "Set-Cookie" not in res.headers


@pytest.mark.parametrize("body, content_type, code", [
    (b'{"key": 5}', "application/json", 400), (b'{"key": "x", "user": "me"}', "application/json", 400),
    (b"{not json", "application/json", 400), (b"[]", "application/json", 400), (b"{}", "application/json", 400),
    (b"key=x", "application/x-www-form-urlencoded", 415),
    (json.dumps({"key": "x" * 5000}).encode(), "application/json", 413),
])
def test_sign_in_refuses_what_is_not_a_key(keyed, body, content_type, code):
    detail = assert_problem(keyed.client.post("/session", body, content_type=content_type, status="*"), code)
    assert "key" in detail


def test_sign_in_without_a_key_configured_is_a_409(service):
    detail = assert_problem(service.client.post_json("/session", {"key": KEY}, status="*"), 409)
    assert "API_KEY" in detail


def test_tokens_carry_their_expiry_and_need_no_server_state():
    t = [1_000_000.0]
    guard = lan.Guard(key=KEY, session_hours=1, now=lambda: t[0])
    token = guard.new_token()
    assert lan.Guard(key=KEY, session_hours=1, now=lambda: t[0]).token_valid(token)  # another process, same key
    assert not lan.Guard(key=KEY + "2", now=lambda: t[0]).token_valid(token)  # a new key ends every session
    expires, nonce, signature = token.split(".")[1:]
    assert not guard.token_valid(f"v1.{int(expires) + 3600}.{nonce}.{signature}")  # a longer life, forged
    assert not guard.token_valid(f"v1.{expires}.{nonce}x.{signature}")
    assert not guard.token_valid("v1." + "9" * 300)
    t[0] += 3599
    assert guard.token_valid(token)
    t[0] += 1
    assert not guard.token_valid(token)


def test_an_expired_cookie_is_a_401_that_clears_it(make_service):
    service = make_service(api_key=KEY)
    past = lan.Guard(key=KEY, session_hours=1, now=lambda: 0.0).new_token()  # expired in 1970
    res = service.client.get("/images", headers={"Cookie": f"{lan.SESSION_COOKIE}={past}"}, status="*")
    assert "sign in again" in assert_problem(res, 401)
    assert cookie_attributes(res.headers["Set-Cookie"])[2]["max-age"] == "0"
    fresh = lan.Guard(key=KEY).new_token()
    assert service.client.get("/images", headers={"Cookie": f"a=b; {lan.SESSION_COOKIE}={fresh}"}).status_int == 200


def test_a_session_cookie_does_not_lift_the_cross_site_check(keyed):
    keyed.client.post_json("/session", {"key": KEY})
    image = add_image(keyed)
    res = keyed.client.delete(f"/images/{image}", headers={"Host": HERE, "Origin": "http://evil.test"}, status="*")
    assert_problem(res, 403)
    assert count(keyed) == 1


# --------------------------------------------------------------------------------------------------------
# 5. Security headers on every HTML answer
# --------------------------------------------------------------------------------------------------------


def html_paths():
    static = os.path.join(ROOT, "static")
    found = ["/"]
    for folder, _, files in os.walk(static):
        found += ["/static/" + os.path.relpath(os.path.join(folder, f), static).replace(os.sep, "/")
                  for f in files if f.endswith((".html", ".htm"))]
    return found


def assert_page_headers(res):
    csp = res.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert res.headers["X-Content-Type-Options"] == "nosniff"
    assert res.headers["Referrer-Policy"] == "same-origin"
    assert res.headers["X-Frame-Options"] == "DENY"


@pytest.mark.parametrize("path", html_paths())
def test_every_html_answer_has_the_security_headers(make_service, path):
    for service in (make_service(), make_service(api_key=KEY)):
        res = service.client.get(path)
        assert res.content_type == "text/html"
        assert_page_headers(res)
        assert_page_headers(service.client.head(path))
        again = service.client.get(path, headers={"If-Modified-Since": res.headers["Last-Modified"]}, status=304)
        assert_page_headers(again)
    assert "/static/index.html" in html_paths()


# --------------------------------------------------------------------------------------------------------
# openapi.json documents these answers
# --------------------------------------------------------------------------------------------------------


def test_the_lan_answers_match_openapi_json(make_service):
    with open(os.path.join(ROOT, "openapi.json"), encoding="utf-8") as f:
        doc = json.load(f)
    check = Checker(doc)
    service = make_service(api_key=KEY, auth_failures=2)
    client = service.client
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method not in ("get", "post", "delete"):
                continue
            real = path.replace("{id}", "1").replace("{jobId}", "x").replace("{filepath}", "style.css")
            res = client.request(real, method=method.upper(), headers={"Host": "rebind.test", "Origin": "http://rebind.test"},
                                 status="*")
            check(res, method.upper(), path, 421)
            if method != "get":
                check(client.request(real, method=method.upper(), headers={"Origin": "http://evil.test"}, status="*"),
                      method.upper(), path, 403)
            if (method, path) not in {("get", "/"), ("get", "/static/{filepath}"), ("get", "/health"), ("post", "/session")}:
                check(client.request(real, method=method.upper(), status="*"), method.upper(), path, 401)
            else:
                assert "401" not in op["responses"] or path == "/session", (method, path)
    check(client.get("/health", status="*"), "GET", "/health", 200)
    check(client.post_json("/session", {"key": KEY}, status="*"), "POST", "/session", 204)
    check(client.delete("/session", status="*"), "DELETE", "/session", 204)
    check(client.post_json("/session", {"key": "nope"}, status="*"), "POST", "/session", 401)
    check(client.post_json("/session", {"key": 1}, status="*"), "POST", "/session", 400)
    check(client.post("/session", b"k", content_type="text/plain", status="*"), "POST", "/session", 415)
    check(client.post_json("/session", {"key": "nope"}, status="*"), "POST", "/session", 401)
    check(client.post_json("/session", {"key": KEY}, status="*"), "POST", "/session", 429)
    check(client.get("/images", headers={"X-API-Key": KEY}, status="*"), "GET", "/images", 429)
    check(client.delete("/images/1", headers={"X-API-Key": KEY}, status="*"), "DELETE", "/images/{id}", 429)
    assert deref(doc, doc["paths"]["/session"]["post"]["responses"]["429"])["headers"]["Retry-After"]["required"]


# --------------------------------------------------------------------------------------------------------
# The real process: start-up, TRUSTED_PROXY through waitress
# --------------------------------------------------------------------------------------------------------


def call(base, path, method="GET", headers=None, body=None):
    """(status, headers, body) of one request; errors are answers too."""
    req = urllib.request.Request(base + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            return res.status, res.headers, res.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_the_log_says_once_that_a_key_is_needed_and_never_shows_it(tmp_path, model_path):
    proc, base, _ = start_server(tmp_path, "--model", model_path, env={"API_KEY": KEY})
    try:
        assert call(base, "/images")[0] == 401
        assert call(base, "/images", headers={"X-API-Key": "wrong-key-1"})[0] == 401
        assert call(base, "/images", headers={"X-API-Key": KEY})[0] == 200
        body = json.dumps({"key": KEY}).encode()
        assert call(base, "/session", "POST", {"Content-Type": "application/json"}, body)[0] == 204
    finally:
        log = stop_server(proc)
    assert log.count("the API needs a key") == 1 and "wrong API key from 127.0.0.1" in log
    assert KEY not in log


@pytest.mark.parametrize("host, warned", [("0.0.0.0", True), ("192.168.1.20", True), ("::", True),
                                          ("127.0.0.1", False), ("localhost", False), ("::1", False)])
def test_an_open_api_on_the_lan_is_warned_about(caplog, host, warned):
    with caplog.at_level(logging.INFO, logger="lan"):
        lan.Guard().announce(host)
    (record,) = caplog.records
    assert "the API is open" in record.getMessage()
    assert (record.levelno == logging.WARNING) == warned
    if warned:
        assert "API_KEY" in record.getMessage()


def test_an_unusable_key_file_stops_the_start_in_one_line(tmp_path, model_path):
    line = _one_line_failure(_run_server(tmp_path, "--model", model_path, env={"API_KEY_FILE": str(tmp_path / "none")}))
    assert "API_KEY_FILE" in line and "cannot read" in line


def test_trusted_proxy_forwarded_headers_are_believed_from_it_only(tmp_path, model_path):
    forwarded = {
        "X-Forwarded-Proto": "https", "X-Forwarded-Host": "photos.example", "X-Forwarded-For": "203.0.113.5",
        "Origin": "https://photos.example", "User-Agent": BROWSER, "Content-Type": "application/json",
    }
    body = json.dumps({"key": KEY}).encode()
    env = {"API_KEY": KEY, "ALLOWED_HOSTS": "photos.example", "AUTH_FAILURES": "2"}
    proc, base, _ = start_server(tmp_path, "--model", model_path, env={**env, "TRUSTED_PROXY": "127.0.0.1"})
    try:
        status, headers, _ = call(base, "/session", "POST", forwarded, body)
        assert status == 204 and "Secure" in headers["Set-Cookie"]  # X-Forwarded-Proto believed
        status, _, _ = call(base, "/images/999", "DELETE", {**forwarded, "X-API-Key": KEY})
        assert status == 404  # the Origin matches the forwarded Host: not a cross-site write
        status, _, _ = call(base, "/images", headers={**forwarded, "X-Forwarded-Host": "rebind.test"})
        assert status == 421
        # Wrong keys count against the forwarded client, not against the proxy.
        for _ in range(2):
            assert call(base, "/images", headers={"X-API-Key": "wrong-wrong", "X-Forwarded-For": "203.0.113.5"})[0] == 401
        assert call(base, "/images", headers={"X-API-Key": KEY, "X-Forwarded-For": "203.0.113.5"})[0] == 429
        assert call(base, "/images", headers={"X-API-Key": KEY, "X-Forwarded-For": "203.0.113.6"})[0] == 200
    finally:
        stop_server(proc)
    # A proxy elsewhere: the same headers from here are dropped, so the Origin is not this service.
    proc, base, _ = start_server(tmp_path, "--model", model_path, env={**env, "TRUSTED_PROXY": "192.0.2.1"})
    try:
        status, headers, _ = call(base, "/session", "POST", forwarded, body)
        assert status == 403
        status, headers, _ = call(base, "/session", "POST", {"Content-Type": "application/json"}, body)
        assert status == 204 and "Secure" not in headers["Set-Cookie"]
    finally:
        stop_server(proc)
