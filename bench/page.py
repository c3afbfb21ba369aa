"""Benchmark of the demo page's first screen in a real browser, and of the thumbnails behind it.

    python bench/page.py [--runs N]          (`make bench`; DETECT_MODEL and TESTDATA_DIR as for the tests)

1. Starts `python server.py --port 0 --db <temp> --model $DETECT_MODEL` on a fresh database and uploads 30
   photos with detection (POST /images, detect=true, with their file names): 5 are 4000x3000 JPEGs of 2.6-3.3 MB
   with distinct bytes (test photos enlarged, with noise of their own, quality 92); 25 are the photos of
   TESTDATA_DIR/images as JPEGs, one pixel changed per copy. The big ones are spread over the newest 24
   (the gallery's first page), as they come in a real library.
2. Headless Chromium (Debian's /usr/bin/chromium, else Playwright's) at 1366x768, device pixel ratio 1,
   the network throttled through the DevTools protocol (Network.emulateNetworkConditions: 20 Mbit/s down
   and up, 20 ms latency, cache disabled). No thumbnail exists yet (checked in the database; any kept
   one is purged first). Each load has a new context and page, and starts once the machine has settled
   after making them (`settle`: a tenth of a second with its cores at most 20% busy, at most 3 s), as
   a person's browser is open before they go to the page; each is followed by one started at once (the
   method before), for comparison. From navigation start: the time until every gallery <img> on the
   first screen is complete and decoded, and the bytes transferred by then (Resource Timing's
   transferSize, headers included: the page, its scripts, the API's JSON and every picture, below the
   fold too). Against that,
   what the same cards' originals weigh (their stored sizes), from the same run. Repeated `--runs` times
   on fresh thumbnails; the median is reported. Once more with the thumbnails kept, which separates the
   page's own time from the making. Beside each run: the CPU time the server's process used by then and
   the load average (browser and server share the machine's cores, often with other work). `--waterfall`
   prints each request's timing (Resource Timing) of the median cold run and of the warm one.
   Then the same cold loads once more with the browser (and Playwright) on the first core and the server
   on the others (Linux sched_setaffinity; skipped with one core), as a phone and a Pi are two machines:
   the server's work for the first screen (thumbnails made ahead, THUMBNAIL_READ_AHEAD) then overlaps
   the browser's instead of competing with it for the same cores. A load that stalls in Chromium's
   throttling (about one in 20-60 here; see `first_screen`) is done again and counted.
3. Thumbnail making, server side (GET over loopback without throttling, so the time is the server's):
   the first request of a 4000x3000 and of a 1080p JPEG's thumbnail (size 320, WebP as the browser asks),
   and a kept thumbnail's latency (the median of 50 requests for one already made).

Prints one markdown table against the issue's targets (ok/MISSED), then one line of context. Progress
goes to stderr. It reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from api import BIG, big_photo, jpeg, variants  # noqa: E402  (bench/api.py)
from PIL import Image  # noqa: E402

import store  # noqa: E402
from serverproc import ServerProcess  # noqa: E402  (bench/serverproc.py)

SSD = "coco_ssd_mobilenet_v1_1.0_quant_2018_06_29.tflite"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
VIEWPORT = {"width": 1366, "height": 768}
MBIT = 1_000_000 / 8  # bytes per second in one Mbit/s
THROTTLE = {"offline": False, "latency": 20, "downloadThroughput": 20 * MBIT, "uploadThroughput": 20 * MBIT}
WEBP = "image/avif,image/webp,image/apng,image/*,*/*;q=0.8"  # what Chromium sends for an <img>

# In the page from its first script on: the first moment every gallery <img> on screen is complete, then
# decoded; and the bytes of every resource that had finished by then.
FIRST_SCREEN = """
window.__firstScreen = new Promise((resolve) => {
  const check = async () => {
    const imgs = [...document.querySelectorAll('#gallery img')].filter((i) => {
      const r = i.getBoundingClientRect();
      return r.bottom > 0 && r.top < innerHeight && r.right > 0 && r.left < innerWidth;
    });
    if (!imgs.length || !imgs.every((i) => i.complete && i.naturalWidth > 0)) return requestAnimationFrame(check);
    const complete = performance.now();
    await Promise.all(imgs.map((i) => i.decode().catch(() => null)));
    const done = performance.now();
    const nav = performance.getEntriesByType('navigation')[0];
    const resources = performance.getEntriesByType('resource').filter((e) => e.responseEnd <= done);
    resolve({
      complete, done, cards: imgs.map((i) => Number(i.closest('.card').dataset.id)),
      srcs: imgs.map((i) => i.currentSrc),
      bytes: nav.transferSize + resources.reduce((s, e) => s + e.transferSize, 0),
      pictureBytes: resources.filter((e) => /\\/images\\/\\d+\\/(thumbnail|file)/.test(e.name)).reduce((s, e) => s + e.transferSize, 0),
      requests: resources.length + 1,
      waterfall: [nav, ...resources].map((e) => [e.name.replace(location.origin, ''), e.startTime, e.requestStart,
        e.responseStart, e.responseEnd, e.transferSize]).concat(performance.getEntriesByType('mark')
        .map((m) => [`mark: ${m.name}`, m.startTime, m.startTime, m.startTime, m.startTime, 0])),
    });
  };
  requestAnimationFrame(check);
});
"""


def progress(text: str) -> None:
    print(f"[bench/page] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# The photos
# ---------------------------------------------------------------------------------------------------------


def photos(images_dir: str) -> list[tuple[str, bytes]]:
    """30 (file name, JPEG bytes), oldest first: 25 test photos and 5 big ones among the newest 24."""
    names = sorted(n for n in os.listdir(images_dir) if n.lower().endswith((".jpg", ".jpeg", ".bmp")))
    as_jpeg = {}
    for name in names:
        with open(os.path.join(images_dir, name), "rb") as f:
            data = f.read()
        if not name.lower().endswith((".jpg", ".jpeg")):
            data = jpeg(Image.open(io.BytesIO(data)).convert("RGB"), quality=90)
        as_jpeg[name] = data
    copies = {name: iter(variants(data, -(-25 // len(names)))) for name, data in as_jpeg.items()}
    regular = [(f"{os.path.splitext(n)[0]}-{i // len(names) + 1}.jpg", next(copies[n]))
               for i, n in enumerate(names[i % len(names)] for i in range(25))]
    sources = ["kite_and_cold.jpg", "cat_1080p.jpg", "pets.jpg", "coupleanddog.jpeg", "pasta_wine_test_image.jpg"]
    big = [(f"camera-{n + 1}.jpg", big_photo(Image.open(io.BytesIO(as_jpeg[s])), n)) for n, s in enumerate(sources)]
    newest = regular[::-1]
    for n, item in enumerate(big):  # the gallery shows the newest first: these are its cards 2, 6, 10, 14, 18
        newest.insert(1 + 4 * n, item)
    return newest[::-1]


def upload(srv: ServerProcess, name: str, data: bytes) -> dict:
    body = json.dumps({"image": base64.b64encode(data).decode("ascii"), "detect": True, "filename": name}).encode()
    _, _, answer = srv.request("POST", "/images", body)
    return json.loads(answer)


def get(srv: ServerProcess, path: str, **headers: str) -> tuple[float, int, int, str | None]:
    """(ms from sending to the last byte, status, body bytes, ETag) over the server's keep-alive connection,
    asking as Chromium's <img> does (WebP accepted)."""
    t = time.perf_counter()
    srv.conn.request("GET", path, headers={"Accept": WEBP, **{k.replace("_", "-"): v for k, v in headers.items()}})
    res = srv.conn.getresponse()
    data = res.read()
    return (time.perf_counter() - t) * 1000, res.status, len(data), res.headers.get("ETag")


