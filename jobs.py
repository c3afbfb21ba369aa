"""Imgur upload jobs: batches of URLs downloaded (fetch.py) and re-uploaded to Imgur (imgur.py).

Jobs live in memory, as their brief requires: dicts behind one lock; a restart forgets them. A
`ThreadPoolExecutor` with UPLOAD_WORKERS threads runs at most that many tasks, each taking URLs one after
another while any wait. Which URL a task handles is decided when a worker picks it up, round-robin over
the jobs that still have URLs waiting, so the URLs of one job upload in parallel and a job of 1,000 URLs
does not starve one of 3 submitted after it.

`Jobs(workers=0)` runs each URL inline, inside `submit()`: tests use that for determinism. `close()`
stops taking work, cancels what has not started and waits for in-flight uploads up to a deadline.

Bounded under attack (issue 10): finished jobs are kept up to a count (JOBS_KEPT) and a total size
(JOBS_KEPT_MB), oldest forgotten first; a job still running is never forgotten. A failed item keeps its
reason without its own URL (the item has it) and cut to REASON_CHARS, and the items of a job share one
copy of each distinct reason. The log gets, per job, the first URL of each kind of failure (error class
and host, at most LOGGED_KINDS kinds) and one summary line with the counts; URLs in it are cut to 200
characters.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import sys
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import fetch
import imgur

log = logging.getLogger(__name__)

PENDING, IN_PROGRESS, COMPLETE, FAILED = "pending", "in-progress", "complete", "failed"

URL_MARK = "\x00"  # stands for the item's own URL in a stored reason (fetch.check_url refuses controls in URLs)
REASON_CHARS = 500  # most characters of a stored reason, without the item's own URL
LOGGED_KINDS = 10  # kinds of failure (error class, host) logged with an example URL per job; more are counted
# What a finished job holds besides its strings (measured with tracemalloc, CPython 3.11 x86-64; a test
# holds the estimate to what is really allocated): an Item with its list slot; the Job, its dicts, id and times.
ITEM_BYTES = 88
JOB_BYTES = 450


class JobError(Exception):
    """Base of this module's errors."""


class UnknownJob(JobError):
    """No job with that id (never was, or forgotten: finished jobs beyond the bound are dropped)."""


@dataclass(frozen=True)
class BatchProblem:
    """One bad entry of a batch: its position, the value given and why it cannot be used."""

    index: int
    value: Any
    reason: str


class InvalidBatch(JobError):
    """The list of URLs is not acceptable; `problems` names each bad entry (empty when the batch as a whole is)."""

    def __init__(self, message: str, problems: list[BatchProblem] | None = None):
        super().__init__(message)
        self.problems = problems or []


