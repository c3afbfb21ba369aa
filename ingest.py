"""The pipeline that turns a new image into a stored record, whichever way it came in.

`Ingest.add(Submission)`: download a URL through fetch.py (or take the bytes given), check that the bytes
decode completely (imaging.py), run the detector or reuse detections stored for the same bytes by the
same model and threshold, generate a label when none was given, and store it all in one transaction
(store.py). POST /images uses it today; bulk import, re-detection and the detection API reuse it.
The two slow steps, downloads and detections, pass a `Gate` each: bounded admission, Busy beyond it.

Label generation lives here too: "2 dogs", "person and dog", a file name, else "untitled <sha8>".
This module never imports Bottle; it raises typed errors (its own, and those of fetch, imaging, detect
and store), which server.py maps to HTTP statuses.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import logging
import math
import os
import re
import signal
import sqlite3
import stat as stat_mod
import sys
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import detect
import fetch
import imaging
import settings as settings_mod
import store

log = logging.getLogger(__name__)

LABEL_MAX = 200
STAGE_BYTES = 1 << 20  # from this size an image's bytes are written while the model runs (Ingest._staged)
FILENAME_MAX = 255  # characters of a stored file name (most file systems' limit for one name)


class IngestError(Exception):
    """Base of this module's errors."""


class InvalidLabel(IngestError):
    """The label given cannot be used (not text, too long, or holding a control character)."""