# ---------------------------------------------------------------------------------------------------------
# The browser
# ---------------------------------------------------------------------------------------------------------


def cpu_ms(pid: int) -> float:
    """CPU time (user + system) a process has used so far, in ms (Linux's /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def busy_ticks() -> int | None:
    """CPU time the machine has spent busy (every core, not idle or waiting on disk), in clock ticks;
    None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(ticks) - ticks[3] - ticks[4]


def settle(window_s: float = 0.1, share: float = 0.2, limit_s: float = 3.0) -> float:
    """Wait until the machine is mostly idle: a `window_s` in which its cores were busy at most `share`
    of the time (at most `limit_s`; 0.5 s where /proc/stat cannot say). The seconds waited.

    After Playwright returns a new context and page, the page's renderer spends about 0.9 s of CPU on
    about:blank (Playwright setting itself up in it), and the browser process 0.2 s more: both cores of
    this machine stay busy for 0.7-0.9 s (/proc/stat in tenths of a second). A tab opened in the same
    Chromium without Playwright (DevTools' /json/new) cost its renderer 20-40 ms; and a person's tab is
    open before they go to the page. A load started at once measured the harness with the page: on the
    same code, a median of 1,100 ms against 700 ms after a pause (8 loads each, twice; the table's
    "method before" row measures it again in each run)."""
    started = time.perf_counter()
    last = busy_ticks()
    if last is None:
        time.sleep(0.5)
        return 0.5
    most = share * window_s * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)  # /proc/stat counts every core
    while time.perf_counter() - started < limit_s:
        time.sleep(window_s)
        now = busy_ticks()
        if now - last <= most:
            break
        last = now
    return time.perf_counter() - started


