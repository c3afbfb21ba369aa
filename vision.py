"""The DeepStack / CodeProject.AI-compatible detection API, minus HTTP: the model shelf and the answers.

`Shelf` holds the models of `/v1/vision/custom/<name>`: every `.tflite` file in VISION_MODELS_DIR, listed
by its file stem. A name is only ever looked up in that listing, never joined into a path, so no name
reaches a file outside the folder. Models load when first asked for; at most VISION_MODELS_LOADED stay
loaded, the least recently used going first. The service's own model (DETECT_MODEL) is not loaded twice:
when its file is on the shelf, its name is served by the service's Detector.

`predictions()` and `detection_answer()` turn a detect.Result into DeepStack's answer: boxes in integer
pixels of the image as it was sent (the model saw it upright, EXIF orientation applied, as for POST
/images; the boxes are mapped back to the stored pixel grid, which is what every client computes with),
labels exactly as the model's label map has them, highest confidence first, at most VISION_MAX_PREDICTIONS.
This module never imports Bottle: it raises the typed errors below, which server.py maps to statuses.
"""

from __future__ import annotations

import collections
import contextlib
import email.utils
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import detect

log = logging.getLogger(__name__)

RESERVED = frozenset({"list"})  # POST /v1/vision/custom/list lists the models
SUFFIX = ".tflite"
MAX_LISTED = 1000  # model files looked at in VISION_MODELS_DIR; more are ignored (and logged)
FAILURES_REMEMBERED = 64  # unusable files remembered so that they are not loaded again on every request
DEFAULT_MIN_CONFIDENCE = 0.4  # DeepStack's default
MODULE_ID = "imgsvc"
MODULE_NAME = "imgsvc object detection"


class VisionError(Exception):
    """Base of this module's errors."""


class UnknownModel(VisionError):
    """No model of that name in VISION_MODELS_DIR."""


class UnusableModel(VisionError):
    """The file of that name is not a TFLite detection model this service can run."""


# ---------------------------------------------------------------------------------------------------------
# The model shelf
# ---------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Entry:
    detector: detect.Detector
    users: int = 0
    evicted: bool = False