class BacklogFull(JobError):
    """Too many URLs are waiting already; `retry_after` is a hint in seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Closed(JobError):
    """The service is shutting down and takes no new jobs."""


@dataclass(slots=True)  # a job holds up to JOB_MAX_URLS of them: no __dict__ each
class Item:
    url: str
    status: str = PENDING
    link: str | None = None
    deletehash: str | None = None
    error: str | None = None  # as stored: the item's own URL replaced by URL_MARK (see stored_reason)
    started: float | None = field(default=None, repr=False)  # monotonic, while a worker has it


@dataclass(slots=True)
class Job:
    id: str
    created: float
    items: list[Item]
    finished: float | None = None
    # Items not started yet; None once finished (an emptied deque keeps up to 16 spare 528-byte blocks).
    waiting: collections.deque | None = field(default_factory=collections.deque)
    size: int = 0  # bytes it holds, counted when it finishes: what JOBS_KEPT_MB bounds
    # While it runs: one copy of each distinct stored reason, and the failures by (error class, host).
    reasons: dict[str, str] = field(default_factory=dict, repr=False)
    failures: collections.Counter = field(default_factory=collections.Counter, repr=False)

    @property
    def status(self) -> str:
        states = {i.status for i in self.items}
        if states <= {COMPLETE, FAILED}:
            return COMPLETE
        if states == {PENDING}:
            return PENDING
        return IN_PROGRESS

    def snapshot(self) -> JobView:
        """A copy of the job as it is now (safe to read outside the lock)."""
        items = tuple(ItemView(i.url, i.status, i.link, i.deletehash, shown_reason(i.error, i.url)) for i in self.items)
        return JobView(self.id, self.created, self.finished, self.status, items)


def stored_reason(reason: str, url: str) -> str:
    """A failure reason as an item keeps it: its own URL (the item has it) replaced by URL_MARK, and at
    most REASON_CHARS characters besides (a reason may quote another long URL, a redirect's target)."""
    text = reason.replace(URL_MARK, "").replace(url, URL_MARK)
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."


def shown_reason(stored: str | None, url: str) -> str | None:
    """A stored reason with the URL put back: `url` itself for the API, a cut one for the log."""
    return None if stored is None else stored.replace(URL_MARK, url)


def held_bytes(job: Job) -> int:
    """What a finished job holds, in bytes: its strings as allocated, plus ITEM_BYTES per item and JOB_BYTES."""
    size = JOB_BYTES + sys.getsizeof(job.id) + ITEM_BYTES * len(job.items)
    reasons = {}
    for i in job.items:
        size += sys.getsizeof(i.url)
        if i.link is not None:
            size += sys.getsizeof(i.link) + sys.getsizeof(i.deletehash or "")
        if i.error is not None:
            reasons[id(i.error)] = i.error  # shared by the items that failed alike: counted once
    return size + sum(sys.getsizeof(r) for r in reasons.values())


def _host(url: str) -> str:
    try:
        host = urllib.parse.urlsplit(url).hostname or "?"
    except ValueError:
        host = "?"
    return fetch.for_log(host, 100)


@dataclass(frozen=True)
class ItemView:
    url: str
    status: str
    link: str | None
    deletehash: str | None
    error: str | None


@dataclass(frozen=True)
class JobView:
    """A job at one moment: times are clock readings (seconds), `finished` None until every URL is done."""

    id: str
    created: float
    finished: float | None
    status: str
    items: tuple[ItemView, ...]


class Jobs:
    """In-memory upload jobs and the workers that run them."""

    def __init__(
        self,
        *,
        uploader: imgur.ImgurClient | None,
        fetcher: fetch.Fetcher,
        workers: int = 4,
        max_urls: int = 1000,
        max_backlog: int = 5000,
        keep_finished: int = 1000,
        keep_finished_bytes: int = 32 * 1024 * 1024,
        now: Callable[[], float] = time.time,
    ):
        self.uploader = uploader
        self.fetcher = fetcher
        self.workers = workers
        self.max_urls = max_urls
        self.max_backlog = max_backlog
        self.keep_finished = keep_finished
        self.keep_finished_bytes = keep_finished_bytes
        self.now = now
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._jobs: dict[str, Job] = {}  # insertion order = submission order
        self._finished: collections.deque[Job] = collections.deque()  # oldest finished first
        self._finished_bytes = 0  # what the jobs in _finished hold (their `size`)
        self._ready: collections.deque[Job] = collections.deque()  # jobs with URLs waiting, round-robin
        self._links: list[str] = []
        self._backlog = 0  # URLs waiting or under way
        self._running = 0  # URLs under way
        # Tasks in the executor, at most `workers`: each takes URLs until none wait (one task per URL
        # would queue a Future, its Condition and lock, about 1 KB, for each of UPLOAD_BACKLOG URLs).
        self._runners = 0
        self._closed = False
        self._seconds_per_url = 1.0  # moving average of how long a URL holds a worker (Retry-After)
        # Since the start, for GET /metrics: URLs uploaded, failed ones by error class, BacklogFull raised.
        self._uploaded = 0
        self._failures: collections.Counter[str] = collections.Counter()
        self._backlog_refusals = 0
        self._executor = (
            concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="upload") if workers else None
        )

    @property
    def configured(self) -> bool:
        return self.uploader is not None

    @property
    def seconds_per_url(self) -> float:
        """How long a URL has been holding a worker (a moving average): what Retry-After is made from."""
        with self._lock:
            return self._seconds_per_url

    @seconds_per_url.setter
    def seconds_per_url(self, value: float) -> None:
        """Start the estimate from a known pace (an operator who knows the URLs are slow; tests)."""
        with self._lock:
            self._seconds_per_url = float(value)

    # -- submitting --------------------------------------------------------------------------------------

    def check(self, urls: Sequence[Any]) -> list[str]:
        """The URLs of a batch, de-duplicated (first kept, order kept); InvalidBatch names each bad entry.

        Every entry is looked at (a bad one past the limit must not slip through), unless the list is
        absurdly long.
        """
        if not urls:
            raise InvalidBatch(f"the batch is empty; send between 1 and {self.max_urls:,} URLs")
        if len(urls) > 10 * self.max_urls:  # do not even look through a list that absurd
            raise InvalidBatch(f"the batch has {len(urls):,} entries; a job takes at most {self.max_urls:,} URLs")
        problems = []
        for n, url in enumerate(urls):
            if not isinstance(url, str):
                problems.append(BatchProblem(n, url, f"is {type(url).__name__ if url is not None else 'null'}, not a string"))
                continue
            try:
                fetch.check_url(url.strip())
            except fetch.InvalidURL as e:
                problems.append(BatchProblem(n, url, str(e)))
        if problems:
            raise InvalidBatch(f"{len(problems)} of the {len(urls)} entries are not http(s) URLs", problems)
        unique = list(dict.fromkeys(u.strip() for u in urls))
        if len(unique) > self.max_urls:
            raise InvalidBatch(f"the batch has {len(unique):,} different URLs; a job takes at most {self.max_urls:,}")
        return unique

    def submit(self, urls: Iterable[str]) -> Job:
        """Queue a job of already-checked URLs (see `check`); returns at once unless workers == 0."""
        if self.uploader is None:
            raise imgur.NotConfigured("Imgur uploads are off: set IMGUR_CLIENT_ID (see README) and restart")
        items = [Item(u) for u in urls]
        spawn = 0
        with self._lock:
            if self._closed:
                raise Closed("the service is shutting down; submit the job again once it is back")
            if self._backlog + len(items) > self.max_backlog:
                # When enough URLs will have drained, at the pace they have been taking.
                excess = self._backlog + len(items) - self.max_backlog
                retry = max(1, min(600, math.ceil(excess * self._seconds_per_url / max(1, self.workers))))
                self._backlog_refusals += 1
                raise BacklogFull(
                    f"{self._backlog:,} URLs are waiting already (the limit is {self.max_backlog:,}); try again later",
                    retry,
                )
            job = Job(str(uuid.uuid4()), self.now(), items)
            job.waiting.extend(items)
            self._jobs[job.id] = job
            self._ready.append(job)
            self._backlog += len(items)
            if self._executor is not None:
                spawn = min(len(items), self.workers - self._runners)
                self._runners += spawn
        log.info("job %s: %d URL(s) queued", job.id, len(items))
        if self._executor is None:
            for _ in items:
                self._run_next()
        for _ in range(spawn):
            self._executor.submit(self._work)
        return job

    # -- reading -----------------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobView:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise UnknownJob(f"there is no job {job_id!r}; jobs live in memory and a restart forgets them")
            return job.snapshot()

    def uploaded(self) -> list[str]:
        """Every Imgur link uploaded since the service started, oldest first."""
        with self._lock:
            return list(self._links)

    def wait(self, job_id: str | None = None, timeout: float = 30.0) -> bool:
        """Block until that job (or, without an id, every job) has finished; False on timeout."""

        def done() -> bool:
            if job_id is None:
                return self._backlog == 0
            job = self._jobs.get(job_id)
            return job is None or job.finished is not None

        with self._idle:
            return self._idle.wait_for(done, timeout)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"jobs": len(self._jobs), "backlog": self._backlog, "running": self._running}

    def tally(self) -> dict[str, Any]:
        """For GET /metrics: {"jobs": {state: jobs in memory}, "uploaded": URLs uploaded, "failures":
        {error class: URLs failed}, "backlog_refusals": BacklogFull raised}, the counts since the start."""
        with self._lock:
            states = dict.fromkeys((PENDING, IN_PROGRESS, COMPLETE), 0)
            for job in self._jobs.values():  # O(1) each: a job is pending while all its items wait
                if job.finished is not None:
                    states[COMPLETE] += 1
                else:
                    states[PENDING if job.waiting is not None and len(job.waiting) == len(job.items) else IN_PROGRESS] += 1
            return {
                "jobs": states, "uploaded": self._uploaded, "failures": dict(self._failures),
                "backlog_refusals": self._backlog_refusals,
            }

    def kept(self) -> tuple[int, int]:
        """(finished jobs remembered, the bytes they hold): what JOBS_KEPT and JOBS_KEPT_MB bound."""
        with self._lock:
            return len(self._finished), self._finished_bytes

    # -- working -----------------------------------------------------------------------------------------

    def _next(self, runner: bool = False) -> tuple[Job, Item] | None:
        """The next URL to work on, round-robin over the jobs; None when none waits (a runner then ends)."""
        with self._lock:
            while self._ready:
                job = self._ready.popleft()
                if job.waiting:
                    item = job.waiting.popleft()
                    if job.waiting:
                        self._ready.append(job)  # back of the line: the other jobs go first
                    item.status = IN_PROGRESS
                    item.started = time.monotonic()
                    self._running += 1
                    return job, item
            if runner:
                self._runners -= 1  # under the same lock as the check: a job submitted now spawns a runner
            return None

    def _work(self) -> None:
        """A runner: one URL after another while any wait."""
        try:
            while self._run_next(runner=True):
                pass
        except BaseException:
            with self._lock:
                self._runners -= 1
            raise

    def _run_next(self, runner: bool = False) -> bool:
        """Work on the next URL waiting; False when there was none (close() dropped them, or others took them)."""
        picked = self._next(runner)
        if picked is None:
            return False
        job, item = picked
        try:
            upload = self._process(item.url)
        except (fetch.FetchError, imgur.ImgurError) as e:
            self._finish(job, item, error=str(e), kind=type(e).__name__)
        except Exception as e:  # a bug must fail one URL, not kill the worker silently
            reason = f"internal error ({type(e).__name__}); see the service log"
            self._finish(job, item, error=reason, kind=type(e).__name__, unexpected=e)
        else:
            self._finish(job, item, link=upload.link, deletehash=upload.deletehash)
        return True

    def _process(self, url: str) -> imgur.Upload:
        download = self.fetcher.fetch(url)
        name = url.rstrip("/").rpartition("/")[2].split("?", 1)[0][:100] or "image"
        return self.uploader.upload(download.data, filename=name)

    def _finish(
        self, job: Job, item: Item, *, link: str | None = None, deletehash: str | None = None,
        error: str | None = None, kind: str = "", unexpected: BaseException | None = None,
    ) -> None:
        first_of_kind = False
        with self._lock:
            if error is None:
                item.status, item.link, item.deletehash = COMPLETE, link, deletehash
                self._links.append(link)
                self._uploaded += 1
            else:
                reason = stored_reason(error, item.url)
                item.status, item.error = FAILED, job.reasons.setdefault(reason, reason)
                key = (kind, _host(item.url))
                job.failures[key] += 1
                self._failures[kind or "Error"] += 1  # a class name, never the reason: reasons hold URLs
                first_of_kind = job.failures[key] == 1 and len(job.failures) <= LOGGED_KINDS
            self._running -= 1
            self._backlog -= 1
            if item.started is not None:
                self._seconds_per_url += 0.2 * ((time.monotonic() - item.started) - self._seconds_per_url)
                item.started = None
            done = all(i.status in (COMPLETE, FAILED) for i in job.items)
            if done:
                job.finished = self.now()
                summary = self._summary(job)
                job.reasons, job.failures, job.waiting = {}, collections.Counter(), None  # the items keep what they need
                self._keep(job)
            self._idle.notify_all()
        if first_of_kind:  # the rest of this kind are counted in the job's summary line
            short = fetch.for_log(item.url)
            if unexpected is not None:
                log.error("job %s: unexpected error for %s", job.id, short, exc_info=unexpected)
            else:
                log.warning("job %s: %s failed: %s", job.id, short, shown_reason(item.error, short))
        if done:
            log.info("job %s complete: %s", job.id, summary)

    def _summary(self, job: Job) -> str:
        """'3 uploaded, 997 failed, 12.3 s; failed: 990 x BlockedAddress (host 10.0.0.1), 7 x ...' (bounded)."""
        failed = sum(1 for i in job.items if i.status == FAILED)
        text = f"{len(job.items) - failed} uploaded, {failed} failed, {job.finished - job.created:.1f} s"
        if failed:
            kinds = job.failures.most_common()
            shown = kinds[:LOGGED_KINDS]
            parts = [f"{n} x {kind} (host {host})" for (kind, host), n in shown]
            if len(kinds) > len(shown):
                parts.append(f"{sum(n for _, n in kinds[len(shown):])} x {len(kinds) - len(shown)} other kinds")
            if failed > sum(job.failures.values()):  # failed by close() without a worker
                parts.append(f"{failed - sum(job.failures.values())} x not started (the service shut down)")
            text += "; failed: " + ", ".join(parts)
        return text

    def _keep(self, job: Job) -> None:
        """Remember a finished job; forget the oldest beyond JOBS_KEPT or JOBS_KEPT_MB (under the lock).

        The newest is kept even when it alone is over JOBS_KEPT_MB (at most JOB_MAX_URLS URLs of 2 KB),
        so whoever sent it can read its result."""
        job.size = held_bytes(job)
        self._finished.append(job)
        self._finished_bytes += job.size
        while len(self._finished) > 1 and (
            len(self._finished) > self.keep_finished or self._finished_bytes > self.keep_finished_bytes
        ):
            old = self._finished.popleft()
            self._finished_bytes -= old.size
            self._jobs.pop(old.id, None)

    # -- shutdown ----------------------------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> dict[str, int]:
        """Take no more jobs, drop URLs not started, wait up to `timeout` s for uploads under way.

        Returns what was abandoned: {"not_started": n, "in_flight": m}. Logs it too.
        """
        with self._lock:
            self._closed = True
            not_started = 0
            for job in self._ready:
                for item in job.waiting:
                    item.status, item.error = FAILED, "not started: the service shut down"
                    not_started += 1
                job.waiting.clear()
                if job.status == COMPLETE:  # nothing of it under way: it ends now
                    job.finished = self.now()
            self._ready.clear()
            self._backlog -= not_started
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._running and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())
            in_flight = self._running
        if self.uploader is not None:
            self.uploader.close()  # ends retry waits and credit pauses at once, and closes keep-alives
        if self._executor is not None:
            # The workers now end as soon as their current download or upload returns.
            self._executor.shutdown(wait=in_flight == 0)
        if not_started or in_flight:
            log.warning("shutdown abandoned %d URL(s) not started and %d upload(s) under way", not_started, in_flight)
        else:
            log.info("upload jobs closed; nothing was abandoned")
        return {"not_started": not_started, "in_flight": in_flight}