STALL_S = 20  # a load that has not shown its first screen by then is one of Chromium's throttling stalls
STALL_TRIES = 3


def first_screen(browser, base: str, server_pid: int, wait_to_settle: bool = True) -> dict:
    """One load of the page (`load_once`); a load that stalls is tried again, up to STALL_TRIES in all.

    About one load in 20-60 here stops for one to three minutes: Chromium stops reading its sockets
    (seen with `ss`: the server had sent every byte and was idle; Chromium's side held them unread),
    which is DevTools' network throttling, not the page or the service. Such a load is counted
    (`stalls`) rather than timed."""
    stalls = 0
    while True:
        result = load_once(browser, base, server_pid, wait_to_settle)
        if result is not None or stalls + 1 >= STALL_TRIES:
            if result is None:
                raise RuntimeError(f"{STALL_TRIES} loads in a row stalled past {STALL_S} s")
            result["stalls"] = stalls
            return result
        stalls += 1
        progress(f"a load stalled past {STALL_S} s (Chromium's throttling); trying again")


def load_once(browser, base: str, server_pid: int, wait_to_settle: bool = True) -> dict | None:
    """One load of the page, once the new context has settled (unless not `wait_to_settle`: the method
    before, for comparison); with what the server's process spent on CPU meanwhile, and the load average
    (the machine is shared: a first screen that waits for CPU is slower than the server's work needs).
    None when it stalled."""
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1, base_url=base)
    try:
        page = context.new_page()
        cdp = context.new_cdp_session(page)
        cdp.send("Network.enable")
        cdp.send("Network.setCacheDisabled", {"cacheDisabled": True})
        cdp.send("Network.emulateNetworkConditions", THROTTLE)
        page.add_init_script(FIRST_SCREEN)
        settled = settle() if wait_to_settle else 0.0
        before = cpu_ms(server_pid)
        page.goto("/", wait_until="commit")
        result = page.evaluate(f"() => Promise.race([window.__firstScreen, new Promise((r) => setTimeout(() => r(null), {STALL_S * 1000}))])")
        if result is None:
            return None
        result["serverCpu"] = cpu_ms(server_pid) - before
        result["load"] = os.getloadavg()[0]
        result["settled"] = settled
        return result
    finally:
        context.close()


def two_devices_possible() -> bool:
    return hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2


