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

import contextlib
import hashlib
import logging
import math
import re
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import detect
import fetch
import imaging
import store

log = logging.getLogger(__name__)

LABEL_MAX = 200
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
    def enter(self) -> Iterator[None]:
        """Hold a place for the `with` block; Busy when none comes free in time."""
        token = self._acquire()
        try:
            yield
        finally:
            self._release(token)

    def _acquire(self) -> object:
        deadline = time.monotonic() + self.wait
        with self._cond:
            if len(self._holders) >= self.places:
                if self._eta(self._waiting + 1) > self.wait:
                    raise self._busy(self._waiting + 1)
                self._waiting += 1
                try:
                    while len(self._holders) >= self.places:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise self._busy(self._waiting)  # this caller is one of them
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

    def _busy(self, ahead: int) -> Busy:
        retry = max(1, math.ceil(self._eta(ahead)))
        self._refused += 1
        self.refusals += 1
        now = self.clock()
        if self._warned is None or now - self._warned >= 60:  # at most one line a minute under load
            log.warning("refused %d request(s) (Busy): %s", self._refused, self.refusal.format(retry=retry))
            self._refused, self._warned = 0, now
        return Busy(self.refusal.format(retry=retry), retry)


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
        "try again in {retry} s, or send the image with detect=false"
    ), **kw)


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


def _entered(gate: Gate | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if gate is None else gate.enter()


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
        with self.images.connection():
            if sub.detect:
                detected_with = self.detector.fingerprint()
                cached = self.images.cached_detections(sha256, detected_with)
                if cached is None:
                    with _entered(self.detections):
                        result = self.detector.detect(data, budget=self.budget)
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
