"""Safe on a LAN, in the real browser: headless Chromium driven by Playwright against the real server process.

Chromium is launched with host-resolver rules that send evil.test and rebind.test to 127.0.0.1:
- a page at http://evil.test:<its port> (another site, not just another port) posts a form and sends a
  no-cors fetch to the service: nothing is stored and nothing fetched;
- a page at http://rebind.test:<the service's port> (what a DNS-rebinding attack looks like: the
  attacker's document, then the service at the same origin) reads and deletes through same-origin
  fetches: 421, nothing deleted. Its document is served by `page.route`, so Chromium's local-network
  checks would block its fetches to 127.0.0.1 before the service saw them; they are turned off
  (--disable-features=LocalNetworkAccessChecks), leaving the service alone to refuse;
- the demo page with API_KEY set: sign in, upload, see the picture, sign out, then 401.
"""

import base64
import json
import os
import urllib.request

import pytest
from playwright import sync_api as playwright_api
from test_page import CHROMIUM, DESKTOP, shot, upload_file, wait_image_loaded
from test_server import start_server, stop_server

from helpers import jpeg
from loopback import Loopback, ok

KEY = "correct-horse-battery"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
    "--host-resolver-rules=MAP evil.test 127.0.0.1, MAP rebind.test 127.0.0.1",
    "--disable-features=LocalNetworkAccessChecks",
]


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM if os.path.exists(CHROMIUM) else None, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def context(browser):
    context = browser.new_context(viewport=DESKTOP)
    errors = []
    context.on("weberror", lambda e: errors.append(str(e.error)))
    yield context
    context.close()
    assert errors == [], errors


