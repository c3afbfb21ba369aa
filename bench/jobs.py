"""Benchmark of Imgur upload jobs through the real server process: throughput and submit latency.

    python bench/jobs.py [--urls N] [--load N] [--submits N] [--per-submit N] [--delay S] [--workers N]
                         [--poll S] [--photo NAME] [--reference N]
                                             (DETECT_MODEL and TESTDATA_DIR as for the tests)

Starts a fake Imgur (tests/fake_imgur.py, a fixed --delay per upload) and an image host
(tests/loopback.py) on loopback in this process, then `python server.py --port 0 --db <temp> --model
$DETECT_MODEL` with IMGUR_CLIENT_ID / IMGUR_API_URL pointing at the fake, ALLOW_PRIVATE_URLS=1,
UPLOAD_WORKERS=--workers and an UPLOAD_BACKLOG / JOB_MAX_URLS that admit everything below. Every URL is
its own path on the image host and serves the photo with its index appended after the JPEG's end (distinct
bytes, so the fake's `received` shows which URL each upload came from). Polls go over one keep-alive
connection (http.client); the timed POSTs over another, from a child process, so that the time this
process spends playing the fake (parsing every upload's multipart body) is not counted as the server's.

R. Reference, without the server: --workers threads in this process doing what a server worker does
   (fetch.Fetcher.fetch + imgur.ImgurClient.upload, one URL after another) for --reference URLs: what the
   fake and the image host allow on this machine.
0. Warm-up, and the idle baseline: --submits/10 timed POST /v1/images/upload of --per-submit URLs each on
   an idle server; waits until they are uploaded.
1. Throughput: --urls URLs in one POST /v1/images/upload; GET /v1/images/upload/<jobId> every --poll s
   until the job is complete. Uploads per second = URLs / (first POST sent -> the poll that saw
   `complete`), against 90% of the ideal workers / delay. Also the server's own view (job `finished` -
   `created`). Checks that every URL ended `complete` and that the fake received each exactly once.
2. Submit latency under load: one POST of --load URLs (the workers are busy with it), then --submits
   timed POSTs of --per-submit URLs each, back to back over one keep-alive connection; median and p99
   against p99 <= 20 ms. Then waits until every job is complete and checks the uploads as in 1.

Prints one markdown table against the issue's targets and one line of context (cores, workers, fake
delay, counts, CPU used by the server and by this process, which plays the fake and the image host).
Progress goes to stderr. It reports; it asserts nothing. The server is stopped with SIGTERM and the
loopback servers closed on errors and Ctrl-C too.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import fetch  # noqa: E402
import imgur  # noqa: E402
import settings as settings_mod  # noqa: E402
from fake_imgur import FakeImgur, _parse_multipart  # noqa: E402
from loopback import Loopback, respond  # noqa: E402
from serverproc import ServerProcess, testdata_paths  # noqa: E402  (bench/serverproc.py)

SUBMIT = "/v1/images/upload"
TAG = re.compile(rb"\n<bench-url (\d+)>$")  # appended after the JPEG's end: which URL an upload came from

# The timed POSTs, in a child process: {"host", "port", "path", "batches": [[url, ...], ...], "pause": s} on
# stdin; {"results": [[ms, jobId], ...], "connects": n} or {"error": "..."} on stdout.
CLIENT = r"""
import http.client, json, sys, time
spec = json.load(sys.stdin)
conn = http.client.HTTPConnection(spec["host"], spec["port"], timeout=60)
out, connects = [], 0
for urls in spec["batches"]:
    body = json.dumps({"urls": urls}).encode()
    connects += conn.sock is None
    t = time.perf_counter()
    conn.request("POST", spec["path"], body=body, headers={"Content-Type": "application/json"})
    res = conn.getresponse()
    data = res.read()
    ms = (time.perf_counter() - t) * 1000
    if res.status != 202:
        print(json.dumps({"error": "HTTP %d: %r" % (res.status, data[:500])}))
        sys.exit(1)
    out.append([ms, json.loads(data)["jobId"]])
    if spec["pause"]:
        time.sleep(spec["pause"])
