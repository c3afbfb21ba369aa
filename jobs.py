"""Imgur upload jobs: batches of URLs downloaded (fetch.py) and re-uploaded to Imgur (imgur.py).

Jobs live in memory, as their brief requires: dicts behind one lock; a restart forgets them. A
`ThreadPoolExecutor` with UPLOAD_WORKERS threads runs one task per URL. Which URL a task handles is
decided when a worker picks it up, round-robin over the jobs that still have URLs waiting, so the URLs
of one job upload in parallel and a job of 1,000 URLs does not starve one of 3 submitted after it.

`Jobs(workers=0)` runs each URL inline, inside `submit()`: tests use that for determinism. `close()`
stops taking work, cancels what has not started and waits for in-flight uploads up to a deadline.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import fetch
import imgur

log = logging.getLogger(__name__)

PENDING, IN_PROGRESS, COMPLETE, FAILED = "pending", "in-progress", "complete", "failed"


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


@dataclass
class Item:
    url: str
    status: str = PENDING
    link: str | None = None
    deletehash: str | None = None
    error: str | None = None
    started: float | None = field(default=None, repr=False)  # monotonic, while a worker has it


@dataclass
class Job:
    id: str
    created: float
    items: list[Item]
    finished: float | None = None
    waiting: collections.deque = field(default_factory=collections.deque)  # items not started yet

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
        items = tuple(ItemView(i.url, i.status, i.link, i.deletehash, i.error) for i in self.items)
        return JobView(self.id, self.created, self.finished, self.status, items)


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
        now: Callable[[], float] = time.time,
    ):
        self.uploader = uploader
        self.fetcher = fetcher
        self.workers = workers
        self.max_urls = max_urls
        self.max_backlog = max_backlog
        self.keep_finished = keep_finished
        self.now = now
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._jobs: dict[str, Job] = {}  # insertion order = submission order
        self._finished: collections.deque[str] = collections.deque()  # ids, oldest finished first
        self._ready: collections.deque[Job] = collections.deque()  # jobs with URLs waiting, round-robin
        self._links: list[str] = []
        self._backlog = 0  # URLs waiting or under way
        self._running = 0  # URLs under way
        self._closed = False
        self._seconds_per_url = 1.0  # moving average of how long a URL holds a worker (Retry-After)
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
        with self._lock:
            if self._closed:
                raise Closed("the service is shutting down; submit the job again once it is back")
            if self._backlog + len(items) > self.max_backlog:
                # When enough URLs will have drained, at the pace they have been taking.
                excess = self._backlog + len(items) - self.max_backlog
                retry = max(1, min(600, math.ceil(excess * self._seconds_per_url / max(1, self.workers))))
                raise BacklogFull(
                    f"{self._backlog:,} URLs are waiting already (the limit is {self.max_backlog:,}); try again later",
                    retry,
                )
            job = Job(str(uuid.uuid4()), self.now(), items)
            job.waiting.extend(items)
            self._jobs[job.id] = job
            self._ready.append(job)
            self._backlog += len(items)
        log.info("job %s: %d URL(s) queued", job.id, len(items))
        for _ in items:
            if self._executor is None:
                self._run_next()
            else:
                self._executor.submit(self._run_next)
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

    # -- working -----------------------------------------------------------------------------------------

    def _next(self) -> tuple[Job, Item] | None:
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
            return None

    def _run_next(self) -> None:
        picked = self._next()
        if picked is None:  # cancelled by close(), or its URL was taken by another task
            return
        job, item = picked
        try:
            upload = self._process(item.url)
        except (fetch.FetchError, imgur.ImgurError) as e:
            self._finish(job, item, None, None, str(e))
        except Exception as e:  # a bug must fail one URL, not kill the worker silently
            log.exception("job %s: unexpected error for %s", job.id, item.url)
            self._finish(job, item, None, None, f"internal error ({type(e).__name__}); see the service log")
        else:
            self._finish(job, item, upload.link, upload.deletehash, None)

    def _process(self, url: str) -> imgur.Upload:
        download = self.fetcher.fetch(url)
        name = url.rstrip("/").rpartition("/")[2].split("?", 1)[0][:100] or "image"
        return self.uploader.upload(download.data, filename=name)

    def _finish(self, job: Job, item: Item, link: str | None, deletehash: str | None, error: str | None) -> None:
        with self._lock:
            if error is None:
                item.status, item.link, item.deletehash = COMPLETE, link, deletehash
                self._links.append(link)
            else:
                item.status, item.error = FAILED, error
            self._running -= 1
            self._backlog -= 1
            if item.started is not None:
                self._seconds_per_url += 0.2 * ((time.monotonic() - item.started) - self._seconds_per_url)
            done = all(i.status in (COMPLETE, FAILED) for i in job.items)
            if done:
                job.finished = self.now()
                self._finished.append(job.id)
                while len(self._finished) > self.keep_finished:
                    self._jobs.pop(self._finished.popleft(), None)
            self._idle.notify_all()
        if error is not None:
            log.warning("job %s: %s failed: %s", job.id, item.url, error)
        if done:
            failed = sum(1 for i in job.items if i.status == FAILED)
            log.info(
                "job %s complete: %d uploaded, %d failed, %.1f s",
                job.id, len(job.items) - failed, failed, job.finished - job.created,
            )

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