def api(base, path, method="GET", body=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data, {"Content-Type": "application/json", **(headers or {})}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            return res.status, json.loads(res.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.fixture
def victim(tmp_path, model_path):
    """The real server, open (no key) and allowed to fetch loopback URLs, as on a trusted LAN; and a LAN
    device on loopback whose "reboot" the attacker wants to trigger."""
    with Loopback({"/cgi-bin/reboot": ok(jpeg(), "image/jpeg")}) as device:
        proc, base, _ = start_server(tmp_path, "--model", model_path, env={"ALLOW_PRIVATE_URLS": "1"})
        try:
            yield base, device
        finally:
            stop_server(proc)


ATTACK = """<!doctype html><title>cute cats</title>
<form id="f" method="post" action="{service}/images" enctype="multipart/form-data">
  <input name="url" value="{device}"><input name="detect" value="false">
</form>
<script>
(async () => {{
  const image = Uint8Array.from(atob("{jpeg}"), (c) => c.charCodeAt(0));
  const upload = new FormData();
  upload.append("image", new Blob([image], {{type: "image/jpeg"}}), "a.jpg");
  await fetch("{service}/images", {{method: "POST", mode: "no-cors", body: upload}}).catch(() => {{}});
  const byUrl = new FormData();
  byUrl.append("url", "{device}");
  await fetch("{service}/images", {{method: "POST", mode: "no-cors", body: byUrl}}).catch(() => {{}});
  document.getElementById("f").submit();
}})();
</script>"""


def test_a_cross_site_page_stores_nothing_and_fetches_nothing(context, victim):
    base, device = victim
    status, first = api(base, "/images", "POST", {"image": base64.b64encode(jpeg((9, 9, 9))).decode()})
    assert status == 200
    page_html = ATTACK.format(service=base, device=device.url("/cgi-bin/reboot"),
                              jpeg=base64.b64encode(jpeg()).decode())
    with Loopback({"/cats": ok(page_html.encode(), "text/html")}) as attacker:
        page = context.new_page()
        answers = []
        page.on("response", lambda r: answers.append((r.request.method, r.url, r.status)) if r.url.startswith(base) else None)
        with page.expect_navigation(url=f"{base}/images", timeout=30_000):
            page.goto(f"http://evil.test:{attacker.port}/cats")
        assert "ALLOWED_ORIGINS" in page.text_content("body")  # the form post's answer, shown to the user
    # (A cross-site DELETE cannot even be sent: the browser asks first, with a CORS preflight, which fails.)
    assert [(m, s) for m, _, s in answers] == [("POST", 403)] * 3, answers
    assert device.hits["/cgi-bin/reboot"] == 0
    status, images = api(base, "/images")
    assert status == 200 and [i["id"] for i in images] == [first["id"]]


REBIND = """<!doctype html><title>rebinding</title><script>
window.results = (async () => {
  const out = {};
  out.read = (await fetch("/images")).status;
  out.readNoReferrer = (await fetch("/images", {referrerPolicy: "no-referrer"})).status;
  out.file = (await fetch("/images/ID/file", {referrerPolicy: "no-referrer"})).status;
  out.remove = (await fetch("/images/ID", {method: "DELETE"})).status;
  out.body = await (await fetch("/images", {referrerPolicy: "no-referrer"})).text();
  return out;
})();
</script>"""


def test_a_rebinding_page_reads_nothing_and_deletes_nothing(context, victim):
    base, _ = victim
    status, image = api(base, "/images", "POST", {"image": base64.b64encode(jpeg()).decode()})
    assert status == 200
    port = base.rsplit(":", 1)[1]
    origin = f"http://rebind.test:{port}"
    page = context.new_page()
    # The attacker's document, as DNS first answered; after that, rebind.test is the service's address.
    page.route(f"{origin}/", lambda route: route.fulfill(
        status=200, content_type="text/html", body=REBIND.replace("ID", str(image["id"]))))
    page.goto(origin + "/")
    results = page.evaluate("() => window.results")
    assert {k: v for k, v in results.items() if k != "body"} == {"read": 421, "readNoReferrer": 421, "file": 421, "remove": 421}
    assert "ALLOWED_HOSTS" in json.loads(results["body"])["detail"]
    status, kept = api(base, f"/images/{image['id']}")
    assert status == 200 and kept["id"] == image["id"]
    # The page itself is refused at that name too (the service, not the attacker, answering there).
    page.unroute(f"{origin}/")
    res = page.goto(origin + "/")
    assert res.status == 421


@pytest.fixture
def keyed_site(tmp_path, model_path):
    proc, base, _ = start_server(tmp_path, "--model", model_path, env={"API_KEY": KEY})
    try:
        yield base
    finally:
        stop_server(proc)


def test_the_page_signs_in_uploads_shows_the_picture_and_signs_out(context, keyed_site, images_dir):
    base = keyed_site
    page = context.new_page()
    page.on("dialog", lambda d: d.accept())
    page.goto(base + "/")
    page.wait_for_selector("#signin[open]")  # the API answered 401: the page asks for the key
    shot(page, "signin-desktop")
    page.fill("#signin-key", "not-the-key")
    page.click("#signin-submit")
    page.wait_for_selector("#signin-error:not([hidden])")
    assert "wrong" in page.text_content("#signin-error")
    assert page.locator("#signin[open]").count() == 1

    page.fill("#signin-key", KEY)
    page.press("#signin-key", "Enter")
    page.wait_for_selector("#signin", state="hidden")
    assert page.text_content("#session") == "Sign out" and page.is_visible("#session")
    assert page.is_hidden("#alert")
    cookies = context.cookies(base)
    assert [c["name"] for c in cookies] == ["imgsvc_session"]
    assert cookies[0]["httpOnly"] and cookies[0]["sameSite"] == "Strict" and KEY not in cookies[0]["value"]
    assert page.evaluate("() => document.cookie") == ""  # HttpOnly: no script can read the token

    upload_file(page, os.path.join(images_dir, "pets.jpg"))
    wait_image_loaded(page)  # the <img> loads with the cookie
    assert "2 dogs" in page.text_content("#detail-title")
    page.click("#detail-close")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#gallery img')].some(i => i.complete && i.naturalWidth > 0)"
    )
    image_id = page.evaluate("() => fetch('/images?limit=1').then(r => r.json()).then(a => a[0].id)")

    page.click("#session")
    page.wait_for_selector("#signin[open]")
    assert page.text_content("#session") == "Sign in"
    assert context.cookies(base) == []
    assert page.evaluate("() => fetch('/images').then(r => r.status)") == 401
    # (The browser keeps the picture it has in its private cache; the service gives it out no more.)
    assert page.evaluate(f"() => fetch('/images/{image_id}/file', {{cache: 'no-store'}}).then(r => r.status)") == 401


def test_an_open_service_never_asks_for_a_key(context, victim):
    base, _ = victim
    page = context.new_page()
    page.goto(base + "/")
    page.wait_for_function("() => document.getElementById('health').textContent.startsWith('Version')")
    page.wait_for_selector("#gallery-status:has-text('No images yet.')")
    assert page.is_hidden("#session") and page.locator("#signin[open]").count() == 0
