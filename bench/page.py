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
   after making them (`settle`: a fifth of a second with no core more than 20% busy, at most 3 s), as
   a person's tab has its renderer running before they go to the page; as many loads are started at
   once (the method before), interleaved, for comparison. Before each, the server is let finish what
   the last load's listing had it make ahead, and then every kept thumbnail is purged. From navigation
   start: the time until every gallery <img> on the first screen is complete and decoded, and the bytes
   transferred by then (Resource Timing's transferSize, headers included: the page, its scripts, the
   API's JSON and every picture, below the fold too). Against that,
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


def busy_ticks() -> list[int] | None:
    """CPU time each core has spent busy so far (user, nice, system, irq, softirq, steal: /proc/stat's
    guest time is inside user already), in clock ticks; None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            lines = [line.split() for line in f if line.startswith("cpu") and not line.startswith("cpu ")]
        return [sum(int(line[i]) for i in (1, 2, 3, 6, 7, 8)) for line in lines]
    except (OSError, ValueError, IndexError):
        return None


def settle(window_s: float = 0.2, share: float = 0.2, limit_s: float = 3.0) -> tuple[float, bool]:
    """Wait until the machine is mostly idle: a `window_s` in which no core was busy more than `share`
    of the time, for at most `limit_s`. (The seconds waited, whether it settled); where /proc/stat cannot
    say, a 1 s pause and False.

    A new browser context's first page starts a renderer process of its own, which spends about 1 s of CPU
    starting up, and the browser process spends 0.2-0.4 s more. That was measured without Playwright too,
    over a raw DevTools pipe (Target.createBrowserContext, then Target.createTarget): renderer 1.06 s and
    browser 0.44 s. A new tab in the default context cost its renderer 60 ms, because Chromium hands a
    new tab a spare renderer it started beforehand. Both cores of this machine stay busy for 0.7-0.9 s
    after Playwright returns the page (/proc/stat, sampled every tenth of a second), and a load started at
    once shares them with that start-up. A person's tab has its renderer running before they go to the
    page. Each run measures both ways, interleaved: the table's rows "(the method before)"."""
    per_core = share * window_s * os.sysconf("SC_CLK_TCK")
    if not busy_ticks():
        time.sleep(1.0)
        return 1.0, False

    def calm(before: list[int], after: list[int]) -> bool:
        return len(before) == len(after) and max(b - a for a, b in zip(before, after, strict=True)) <= per_core

    return until_still(busy_ticks, calm, window_s, limit_s)


def server_idle(pid: int, window_s: float = 0.1, limit_s: float = 5.0) -> None:
    """Wait until the server's process used no CPU for `window_s` (at most `limit_s`): the thumbnails the
    last load's listing had it make ahead are all made (and kept) before the next purge."""
    until_still(lambda: cpu_ms(pid), lambda a, b: a == b, window_s, limit_s)


def until_still(read, still, window_s: float, limit_s: float) -> tuple[float, bool]:
    """Read `read()` every `window_s` until `still(before, after)` holds for one window (or a reading
    fails: None), at most `limit_s`: (the seconds waited, whether it held)."""
    started, last = time.perf_counter(), read()
    while time.perf_counter() - started < limit_s:
        time.sleep(window_s)
        now = read()
        if now is None:
            break
        if still(last, now):
            return time.perf_counter() - started, True
        last = now
    return time.perf_counter() - started, False


STALL_S = 20  # a load that has not shown its first screen by then is one of Chromium's throttling stalls
STALL_TRIES = 3


def first_screen(browser, base: str, srv: ServerProcess, db: str | None, settled: bool = True) -> dict:
    """One load of the page (`load_once`); a load that stalls is done again, up to STALL_TRIES in all.

    About one load in 20-60 here stops for two to three minutes: Chromium stops reading its sockets
    (seen with `ss`: the server had sent every byte and was idle; Chromium's side held them unread),
    which is DevTools' network throttling, not the page or the service. Such a load is counted
    (`stalls`) rather than timed; each try starts on fresh thumbnails again."""
    for stalls in range(STALL_TRIES):
        result = load_once(browser, base, srv, db, settled)
        if not result.get("stalled"):
            result["stalls"] = stalls
            return result
        progress(f"a load stalled past {STALL_S} s (Chromium's throttling); doing it again")
    raise RuntimeError(f"{STALL_TRIES} loads in a row stalled past {STALL_S} s in Chromium's network throttling")


def load_once(browser, base: str, srv: ServerProcess, db: str | None, settled: bool = True) -> dict:
    """One load of the page on fresh thumbnails (every kept one purged first, once the server is idle;
    `db` None: the ones kept stay, a second visit), with what the server's process spent on CPU meanwhile
    and the load average (the machine is shared: a first screen that waits for CPU is slower than the
    server's work needs). `settled`: the load starts once the new page has settled (`settle`); else
    as soon as Playwright returns it, the method before, for comparison. {"stalled": True} when the
    first screen had not come after STALL_S."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    server_idle(srv.proc.pid)
    purged = no_thumbnails(db) if db is not None and not settled else None
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1, base_url=base)
    try:
        page = context.new_page()
        cdp = context.new_cdp_session(page)
        cdp.send("Network.enable")
        cdp.send("Network.setCacheDisabled", {"cacheDisabled": True})
        cdp.send("Network.emulateNetworkConditions", THROTTLE)
        page.add_init_script(FIRST_SCREEN)
        waited, calm = settle() if settled else (0.0, False)
        if db is not None and settled:
            purged = no_thumbnails(db)  # after the settle, which may have let the server finish making some
        before = cpu_ms(srv.proc.pid)
        try:
            page.goto("/", wait_until="commit", timeout=STALL_S * 1000)
        except PlaywrightTimeout:
            return {"stalled": True}  # stalled before the page even arrived
        result = page.evaluate(
            "(stallMs) => { if (!window.__firstScreen) throw new Error('the first-screen script did not run');"
            " return Promise.race([window.__firstScreen,"
            " new Promise((resolve) => setTimeout(() => resolve({ stalled: true }), stallMs))]); }",
            STALL_S * 1000,
        )
        if result.get("stalled"):
            return result
        result.update(serverCpu=cpu_ms(srv.proc.pid) - before, load=os.getloadavg()[0], waited=waited,
                      calm=calm, purged=purged)
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


def cold_series(p, srv: ServerProcess, db: str, n: int, two_devices: bool = False) -> tuple[list[dict], list[dict], dict]:
    """`n` first-screen loads each way, on fresh thumbnails: started once the new page has settled, and
    as soon as Playwright returns it (the method before), interleaved (ABBA, so that neither always goes
    first); then one settled load with the thumbnails kept. (settled runs, unsettled runs, the warm run).
    `two_devices`: the browser (and this process) on the first core, the server on the others, as a
    phone and a Pi are two machines; otherwise they share every core."""
    every = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    if two_devices:
        first = min(every)
        os.sched_setaffinity(0, {first})  # Chromium and Playwright's driver, started below, inherit it
        _pin(srv.proc.pid, every - {first})
    runs: dict[bool, list[dict]] = {True: [], False: []}
    try:
        browser = p.chromium.launch(
            executable_path=CHROMIUM if os.path.exists(CHROMIUM) else None,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )
        try:
            for i in range(n):
                progress(f"first screen{' (two devices)' if two_devices else ''}, run {i + 1} of {n}, both ways")
                for settled in (True, False) if i % 2 == 0 else (False, True):
                    runs[settled].append(first_screen(browser, srv.url, srv, db, settled))
            progress("first screen again, its thumbnails kept")
            warm = first_screen(browser, srv.url, srv, None)
        finally:
            browser.close()
    finally:
        if two_devices:
            os.sched_setaffinity(0, every)
            _pin(srv.proc.pid, every)
    return runs[True], runs[False], warm


def no_thumbnails(db: str) -> int:
    """Purge every kept thumbnail (the last load had some made, and the read-ahead more); how many there were."""
    images = store.Store(db)
    try:
        with images.connection():
            n, _ = images.thumbnail_count()
            if n:
                images.purge_thumbnails()
            return n
    finally:
        images.shutdown()


def times_of(runs: list[dict]) -> str:
    return ", ".join(f"{r['done']:.0f}" for r in runs)


def median_run(runs: list[dict]) -> dict:
    """The median load by time (`--runs` is odd by default; of an even number, the later of the middle two)."""
    return sorted(runs, key=lambda r: r["done"])[len(runs) // 2]


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
                shared = cold_series(p, srv, db, args.runs)
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

    runs, unsettled, warm = shared
    run = median_run(runs)
    if args.waterfall:
        for title, r in (("cold (median run)", run), ("thumbnails kept", warm)):
            progress(f"waterfall, {title}: ms from navigation start: start, request sent, first byte, last byte; bytes")
            for name, start, sent, first, last, size in sorted(r["waterfall"], key=lambda e: e[1]):
                progress(f"  {start:7.0f} {sent:7.0f} {first:7.0f} {last:7.0f} {size:8d}  {name}")
    originals = sum(by_id[i]["size"] for i in run["cards"])
    share = run["bytes"] / originals
    big_on_screen = sum(1 for i in run["cards"] if i in big_ids)

    def first_screen_row(what: str, series: list[dict]) -> tuple[str, str, str, bool]:
        mid = median_run(series)
        stalled = sum(r["stalls"] for r in series)
        return (f"{what} (loads that stalled in Chromium and were done again: {stalled})",
                f"{mid['done']:.0f} ms (complete at {mid['complete']:.0f} ms; runs {times_of(series)})",
                "<= 1000 ms", mid["done"] <= 1000)

    rows = [
        (f"first screen: bytes from navigation start ({len(run['cards'])} cards, {big_on_screen} of them 4000x3000)",
         f"{run['bytes'] / 1024:,.0f} KB ({run['pictureBytes'] / 1024:,.0f} KB of pictures, {run['requests']} requests)", "", None),
        ("the same cards' originals", f"{originals / 2**20:,.1f} MB", "", None),
        ("first screen bytes / originals", f"{share:.1%}", "<= 5%", share <= 0.05),
        first_screen_row("first screen complete and decoded, from navigation start, each load started once the new "
                         "page had settled", runs),
        first_screen_row("the same, each load started as soon as Playwright returned the page (the method before), "
                         "interleaved", unsettled),
    ]
    if apart is not None:
        where = f"browser on 1 core and server on {len(os.sched_getaffinity(0)) - 1} (two devices)"
        rows += [first_screen_row(f"the same, {where}, settled", apart[0]),
                 first_screen_row(f"the same, {where}, the method before, interleaved", apart[1])]
    rows += [
        ("the same, its thumbnails already made (a second visit, browser cache off)",
         f"{warm['done']:.0f} ms, {warm['bytes'] / 1024:,.0f} KB (stalled and done again: {warm['stalls']})", "", None),
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
    cpu = ", ".join(f"{r['serverCpu']:.0f}" for r in runs)
    load = ", ".join(f"{r['load']:.1f}" for r in runs)
    waited = ", ".join(f"{r['waited']:.1f}{'' if r['calm'] else ' (not calm)'}" for r in runs)
    purged = ", ".join(str(r["purged"]) for r in runs)
    shares = ", ".join(f"{r['bytes'] / sum(by_id[i]['size'] for i in r['cards']):.1%}" for r in runs)
    print(
        f"\n{len(records)} photos ({len(big_ids)} of 4000x3000, {sum(by_id[i]['size'] for i in big_ids) / 2**20:.1f} MB "
        f"together), Chromium {VIEWPORT['width']}x{VIEWPORT['height']} at DPR 1, 20 Mbit/s and 20 ms; runs {args.runs} "
        f"each way; settled loads on shared cores: first screen {times_of(runs)} ms, bytes/originals {shares}; the "
        f"server's CPU time by then {cpu} ms (kept thumbnails: {warm['serverCpu']:.0f} ms), load average {load}; "
        f"s waited for the machine to settle {waited}; thumbnails purged before each {purged}; "
        f"pictures on screen asked as {sorted({s.rsplit('?', 1)[-1] for s in run['srcs']})}; cores: {os.cpu_count()}; "
        f"{time.perf_counter() - started:.0f} s in all" + (f"; REGRESSION: {stop()}" if stop() else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
