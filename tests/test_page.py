"""The demo page in a real browser: headless Chromium (Debian's, else Playwright's own) driven by Playwright,
against the real server process, with the fake Imgur and an image host on loopback.

Screenshots (desktop and phone width) go to test-output/ (git-ignored): look at them.
"""

import os
import re

import pytest
from PIL import Image
from playwright import sync_api as playwright_api
from test_server import ROOT, start_server, stop_server

import chromium
from fake_imgur import FakeImgur
from loopback import Loopback, ok, status

OUT = os.path.join(ROOT, "test-output")
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")  # the variable lets a test hide it
PHONE = {"width": 360, "height": 740}
DESKTOP = {"width": 1280, "height": 900}


if not os.path.exists(CHROMIUM) and not chromium.playwright_has_it():
    pytest.skip(f"no Chromium: neither {CHROMIUM} (Debian's chromium package) nor Playwright's own "
                "(.venv/bin/python -m playwright install chromium, which needs the internet)", allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM if os.path.exists(CHROMIUM) else None,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def hosts(images_dir):
    def read(name):
        with open(os.path.join(images_dir, name), "rb") as f:
            return f.read()

    routes = {
        "/cat.bmp": ok(read("cat.bmp"), "image/bmp"),
        "/pets.jpg": ok(read("pets.jpg"), "image/jpeg"),
        "/coupleanddog.jpeg": ok(read("coupleanddog.jpeg"), "image/jpeg"),
        "/gone.jpg": status(404),
    }
    with FakeImgur() as imgur, Loopback(routes) as host:
        yield imgur, host


@pytest.fixture(scope="module")
def site(tmp_path_factory, model_path, hosts):
    """The real server, with Imgur pointed at the fake and URL downloads allowed on loopback."""
    imgur, _ = hosts
    env = {"IMGUR_CLIENT_ID": imgur.client_id, "IMGUR_API_URL": imgur.url, "ALLOW_PRIVATE_URLS": "1", "UPLOAD_WORKERS": "2"}
    proc, base, _ = start_server(tmp_path_factory.mktemp("page"), "--model", model_path, env=env)
    yield base
    stop_server(proc)


@pytest.fixture
def stocked(site, images_dir):
    """Two dogs and a cat, added through the API by the test that asks: no test depends on the ones before it."""
    import base64
    import json
    import urllib.request

    for name in ("pets.jpg", "cat.bmp"):
        with open(os.path.join(images_dir, name), "rb") as f:
            body = json.dumps({"image": base64.b64encode(f.read()).decode("ascii"), "detect": True}).encode()
        req = urllib.request.Request(site + "/images", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as res:
            assert res.status == 200


@pytest.fixture
def page(browser, site):
    context = browser.new_context(viewport=DESKTOP, base_url=site)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: d.accept())  # the delete confirmation
    yield page
    context.close()
    assert errors == [], errors  # no JavaScript error on any page


def shot(page, name):
    os.makedirs(OUT, exist_ok=True)
    page.screenshot(path=os.path.join(OUT, f"{name}.png"), full_page=True)


def upload_file(page, path, detect=True):
    page.set_input_files("#file", path)
    page.set_checked("#detect", detect)
    page.click("#add-submit")
    page.wait_for_selector("#detail[open]")


def box_rects(page):
    """Each drawn box relative to the displayed image, as fractions: [(label, x0, y0, x1, y1)]."""
    return page.evaluate(
        """() => {
        const img = document.getElementById('detail-img').getBoundingClientRect();
        return [...document.querySelectorAll('#boxes .box')].map(b => {
            const r = b.getBoundingClientRect();
            return [b.dataset.label, (r.left - img.left) / img.width, (r.top - img.top) / img.height,
                    (r.right - img.left) / img.width, (r.bottom - img.top) / img.height];
        });
    }"""
    )


def wait_image_loaded(page):
    """The detail view's picture is shown (loaded, decoded, its stage visible and its boxes drawn)."""
    page.wait_for_function(
        "() => { const i = document.getElementById('detail-img'); "
        "return i.complete && i.naturalWidth > 0 && !document.getElementById('stage').hidden; }"
    )


def test_upload_with_detection_draws_two_dog_boxes(page, images_dir):
    page.goto("/")
    upload_file(page, os.path.join(images_dir, "pets.jpg"))
    wait_image_loaded(page)
    labels = page.locator("#boxes .box").evaluate_all("bs => bs.map(b => b.dataset.label)")
    assert labels == ["dog", "dog"]
    assert "2 dogs" in page.text_content("#detail-title")
    # Boxes sit where the API says, relative to the picture as displayed (±1%).
    image = page.evaluate("() => fetch('/images?limit=1').then(r => r.json())")[0]
    for (label, *drawn), d in zip(box_rects(page), image["detections"], strict=True):
        want = [d["box"][k] for k in ("x_min", "y_min", "x_max", "y_max")]
        assert label == d["label"] and all(abs(a - b) < 0.01 for a, b in zip(drawn, want, strict=True)), (drawn, want)
    shot(page, "detail-desktop")


def test_boxes_follow_exif_rotation_and_any_display_size(page, images_dir, tmp_path):
    upright = Image.open(os.path.join(images_dir, "pets.jpg")).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # shown upright by EXIF orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, "JPEG", quality=92, exif=exif.tobytes())
    page.goto("/")
    upload_file(page, str(path))
    wait_image_loaded(page)
    natural = page.evaluate("() => { const i = document.getElementById('detail-img'); return [i.naturalWidth, i.naturalHeight]; }")
    # Shown upright (a thumbnail is made upright; the browser shows an original upright), the frame the
    # boxes are in: the picture's proportions are the upright ones.
    assert abs(natural[0] / natural[1] - upright.size[0] / upright.size[1]) < 0.01, natural
    big = box_rects(page)
    page.set_viewport_size(PHONE)
    page.wait_for_timeout(100)  # let layout settle after the resize
    small = box_rects(page)
    assert [b[0] for b in big] == ["dog", "dog"] and len(small) == 2
    for a, b in zip(big, small, strict=True):
        assert all(abs(x - y) < 0.01 for x, y in zip(a[1:], b[1:], strict=True))
    shot(page, "detail-phone-rotated")


def test_add_by_url(page, hosts):
    _, host = hosts
    page.goto("/")
    page.fill("#url", host.url("/cat.bmp"))
    page.click("#add-submit")
    page.wait_for_selector("#detail[open]")
    assert page.text_content("#detail-title") == "cat"
    page.click("#detail-close")
    assert page.locator("#gallery .card .title", has_text="cat").count() >= 1


def test_filter_by_dog_and_the_bookmarked_url_restores_it(page, browser, site, stocked):
    page.goto("/")
    page.click(".chip[data-name=dog]")
    page.wait_for_url(re.compile(r"objects=dog"))
    page.wait_for_function("() => document.querySelectorAll('#gallery .card').length > 0")
    titles = page.locator("#gallery .card .title").all_text_contents()
    assert titles and all("dog" in t for t in titles) and not any(t == "cat" for t in titles)
    assert page.get_attribute(".chip[data-name=dog]", "aria-pressed") == "true"
    bookmark = page.url
    shot(page, "filter-desktop")

    other = browser.new_context(viewport=DESKTOP).new_page()
    other.goto(bookmark)
    other.wait_for_function("() => document.querySelectorAll('#gallery .card').length > 0")
    assert other.locator("#gallery .card .title").all_text_contents() == titles
    other.wait_for_selector(".chip[data-name=dog][aria-pressed=true]")
    other.context.close()


def test_imgur_job_of_three_urls_one_broken(page, hosts):
    imgur, host = hosts
    page.goto("/")
    urls = [host.url("/pets.jpg"), host.url("/gone.jpg"), host.url("/coupleanddog.jpeg")]
    page.fill("#imgur-urls", "\n".join(urls))
    page.click("#imgur-submit")
    page.wait_for_selector("#job[data-status=complete]", timeout=30_000)
    assert page.locator("#job-items li[data-status=complete] a").count() == 2
    failed = page.locator("#job-items li[data-status=failed]")
    assert failed.count() == 1 and "404" in failed.text_content()
    assert "2 uploaded, 1 failed" in page.text_content("#job-summary")
    page.wait_for_function("() => document.querySelectorAll('#links a').length >= 2")
    shot(page, "imgur-desktop")


def test_an_api_error_shows_its_detail(page, tmp_path, hosts):
    _, host = hosts
    page.goto("/")
    page.fill("#url", host.url("/gone.jpg"))
    page.click("#add-submit")
    page.wait_for_selector("#add-error:not([hidden])")  # beside the form, not at the top of the page
    assert "404" in page.text_content("#add-error")
    assert page.is_hidden("#alert")
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("these are notes, not a photo")
    page.fill("#url", "")
    page.set_input_files("#file", str(not_an_image))
    page.click("#add-submit")
    page.wait_for_function("() => document.getElementById('add-error').textContent.includes('not an image')")


def test_delete_from_the_detail_view(page, images_dir):
    page.goto("/")
    upload_file(page, os.path.join(images_dir, "dragonfly.bmp"), detect=False)
    image_id = page.evaluate("() => fetch('/images?limit=1').then(r => r.json()).then(a => a[0].id)")
    page.click("#detail-delete")
    page.wait_for_selector("#detail", state="hidden")
    assert page.locator(f"#gallery [data-id='{image_id}']").count() == 0
    assert page.evaluate(f"() => fetch('/images/{image_id}').then(r => r.status)") == 404


@pytest.mark.parametrize("viewport, name", [(PHONE, "phone"), (DESKTOP, "desktop")])
def test_nothing_overflows(browser, site, stocked, viewport, name):
    context = browser.new_context(viewport=viewport, base_url=site)
    page = context.new_page()
    page.goto("/")
    page.wait_for_function("() => document.querySelectorAll('#gallery .card').length > 0")
    # The pictures on screen (lazy ones below the fold never load, and need not for this check).
    page.wait_for_function(
        "() => [...document.querySelectorAll('#gallery img')]"
        ".filter(i => i.getBoundingClientRect().top < innerHeight).every(i => i.complete)"
    )
    widths = page.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert widths[0] <= widths[1], widths
    shot(page, f"home-{name}")
    context.close()


def test_keyboard_reaches_every_control(page, stocked):
    page.goto("/")
    page.wait_for_selector(".chip")
    reached = set()
    for _ in range(60):
        page.keyboard.press("Tab")
        reached.add(page.evaluate("() => document.activeElement.id || document.activeElement.className"))
    assert {"file", "url", "label", "detect", "add-submit", "imgur-urls", "imgur-submit"} <= reached
    assert "chip" in reached
    unlabeled = page.evaluate(
        """() => [...document.querySelectorAll('input, textarea, select')].filter(e =>
             !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map(e => e.id || e.name)"""
    )
    assert unlabeled == []


def test_detection_unavailable_is_said_before_submitting(browser, tmp_path):
    proc, base, _ = start_server(tmp_path, "--model", str(tmp_path / "none.tflite"))
    try:
        context = browser.new_context(viewport=DESKTOP, base_url=base)
        page = context.new_page()
        page.goto("/")
        page.wait_for_selector("#detect-note:not([hidden])")
        assert "make model" in page.text_content("#detect-note")
        assert page.is_disabled("#detect") and not page.is_checked("#detect")
        assert "unavailable" in page.text_content("#health")
        context.close()
    finally:
        stop_server(proc)


def test_the_page_uses_nothing_from_elsewhere(site):
    import urllib.request

    with urllib.request.urlopen(site + "/") as res:
        html = res.read().decode()
        csp = res.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp
    assert not re.search(r"""(src|href)=["']https?://""", html)
    for module in ("app", "api", "detail", "gallery", "imgur", "pictures", "session", "upload"):
        with urllib.request.urlopen(f"{site}/static/js/{module}.js") as res:
            assert "javascript" in res.headers["Content-Type"]
            assert "http://" not in res.read().decode().replace("http(s)", "")