def _stat(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class Shelf:
    """The named models of VISION_MODELS_DIR. Safe to use from many threads.

    `make_detector(path)` builds a Detector for a file (server.build_parts gives it the service's
    threads, interpreters, pixel limit and decode budget); `main` is the service's own Detector, which
    serves its file's name when that file is on the shelf. `use(name)` lends a Detector for a `with`
    block: a model evicted while detections run on it is closed when the last of them ends, so every
    detection finishes on the model it started with.
    """

    def __init__(
        self,
        folder: str,
        *,
        loaded: int,
        make_detector: Callable[[str], detect.Detector],
        main: detect.Detector | None = None,
    ):
        if loaded < 1:
            raise ValueError("a Shelf keeps at least one model loaded")
        self.folder = folder
        self.limit = loaded
        self.main = main
        self.loads = 0  # models loaded so far (what tests and /health can count)
        self._make = make_detector
        self._lock = threading.Lock()  # the entries and their counts
        self._loading = threading.Lock()  # one load at a time: memory, and two first requests load once
        self._loaded: collections.OrderedDict[str, _Entry] = collections.OrderedDict()  # oldest use first
        self._failed: collections.OrderedDict[str, tuple[tuple | None, UnusableModel]] = collections.OrderedDict()
        self._warned_many = False

    def listing(self) -> dict[str, str]:
        """{name: path} of the model files in the folder (none when it does not exist)."""
        found: dict[str, str] = {}
        try:
            entries = os.scandir(self.folder)
        except OSError:
            return found
        with entries:
            for n, entry in enumerate(entries):
                if n >= MAX_LISTED:
                    if not self._warned_many:
                        self._warned_many = True
                        log.warning("%s holds more than %d files; only the first are offered as models", self.folder, MAX_LISTED)
                    break
                stem = entry.name[: -len(SUFFIX)]
                if not entry.name.endswith(SUFFIX) or not stem or stem.startswith(".") or stem in RESERVED:
                    continue
                try:
                    if entry.is_file():  # follows a symbolic link: a model may be linked in
                        found[stem] = entry.path
                except OSError:
                    continue
        return found

    def names(self) -> list[str]:
        return sorted(self.listing())

    def loaded(self) -> list[str]:
        """Names of the models loaded now, least recently used first."""
        with self._lock:
            return list(self._loaded)

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[detect.Detector]:
        """The Detector of the model `name`, for the block. UnknownModel when there is none of that name,
        UnusableModel when its file cannot be used (detect's ModelMissing when no runtime is installed)."""
        path = self.listing().get(name) if name not in RESERVED else None
        if path is None:
            raise UnknownModel(
                f"there is no model {name[:100]!r} in VISION_MODELS_DIR; POST /v1/vision/custom/list lists "
                "the models (a model is a .tflite file there, named by its file name without .tflite)"
            )
        if self.main is not None and _same_file(path, self.main.model_path):
            yield self.main
            return
        entry = self._take(name, path)
        try:
            yield entry.detector
        finally:
            self._give(entry)

    def _hold(self, name: str) -> _Entry | None:
        """The loaded entry of `name`, marked used (under self._lock)."""
        entry = self._loaded.get(name)
        if entry is not None:
            self._loaded.move_to_end(name)
            entry.users += 1
        return entry

    def _take(self, name: str, path: str) -> _Entry:
        with self._lock:
            entry = self._hold(name)
        if entry is not None:
            return entry
        with self._loading:
            with self._lock:
                entry = self._hold(name)
            if entry is not None:
                return entry
            stat = _stat(path)
            failed = self._failed.get(name)
            if failed is not None and failed[0] == stat:
                raise failed[1]  # the same file failed before: do not load it on every request
            detector = self._make(path)
            try:
                detector.load()
            except detect.ModelInvalid as e:
                error = UnusableModel(
                    f"the model {name!r} cannot be used: {str(e).replace(os.path.dirname(path) + os.sep, '')}. "
                    "Put a TFLite detection model (SSD or EfficientDet-Lite, with its labels) in VISION_MODELS_DIR"
                )
                self._failed[name] = (stat, error)
                while len(self._failed) > FAILURES_REMEMBERED:
                    self._failed.popitem(last=False)
                log.warning("%s", error)
                raise error from None
            except detect.ModelMissing:
                if _stat(path) is None:  # gone since it was listed
                    raise UnknownModel(f"the model {name!r} was removed from VISION_MODELS_DIR") from None
                raise
            self._failed.pop(name, None)
            entry = _Entry(detector, users=1)
            closing = []
            with self._lock:
                self._loaded[name] = entry
                self.loads += 1
                while len(self._loaded) > self.limit:
                    old_name, old = self._loaded.popitem(last=False)
                    old.evicted = True
                    log.info("unloaded model %s (VISION_MODELS_LOADED=%d)", old_name, self.limit)
                    if old.users == 0:
                        closing.append(old)
            for old in closing:
                old.detector.close()
            return entry

    def _give(self, entry: _Entry) -> None:
        with self._lock:
            entry.users -= 1
            close = entry.evicted and entry.users == 0
        if close:
            entry.detector.close()

    def close(self) -> None:
        """Unload every model (those in use are closed when their detections end)."""
        with self._lock:
            entries = list(self._loaded.values())
            self._loaded.clear()
            for entry in entries:
                entry.evicted = True
            idle = [e for e in entries if e.users == 0]
        for entry in idle:
            entry.detector.close()


# ---------------------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------------------

# EXIF orientation -> the point of the image as sent (normalised x, y) under a point (x, y) of the picture
# shown upright: the inverse of the transpose imaging applied (imaging._ORIENTATION).
_TO_SENT: dict[int, Callable[[float, float], tuple[float, float]]] = {
    1: lambda x, y: (x, y),
    2: lambda x, y: (1 - x, y),  # mirrored left-right
    3: lambda x, y: (1 - x, 1 - y),  # turned 180
    4: lambda x, y: (x, 1 - y),  # mirrored top-bottom
    5: lambda x, y: (y, x),  # transposed
    6: lambda x, y: (y, 1 - x),  # sent turned 90 anticlockwise, shown turned back clockwise
    7: lambda x, y: (1 - y, 1 - x),  # transversed
    8: lambda x, y: (1 - y, x),  # sent turned 90 clockwise
}


def box_as_sent(box: detect.Box, orientation: int) -> tuple[float, float, float, float]:
    """A box of the upright picture (0..1) as (x_min, y_min, x_max, y_max) of the image as sent (0..1)."""
    to_sent = _TO_SENT.get(orientation, _TO_SENT[1])
    xa, ya = to_sent(box.x_min, box.y_min)
    xb, yb = to_sent(box.x_max, box.y_max)
    return min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)