def _pin(pid: int, cores: set[int]) -> None:
    """Every thread of process `pid` on `cores` (a thread made later inherits its maker's)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), cores)


def cold_series(
    p, srv: ServerProcess, db: str, n: int, two_devices: bool = False, unsettled: list[dict] | None = None
) -> tuple[list[dict], list[int], dict]:
    """`n` first-screen loads, each on fresh thumbnails, then one with them kept: (runs, thumbnails purged
    before each, the warm run). `two_devices`: the browser (and this process) on the first core, the
    server on the others, as a phone and a Pi are two machines; otherwise they share every core. With
    `unsettled` (a list), each load is followed by one that does not wait for the new page to settle, as
    loads were made before `settle`, on fresh thumbnails too, into that list: the two methods
    interleaved, so that their medians compare."""
    every = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    if two_devices:
        first = min(every)
        os.sched_setaffinity(0, {first})  # Chromium and Playwright's driver, started below, inherit it
        _pin(srv.proc.pid, every - {first})
    runs, purged = [], []
    try:
        browser = p.chromium.launch(
            executable_path=CHROMIUM if os.path.exists(CHROMIUM) else None,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )
        try:
            for i in range(n):
                purged.append(no_thumbnails(db))
                progress(f"first screen{' (two devices)' if two_devices else ''}, run {i + 1} of {n}")
                runs.append(first_screen(browser, srv.url, srv.proc.pid))
                if unsettled is not None:
                    purged.append(no_thumbnails(db))
                    unsettled.append(first_screen(browser, srv.url, srv.proc.pid, wait_to_settle=False))
            progress("first screen again, its thumbnails kept")
            warm = first_screen(browser, srv.url, srv.proc.pid)
        finally:
            browser.close()
    finally:
        if two_devices:
            os.sched_setaffinity(0, every)
            _pin(srv.proc.pid, every)
    return runs, purged, warm


def no_thumbnails(db: str) -> int:
    """Purge every kept thumbnail (none is expected: they are made on first request); how many there were."""
    images = store.Store(db)
    try:
        with images.connection():
            n, _ = images.thumbnail_count()
            if n:
                images.purge_thumbnails()
            return n
    finally:
        images.shutdown()


def made_row(size: str, answers: list[tuple[float, int, int, str | None]]) -> tuple[str, str, str, None]:
    ms = sorted(a[0] for a in answers)
    kb = statistics.median(a[2] for a in answers) / 1024
    statuses = sorted({a[1] for a in answers})
    return (f"thumbnail of a {size} JPEG (320, WebP), first request: made, median of {len(ms)}",
            f"{statistics.median(ms):.0f} ms (max {ms[-1]:.0f} ms, {kb:.1f} KB, HTTP {statuses})", "", None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="first-screen loads, each on fresh thumbnails (default 3)")
    parser.add_argument("--waterfall", action="store_true",
                        help="also print each request of the median cold run and of the warm run (to stderr)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    from playwright import sync_api as playwright_api

    testdata = os.path.abspath(os.environ.get("TESTDATA_DIR") or os.path.join(ROOT, "testdata"))
    model = os.path.abspath(os.environ.get("DETECT_MODEL") or os.path.join(testdata, "models", SSD))
    images_dir = os.path.join(testdata, "images")
    started = time.perf_counter()
    progress("making 30 photos")
    made = photos(images_dir)
    random.seed(1)

    with tempfile.TemporaryDirectory(prefix="bench-page-") as tmp:
        db = os.path.join(tmp, "images.db")
        with ServerProcess(["--db", db, "--model", model], timeout=120) as srv:
            progress("uploading them with detection")
            records = [upload(srv, name, data) for name, data in made]
            by_id = {r["id"]: r for r in records}
            big_ids = [r["id"] for r in records if r["width"] * r["height"] >= BIG[0] * BIG[1]]

            with playwright_api.sync_playwright() as p:
                unsettled: list[dict] = []
                runs, purged, warm = cold_series(p, srv, db, args.runs, unsettled=unsettled)
                apart = cold_series(p, srv, db, args.runs, two_devices=True) if two_devices_possible() else None

            no_thumbnails(db)
            progress("thumbnail making, server side")
            full_hd = [r["id"] for r in records if (r["width"], r["height"]) == (1920, 1080)]
            srv.conn.close()  # idle through the browser runs: past channel_timeout the server has closed it
            get(srv, "/health")  # the connection is open and the server warm before anything is timed
            # One request after another: each thumbnail's first request, made at once with nothing else running.
            make_big = [get(srv, f"/images/{i}/thumbnail?size=320") for i in big_ids]
            make_1080 = [get(srv, f"/images/{i}/thumbnail?size=320") for i in full_hd]
            kept = [get(srv, f"/images/{big_ids[0]}/thumbnail?size=320")[0] for _ in range(50)]
            not_modified = [get(srv, f"/images/{big_ids[0]}/thumbnail?size=320", If_None_Match=make_big[0][3])[:2]
                            for _ in range(20)]
            stop = srv.stop_problem

    run = sorted(runs, key=lambda r: r["done"])[len(runs) // 2]  # the median run by time
    if args.waterfall:
        for title, r in (("cold (median run)", run), ("thumbnails kept", warm)):
            progress(f"waterfall, {title}: ms from navigation start: start, request sent, first byte, last byte; bytes")
            for name, start, sent, first, last, size in sorted(r["waterfall"], key=lambda e: e[1]):
                progress(f"  {start:7.0f} {sent:7.0f} {first:7.0f} {last:7.0f} {size:8d}  {name}")
    originals = sum(by_id[i]["size"] for i in run["cards"])
    share = run["bytes"] / originals
    big_on_screen = sum(1 for i in run["cards"] if i in big_ids)
    rows = [
        (f"first screen: bytes from navigation start ({len(run['cards'])} cards, {big_on_screen} of them 4000x3000)",
         f"{run['bytes'] / 1024:,.0f} KB ({run['pictureBytes'] / 1024:,.0f} KB of pictures, {run['requests']} requests)", "", None),
        ("the same cards' originals", f"{originals / 2**20:,.1f} MB", "", None),
        ("first screen bytes / originals", f"{share:.1%}", "<= 5%", share <= 0.05),
        ("first screen complete and decoded, from navigation start", f"{run['done']:.0f} ms (complete at {run['complete']:.0f} ms)",
         "<= 1000 ms", run["done"] <= 1000),
    ]
    if unsettled:
        hasty = statistics.median(r["done"] for r in unsettled)
        hasty_times = ", ".join(f"{r['done']:.0f}" for r in unsettled)
        rows.append(("the same, each load started as soon as Playwright gave the page (the method before `settle`), "
                     "interleaved", f"{hasty:.0f} ms (runs {hasty_times})", "", None))
    if apart is not None:
        far = sorted(apart[0], key=lambda r: r["done"])[len(apart[0]) // 2]
        apart_times = ", ".join(f"{r['done']:.0f}" for r in apart[0])
        rows.append((f"the same, browser on 1 core and server on {len(os.sched_getaffinity(0)) - 1} (two devices)",
                     f"{far['done']:.0f} ms (complete at {far['complete']:.0f} ms; runs {apart_times})",
                     "<= 1000 ms", far["done"] <= 1000))
    rows += [
        ("the same, its thumbnails already made (a second visit, browser cache off)",
         f"{warm['done']:.0f} ms, {warm['bytes'] / 1024:,.0f} KB", "", None),
        made_row("4000x3000", make_big),
        made_row("1920x1080", make_1080),
        ("a kept thumbnail, median of 50", f"{statistics.median(kept):.1f} ms (p90 {sorted(kept)[44]:.1f} ms)", "", None),
        ("a kept thumbnail with If-None-Match, median of 20",
         f"{statistics.median(m for m, _ in not_modified):.1f} ms (HTTP {not_modified[0][1]})", "", None),
    ]
    print("| what | measured | target | ok/MISSED |")
    print("|---|---|---|---|")
    for what, got, want, ok in rows:
        print(f"| {what} | {got} | {want or '—'} | {'—' if ok is None else 'ok' if ok else 'MISSED'} |")
    times = ", ".join(f"{r['done']:.0f}" for r in runs)
    cpu = ", ".join(f"{r['serverCpu']:.0f}" for r in runs)
    load = ", ".join(f"{r['load']:.1f}" for r in runs)
    settled = ", ".join(f"{r['settled']:.1f}" for r in runs)
    stalls = sum(r["stalls"] for r in runs + [warm] + (apart[0] + [apart[2]] if apart else []))
    shares = ", ".join(f"{r['bytes'] / sum(by_id[i]['size'] for i in r['cards']):.1%}" for r in runs)
    print(
        f"\n{len(records)} photos ({len(big_ids)} of 4000x3000, {sum(by_id[i]['size'] for i in big_ids) / 2**20:.1f} MB "
        f"together), Chromium {VIEWPORT['width']}x{VIEWPORT['height']} at DPR 1, 20 Mbit/s and 20 ms; runs {args.runs}: "
        f"first screen {times} ms, bytes/originals {shares}; the server's CPU time by then {cpu} ms "
        f"(kept thumbnails: {warm['serverCpu']:.0f} ms), load average {load}; s waited for the machine to settle before each {settled}; loads that stalled in Chromium and were done again {stalls}; thumbnails kept before each run: {purged}; "
        f"pictures on screen asked as {sorted({s.rsplit('?', 1)[-1] for s in run['srcs']})}; cores: {os.cpu_count()}; "
        f"{time.perf_counter() - started:.0f} s in all" + (f"; REGRESSION: {stop()}" if stop() else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