class Busy(IngestError):
    """Every place for one kind of slow work is taken; `retry_after` (whole seconds) says when to try again."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


# ---------------------------------------------------------------------------------------------------------
# Admission
# ---------------------------------------------------------------------------------------------------------


class Gate:
    """Bounded admission for one kind of slow work: at most `places` callers inside at once.

    A caller that finds every place taken waits up to `wait` seconds for one, then gets Busy. It is
    refused at once when the wait cannot succeed: when the holds ahead of it, at the pace holds have
    been taking, need longer than `wait`. Each caller waiting holds a request thread, so refusing early
    keeps those threads free. Busy's `retry_after` is that same estimate (at least 1 s): how long holds
    have been taking (a moving average of the finished ones, or the age of the current holders when
    they have been at it longer), times the holds ahead, spread over the places. `refusal` is the
    message, with `{retry}` where the seconds go; it names the setting to change.
    """

    def __init__(self, places: int, wait: float, refusal: str, *, clock: Callable[[], float] = time.monotonic):
        if places < 1:
            raise ValueError("a Gate needs at least one place")
        self.places = places
        self.wait = wait
        self.refusal = refusal
        self.clock = clock
        self._cond = threading.Condition()
        self._holders: dict[object, float] = {}  # token -> when it entered (clock)
        self._waiting = 0
        self._mean: float | None = None  # moving average of finished holds, seconds
        self._refused = 0  # since the last warning
        self.refusals = 0  # since the start (GET /metrics)
        self._warned: float | None = None

    @property
    def in_use(self) -> int:
        with self._cond:
            return len(self._holders)

    @property
    def waiting(self) -> int:
        with self._cond:
            return self._waiting

    @contextlib.contextmanager
    def enter(self, advice: str = "") -> Iterator[None]:
        """Hold a place for the `with` block; Busy when none comes free in time, its message the refusal
        and then `advice` (what else this caller's client can do, e.g. ", or send it with detect=false")."""
        token = self._acquire(advice)
        try:
            yield
        finally:
            self._release(token)

    def _acquire(self, advice: str = "") -> object:
        deadline = time.monotonic() + self.wait
        with self._cond:
            if len(self._holders) >= self.places:
                if self._eta(self._waiting + 1) > self.wait:
                    raise self._busy(self._waiting + 1, advice)
                self._waiting += 1
                try:
                    while len(self._holders) >= self.places:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise self._busy(self._waiting, advice)  # this caller is one of them
                        self._cond.wait(left)
                finally:
                    self._waiting -= 1
            token = object()
            self._holders[token] = self.clock()
            return token

    def _release(self, token: object) -> None:
        with self._cond:
            took = self.clock() - self._holders.pop(token)
            self._mean = took if self._mean is None else 0.7 * self._mean + 0.3 * took
            self._cond.notify()

    def _eta(self, ahead: int) -> float:
        """Seconds until `ahead` more holds can have started, at the pace holds have been taking."""
        now = self.clock()
        youngest = min((now - t for t in self._holders.values()), default=0.0)
        return max(self._mean or 0.0, youngest) * ahead / self.places

    def _busy(self, ahead: int, advice: str = "") -> Busy:
        retry = max(1, math.ceil(self._eta(ahead)))
        self._refused += 1
        self.refusals += 1
        now = self.clock()
        if self._warned is None or now - self._warned >= 60:  # at most one line a minute under load
            log.warning("refused %d request(s) (Busy): %s", self._refused, self.refusal.format(retry=retry))
            self._refused, self._warned = 0, now
        return Busy(self.refusal.format(retry=retry) + advice, retry)


def download_gate(slots: int, wait: float, **kw: Any) -> Gate:
    """URL downloads in request threads: `slots` at once (DOWNLOAD_SLOTS)."""
    return Gate(slots, wait, (
        f"the server is downloading {slots} URL(s) already, the most at once (DOWNLOAD_SLOTS); "
        "try again in {retry} s, or send the image's bytes instead of its URL"
    ), **kw)


def detection_gate(pool: int, queue: int, wait: float, **kw: Any) -> Gate:
    """Detections: the detector's `pool` interpreters run, at most `queue` more wait (DETECT_QUEUE)."""
    return Gate(pool + queue, wait, (
        f"the detector is busy: {pool} detection(s) running (DETECT_INTERPRETERS) and {queue} waiting (DETECT_QUEUE); "
        "try again in {retry} s"  # POST /images adds ", or send the image with detect=false" (DETECT_ADVICE)
    ), **kw)


DETECT_ADVICE = ", or send the image with detect=false"  # a refused POST /images can still store the image


@dataclass(frozen=True)
class Submission:
    """A new image, whichever way it came: exactly one of `data` and `url`."""

    data: bytes | None
    url: str | None
    label: str | None
    detect: bool
    name: str | None = None  # the file name or URL, for a generated label


# ---------------------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------------------

# What a label may not hold: control characters (Unicode Cc: NUL, CR/LF, ESC...), the bidi embeddings,
# overrides and isolates (U+202A-U+202E, U+2066-U+2069: "\u202egpj.exe" shows as "exe.jpg"), and lone
# surrogates (from JSON's "\ud800"; SQLite cannot store them). Joiners (U+200C, U+200D) stay: emoji
# sequences and Persian need them.
_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")

_IRREGULAR = {"person": "people", "mouse": "mice", "knife": "knives", "sheep": "sheep", "skis": "skis", "scissors": "scissors"}


def check_label(label: Any) -> str | None:
    """A label as given by a user, trimmed; None when absent or blank (one is generated then)."""
    if label is None:
        return None
    if not isinstance(label, str):
        raise InvalidLabel("`label` must be a string (or left out to have one generated)")
    label = label.strip()
    if len(label) > LABEL_MAX:
        raise InvalidLabel(f"`label` is {len(label)} characters long; the limit is {LABEL_MAX}")
    bad = _FORBIDDEN.search(label)
    if bad:
        ch = bad.group()
        what = (
            "a lone surrogate (send valid Unicode: surrogates come in pairs)" if "\ud800" <= ch <= "\udfff"
            else "a bidi control (it can disguise text, e.g. a file name)" if ch >= "\u202a"
            else "a control character"
        )
        raise InvalidLabel(f"`label` holds {what}, U+{ord(ch):04X}; send one line of text without it")
    return label or None


def _clean(text: str) -> str:
    """A generated label made safe: whitespace runs (CR, LF and tab included) as one space, the other
    forbidden characters dropped."""
    return " ".join(_FORBIDDEN.sub("", " ".join(text.split())).split())


def plural(noun: str) -> str:
    head, _, last = noun.rpartition(" ")
    if last in _IRREGULAR:
        word = _IRREGULAR[last]
    elif re.search(r"(s|x|z|ch|sh)$", last):
        word = last + "es"
    elif re.search(r"[^aeiou]y$", last):
        word = last[:-1] + "ies"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


def describe(labels: Iterable[str], most: int = 3) -> str | None:
    """A readable phrase for what was found: "2 dogs", "person and dog", "3 people, kite and 2 more"."""
    counts = Counter(labels)
    if not counts:
        return None
    # Most frequent first; ties keep the order of first appearance (detections come highest confidence first).
    parts = [name if n == 1 else f"{n} {plural(name)}" for name, n in counts.most_common()]
    if len(parts) > most:
        rest = len(parts) - (most - 1)
        parts = parts[: most - 1] + [f"{rest} more"]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# The search vocabulary: the words our own labels use. It lives beside label generation so that the
# plural a label says ("2 people") and the plural a search understands come from one _IRREGULAR table
# and one plural(); store.py stays free of English and only ever sees names.

# COCO 2017's category -> supercategory mapping, as `categories` of the official annotation files
# (cocodataset.org, instances_val2017.json) give it. The names are those of the test model's label map
# (detect.load_labels; tests/test_search_words.py checks it) and of the EfficientDet-Lite label maps,
# which come from the same COCO names (google/automl efficientdet label_util.py `coco`, checked by eye).
CATEGORIES: dict[str, tuple[str, ...]] = {
    "person": ("person",),
    "vehicle": ("bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat"),
    "outdoor": ("traffic light", "fire hydrant", "stop sign", "parking meter", "bench"),
    "animal": ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"),
    "accessory": ("backpack", "umbrella", "handbag", "tie", "suitcase"),
    "sports": (
        "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
        "surfboard", "tennis racket",
    ),
    "kitchen": ("bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl"),
    "food": ("banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake"),
    "furniture": ("chair", "couch", "potted plant", "bed", "dining table", "toilet"),
    "electronic": ("tv", "laptop", "mouse", "remote", "keyboard", "cell phone"),
    "appliance": ("microwave", "oven", "toaster", "sink", "refrigerator"),
    "indoor": ("book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"),
}
_SINGULAR = {many: one for one, many in _IRREGULAR.items() if many != one}
_KNOWN = set(CATEGORIES).union(*CATEGORIES.values())


def singulars(word: str) -> set[str]:
    """The nouns whose plural() is `word` ("dogs" -> dog, "people" -> person, "hot dogs" -> hot dog)."""
    head, _, last = word.rpartition(" ")
    guesses = {last[:-1], last[:-2], last[:-3] + "y"} if last.endswith("s") else set()
    if last in _SINGULAR:
        guesses.add(_SINGULAR[last])
    found = {f"{head} {g}" if head else g for g in guesses if g}
    nouns = {noun for noun in found if noun != word and plural(noun) == word}
    # "buses" is the plural of "bus" and of "buse": where a COCO word is among them, the others go.
    return (nouns & _KNOWN) or nouns


def search_names(term: str) -> tuple[str, ...]:
    """The object names one search term finds, any of them: the term as written, the nouns it is the
    plural of, and the members of a COCO supercategory it names (singular or plural: "animal", "animals")."""
    names = {term}
    for word in {term} | singulars(term):
        names.add(word)
        names.update(CATEGORIES.get(word, ()))
    return tuple(sorted(names))


def name_hint(name: str | None) -> str | None:
    """A label from a file name or a URL's last path segment: "golden-retriever.jpg" -> "golden-retriever"."""
    if not name:
        return None
    if "://" in name:
        name = urllib.parse.urlsplit(name).path.rstrip("/").rpartition("/")[2]
    name = urllib.parse.unquote(name.replace("\\", "/").rpartition("/")[2])
    stem, dot, ext = name.rpartition(".")
    if dot and stem and 1 <= len(ext) <= 5:
        name = stem
    name = _clean(name).strip(" .")
    return name[:LABEL_MAX] or None


def file_name(name: str | None, from_url: bool = False) -> str | None:
    """The file name to show for an image: the last path segment of a file name as a client sent it
    ("C:\\Photos\\dog.jpg" -> "dog.jpg"), or of a URL's path, percent-decoded; control and bidi
    characters dropped, whitespace runs as one space, at most FILENAME_MAX characters. None when nothing
    is left (no name, a URL ending in "/", "." or "..")."""
    if not name:
        return None
    if from_url:
        name = urllib.parse.unquote(urllib.parse.urlsplit(name).path.rpartition("/")[2], errors="replace")
    name = _clean(name.replace("\\", "/").rpartition("/")[2])
    if name in ("", ".", ".."):
        return None
    return name[:FILENAME_MAX]


def make_label(user: str | None, found: Sequence[store.Found], hint: str | None, sha256: str) -> tuple[str, bool]:
    """(label, generated): the user's, else what was found, else the name, else "untitled <sha8>"."""
    if user is not None and user.strip():
        return user.strip()[:LABEL_MAX], False
    generated = _clean(describe(d.label for d in found) or "") or name_hint(hint) or f"untitled {sha256[:8]}"
    return generated, True


# ---------------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------------


def found_from(detections: Iterable[detect.Detection]) -> tuple[store.Found, ...]:
    """The detector's detections as the store keeps them."""
    return tuple(
        store.Found(d.label, d.confidence, d.box.x_min, d.box.y_min, d.box.x_max, d.box.y_max) for d in detections
    )


def _entered(gate: Gate | None, advice: str = "") -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if gate is None else gate.enter(advice)


class _Staging:
    """The bytes of a large image (STAGE_BYTES or more) written by a thread of their own while the model
    runs (Store.stage_blob: a commit with fsync, 10-30 ms for a 3 MB photo on an SSD, far more on an SD
    card), so that the image's own transaction afterwards is small. `start()` starts the write, `finish()`
    waits for it and raises what refused it (the disk floor); when the `with` block raises, the staged
    bytes are taken back (Store.unstage_blob), so nothing is stored when a request fails."""

    def __init__(self, images: store.Store, data: bytes, sha256: str):
        self.images, self.data, self.sha256 = images, data, sha256
        self._writer: threading.Thread | None = None
        self._outcome: list[bool | store.StoreError] = []

    def start(self) -> None:
        if len(self.data) >= STAGE_BYTES and self._writer is None:
            self._writer = threading.Thread(target=self._stage, name="stage-bytes", daemon=True)
            self._writer.start()

    def _stage(self) -> None:
        try:
            with self.images.connection():
                self._outcome.append(self.images.stage_blob(self.sha256, self.data))
        except store.StoreError as e:
            self._outcome.append(e)

    def finish(self) -> None:
        if self._writer is not None:
            self._writer.join()
            if self._outcome and isinstance(self._outcome[0], store.StoreError):
                raise self._outcome[0]

    def __enter__(self) -> _Staging:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is None or self._writer is None:
            return
        self._writer.join()
        if self._outcome and self._outcome[0] is True:
            with contextlib.suppress(store.StoreError):
                self.images.unstage_blob(self.sha256)


class Ingest:
    """Adds images to a store: the same checks, limits and errors for every way in."""

    def __init__(
        self,
        *,
        images: store.Store,
        detector: detect.Detector,
        fetcher: fetch.Fetcher,
        max_pixels: int = imaging.MAX_PIXELS,
        budget: imaging.DecodeBudget | None = None,
        downloads: Gate | None = None,
        detections: Gate | None = None,
    ):
        """`downloads` and `detections` bound the slow steps (server.build_parts makes them from the
        settings); None leaves a step unbounded, for callers that run one image at a time."""
        self.images = images
        self.detector = detector
        self.fetcher = fetcher
        self.max_pixels = max_pixels
        # Every decode of the service reserves its memory here, with detection or without.
        self.budget = budget if budget is not None else detector.budget
        self.downloads = downloads
        self.detections = detections

    def add(self, sub: Submission) -> tuple[store.ImageRecord, bytes]:
        """Store `sub`; returns the record and the stored bytes. Nothing is stored when it raises."""
        if (sub.data is None) == (sub.url is None):
            raise ValueError("a Submission has exactly one of data and url")
        label = check_label(sub.label)
        if sub.detect:
            self.detector.load()  # ModelError now, before any download, when there is no model
        source_url = None
        if sub.url is not None:
            with _entered(self.downloads):
                data, source_url = self.fetcher.fetch(sub.url).data, sub.url
        else:
            data = sub.data
        sha256 = hashlib.sha256(data).hexdigest()
        found: tuple[store.Found, ...] = ()
        detected_with = None
        with self.images.connection(), _Staging(self.images, data, sha256) as staging:
            if sub.detect:
                detected_with = self.detector.fingerprint()
                cached = self.images.cached_detections(sha256, detected_with)
                if cached is None:
                    with _entered(self.detections, DETECT_ADVICE):
                        staging.start()  # a large image's bytes are written while the model runs
                        result = self.detector.detect(data, budget=self.budget)
                    staging.finish()
                    decoded, found, detected_with = result.decoded, found_from(result.detections), result.fingerprint
                else:
                    decoded, found = imaging.inspect(data, self.max_pixels, self.budget), cached
            else:
                decoded = imaging.inspect(data, self.max_pixels, self.budget)
            text, generated = make_label(label, found, sub.name, sha256)
            rec = self.images.add(
                store.NewImage(
                    data=data, sha256=sha256, content_type=decoded.content_type, width=decoded.width,
                    height=decoded.height, label=text, label_generated=generated, detection_enabled=sub.detect,
                    detections=found, detected_with=detected_with, source_url=source_url,
                    filename=file_name(sub.name, from_url=sub.url is not None), model_name=self.detector.model_name,
                )
            )
        log.info("stored image %d (%s, %d bytes, %d objects)", rec.id, rec.content_type, rec.size, len(found))
        return rec, data

    def add_frame(self, data: bytes, result: detect.Result, *, keep: int, name: str | None = None) -> store.ImageRecord:
        """Store an image a /v1/vision/ route has analysed (VISION_STORE) as add() with detection would have
        stored it: its detections at the detector's threshold (`result.detections`, with the fingerprint
        that produced them), a label made from them, as one of the newest `keep` frames (store.add_frame).
        The image was decoded completely for the detection: nothing is decoded again."""
        sha256 = hashlib.sha256(data).hexdigest()
        found = found_from(result.detections)
        text, generated = make_label(None, found, name, sha256)
        decoded = result.decoded
        with self.images.connection():
            rec = self.images.add_frame(
                store.NewImage(
                    data=data, sha256=sha256, content_type=decoded.content_type, width=decoded.width,
                    height=decoded.height, label=text, label_generated=generated, detection_enabled=True,
                    detections=found, detected_with=result.fingerprint, source_url=None,
                    filename=file_name(name, from_url=False), model_name=result.model_name,
                ),
                keep,
            )
        log.debug("stored vision frame %d (%d bytes, %d objects)", rec.id, rec.size, len(found))
        return rec

    def redetect(self, image_id: int, threshold: float | None = None) -> store.ImageRecord:
        """Run detection again on a stored image with the current model, at `threshold` (the detector's,
        DETECT_THRESHOLD, by default), and replace its detections: POST /images/{id}/detect and
        `ingest.py redetect`. A generated label is made again from what was found; a user's label stays.
        Through the detection gate and the decode budget, as add() detects. NotFound when the image is
        missing, or deleted while it was being detected (then nothing is written); nothing is written
        when it raises."""
        self.detector.load()  # ModelError first, before reading the bytes
        with self.images.connection():
            rec = self.images.get(image_id)
            data = self.images.file(image_id)[0]
        with _entered(self.detections):
            result = self.detector.detect(data, threshold=threshold, budget=self.budget)
        found = found_from(result.detections)
        label = make_label(None, found, rec.filename or rec.source_url, rec.sha256)[0] if rec.label_generated else None
        with self.images.connection():
            # detected_with carries the threshold used, so POST /images reuses these detections only for
            # the same bytes analysed by the same model at the same threshold.
            new = self.images.replace_detections(image_id, found, result.fingerprint, result.model_name, label)
        log.debug("re-detected image %d with %s (%d objects)", image_id, result.fingerprint, len(found))
        return new


# ---------------------------------------------------------------------------------------------------------
# Thumbnails
# ---------------------------------------------------------------------------------------------------------


def _lower_priority() -> None:
    """Run the calling thread at a lower CPU priority than the request threads (Linux nice applies per
    thread; elsewhere, or without permission, it runs at the usual priority)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + 10)
    except (AttributeError, OSError):
        pass


UNMAKEABLE_KEPT = 4096  # keys of thumbnails that cannot be made, not tried again ahead (about 0.5 MB)


class Thumbnails:
    """The thumbnails of stored images: a kept one read, a missing one made (inside the decode budget),
    and the grid's thumbnails of a listed page made ahead, in the background.

    `read_ahead(records)` is what GET /images calls with the page it answers: the `size` (the grid's 320)
    `fmt` (WebP, which every current browser asks for) thumbnails of its first `read_ahead` images that
    are not kept yet are made and kept by `workers` threads at a lower CPU priority, and in the decode
    budget only when no request waits for it (a background reservation: skipped otherwise, and made when
    asked for), so that the browser
    asking for them a few hundred milliseconds later (after its scripts ran) finds them made, or being
    made: a request for one under way waits for it rather than making it twice; one still queued is taken
    off the queue and made by the request. At most twice `read_ahead` wait; more are not queued.
    """

    def __init__(
        self,
        images: store.Store,
        *,
        max_pixels: int = imaging.MAX_PIXELS,
        budget: imaging.DecodeBudget | None = None,
        read_ahead: int = 24,
        size: int = 320,
        fmt: str = "webp",
        workers: int | None = None,
        make: Callable[..., imaging.Rendition] = imaging.thumbnail,
        wait: float = 30.0,
    ):
        self.images = images
        self.max_pixels = max_pixels
        self.budget = budget
        self.read_ahead_count = read_ahead
        self.size = size
        self.fmt = fmt
        self.make = make
        self.wait = wait  # the longest a request waits for one being made ahead; then it makes its own
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, int, str], concurrent.futures.Future] = {}
        self._unmakeable: collections.OrderedDict[tuple[str, int, str], None] = collections.OrderedDict()
        self._pool = None
        if read_ahead > 0:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                workers or min(2, os.cpu_count() or 1), thread_name_prefix="thumbnails-ahead",
                initializer=_lower_priority,
            )

    def get(self, image_id: int, sha256: str, size: int, fmt: str) -> tuple[store.Thumbnail, bool]:
        """(the thumbnail, whether it is kept). One not kept is the caller's to keep (`keep`), after it
        was sent. Raises store.NotFound when the image is gone; imaging's errors when it cannot be made."""
        thumb = self.images.thumbnail(sha256, size, fmt)
        if thumb is not None:
            return thumb, True
        ahead = self._claim((sha256, size, fmt))
        if ahead is not None:
            try:
                made = ahead.result(timeout=self.wait)
            except Exception as e:  # noqa: BLE001 - whatever stopped it, the request makes its own
                log.debug("thumbnail of image %d made ahead failed (%s); making it now", image_id, e)
            else:
                if made is not None:
                    return made
        data = self.images.file(image_id)[0]
        rendition = self.make(data, size, fmt, self.max_pixels, self.budget)
        return store.Thumbnail(rendition.data, rendition.width, rendition.height), False

    def keep(self, image_id: int, sha256: str, size: int, fmt: str, thumb: store.Thumbnail) -> None:
        """Keep a thumbnail made by `get`: below the disk floor or with the database busy it is not kept
        (it is made again next time), which is logged, not raised."""
        try:
            with self.images.connection():
                self.images.keep_thumbnail(sha256, size, fmt, thumb)
        except store.StoreFull as e:
            log.debug("thumbnail of image %d served without being kept: %s", image_id, e)
        except store.StoreUnavailable as e:
            log.warning("thumbnail of image %d served without being kept: %s", image_id, e)

    def read_ahead(self, records: Iterable[store.ImageRecord]) -> int:
        """Queue the grid thumbnails of the first `read_ahead` records not kept or queued yet; how many."""
        if self._pool is None:
            return 0
        queued = 0
        for rec in list(records)[: self.read_ahead_count]:
            key = (rec.sha256, min(self.size, max(rec.width, rec.height)), self.fmt)
            with self._lock:
                if key in self._pending or key in self._unmakeable or len(self._pending) >= 2 * self.read_ahead_count:
                    continue
                try:
                    ahead = self._pool.submit(self._ahead, rec.id, key)
                except RuntimeError:  # closed meanwhile
                    return queued
                self._pending[key] = ahead
            ahead.add_done_callback(lambda done, key=key: self._forget(key, done))
            queued += 1
        return queued

    def _forget(self, key: tuple[str, int, str], done: concurrent.futures.Future) -> None:
        with self._lock:
            if self._pending.get(key) is done:
                del self._pending[key]

    def _claim(self, key: tuple[str, int, str]) -> concurrent.futures.Future | None:
        """The read-ahead of `key` if one is under way; one still queued is cancelled (None)."""
        with self._lock:
            ahead = self._pending.pop(key, None)
        if ahead is None or ahead.cancel():
            return None
        return ahead

    def _ahead(self, image_id: int, key: tuple[str, int, str]) -> tuple[store.Thumbnail, bool] | None:
        sha256, size, fmt = key
        try:
            with self.images.connection():
                if self.images.has_thumbnail(sha256, size, fmt):
                    return None  # kept already (by a request, another process, an earlier listing)
                data = self.images.file(image_id)[0]
            made = self.make(data, size, fmt, self.max_pixels, self.budget, background=True)
            thumb = store.Thumbnail(made.data, made.width, made.height)
            try:
                with self.images.connection():
                    kept = self.images.keep_thumbnail(sha256, size, fmt, thumb)
            except (store.StoreFull, store.StoreUnavailable) as e:
                log.debug("thumbnail of image %d made ahead, not kept: %s", image_id, e)
                kept = False
            return thumb, kept
        except (imaging.ImageError, store.StoreError) as e:
            # Deleted meanwhile, the decode budget full, a picture that cannot be made: a request makes it
            # (or says why) when it is asked for. One that can never be made is not tried again ahead of
            # every listing that shows it (remembered for the newest UNMAKEABLE_KEPT such keys).
            if isinstance(e, imaging.ImageError) and not isinstance(e, imaging.DecodeBusy):
                with self._lock:
                    self._unmakeable[key] = None
                    while len(self._unmakeable) > UNMAKEABLE_KEPT:
                        self._unmakeable.popitem(last=False)
            log.debug("thumbnail of image %d not made ahead: %s", image_id, e)
            return None

    def close(self) -> None:
        """Stop the read-ahead: queued thumbnails are dropped, the ones being made finish."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            with self._lock:
                self._pending.clear()


# ---------------------------------------------------------------------------------------------------------
# Command line: `python ingest.py import PATH...` (and the other bulk commands), with a progress bar
# ---------------------------------------------------------------------------------------------------------

OUTCOMES = ("added", "skipped", "failed")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# The settings a bulk command reads (from the environment, --db and --model as flags), listed by its --help.
LIBRARY_SETTINGS = (
    "db", "model", "detect_threshold", "detect_threads", "detect_interpreters", "max_pixels", "decode_memory_mb",
    "decode_wait_ms", "max_image_bytes", "min_free_disk_mb",
)


class Progress:
    """Progress of a bulk command over `total` items (None: unknown), on `stream` (stderr by default).

        with Progress(total, "import", unit="file") as progress:
            for item in items:
                ...
                progress.update("added")                   # or "skipped" / "failed"
                progress.update("skipped", "duplicates")   # with a reason, which the summary counts
        print(progress.summary())

    On a terminal: a tqdm bar with items per second, ETA and the counts of each outcome, and log records
    written above it (tqdm's logging_redirect_tqdm) instead of through it. Elsewhere (a pipe, a file,
    journald): a plain line every `every` seconds (at most, so the log stays small however many items
    there are; 0: one per item) and none of tqdm's carriage returns. `words` shows an outcome under
    another word ({"added": "re-detected"}); `write(text)` puts a line of command-line output out without
    breaking the bar. `summary()`: one line of counts, reasons, time and rate.
    """

    def __init__(
        self,
        total: int | None,
        what: str,
        *,
        unit: str = "file",
        stream: Any = None,
        tty: bool | None = None,
        every: float = 5.0,
        words: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total = total
        self.what = what
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = tty if tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every
        self.words = {o: o for o in OUTCOMES} | (words or {})
        self.clock = clock
        self.counts: Counter[str] = Counter()
        self.reasons: Counter[tuple[str, str]] = Counter()
        self.started = clock()
        self.ended: float | None = None
        self._last_line = self.started
        self._bar: Any = None
        self._redirect: contextlib.ExitStack | None = None

    def __enter__(self) -> Progress:
        self.started = self._last_line = self.clock()
        if self.tty:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(
                total=self.total, desc=self.what, unit=f" {self.unit}s", file=self.stream, dynamic_ncols=True,
                mininterval=0.25, smoothing=0.1,
            )
            self._bar.set_postfix_str(self._counts_text(), refresh=False)
            self._redirect = contextlib.ExitStack()
            self._redirect.enter_context(logging_redirect_tqdm(tqdm_class=tqdm))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.ended = self.clock()
        if self._redirect is not None:
            self._redirect.close()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    @property
    def elapsed(self) -> float:
        return (self.ended if self.ended is not None else self.clock()) - self.started

    def update(self, outcome: str, reason: str | None = None) -> None:
        """One more item done, with its outcome ("added", "skipped" or "failed") and an optional reason."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, not {outcome!r}")
        self.counts[outcome] += 1
        if reason:
            self.reasons[outcome, reason] += 1
        if self._bar is not None:
            self._bar.set_postfix_str(self._counts_text(), refresh=False)
            self._bar.update(1)
            return
        now = self.clock()
        if now - self._last_line >= self.every or self.done == self.total:
            self._last_line = now
            self._line(self._status_text())

    def write(self, text: str) -> None:
        """A line of command-line output (above the bar on a terminal)."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            self._line(text)

    def _line(self, text: str) -> None:
        self.stream.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        self.stream.flush()

    def _counts_text(self) -> str:
        return ", ".join(f"{self.counts[o]} {self.words[o]}" for o in OUTCOMES)

    def _rate(self) -> float:
        elapsed = self.elapsed
        return self.done / elapsed if elapsed > 0 else 0.0

    def _status_text(self) -> str:
        rate = self._rate()
        if self.total:
            head = f"{self.done}/{self.total} {self.unit}s ({100 * self.done / self.total:.0f}%)"
            left = (self.total - self.done) / rate if rate > 0 else None
            eta = f", about {_duration(left)} left" if left is not None and self.done < self.total else ""
        else:
            head, eta = f"{self.done} {self.unit}s", ""
        return f"{self.what}: {head}, {self._counts_text()}; {rate:.1f} {self.unit}s/s{eta}"

    def summary(self, *, interrupted: bool = False) -> str:
        """One line: each outcome's count with its reasons, then the items, the time and the rate."""
        parts = []
        for o in OUTCOMES:
            text = f"{self.counts[o]} {self.words[o]}"
            why = [f"{r}: {n}" for (oc, r), n in sorted(self.reasons.items()) if oc == o]
            parts.append(f"{text} ({', '.join(why)})" if why else text)
        stopped = " (interrupted: the rest was not looked at)" if interrupted else ""  # Ctrl-C, SIGTERM
        return (
            f"{self.what}{stopped}: {', '.join(parts)}; {self.done} {self.unit}s in {_duration(self.elapsed)}, "
            f"{self._rate():.1f} {self.unit}s/s"
        )


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def library_options(parser: Any) -> None:
    """--db and --model, as server.py takes them (flags win over IMAGES_DB and DETECT_MODEL)."""
    for name in ("db", "model"):
        s = next(x for x in settings_mod.SETTINGS if x.name == name)
        parser.add_argument(s.flag, dest=name, default=None, metavar=s.env, help=f"{s.help} [{s.env}, default: {s.default}]")


def library_settings(args: Any) -> Any:
    """The server's settings (settings.py: environment, defaults), with --db / --model from `args`.
    Raises settings.SettingError."""
    given = {name: getattr(args, name) for name in ("db", "model") if getattr(args, name, None) is not None}
    return settings_mod.load(**given)


def open_library(settings: Any) -> Ingest:
    """The pipeline POST /images uses, built from the same settings as server.build_parts builds it: the
    store (with the disk floor), the detector (its pool of interpreters), one decode budget. No gates:
    a bulk command bounds its own concurrency. Raises store.StoreError or OSError."""
    detector = make_detector(settings)
    images = store.Store(
        settings.db, min_free_mb=settings.min_free_disk_mb, pool_size=settings.db_pool_size,
        busy_timeout_ms=int(settings.db_busy_timeout * 1000),
    )
    fetcher = fetch.Fetcher(max_bytes=settings.max_image_bytes)  # unused by files; Ingest takes one
    return Ingest(
        images=images, detector=detector, fetcher=fetcher, max_pixels=settings.max_pixels, budget=detector.budget
    )


def make_detector(settings: Any) -> detect.Detector:
    """The detector server.build_parts makes from `settings` (the model is loaded on first use), with the
    process's one decode budget (`detector.budget`)."""
    budget = imaging.DecodeBudget(settings.decode_memory_mb * imaging.MB, settings.decode_wait_ms / 1000)
    imaging.free_large_blocks_promptly()
    return detect.Detector(
        settings.model, threshold=settings.detect_threshold, threads=settings.detect_threads or None,
        pool=settings.detect_interpreters or None, max_pixels=settings.max_pixels, budget=budget,
    )


def _settings_epilog() -> str:
    return "Settings read from the environment, as server.py reads them:\n" + "\n".join(
        f"  {s.env:<20} {s.help} (default: {settings_mod.default_text(s)})"
        for s in settings_mod.SETTINGS if s.name in LIBRARY_SETTINGS
    )


def argument_parser() -> Any:
    """`python ingest.py COMMAND ...`: one subcommand per bulk job; each sets `run(args) -> exit status`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="ingest.py", description="Bulk work on the library the server uses (the same database and settings).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_settings_epilog(),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_import_command(commands)
    _add_redetect_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 all done, 1 some item failed (or the command stopped early), 2 usage, 130 Ctrl-C
    (143 SIGTERM, which stops a command as Ctrl-C does: docker stop, systemd, kill)."""
    parser = argument_parser()
    args = parser.parse_args(argv)  # exits 2 on a usage error
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    received: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if on_main else None
    try:
        code = args.run(args, parser)
    except KeyboardInterrupt:  # before a command's own handling starts (opening, counting) or after it
        print(f"ingest.py {args.command}: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    return 128 + received[0] if code == EXIT_INTERRUPTED and received else code


# -- import ------------------------------------------------------------------------------------------------


def _add_import_command(commands: Any) -> None:
    import argparse

    p = commands.add_parser(
        "import", help="add the image files under folders (recursively) and files to the library",
        description=(
            "Add JPEG, PNG, GIF, WebP and BMP files (recognised by their content, not their names) to the "
            "library, as POST /images adds them, with detection unless --no-detect. Other files (HEIC "
            "included) are skipped and counted; so are files whose bytes the library holds already, so "
            "running it again adds only new files. Safe while the server runs on the same database."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_settings_epilog(),
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders (searched recursively)")
    p.add_argument("--dry-run", action="store_true", help="say what would be added and skipped; write nothing")
    p.add_argument("--no-detect", dest="detect", action="store_false", help="store the images without detection")
    library_options(p)
    p.add_argument(
        "--log-every", type=float, default=5.0, metavar="SECONDS",
        help="when not on a terminal, a progress line at most every SECONDS (default 5; 0: every file)",
    )
    p.set_defaults(run=_run_import)


@dataclass(frozen=True)
class Unwalked:
    """What the walk meets and does not hand on as a file, with its outcome: a folder it cannot read
    ("failed"), a link to a folder, which it does not follow ("skipped", under `reason`)."""

    path: str
    outcome: str
    why: str
    reason: str | None = None


def iter_files(paths: Iterable[str]) -> Iterator[str | Unwalked]:
    """Every file under `paths` (files as given; folders walked recursively, in name order, without
    following links to folders, so a link loop cannot trap the walk), and an Unwalked for each folder
    that cannot be read and each link to a folder, so that nothing is passed over unsaid."""
    for path in paths:
        if not os.path.isdir(path):
            yield path
            continue
        errors: list[OSError] = []  # os.walk leaves out a folder it cannot list, after telling onerror
        for folder, dirs, files in os.walk(path, onerror=errors.append):
            yield from _unreadable(errors)
            dirs.sort()
            for name in [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
                dirs.remove(name)  # os.walk would not go in either; counted, not silently dropped
                yield Unwalked(os.path.join(folder, name), "skipped", "a link to a folder: not followed", "links to folders")
            for name in sorted(files):
                yield os.path.join(folder, name)
        yield from _unreadable(errors)


def _unreadable(errors: list[OSError]) -> Iterator[Unwalked]:
    while errors:
        e = errors.pop(0)
        yield Unwalked(str(e.filename), "failed", f"cannot read folder {e.filename}: {e.strerror or e}")


def _not_there(path: str) -> str | None:
    """Why `path`, given on the command line, cannot be imported (None: it can be looked at)."""
    import errno

    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a loop of links"
        if e.errno == errno.ENOENT:
            return "no such file or folder"
        return (e.strerror or str(e)).lower()
    return None


class _Stop(Exception):
    """The import cannot go on (the disk is full, the database unusable); the message says why."""


@dataclass
class _Candidate:
    path: str
    data: bytes
    sha256: str


class Importer:
    """Adds files to the library through `pipeline.add`, as POST /images adds bytes, `workers` at once.

    The caller's thread reads each file, sniffs and hashes it and skips what the library holds; the
    workers decode, detect and store (Ingest.add: same limits, same errors, one transaction per file).
    At most 2 x `workers` files are held in memory at once. With `dry_run`, `holds` answers from a
    read-only view, the workers only check that the bytes decode (imaging.inspect), and nothing is written.
    """

    RETRIES = 5  # attempts of a file whose decode or database write found the machine busy

    def __init__(
        self, pipeline: Ingest | None, progress: Progress, *, holds: Callable[[str], bool], detect: bool,
        dry_run: bool, max_bytes: int, max_pixels: int, budget: imaging.DecodeBudget, workers: int,
    ):
        self.pipeline = pipeline
        self.progress = progress
        self.holds = holds
        self.detect = detect
        self.dry_run = dry_run
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.budget = budget
        self.workers = max(1, workers)
        self._pending: dict[concurrent.futures.Future, _Candidate] = {}
        # Dry run: the digests of the files that would be added (nothing is stored, so the library cannot
        # tell), each put in once its check passed, as the real run stores a file only once it decoded. One
        # entry per distinct new file, about 100 bytes each (a 32-byte bytes object and its slot): 100 MB at
        # a million new files, the most a dry run holds; the real run holds none.
        self._seen: set[bytes] = set()
        self.stopped: str | None = None

    def run(self, files: Iterable[str | Unwalked]) -> None:
        """Import `files`; KeyboardInterrupt propagates once the files under way are done (or abandoned)."""
        with concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="import") as pool:
            try:
                for path in files:
                    if self.stopped:
                        break
                    if isinstance(path, Unwalked):
                        self._passed(path)
                        continue
                    found = self._examine(path)
                    if found is None:
                        continue
                    while len(self._pending) >= 2 * self.workers:
                        self._collect(concurrent.futures.FIRST_COMPLETED)
                    self._pending[pool.submit(self._store, found)] = found
                self._collect(concurrent.futures.ALL_COMPLETED)
            except KeyboardInterrupt:
                pool.shutdown(wait=False, cancel_futures=True)
                self._finish_in_flight()
                raise

    def _finish_in_flight(self) -> None:
        """After Ctrl-C: let the files under way finish (each is one transaction: stored whole or not at all)."""
        for future in list(self._pending):
            if future.cancelled():  # not started: left for the next run
                del self._pending[future]
        if self._pending:
            self.progress.write(f"stopping: finishing the {len(self._pending)} file(s) under way")
        self._collect(concurrent.futures.ALL_COMPLETED)

    def _examine(self, path: str) -> _Candidate | None:
        """The file's bytes if they are to be stored; else its outcome is counted here and None returned."""
        try:
            st = os.stat(path)
            if not stat_mod.S_ISREG(st.st_mode):
                return self._skip(path, "not images", "not a regular file")
            with open(path, "rb") as f:
                head = f.read(imaging.SNIFF_BYTES)
                if imaging.sniff_format(head) is None:
                    other = imaging.other_format(head)
                    return self._skip(path, "not images", f"{other} is not supported" if other else "not an image")
                if st.st_size > self.max_bytes:
                    return self._fail(path, self._too_large())
                data = head + f.read(self.max_bytes + 1 - len(head))
        except OSError as e:
            return self._fail(path, f"cannot read it: {e.strerror or e}")
        if len(data) > self.max_bytes:  # it grew since stat
            return self._fail(path, self._too_large())
        digest = hashlib.sha256(data)
        sha256 = digest.hexdigest()
        for future, other in list(self._pending.items()):
            if other.sha256 == sha256:  # the same bytes under another name, being stored now
                concurrent.futures.wait([future])
                self._collect(concurrent.futures.FIRST_COMPLETED, only=[future])
        if self.dry_run and digest.digest() in self._seen:
            return self._skip(path, "duplicates", "the same bytes as a file before it")
        try:
            held = self.holds(sha256)
        except store.StoreUnavailable as e:
            raise _Stop(str(e)) from e
        if held:
            return self._skip(path, "duplicates", "the library holds these bytes already")
        return _Candidate(path, data, sha256)

    def _passed(self, entry: Unwalked) -> None:
        if entry.outcome == "failed":
            log.warning("%s", entry.why)
        else:
            log.debug("skipped %s: %s", entry.path, entry.why)
        self.progress.update(entry.outcome, entry.reason)

    def _too_large(self) -> str:
        return f"the file is larger than {self.max_bytes:,} bytes (MAX_IMAGE_BYTES); raise MAX_IMAGE_BYTES to import it"

    def _skip(self, path: str, reason: str, why: str) -> None:
        log.debug("skipped %s: %s", path, why)
        self.progress.update("skipped", reason)
        return None

    def _fail(self, path: str, why: str) -> None:
        log.warning("failed %s: %s", path, why)
        self.progress.update("failed")
        return None

    def _store(self, c: _Candidate) -> None:
        """In a worker: decode, detect and store one file (or, in a dry run, check that it decodes)."""
        for attempt in range(1, self.RETRIES + 1):
            try:
                if self.dry_run:
                    imaging.inspect(c.data, self.max_pixels, self.budget)
                else:
                    sub = Submission(data=c.data, url=None, label=None, detect=self.detect, name=os.path.basename(c.path))
                    self.pipeline.add(sub)
                return
            except (imaging.DecodeBusy, store.StoreUnavailable):
                if attempt == self.RETRIES:
                    raise
                time.sleep(0.2 * attempt)  # the server, or a large image here, holds the budget or the database

    def _collect(self, when: str, only: list | None = None) -> None:
        """Wait for pending files (`when`: FIRST_COMPLETED or ALL_COMPLETED) and count what they came to."""
        waiting = only if only is not None else list(self._pending)
        if not waiting:
            return
        done, _ = concurrent.futures.wait(waiting, return_when=when)
        for future in done:
            c = self._pending.pop(future, None)
            if c is None:
                continue
            try:
                future.result()
            except store.StoreFull as e:  # LowDisk too: every later file would meet it
                self._fail(c.path, str(e))
                self.stopped = str(e)
            except store.StoreUnavailable as e:
                self._fail(c.path, str(e))
                self.stopped = str(e)
            except (imaging.ImageError, detect.DetectError, IngestError) as e:
                self._fail(c.path, str(e))
            except Exception as e:  # a bug of ours: say so, keep going with the other files
                log.error("failed %s: unexpected error", c.path, exc_info=e)
                self.progress.update("failed")
            else:
                if self.dry_run:  # the copies after it are duplicates; a copy of a failed file fails too
                    self._seen.add(bytes.fromhex(c.sha256))
                self.progress.update("added")


def _run_import(args: Any, parser: Any) -> int:
    missing: dict[str, list[str]] = {}
    for path in args.paths:
        why = _not_there(path)
        if why:
            missing.setdefault(why, []).append(path)
    if missing:
        parser.error("; ".join(f"{why}: {', '.join(paths)}" for why, paths in missing.items()))
    try:
        settings = library_settings(args)
    except settings_mod.SettingError as e:
        parser.error(f"{e}; `python ingest.py import --help` lists the settings it reads")
    pipeline = None
    try:
        if args.dry_run:
            holdings = store.ReadOnlyHoldings(settings.db)
            holds, close = holdings.holds, holdings.close
            detector = make_detector(settings)
        else:
            pipeline = open_library(settings)
            holds, close, detector = pipeline.images.holds, pipeline.images.shutdown, pipeline.detector
    except (store.StoreError, OSError, sqlite3.Error) as e:
        print(f"ingest.py import: cannot open the database {store.redact(settings.db)}: {e}", file=sys.stderr)
        return EXIT_USAGE
    budget, workers = detector.budget, detector.pool
    try:
        if args.detect:
            try:
                detector.load()
            except detect.ModelError as e:
                print(f"ingest.py import: {e}; or import without detection: --no-detect", file=sys.stderr)
                return EXIT_USAGE
        total = sum(1 for _ in iter_files(args.paths))  # a first walk, for the ETA: names only, nothing read
        what = "import (dry run: nothing is written)" if args.dry_run else "import"
        words = {"added": "to add", "skipped": "to skip", "failed": "would fail"} if args.dry_run else None
        with Progress(total, what, unit="file", every=args.log_every, words=words) as progress:
            detection = (
                f"detection on ({os.path.basename(settings.model)}, threshold {settings.detect_threshold:g})"
                if args.detect else "detection off"
            )
            progress.write(f"import: {total} file(s) into {store.redact(settings.db)}, {detection}, {workers} at once")
            importer = Importer(
                pipeline, progress, holds=holds, detect=args.detect, dry_run=args.dry_run,
                max_bytes=settings.max_image_bytes, max_pixels=settings.max_pixels, budget=budget, workers=workers,
            )
            interrupted = False
            try:
                with pipeline.images.connection() if pipeline else contextlib.nullcontext():
                    importer.run(iter_files(args.paths))
            except KeyboardInterrupt:
                interrupted = True
            except _Stop as e:
                importer.stopped = str(e)
        print(progress.summary(interrupted=interrupted), flush=True)
        if importer.stopped:
            print(f"ingest.py import: stopped early: {importer.stopped}", file=sys.stderr)
        if interrupted:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if progress.counts["failed"] or importer.stopped else EXIT_OK
    finally:
        close()

# -- redetect ----------------------------------------------------------------------------------------------


def _threshold_arg(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not detect.CANDIDATE_FLOOR <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number from {detect.CANDIDATE_FLOOR:g} to 1, not {text!r}")
    return value


def _add_redetect_command(commands: Any) -> None:
    import argparse

    p = commands.add_parser(
        "redetect", help="run detection again on stored images: after a model change, a new threshold, or for images stored without",
        description=(
            "Run the current model (DETECT_MODEL) again on stored images and replace their detections, as "
            "POST /images/{id}/detect does: a generated label follows the new detections, a label someone "
            "gave stays. Which images: --stale (the default) those detected by another model or at another "
            "threshold, --undetected those never analysed, --all every one. An image deleted meanwhile is "
            "skipped. Safe while the server runs on the same database."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_settings_epilog(),
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--stale", dest="which", action="store_const", const="stale",
                       help="images whose detections came from another model or threshold (the default)")
    which.add_argument("--undetected", dest="which", action="store_const", const="undetected",
                       help="images never analysed (stored with detection off)")
    which.add_argument("--all", dest="which", action="store_const", const="all", help="every image")
    p.set_defaults(which="stale")
    p.add_argument("--objects", metavar="NAMES", default="",
                   help="only images holding any of these, comma-separated, in the words of GET /images?objects= "
                        "(dog,cat; dogs; animal)")
    p.add_argument("--threshold", type=_threshold_arg, default=None, metavar="T",
                   help=f"keep detections at or above T, {detect.CANDIDATE_FLOOR:g} to 1 (default: DETECT_THRESHOLD)")
    p.add_argument("--dry-run", action="store_true", help="say how many images would be detected again; write nothing")
    library_options(p)
    p.add_argument(
        "--log-every", type=float, default=5.0, metavar="SECONDS",
        help="when not on a terminal, a progress line at most every SECONDS (default 5; 0: every image)",
    )
    p.set_defaults(run=_run_redetect)


class Redetector:
    """Detects stored images again through `pipeline.redetect`, `workers` at once, each image its own
    write transaction. The caller's thread pages through the ids (oldest first, 500 at a time) and keeps
    at most 2 x `workers` images under way, so memory stays bounded however large the library is; the
    workers read the bytes, detect (the detector's pool of interpreters, so every core works) and write."""

    RETRIES = 5  # attempts of an image whose decode or database write found the machine busy
    PAGE = 500

    def __init__(self, pipeline: Ingest, progress: Progress, *, threshold: float, workers: int):
        self.pipeline = pipeline
        self.progress = progress
        self.threshold = threshold
        self.workers = max(1, workers)
        self._pending: dict[concurrent.futures.Future, int] = {}
        self.stopped: str | None = None

    def ids(self, which: str, fingerprint: str, objects: Sequence[Sequence[str]], until: int) -> Iterator[int]:
        after = 0
        while True:
            with self.pipeline.images.connection():
                page = self.pipeline.images.redetect_ids(
                    which, fingerprint, objects=objects, after=after, until=until, limit=self.PAGE
                )
            yield from page
            if len(page) < self.PAGE:
                return
            after = page[-1]

    def run(self, ids: Iterable[int]) -> None:
        """Detect `ids` again; KeyboardInterrupt propagates once the images under way are done."""
        with concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="redetect") as pool:
            try:
                for image_id in ids:
                    if self.stopped:
                        break
                    while len(self._pending) >= 2 * self.workers:
                        self._collect(concurrent.futures.FIRST_COMPLETED)
                    self._pending[pool.submit(self._one, image_id)] = image_id
                self._collect(concurrent.futures.ALL_COMPLETED)
            except KeyboardInterrupt:
                pool.shutdown(wait=False, cancel_futures=True)
                if self._pending:
                    self.progress.write(f"stopping: waiting for the {len(self._pending)} image(s) under way")
                for future in list(self._pending):
                    if future.cancelled():
                        del self._pending[future]
                self._collect(concurrent.futures.ALL_COMPLETED)
                raise

    def _one(self, image_id: int) -> None:
        for attempt in range(1, self.RETRIES + 1):
            try:
                self.pipeline.redetect(image_id, self.threshold)
                return
            except (imaging.DecodeBusy, store.StoreUnavailable):
                if attempt == self.RETRIES:
                    raise
                time.sleep(0.2 * attempt)  # the server, or a large image here, holds the budget or the database

    def _collect(self, when: str) -> None:
        if not self._pending:
            return
        done, _ = concurrent.futures.wait(list(self._pending), return_when=when)
        for future in done:
            image_id = self._pending.pop(future)
            try:
                future.result()
            except store.NotFound:
                log.debug("skipped image %d: deleted meanwhile", image_id)
                self.progress.update("skipped", "deleted meanwhile")
            except (store.StoreFull, store.StoreUnavailable) as e:  # every later image would meet it
                log.warning("failed image %d: %s", image_id, e)
                self.progress.update("failed")
                self.stopped = str(e)
            except (imaging.ImageError, detect.DetectError, IngestError) as e:
                log.warning("failed image %d: %s", image_id, e)
                self.progress.update("failed")
            except Exception as e:  # a bug of ours: say so, keep going with the other images
                log.error("failed image %d: unexpected error", image_id, exc_info=e)
                self.progress.update("failed")
            else:
                self.progress.update("added")


_WHICH = {
    "stale": "detected by another model or threshold",
    "undetected": "never analysed",
    "all": "every image",
}


def _run_redetect(args: Any, parser: Any) -> int:
    try:
        settings = library_settings(args)
    except settings_mod.SettingError as e:
        parser.error(f"{e}; `python ingest.py redetect --help` lists the settings it reads")
    threshold = settings.detect_threshold if args.threshold is None else args.threshold
    terms = [t.strip().lower() for t in args.objects.split(",") if t.strip()]
    if terms and args.which == "undetected":
        parser.error("--objects goes with --stale or --all: images never analysed hold no objects")
    objects = [search_names(t) for t in terms]
    scope = _WHICH[args.which] + (f", holding {' or '.join(terms)}" if terms else "")
    if args.dry_run:
        detector = make_detector(settings)
        try:
            fingerprint = detector.fingerprint(threshold)
            n = store.read_only_redetect_count(settings.db, args.which, fingerprint, objects)
        except detect.ModelError as e:
            print(f"ingest.py redetect: {e}", file=sys.stderr)
            return EXIT_USAGE
        except store.StoreError as e:
            print(f"ingest.py redetect: cannot read the database {store.redact(settings.db)}: {e}", file=sys.stderr)
            return EXIT_USAGE
        print(f"redetect (dry run: nothing is written): {n} image(s) in {store.redact(settings.db)} would be detected again "
              f"({scope}) with {detector.model_name} ({fingerprint})", flush=True)
        return EXIT_OK
    # store.Store would make a missing file a new empty library (a typo, or the default path from another
    # folder): nothing to re-detect there, and a file left behind. (A dry run opens it read-only: 0 images.)
    if not store.is_url(settings.db) and not os.path.exists(settings.db):
        print(f"ingest.py redetect: the database {store.redact(settings.db)} does not exist; give the server's database with "
              f"--db (IMAGES_DB)", file=sys.stderr)
        return EXIT_USAGE
    try:
        pipeline = open_library(settings)
    except (store.StoreError, OSError, sqlite3.Error) as e:
        print(f"ingest.py redetect: cannot open the database {store.redact(settings.db)}: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        try:
            fingerprint = pipeline.detector.fingerprint(threshold)
        except detect.ModelError as e:
            print(f"ingest.py redetect: {e}", file=sys.stderr)
            return EXIT_USAGE
        # Two images under way per interpreter: one detecting while the other reads or writes (its fsync).
        workers = 2 * pipeline.detector.pool
        with pipeline.images.connection():
            until = pipeline.images.last_id()  # images added meanwhile are the server's to detect
            total = pipeline.images.redetect_count(args.which, fingerprint, objects=objects, until=until)
        words = {"added": "re-detected"}
        with Progress(total, "redetect", unit="image", every=args.log_every, words=words) as progress:
            progress.write(f"redetect: {total} image(s) in {store.redact(settings.db)} ({scope}) with {pipeline.detector.model_name} "
                           f"({fingerprint}), {workers} at once")
            redetector = Redetector(pipeline, progress, threshold=threshold, workers=workers)
            interrupted = False
            try:
                redetector.run(redetector.ids(args.which, fingerprint, objects, until))
            except KeyboardInterrupt:
                interrupted = True
            except store.StoreError as e:  # paging through the ids failed
                redetector.stopped = str(e)
        print(progress.summary(interrupted=interrupted), flush=True)
        if redetector.stopped:
            print(f"ingest.py redetect: stopped early: {redetector.stopped}", file=sys.stderr)
        if interrupted:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if progress.counts["failed"] or redetector.stopped else EXIT_OK
    finally:
        pipeline.images.shutdown()


if __name__ == "__main__":
    # Run as the module `ingest`, not `__main__`, so its classes are the ones the other modules see.
    import ingest

    sys.exit(ingest.main())