def predictions(result: detect.Result, min_confidence: float, most: int) -> list[dict[str, Any]]:
    """DeepStack's `predictions`: the candidates at or above `min_confidence` (never below
    detect.CANDIDATE_FLOOR), highest confidence first, at most `most`, boxes in whole pixels of the image
    as it was sent."""
    decoded = result.decoded
    orientation = getattr(decoded, "orientation", 1)
    swap = orientation in (5, 6, 7, 8)
    width, height = (decoded.height, decoded.width) if swap else (decoded.width, decoded.height)
    out = []
    for d in result.above(max(min_confidence, detect.CANDIDATE_FLOOR))[:most]:
        x0, y0, x1, y1 = box_as_sent(d.box, orientation)
        out.append({
            "label": d.label,
            "confidence": d.confidence,
            "x_min": min(width, max(0, round(x0 * width))),
            "y_min": min(height, max(0, round(y0 * height))),
            "x_max": min(width, max(0, round(x1 * width))),
            "y_max": min(height, max(0, round(y1 * height))),
        })
    return out


def message(found: list[dict[str, Any]]) -> str:
    labels = list(dict.fromkeys(p["label"] for p in found))
    return f"Found {', '.join(labels)}" if labels else "No objects found"


def detection_answer(
    found: list[dict[str, Any]], timings: dict[str, float], round_trip_ms: float, *, host: str, now: float
) -> dict[str, Any]:
    """The 200 answer of /v1/vision/detection and /v1/vision/custom/<name>, as CodeProject.AI writes it.

    `timings`: the Result's (ms); inferenceMs is the model's invoke, processMs all of the detector's work
    (decode, wait for an interpreter, invoke, post-processing), analysisRoundTripMs the whole request
    from the route's start; `duration` is processMs in seconds (DeepStack's field)."""
    process_ms = sum(timings.values())
    return {
        "success": True,
        "predictions": found,
        "count": len(found),
        "message": message(found),
        "inferenceMs": round(timings.get("invoke", 0.0)),
        "processMs": round(process_ms),
        "analysisRoundTripMs": round(max(round_trip_ms, process_ms)),
        "moduleId": MODULE_ID,
        "moduleName": MODULE_NAME,
        "code": 200,
        "command": "detect",
        "duration": round(process_ms / 1000, 3),
        "inferenceDevice": "CPU",
        "processedBy": host,
        "timestampUTC": email.utils.formatdate(now, usegmt=True),  # RFC 1123, as CodeProject.AI's "R" format
    }


class Throttled:
    """A warning said at most once per `every` seconds, with how many were held back meanwhile."""

    def __init__(self, every: float = 60.0, *, clock: Callable[[], float] = time.monotonic):
        self.every = every
        self.clock = clock
        self._lock = threading.Lock()
        self._last: float | None = None
        self._held = 0

    def warn(self, logger: logging.Logger, text: str, *args: Any) -> bool:
        """Log `text % args` now, or count it; True when it was logged."""
        with self._lock:
            now = self.clock()
            if self._last is not None and now - self._last < self.every:
                self._held += 1
                return False
            held, self._held, self._last = self._held, 0, now
        logger.warning(text + (f" ({held} more like it not logged)" if held else ""), *args)
        return True
