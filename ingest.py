"""The pipeline that turns a new image into a stored record, whichever way it came in.

`Ingest.add(Submission)`: download a URL through fetch.py (or take the bytes given), check that the bytes
decode completely (imaging.py), run the detector or reuse detections stored for the same bytes by the
same model and threshold, generate a label when none was given, and store it all in one transaction
(store.py). POST /images uses it today; bulk import, re-detection and the detection API reuse it.

Label generation lives here too: "2 dogs", "person and dog", a file name, else "untitled <sha8>".
This module never imports Bottle; it raises typed errors (its own, and those of fetch, imaging, detect
and store), which server.py maps to HTTP statuses.
"""

from __future__ import annotations

import hashlib
import logging
import re
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import detect
import fetch
import imaging
import store

log = logging.getLogger(__name__)

LABEL_MAX = 200


class IngestError(Exception):
    """Base of this module's errors."""


class InvalidLabel(IngestError):
    """The label given cannot be used (not text, too long, or holding a control character)."""


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
    ):
        self.images = images
        self.detector = detector
        self.fetcher = fetcher
        self.max_pixels = max_pixels
        # Every decode of the service reserves its memory here, with detection or without.
        self.budget = budget if budget is not None else detector.budget

    def add(self, sub: Submission) -> tuple[store.ImageRecord, bytes]:
        """Store `sub`; returns the record and the stored bytes. Nothing is stored when it raises."""
        if (sub.data is None) == (sub.url is None):
            raise ValueError("a Submission has exactly one of data and url")
        label = check_label(sub.label)
        if sub.detect:
            self.detector.load()  # ModelError now, before any download, when there is no model
        source_url = None
        if sub.url is not None:
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
                )
            )
        log.info("stored image %d (%s, %d bytes, %d objects)", rec.id, rec.content_type, rec.size, len(found))
        return rec, data