conn.close()
print(json.dumps({"results": out, "connects": connects}))
"""


def progress(text: str) -> None:
    print(f"[bench/jobs] {text}", file=sys.stderr, flush=True)


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98] if len(values) > 1 else values[0]


def iso_seconds(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------------------
# The server process
# ---------------------------------------------------------------------------------------------------------


class JobsServer(ServerProcess):
    """`python server.py` with its own database and `env`; JSON over the keep-alive connection, and the timed
    POSTs from a child process."""

    def __init__(self, db: str, model: str, env: dict[str, str]):
        self.child_connects = 0  # of the timed POSTs' connections (one per child process if kept alive)
        super().__init__(["--db", db, "--model", model], env=env, stop_timeout=15)  # jobs.close() waits for uploads

    def request_json(self, method: str, path: str, body: bytes | None = None) -> tuple[float, dict]:
        """(milliseconds from sending to the last byte read, the JSON body); anything but 2xx raises."""
        ms, _, data = self.request(method, path, body)
        return ms, json.loads(data)

    def submit(self, urls: list[str]) -> tuple[float, str]:
        ms, doc = self.request_json("POST", SUBMIT, json.dumps({"urls": urls}).encode())
        return ms, doc["jobId"]

    def timed_submits(self, batches: list[list[str]], pause: float = 0.0) -> tuple[list[float], list[str]]:
        """POST each batch from a child process over one keep-alive connection: (ms of each, job ids)."""
        spec = {"host": self.host, "port": self.port, "path": SUBMIT, "batches": batches, "pause": pause}
        done = subprocess.run(
            [sys.executable, "-c", CLIENT], input=json.dumps(spec), capture_output=True, text=True, timeout=300,
        )
        try:
            doc = json.loads(done.stdout)
        except ValueError:
            doc = {"error": f"exit status {done.returncode}: {done.stderr[-2000:]}"}
        if "error" in doc:
            raise RuntimeError(f"the timed POSTs failed: {doc['error']}\nserver log (tail):\n{self.tail()}")
        self.child_connects += doc["connects"]
        return [r[0] for r in doc["results"]], [r[1] for r in doc["results"]]

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)


# ---------------------------------------------------------------------------------------------------------
# The image host and the checks
# ---------------------------------------------------------------------------------------------------------


class Photos:
    """Paths /u/<n>.jpg, each serving `photo` + its tag; `urls(k)` hands out the next k never used."""

    def __init__(self, photo: bytes, count: int):
        self.photo = photo
        self.next = 0
        self.routes = {f"/u/{n}.jpg": self._route(n) for n in range(count)}

    def _route(self, n: int):
        tag = b"\n<bench-url %d>" % n
        return lambda h: respond(h, 200, self.photo + tag, "image/jpeg")

    def urls(self, host: Loopback, k: int) -> tuple[list[str], range]:
        first = self.next
        self.next += k
        if self.next > len(self.routes):
            raise RuntimeError(f"the image host has {len(self.routes)} paths; {self.next} are needed")
        return [host.url(f"/u/{n}.jpg") for n in range(first, self.next)], range(first, self.next)


def tally(fake: FakeImgur, start: int, expected: range) -> dict:
    """What the fake received since index `start` of `fake.received`, against the URL indices expected."""
    got = collections.Counter()
    untagged = 0
    for data in fake.received[start:]:
        m = TAG.search(data[-40:])
        if m:
            got[int(m.group(1))] += 1
        else:
            untagged += 1
    want = set(expected)
    return {
        "received": sum(got.values()) + untagged,
        "missing": sorted(want - set(got)),
        "duplicated": sorted(n for n, c in got.items() if c > 1),
        "unexpected": sorted(set(got) - want) + ["?"] * untagged,
    }


def wait_complete(srv: JobsServer, job_ids: list[str], poll: float, deadline: float) -> tuple[float, dict[str, dict], list[float]]:
    """Poll the jobs (the unfinished ones, oldest first) until all are complete.

    Returns (perf_counter of the response that showed the last one complete, {id: view}, poll ms)."""
    views: dict[str, dict] = {}
    polls: list[float] = []
    left = list(job_ids)
    while True:
        time.sleep(poll)
        while left:
            ms, view = srv.request_json("GET", f"{SUBMIT}/{left[0]}")
            polls.append(ms)
            if view["status"] != "complete":
                break
            views[left.pop(0)] = view
        if not left:
            return time.perf_counter(), views, polls
        if time.perf_counter() > deadline:
            raise RuntimeError(
                f"{len(left)} job(s) not complete in time; the first: {json.dumps(view)[:400]}...\n"
                f"server log (tail):\n{srv.tail()}"
            )


def outcome(views: dict[str, dict]) -> dict:
    items = [i for v in views.values() for i in v["items"]]
    failed = [i for i in items if i["status"] != "complete"]
    created = min(iso_seconds(v["created"]) for v in views.values())
    finished = max(iso_seconds(v["finished"]) for v in views.values())
    return {"items": len(items), "complete": len(items) - len(failed), "failed": failed, "server_seconds": finished - created}


def report_problems(name: str, result: dict, checked: dict) -> list[str]:
    problems = [f"{name}: {i['url']}: {i['status']}: {i['error']}" for i in result["failed"][:10]]
    if len(result["failed"]) > 10:
        problems.append(f"{name}: ... {len(result['failed']) - 10} more failed")
    for key in ("missing", "duplicated", "unexpected"):
        if checked[key]:
            problems.append(f"{name}: the fake's uploads {key}: {checked[key][:10]}{' ...' if len(checked[key]) > 10 else ''}")
    for p in problems:
        progress("PROBLEM " + p)
    return problems


# ---------------------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------------------


def part_reference(host: Loopback, fake: FakeImgur, photos: Photos, args) -> dict:
    """--workers threads in this process, each fetching and uploading one URL after another (no server)."""
    progress(f"part R: {args.reference} URLs by {args.workers} threads in this process, without the server")
    urls, indices = photos.urls(host, args.reference)
    start_received = len(fake.received)
    fetcher = fetch.Fetcher(max_bytes=settings_mod.load(environ={}).max_image_bytes, allow_private=True)
    client = imgur.ImgurClient(client_id=fake.client_id, api_url=fake.url)
    todo, lock, stop, errors = iter(urls), threading.Lock(), threading.Event(), []

    def work():
        while not stop.is_set():
            with lock:
                url = next(todo, None)
            if url is None:
                return
            try:
                client.upload(fetcher.fetch(url).data, filename=url.rpartition("/")[2])
            except Exception as e:  # reported, not raised: the bench asserts nothing
                errors.append(f"{url}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, name=f"reference-{n}") for n in range(args.workers)]
    t0 = time.perf_counter()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:  # Ctrl-C: let each thread end after its current URL
        stop.set()
        client.close()
        for t in threads:
            t.join(10)
    seconds = time.perf_counter() - t0
    checked = tally(fake, start_received, indices)
    for e in errors[:10]:
        progress("PROBLEM part R: " + e)
    progress(f"part R: {args.reference / seconds:.1f} uploads/s")
    return {"seconds": seconds, "errors": errors, "checked": checked}


def part_warmup(srv: JobsServer, host: Loopback, fake: FakeImgur, photos: Photos, args) -> dict:
    n = max(5, args.submits // 10)
    progress(f"part 0: {n} POSTs of {args.per_submit} URLs on an idle server (warm-up and baseline)")
    batches = [photos.urls(host, args.per_submit)[0] for _ in range(n)]
    times, ids = srv.timed_submits(batches, pause=0.05)  # idle: the workers finish each before the next
    wait_complete(srv, ids, args.poll, time.perf_counter() + 60)
    return {"n": n, "times": times}


def part_throughput(srv: JobsServer, host: Loopback, fake: FakeImgur, photos: Photos, args) -> dict:
    progress(f"part 1: {args.urls} URLs in one job, polled every {args.poll * 1000:.0f} ms")
    urls, indices = photos.urls(host, args.urls)
    start_received = len(fake.received)
    body = json.dumps({"urls": urls}).encode()
    cpu = (srv.cpu(), time.process_time())
    t0 = time.perf_counter()
    post_ms, doc = srv.request_json("POST", SUBMIT, body)
    ideal = args.urls * args.delay / args.workers
    done, views, polls = wait_complete(srv, [doc["jobId"]], args.poll, t0 + max(60, 5 * ideal))
    seconds = done - t0
    cpu = (srv.cpu() - cpu[0], time.process_time() - cpu[1])
    result = outcome(views)
    checked = tally(fake, start_received, indices)
    problems = report_problems("part 1", result, checked)
    progress(f"part 1: {args.urls / seconds:.1f} uploads/s ({seconds:.2f} s), {len(polls)} polls")
    return {
        "seconds": seconds, "post_ms": post_ms, "polls": polls, "result": result, "checked": checked,
        "problems": problems, "cpu": cpu,
    }


def part_latency(srv: JobsServer, host: Loopback, fake: FakeImgur, photos: Photos, args) -> dict:
    progress(f"part 2: {args.load} URLs in one job, then {args.submits} timed POSTs of {args.per_submit} URLs")
    start_received = len(fake.received)
    first = photos.next
    load_urls, _ = photos.urls(host, args.load)
    cpu = (srv.cpu(), time.process_time())
    t0 = time.perf_counter()
    batches = [photos.urls(host, args.per_submit)[0] for _ in range(args.submits)]
    _, load_id = srv.submit(load_urls)  # the workers are busy with it while the child process starts
    times, ids = srv.timed_submits(batches)
    ids.insert(0, load_id)
    submits_seconds = time.perf_counter() - t0
    _, load_view = srv.request_json("GET", f"{SUBMIT}/{load_id}")
    still_waiting = len(load_view["uploaded"]["pending"])
    progress(
        f"part 2: median {statistics.median(times):.1f} ms, p99 {p99(times):.1f} ms; "
        f"{still_waiting} of the {args.load} still waiting or under way; draining"
    )
    total = args.load + args.submits * args.per_submit
    done, views, polls = wait_complete(srv, ids, args.poll, t0 + max(90, 5 * total * args.delay / args.workers))
    cpu = (srv.cpu() - cpu[0], time.process_time() - cpu[1])
    result = outcome(views)
    checked = tally(fake, start_received, range(first, photos.next))
    problems = report_problems("part 2", result, checked)
    return {
        "times": times, "still_waiting": still_waiting, "submits_seconds": submits_seconds, "total": total,
        "drain_seconds": done - t0, "result": result, "checked": checked, "problems": problems, "cpu": cpu,
        "jobs": len(ids),
    }


# ---------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, default=500, help="URLs of the throughput job (default 500)")
    parser.add_argument("--load", type=int, default=1000, help="URLs in flight while submits are timed (default 1000)")
    parser.add_argument("--submits", type=int, default=200, help="timed POSTs under load (default 200)")
    parser.add_argument("--per-submit", type=int, default=3, help="URLs per timed POST (default 3)")
    parser.add_argument("--delay", type=float, default=0.05, help="the fake Imgur's seconds per upload (default 0.05)")
    parser.add_argument("--workers", type=int, default=4, help="UPLOAD_WORKERS (default 4)")
    parser.add_argument("--poll", type=float, default=0.05, help="seconds between job polls (default 0.05)")
    parser.add_argument("--photo", default="pets.jpg", help="photo of TESTDATA_DIR/images served at every URL (default pets.jpg)")
    parser.add_argument("--reference", type=int, default=300, help="URLs of the no-server reference, 0 to skip (default 300)")
    args = parser.parse_args()
    # SIGTERM (make, CI) unwinds like Ctrl-C, so the server is stopped and temp dirs removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    testdata, model = testdata_paths()
    with open(os.path.join(testdata, "images", args.photo), "rb") as f:
        photo = f.read()
    cores = os.cpu_count() or 1
    started = time.perf_counter()
    warm_n = max(5, args.submits // 10)
    photos = Photos(photo, args.reference + warm_n * args.per_submit + args.urls + args.load + args.submits * args.per_submit)
    backlog = 2 * len(photos.routes)

    # What the fake spends (in this process) on one upload's multipart body, before its delay.
    body, ctype = imgur._multipart({"type": "file"}, "image", photo + b"\n<bench-url 0>", "0.jpg", "image/jpeg")
    t = time.perf_counter()
    for _ in range(10):
        _parse_multipart(ctype, body)
    parse_ms = (time.perf_counter() - t) * 100

    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp, FakeImgur(delay=args.delay) as fake, \
            Loopback(photos.routes) as host:
        ref = part_reference(host, fake, photos, args) if args.reference > 0 else None
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMGUR_")}
        env.update({
            "IMGUR_CLIENT_ID": fake.client_id,
            "IMGUR_API_URL": fake.url,
            "ALLOW_PRIVATE_URLS": "1",
            "UPLOAD_WORKERS": str(args.workers),
            "UPLOAD_BACKLOG": str(backlog),
            "JOB_MAX_URLS": str(max(1000, args.urls, args.load, args.per_submit)),
            "JOBS_KEPT": str(max(1000, 2 * (warm_n + args.submits + 2))),
        })
        with JobsServer(os.path.join(tmp, "jobs.db"), model, env) as srv:
            warm = part_warmup(srv, host, fake, photos, args)
            thr = part_throughput(srv, host, fake, photos, args)
            lat = part_latency(srv, host, fake, photos, args)
        received = len(fake.received)

    ideal = args.workers / args.delay
    rate = args.urls / thr["seconds"]
    r1, r2 = thr["result"], lat["result"]
    ok1 = r1["complete"] == args.urls and thr["checked"]["received"] == args.urls and not thr["problems"]
    ok2 = r2["complete"] == lat["total"] and lat["checked"]["received"] == lat["total"] and not lat["problems"]
    expected = photos.next
    whole = time.perf_counter() - started
    under = lat["times"]
    rows = [
        (f"uploads/s, {args.urls} URLs in 1 job, first POST -> poll seeing `complete`",
         f"{rate:.1f}/s ({thr['seconds']:.2f} s)", f">= {0.9 * ideal:.0f}/s (90% of {ideal:.0f})", rate >= 0.9 * ideal),
        ("part 1: URLs `complete` / fake received (each URL once)",
         f"{r1['complete']} / {thr['checked']['received']}", f"{args.urls} / {args.urls}", ok1),
        (f"POST {SUBMIT} ({args.per_submit} URLs) p99, {args.submits} calls while {args.load:,} uploads in flight",
         f"{p99(under):.1f} ms", "<= 20 ms", p99(under) <= 20),
        ("  same, median", f"{statistics.median(under):.1f} ms", "—", "—"),
        ("part 2: URLs `complete` / fake received (each URL once)",
         f"{r2['complete']} / {lat['checked']['received']}", f"{lat['total']} / {lat['total']}", ok2),
        ("fake Imgur: uploads received, whole run", f"{received:,}", f"{expected:,}", received == expected),
        ("whole run", f"{whole:.0f} s", "—", "—"),
        ("  server-side uploads/s, part 1 (job `finished` - `created`)", f"{args.urls / r1['server_seconds']:.1f}/s", "—", "—"),
        *([(f"  reference without the server: {args.workers} threads here, fetch + upload, {args.reference} URLs",
            f"{args.reference / ref['seconds']:.1f}/s"
            + (f" ({len(ref['errors'])} failed)" if ref["errors"] else ""), "—", "—")] if ref else []),
        (f"  uploads/s, part 2 ({lat['total']:,} URLs in {lat['jobs']} jobs, first POST -> all complete)",
         f"{lat['total'] / lat['drain_seconds']:.1f}/s", "—", "—"),
        (f"  POST {SUBMIT} ({args.per_submit} URLs) on an idle server, median / max of {warm['n']}",
         f"{statistics.median(warm['times']):.1f} / {max(warm['times']):.1f} ms", "—", "—"),
        (f"  POST {SUBMIT} ({args.urls} URLs)", f"{thr['post_ms']:.1f} ms", "—", "—"),
        (f"  GET {SUBMIT}/<jobId> ({args.urls}-URL job) median / p99 of {len(thr['polls'])}",
         f"{statistics.median(thr['polls']):.1f} / {p99(thr['polls']):.1f} ms", "—", "—"),
    ]
    print("| what | measured | target | ok/MISSED |")
    print("|---|---|---|---|")
    for what, got, want, ok in rows:
        status = ok if isinstance(ok, str) else ("ok" if ok else "MISSED")
        print(f"| {what} | {got} | {want} | {status} |")
    print(
        f"\ncores: {cores}, UPLOAD_WORKERS {args.workers}, fake Imgur delay {args.delay * 1000:.0f} ms per upload "
        f"(ideal {ideal:.0f}/s), photo {args.photo} ({len(photo):,} bytes; the fake parses each upload's multipart "
        f"in {parse_ms:.1f} ms, in this process), UPLOAD_BACKLOG {backlog:,}; URLs: {warm['n']}x{args.per_submit} "
        f"warm-up, {args.urls} (part 1), {args.load:,} + {args.submits}x{args.per_submit} (part 2; "
        f"{lat['still_waiting']:,} of the {args.load:,} still waiting or under way after the timed POSTs, which took "
        f"{lat['submits_seconds']:.2f} s); poll every {args.poll * 1000:.0f} ms; CPU, % of one core, server / this "
        f"process: part 1 {100 * thr['cpu'][0] / thr['seconds']:.0f} / {100 * thr['cpu'][1] / thr['seconds']:.0f}, "
        f"part 2 {100 * lat['cpu'][0] / lat['drain_seconds']:.0f} / {100 * lat['cpu'][1] / lat['drain_seconds']:.0f}; "
        f"TCP connections opened: polls {srv.connects}, timed POSTs {srv.child_connects} (one child process each for "
        f"parts 0 and 2); server WARNING/ERROR log lines {srv.warnings}, SIGTERMs to stop "
        f"{srv.sigterms}{' +SIGKILL' if srv.killed else ''}"
        + (f"; REGRESSION in server.py's SIGTERM handling: {srv.stop_problem()}" if srv.stop_problem() else "")
    )
    problems = thr["problems"] + lat["problems"] + [f"part R: {e}" for e in (ref["errors"] if ref else [])[:10]]
    if problems:
        print("problems: " + "; ".join(problems))
    return 0


if __name__ == "__main__":
    sys.exit(main())
