"""The demo page's views in the real browser (issue 14): thumbnails, the races between views, the detail
view's loading state, the detections and their labels, phones, errors beside their controls, focus and
contrast, several files per upload.

Headless Chromium driven by Playwright against the real server process, as tests/test_page.py. Where a race
needs an answer to come late, `page.route` holds that response back and lets it go later; where the page
must wait out a 503 (the decode budget busy, which no test can make happen on cue), `page.route` answers
one request with the service's 503 and lets the next through.
"""

import base64
import io
import json
import os
import re
import shutil
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image
from test_page import DESKTOP, PHONE, browser, hosts, shot, wait_image_loaded  # noqa: F401 (fixtures)
from test_server import start_server, stop_server

PICTURE = re.compile(r"/images/\d+/(thumbnail|file)")


@pytest.fixture(scope="module")
def site(tmp_path_factory, model_path, hosts):  # noqa: F811
    imgur, _ = hosts
    env = {"IMGUR_CLIENT_ID": imgur.client_id, "IMGUR_API_URL": imgur.url, "ALLOW_PRIVATE_URLS": "1"}
    proc, base, _ = start_server(tmp_path_factory.mktemp("views"), "--model", model_path, env=env)
    yield base
    stop_server(proc)


def api(site, path, method="GET", body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(site + path, data, {"Content-Type": "application/json"}, method=method)
    with urllib.request.urlopen(req, timeout=60) as res:
        return json.loads(res.read() or b"null")


def add(site, images_dir, name, detect=True):
    with open(os.path.join(images_dir, name), "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return api(site, "/images", "POST", {"image": data, "detect": detect, "filename": name})


def tiny(n):
    """A small JPEG of its own colour (distinct bytes: the store keeps one record per sha256)."""
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (n * 9 % 256, n * 31 % 256, n * 57 % 256)).save(out, "JPEG")
    return base64.b64encode(out.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def stocked(site, images_dir):
    """26 small pictures without detection, then (newest) two dogs, a cat, people with kites, a table with
    wine: more than a page of 24, several object names."""
    for n in range(26):
        api(site, "/images", "POST", {"image": tiny(n), "detect": False, "label": f"swatch {n}"})
    return {name: add(site, images_dir, name) for name in
            ("pasta_wine_test_image.jpg", "kite_and_cold.jpg", "coupleanddog.jpeg", "cat.bmp", "pets.jpg")}


@pytest.fixture
def page(browser, site):  # noqa: F811
    context = browser.new_context(viewport=DESKTOP, base_url=site)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: d.accept())
    yield page
    context.close()
    assert errors == [], errors


class Held:
    """Responses to requests matching `pattern` held back until `release()` (Playwright's page.route)."""

    def __init__(self, page, pattern, times=None):
        self.page, self.pattern, self.routes = page, pattern, []
        page.route(pattern, lambda route: self.routes.append(route), times=times)

    def wait(self, n=1):
        for _ in range(200):
            if len(self.routes) >= n:
                return
            self.page.wait_for_timeout(25)  # lets Playwright deliver the route events
        raise AssertionError(f"no request for {self.pattern}")

    def release(self):
        for route in self.routes:
            try:
                route.continue_()
            except Exception:  # noqa: BLE001 - the page cancelled that request: nothing to let go
                pass
        self.routes.clear()
        self.page.unroute(self.pattern)


def cards(page):
    return page.locator("#gallery .card").evaluate_all("cs => cs.map(c => c.dataset.id)")


def gallery_ready(page):
    page.wait_for_function("() => document.querySelectorAll('#gallery .card').length > 0 && "
                           "!document.getElementById('gallery').hasAttribute('aria-busy')")


def painted(png: bytes):
    """(fraction of pixels in the loading placeholder's grey, number of distinct colours) of a screenshot."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16).reshape(-1, 3)
    grey = np.all(np.abs(pixels - (0xE4, 0xE8, 0xEB)) <= 3, axis=1).mean()
    return float(grey), len(np.unique(pixels, axis=0))


# ----- thumbnails -----


def test_the_gallery_and_the_detail_view_load_thumbnails_never_the_original(page, stocked):
    files = []
    page.on("request", lambda r: files.append(r.url) if PICTURE.search(r.url) else None)
    page.goto("/")
    gallery_ready(page)
    page.wait_for_function("() => [...document.querySelectorAll('#gallery img')]"
                           ".filter(i => i.getBoundingClientRect().top < innerHeight).every(i => i.complete && i.naturalWidth)")
    # Only the pictures near the screen are asked for (Chromium's loading="lazy" asked for all 24 on a desktop).
    on_screen = page.evaluate("() => [...document.querySelectorAll('#gallery img')]"
                              ".filter(i => i.getBoundingClientRect().top < innerHeight).length")
    asked = len(files)
    assert on_screen <= asked < 24, (on_screen, asked)
    page.locator("#gallery .card").last.scroll_into_view_if_needed()
    page.wait_for_function("() => [...document.querySelectorAll('#gallery img')].at(-1).naturalWidth > 0")
    assert len(files) > asked
    first = page.locator("#gallery .card img").first
    assert "size=320 1x" in first.get_attribute("srcset") and first.evaluate("i => i.currentSrc").endswith("?size=320")
    page.locator("#gallery .card button").first.click()
    wait_image_loaded(page)
    shown = page.evaluate("() => document.getElementById('detail-img').currentSrc")
    assert re.search(r"/thumbnail\?size=(640|1280)$", shown), shown
    pets = stocked["pets.jpg"]
    assert page.get_attribute("#detail-file", "href") == pets["file_url"]  # the original: behind this link only
    assert files and not [u for u in files if "/file" in u], files


def test_a_thumbnail_answered_503_is_asked_again_after_retry_after(page, stocked):
    answered = []

    def busy(route):
        answered.append(time.monotonic())
        route.fulfill(status=503, headers={"Retry-After": "1", "Content-Type": "application/problem+json"},
                      body=json.dumps({"status": 503, "detail": "the decode budget is busy; try again in 1 s"}))

    pets = stocked["pets.jpg"]
    page.route(f"**/images/{pets['id']}/thumbnail?size=320", busy, times=1)
    retried = []
    page.on("request", lambda r: retried.append(time.monotonic()) if f"/images/{pets['id']}/thumbnail" in r.url else None)
    page.goto("/")
    card = page.locator(f"#gallery [data-id='{pets['id']}'] img")
    card.wait_for()
    page.wait_for_function("id => { const i = document.querySelector(`#gallery [data-id='${id}'] img`);"
                           " return i.complete && i.naturalWidth > 0; }", arg=pets["id"], timeout=10_000)
    assert answered, "the 503 was never sent"
    later = [t for t in retried if t > answered[0] + 0.9]
    assert later, (answered, retried)  # asked again, and not before the Retry-After's second
    assert card.evaluate("i => i.src").startswith("blob:")


# ----- races -----


def test_a_late_search_answer_never_wins_over_a_newer_one(page, stocked):
    page.goto("/")
    gallery_ready(page)
    held = Held(page, re.compile(r"/images\?objects=dog&"))
    page.click(".chip[data-name=dog]")
    held.wait()
    page.click(".chip[data-name=dog]")  # off again
    page.click(".chip[data-name=cat]")
    page.wait_for_url(re.compile(r"objects=cat$|objects=cat&"))
    gallery_ready(page)
    held.release()  # the dog answer, late (or cancelled already)
    page.wait_for_timeout(300)  # time for a stale answer to do harm, were it let in
    titles = page.locator("#gallery .card .title").all_text_contents()
    assert titles and all("cat" in t and "dog" not in t for t in titles), titles
    assert page.get_attribute(".chip[data-name=cat]", "aria-pressed") == "true"
    assert page.get_attribute(".chip[data-name=dog]", "aria-pressed") == "false"


def test_a_bookmarked_plural_or_category_search_shows_its_images_and_no_count_of_0(page, stocked):
    page.goto("/?objects=dogs")
    gallery_ready(page)
    titles = page.locator("#gallery .card .title").all_text_contents()
    assert titles and all("dog" in t for t in titles), titles  # "dogs" finds what "dog" finds
    page.wait_for_selector(".chip[data-name=dogs]")
    chip = page.locator(".chip[data-name=dogs]")
    assert chip.get_attribute("aria-pressed") == "true" and chip.text_content() == "dogs", chip.text_content()
    page.goto("/?objects=animal")
    gallery_ready(page)
    titles = page.locator("#gallery .card .title").all_text_contents()
    assert any("cat" in t for t in titles) and any("dog" in t for t in titles), titles
    page.wait_for_selector(".chip[data-name=animal]")
    assert page.locator(".chip[data-name=animal]").text_content() == "animal"
    assert page.locator(".chip[data-name=dog] .count").text_content() not in ("", "(0)")


def test_load_more_is_single_flight_and_adds_each_image_once(page, site, stocked):
    page.goto("/")
    gallery_ready(page)
    assert len(cards(page)) == 24 < len(api(site, "/images?limit=1000"))
    held = Held(page, re.compile(r"/images\?.*before="))
    page.evaluate("() => { const m = document.getElementById('more'); m.click(); m.click(); m.click(); }")
    held.wait()
    page.wait_for_timeout(100)
    assert len(held.routes) == 1  # one request, however many clicks
    held.release()
    page.wait_for_function("() => document.querySelectorAll('#gallery .card').length > 24")
    ids = cards(page)
    assert len(ids) == len(set(ids)) == len(api(site, "/images?limit=1000")), ids
    assert page.is_hidden("#more")


def test_load_more_then_a_chip_never_mixes_unfiltered_images_into_the_filter(page, stocked):
    page.goto("/")
    gallery_ready(page)
    held = Held(page, re.compile(r"/images\?.*before="))
    page.click("#more")
    held.wait()
    page.click(".chip[data-name=dog]")
    page.wait_for_url(re.compile(r"objects=dog"))
    page.wait_for_function("() => [...document.querySelectorAll('#gallery .title')].every(t => t.textContent.includes('dog'))")
    held.release()
    page.wait_for_timeout(300)
    titles = page.locator("#gallery .card .title").all_text_contents()
    assert len(titles) == 2 and all("dog" in t for t in titles), titles


# ----- the detail view -----


def test_the_detail_view_never_paints_the_old_picture_under_new_boxes(page, stocked):
    page.goto("/")
    gallery_ready(page)
    pets, cat = stocked["pets.jpg"], stocked["cat.bmp"]
    page.click(f"#gallery [data-id='{pets['id']}'] button")
    wait_image_loaded(page)
    before = painted(page.locator("#frame").screenshot())
    assert before[0] < 0.2 and before[1] > 1000  # the dogs, in colour
    page.click("#detail-close")
    held = Held(page, re.compile(rf"/images/{cat['id']}/(thumbnail|file)"))
    page.click(f"#gallery [data-id='{cat['id']}'] button")
    held.wait()
    page.wait_for_selector("#detail[open]")
    assert page.text_content("#detail-title") == "cat"
    assert page.is_visible("#detail-loading") and "Loading" in page.text_content("#detail-loading")
    waiting = painted(page.locator("#frame").screenshot())
    shot(page, "detail-loading")
    # What is painted is the plain placeholder and its words: no dog, no box.
    assert waiting[0] > 0.8 and waiting[1] < 500, waiting  # (the words' anti-aliasing: a few hundred)
    assert page.locator("#boxes .box").count() == 0
    held.release()
    wait_image_loaded(page)
    after = painted(page.locator("#frame").screenshot())
    assert after[0] < 0.2 and after[1] > 1000
    assert page.locator("#boxes .box").evaluate_all("bs => bs.map(b => b.dataset.label)") == ["cat"]


def test_detections_listed_a_slider_hides_weak_boxes_labels_switch_and_labels_stay_clear(page, stocked):
    kites = stocked["kite_and_cold.jpg"]
    dets = kites["detections"]
    assert len(dets) >= 6  # people and kites, several close together
    page.goto("/")
    gallery_ready(page)
    page.click(f"#gallery [data-id='{kites['id']}'] button")
    wait_image_loaded(page)
    listed = page.locator("#detections li").all_text_contents()
    assert len(listed) == len(dets)
    assert sorted(listed) == sorted(f"{d['label']} {round(d['confidence'] * 100)}%" for d in dets)

    def label_rects():
        return page.evaluate("""() => {
            const img = document.getElementById('detail-img').getBoundingClientRect();
            return [[img.left, img.top, img.right, img.bottom],
                    [...document.querySelectorAll('#boxes .box-label')].filter(l => !l.hidden).map(l => {
                        const r = l.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; })];
        }""")

    def check_labels():
        (il, it, ir, ib), labels = label_rects()
        for left, top, right, bottom in labels:  # never off the picture's edges
            assert il - 0.5 <= left and right <= ir + 0.5 and it - 0.5 <= top and bottom <= ib + 0.5, (labels, il, it, ir, ib)
        worst = 0.0
        for i, a in enumerate(labels):
            for b in labels[i + 1:]:
                w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
                h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
                smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
                worst = max(worst, w * h / smaller)
        assert worst <= 0.25, worst  # at most a quarter of a label under another
        return labels

    assert len(check_labels()) == len(dets)
    shot(page, "detail-kites-desktop")
    page.set_viewport_size(PHONE)
    page.wait_for_timeout(150)  # the resize observer places the labels again
    check_labels()
    shot(page, "detail-kites-phone")
    page.set_viewport_size(DESKTOP)

    page.evaluate("() => { const s = document.getElementById('min-confidence'); s.value = '60';"
                  " s.dispatchEvent(new Event('input')); }")
    assert page.text_content("#min-confidence-value") == "60%"
    visible = page.locator("#boxes .box:visible").count()
    assert visible == sum(1 for d in dets if d["confidence"] >= 0.6) and 0 < visible < len(dets)
    assert len(check_labels()) == visible
    assert page.locator("#detections li.below").count() == len(dets) - visible
    page.uncheck("#show-labels")
    assert page.locator("#boxes .box-label:visible").count() == 0
    assert page.locator("#boxes .box:visible").count() == visible  # the boxes stay


# ----- phones, words, focus -----


def test_two_columns_from_320_px_and_one_row_of_chips_on_a_phone(browser, site, stocked):  # noqa: F811
    for width in (320, 375):
        context = browser.new_context(viewport={"width": width, "height": 700}, base_url=site)
        page = context.new_page()
        page.goto("/")
        gallery_ready(page)
        page.wait_for_function("() => document.querySelectorAll('.chip').length >= 6")
        boxes = page.locator("#gallery .card").evaluate_all("cs => cs.slice(0, 2).map(c => c.getBoundingClientRect().toJSON())")
        assert boxes[0]["top"] == boxes[1]["top"] and boxes[1]["left"] > boxes[0]["right"], boxes
        assert boxes[0]["width"] >= 120
        chips = page.evaluate("""() => { const c = document.getElementById('chips');
            return [c.getBoundingClientRect().height, document.querySelector('.chip').getBoundingClientRect().height,
                    c.scrollWidth, c.clientWidth]; }""")
        assert chips[0] < 2 * chips[1] and chips[2] > chips[3], chips  # one row, scrolled sideways
        widths = page.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert widths[0] <= widths[1], widths
        shot(page, f"home-{width}")
        context.close()


def near(page, a, b, px=120):
    ra, rb = page.locator(a).bounding_box(), page.locator(b).bounding_box()
    return abs(ra["y"] - (rb["y"] + rb["height"])) < px or abs(rb["y"] - (ra["y"] + ra["height"])) < px


def test_errors_are_said_beside_the_control_in_plain_words(page, hosts, stocked):  # noqa: F811
    _, host = hosts
    page.goto("/")
    page.click("#add-submit")
    assert "Nothing to add" in page.text_content("#add-error") and near(page, "#add-error", "#add-submit")
    page.click("#imgur-submit")
    assert "Nothing to upload" in page.text_content("#imgur-error") and near(page, "#imgur-error", "#imgur-urls")
    page.fill("#imgur-urls", f"{host.url('/pets.jpg')}\n\nftp://example.com/b.jpg\n{host.url('/cat.bmp')}")
    page.click("#imgur-submit")
    page.wait_for_function("() => document.getElementById('imgur-error').textContent.includes('ine 3')")
    said = page.text_content("#imgur-error")
    assert "Line 3 (ftp://example.com/b.jpg)" in said and "urls[" not in said, said
    assert page.is_hidden("#alert") and page.is_hidden("#job")
    assert page.get_attribute("#imgur-urls", "aria-invalid") == "true"
    shot(page, "imgur-error")


def test_a_card_shows_its_file_name_and_an_empty_search_says_nothing_matches(page, images_dir, stocked):
    page.goto("/")
    gallery_ready(page)
    card = page.locator(f"#gallery [data-id='{stocked['pets.jpg']['id']}']")
    assert card.locator(".title").text_content() == "2 dogs"
    assert card.locator(".source").text_content() == "pets.jpg"
    page.goto("/?objects=dog,kite&match=all")
    page.wait_for_selector("#gallery-status:has-text('Nothing matches')")
    assert page.locator("#gallery .card").count() == 0
    assert "No images yet" not in page.text_content("#gallery-status")


def test_the_skip_links_and_focus_after_a_delete(page, site, images_dir, stocked):
    page.goto("/")
    gallery_ready(page)
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.id") == "skip-images"
    assert page.locator("#skip-images").bounding_box()["x"] >= 0  # shown when focused
    page.keyboard.press("Enter")
    assert page.evaluate("() => document.activeElement.id") == "gallery-title"
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.className") == "chip"
    page.goto("/")
    gallery_ready(page)
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.id") == "imgur-urls"

    doomed = add(site, images_dir, "bird.bmp", detect=False)
    page.goto("/")
    gallery_ready(page)
    ids = cards(page)
    assert ids[0] == str(doomed["id"])
    page.click(f"#gallery [data-id='{doomed['id']}'] button")
    wait_image_loaded(page)
    page.click("#detail-delete")
    page.wait_for_selector("#detail", state="hidden")
    assert page.evaluate("() => document.activeElement.closest('.card')?.dataset.id") == ids[1]


CONTRAST = """() => {
  const rgb = (c) => { const m = c.match(/[\\d.]+/g).map(Number); return [m[0], m[1], m[2], m.length > 3 ? m[3] : 1]; };
  const lum = ([r, g, b]) => { const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
                               return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
  const ratio = (a, b) => { const [x, y] = [lum(a), lum(b)].sort((p, q) => q - p); return (x + 0.05) / (y + 0.05); };
  const behind = (el) => { for (let e = el; e; e = e.parentElement) { const c = rgb(getComputedStyle(e).backgroundColor);
                             if (c[3] > 0.5) return c; } return [255, 255, 255, 1]; };
  return { ratio, behind, rgb };
}"""


def test_focus_rings_and_input_borders_have_3_to_1_contrast(page, stocked):
    page.goto("/")
    gallery_ready(page)
    borders = page.evaluate(f"""() => {{ const {{ ratio, behind, rgb }} = ({CONTRAST})();
        return [...document.querySelectorAll('#url, #label, #imgur-urls, .chip, .drop')].map(e => {{
          const s = getComputedStyle(e);
          return [e.id || e.className, ratio(rgb(s.borderTopColor), behind(e.parentElement))]; }}); }}""")
    assert borders and all(r >= 3 for _, r in borders), borders
    rings = []
    for _ in range(24):
        page.keyboard.press("Tab")
        rings.append(page.evaluate(f"""() => {{ const {{ ratio, behind, rgb }} = ({CONTRAST})();
            // The file input is invisible: the ring is its drop zone's (:focus-within).
            const e = document.activeElement.id === 'file' ? document.getElementById('drop') : document.activeElement;
            const s = getComputedStyle(e);
            const ring = s.outlineStyle !== 'none' && parseFloat(s.outlineWidth) >= 2;
            // An inset ring (a card) is seen against the element itself; an outset one against what is behind.
            const against = parseFloat(s.outlineOffset) < 0 ? behind(e) : behind(e.parentElement);
            return [e.id || e.className || e.tagName, ring, ring ? ratio(rgb(s.outlineColor), against) : 0]; }}"""))
    assert all(ring and r >= 3 for _, ring, r in rings), rings
    names = {name for name, _, _ in rings}
    assert {"drop", "url", "label", "add-submit", "chip"} <= names, names


# ----- several files -----


def test_several_files_go_one_after_another_each_with_its_progress_and_a_503_is_retried(page, images_dir, stocked):
    names = ["cat.bmp", "coupleanddog.jpeg", "bird.bmp"]
    files = []
    for n, name in enumerate(names):  # distinct bytes, so each is a new image
        im = Image.open(os.path.join(images_dir, name)).convert("RGB")
        im.putpixel((0, 0), (n, 0, 0))
        out = io.BytesIO()
        im.save(out, "JPEG", quality=90)
        files.append({"name": f"<b>{name}.jpg", "mimeType": "image/jpeg", "buffer": out.getvalue()})
    in_flight, most, posts, busy = [0], [0], [], []

    upload = re.compile(r"^http://[^/]+/images$")

    def sent(r):
        if r.method == "POST" and upload.match(r.url):
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])

    def done(r):
        if r.method == "POST" and upload.match(r.url):
            in_flight[0] -= 1

    def second_is_busy(route):
        if route.request.method != "POST":
            return route.continue_()
        posts.append(time.monotonic())
        if len(posts) == 2:
            busy.append(time.monotonic())
            return route.fulfill(status=503, headers={"Retry-After": "1", "Content-Type": "application/problem+json"},
                                 body=json.dumps({"status": 503, "detail": "busy: try again in 1 s"}))
        route.continue_()

    page.on("request", sent)
    page.on("response", lambda r: done(r.request))  # (in the browser's order: before the next request)
    page.on("requestfailed", done)
    page.route(re.compile(r"/images$"), second_is_busy)
    page.goto("/")
    gallery_ready(page)
    page.set_input_files("#file", files)
    assert "3 files" in page.text_content("#file-name")
    page.click("#add-submit")
    page.wait_for_selector("#uploads li[data-status=retrying]")
    page.wait_for_function("() => [...document.querySelectorAll('#uploads li')].every(l => l.dataset.status === 'added')",
                           timeout=30_000)
    assert most[0] == 1 and len(posts) == 4 and posts[2] >= busy[0] + 0.9, (most, posts, busy)
    assert page.locator("#uploads progress").count() == 3
    assert page.locator("#uploads .upload-name").all_text_contents() == [f["name"] for f in files]
    # The names are text: no <b> element came of them, in the list or on the cards.
    assert page.locator("#uploads b, #gallery b").count() == 0
    assert page.locator("#gallery .card .source").all_text_contents()[:3] == [f["name"] for f in reversed(files)]
    assert page.locator("#detail[open]").count() == 0  # several files: the gallery shows them, no dialog
    shot(page, "uploads")


def test_labels_and_file_names_never_run_as_markup(page, stocked):
    evil = "<img src=x onerror=window.pwned=1>"
    page.goto("/")
    gallery_ready(page)
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(out, "JPEG")
    page.set_input_files("#file", {"name": f"{evil}.jpg", "mimeType": "image/jpeg", "buffer": out.getvalue()})
    page.fill("#label", f"<script>window.pwned=2</script>{evil}")
    page.click("#add-submit")
    wait_image_loaded(page)
    assert page.text_content("#detail-title") == f"<script>window.pwned=2</script>{evil}"
    page.click("#detail-close")
    card = page.locator("#gallery .card").first
    assert card.locator(".source").text_content() == f"{evil}.jpg"
    assert page.evaluate("() => window.pwned") is None
    assert page.locator("img[src=x], script:not([src])").count() == 0


# ----- a service without a model and without Imgur -----


def test_health_is_read_again_on_focus_and_imgur_off_is_said(browser, tmp_path, model_path):  # noqa: F811
    later = tmp_path / "later.tflite"
    proc, base, _ = start_server(tmp_path, "--model", str(later))
    try:
        context = browser.new_context(viewport=DESKTOP, base_url=base)
        page = context.new_page()
        sent = []
        page.on("request", lambda r: sent.append((r.method, r.url)))
        page.goto("/")
        page.wait_for_selector("#imgur-off:not([hidden])")
        assert "Imgur uploads are off" in page.text_content("#imgur-off")
        assert "IMGUR_CLIENT_ID" in page.text_content("#imgur-off")
        # Said from GET /health's `imgur` member: no batch sent to find out (each made a WARNING in the log)
        assert [u for m, u in sent if m != "GET"] == []
        assert page.is_disabled("#imgur-urls") and page.is_disabled("#imgur-submit")
        assert page.evaluate("() => document.getElementById('imgur-form').inert")
        assert "unavailable" in page.text_content("#health") and page.is_disabled("#detect")
        shutil.copyfile(model_path, later)  # the model arrives while the page sits in another tab
        page.evaluate("() => document.dispatchEvent(new Event('visibilitychange'))")
        page.wait_for_function("() => document.getElementById('health').textContent.includes('detecting with')")
        assert page.is_enabled("#detect") and page.is_checked("#detect")
        assert page.is_disabled("#imgur-urls") and [u for m, u in sent if m != "GET"] == []
        context.close()
    finally:
        stop_server(proc)
