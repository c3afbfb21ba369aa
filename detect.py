"""On-device object detection with a TFLite detection model (EfficientDet-Lite0 by default).

Two layers, as in Frigate's detectors: `Detector` turns image bytes into the four raw arrays of the
model's TFLite_Detection_PostProcess op; `postprocess()` is a pure function that turns those arrays into
labelled, thresholded, sorted boxes, so it can be fed by hand in tests.

Runtime: LiteRT (`ai-edge-litert`), falling back to `tflite_runtime` when LiteRT is not installed.
This module never imports Bottle; it raises the typed errors below and server.py maps them to HTTP.

Command line:
    python detect.py [--model PATH] PHOTO...     one JSON line per photo
    python detect.py --fetch [NAME]              download a known model into models/
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import queue
import sys
import tempfile
import threading
import time
import urllib.request
import zipfile
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

# Formats we decode. Everything else (EPS needs Ghostscript, TIFF/PSD/PDF parsers are large attack
# surfaces) is refused before a decoder runs.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")
CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp", "BMP": "image/bmp"}
# 50 megapixels: a 48 MP phone photo fits, a 30000x30000 decompression bomb (900 MP, 2.7 GB as RGB) does not.
MAX_PIXELS = 50_000_000

# Magic numbers of formats people send that we refuse, so the error can name them.
_KNOWN_OTHER_FORMATS = (
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%!PS", "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"%PDF", "PDF"),
    (b"8BPS", "Photoshop (PSD)"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"<svg", "SVG"),
    (b"<?xml", "SVG/XML"),
)
_ISO_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"avif": "AVIF", b"avis": "AVIF"}

# EXIF orientation -> the transpose that shows the picture upright (as PIL.ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


class DetectError(Exception):
    """Base of every error this module raises; the message says what was wrong and what to do."""


class NotAnImage(DetectError):
    """The bytes are not a decodable image (random bytes, truncated or corrupt data)."""


class UnsupportedFormat(NotAnImage):
    """A real image, but in a format we do not decode."""


class TooManyPixels(DetectError):
    """The image is larger than MAX_PIXELS once decoded (decompression bomb or simply too big)."""


class ModelError(DetectError):
    """Detection cannot run: the model is missing or unusable."""


class ModelMissing(ModelError):
    """No model file at the configured path."""


class ModelInvalid(ModelError):
    """The file is not a TFLite detection model we can use (or it has no labels)."""


class ModelFetchError(DetectError):
    """Downloading a model failed (network, HTTP status or sha256 mismatch); nothing was left behind."""


# ---------------------------------------------------------------------------------------------------------
# Known models
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KnownModel:
    name: str
    url: str
    sha256: str
    filename: str


MODELS = {
    m.name: m
    for m in (
        KnownModel(
            "efficientdet_lite0",
            "https://storage.googleapis.com/mediapipe-assets/coco_efficientdet_lite0_v1_1.0_quant_2021_09_06.tflite",
            "dee1b4af055a644804d5594442300ecc9e4f7080c25b7c044c98f527eeabb6cf",
            "efficientdet_lite0.tflite",
        ),
        KnownModel(
            "ssd_mobilenet_v1",
            "https://storage.googleapis.com/mediapipe-assets/coco_ssd_mobilenet_v1_1.0_quant_2018_06_29.tflite",
            "61d598093ed03ed41aa47c3a39a28ac01e960d6a810a5419b9a5016a1e9c469b",
            "ssd_mobilenet_v1.tflite",
        ),
    )
}
DEFAULT_MODEL = "efficientdet_lite0"


def fetch_model(
    model: KnownModel,
    models_dir: str = "models",
    *,
    timeout: float = 60.0,
    opener: Callable[..., Any] = urllib.request.urlopen,
) -> str:
    """Download `model` into `models_dir` and return its path.

    Streamed to a temporary file in the same folder, sha256 checked, then renamed into place, so a
    failed or tampered download leaves nothing behind and a half-written model is never loaded.
    """
    os.makedirs(models_dir, exist_ok=True)
    dest = os.path.join(models_dir, model.filename)
    fd, tmp = tempfile.mkstemp(prefix=f".{model.filename}.", suffix=".part", dir=models_dir)
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with opener(model.url, timeout=timeout) as response:
                    expected = response.headers.get("Content-Length")
                    while chunk := response.read(1 << 16):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
            except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts and resets are OSErrors
                raise ModelFetchError(f"could not download {model.name} from {model.url}: {e}") from e
            if expected is not None and expected.isdigit() and int(expected) != size:
                raise ModelFetchError(
                    f"download of {model.name} stopped after {size} of {expected} bytes; run the fetch again"
                )
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != model.sha256:
            raise ModelFetchError(
                f"{model.url} gave a file with sha256 {digest.hexdigest()}, expected {model.sha256}; "
                "nothing was saved. The file may have changed upstream or been tampered with."
            )
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    log.info("saved model %s (%d bytes, sha256 ok) to %s", model.name, size, dest)
    return dest


# ---------------------------------------------------------------------------------------------------------
# Runtime and model loading
# ---------------------------------------------------------------------------------------------------------


def _load_runtime() -> tuple[Any, str]:
    try:
        from ai_edge_litert.interpreter import Interpreter
        from importlib.metadata import version

        return Interpreter, f"ai-edge-litert {version('ai-edge-litert')}"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter
        from importlib.metadata import version

        return Interpreter, f"tflite-runtime {version('tflite-runtime')}"
    except ImportError:
        return None, "none (pip install ai-edge-litert)"


def load_labels(model_path: str) -> list[str]:
    """Labels by class id: `<model>.labels.txt` beside the model, else `labelmap.txt` inside it."""
    override = os.path.splitext(model_path)[0] + ".labels.txt"
    if os.path.exists(override):
        with open(override, encoding="utf-8") as f:
            text = f.read()
    else:
        try:
            with zipfile.ZipFile(model_path) as z:
                text = z.read("labelmap.txt").decode("utf-8")
        except (zipfile.BadZipFile, KeyError) as e:
            raise ModelInvalid(
                f"{model_path} carries no labelmap.txt; put one label per line (line number = class id) "
                f"in {override}"
            ) from e
    labels = [line.strip() for line in text.splitlines()]
    while labels and not labels[-1]:
        labels.pop()
    if not labels:
        raise ModelInvalid(f"the label list for {model_path} is empty")
    return labels


# The four outputs of TFLite_Detection_PostProcess, in the op's own order.
_OUTPUT_ROLES = ("boxes", "classes", "scores", "count")
# Fallback when the runtime does not expose op details: tensor names as exporters write them.
_NAME_HINTS = {
    "boxes": ("box", "location"),
    "classes": ("class", "categor"),
    "scores": ("score",),
    "count": ("num", "count"),
}


def output_roles(interpreter: Any) -> dict[str, int]:
    """Map boxes/classes/scores/count to output tensor indexes by what they are, never by position.

    SSD MobileNet lists its outputs as boxes, classes, scores, count; EfficientDet-Lite0 as scores,
    boxes, count, classes. The post-processing op's own output list is the same for both.
    """
    outputs = {d["index"] for d in interpreter.get_output_details()}
    get_ops = getattr(interpreter, "_get_ops_details", None)
    if get_ops is not None:
        for op in get_ops():
            if op.get("op_name") == "TFLite_Detection_PostProcess" and len(op["outputs"]) == 4:
                roles = dict(zip(_OUTPUT_ROLES, (int(i) for i in op["outputs"])))
                if set(roles.values()) <= outputs:
                    return roles
    roles = {}
    for d in interpreter.get_output_details():
        name = d["name"].lower()
        for role, hints in _NAME_HINTS.items():
            if role not in roles and any(h in name for h in hints):
                roles[role] = d["index"]
                break
    if len(roles) == 4:
        return roles
    raise ModelInvalid(
        "the model has no TFLite_Detection_PostProcess output (boxes, classes, scores, count); "
        "use an SSD or EfficientDet-Lite detection model"
    )


# ---------------------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Decoded:
    """An image ready for the model, and what we learnt about it."""

    format: str  # Pillow's name: JPEG, PNG, ...
    content_type: str
    width: int  # as displayed, after EXIF orientation
    height: int
    pixels: np.ndarray  # [1, H, W, 3] uint8 at the model's input size


def _sniff_other_format(head: bytes) -> str | None:
    for magic, name in _KNOWN_OTHER_FORMATS:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp":
        return _ISO_BRANDS.get(head[8:12], "ISO media (HEIC/AVIF/MP4)")
    return None


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open (not decode) `data` as one of ALLOWED_FORMATS and check its pixel count."""
    if not data:
        raise NotAnImage("the image is empty (0 bytes); send a JPEG, PNG, GIF, WebP or BMP file")
    other = _sniff_other_format(data[:16].lstrip())
    if other:
        raise UnsupportedFormat(f"{other} images are not supported; convert it to JPEG, PNG, GIF, WebP or BMP")
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:  # Pillow's own guard, for headers far past any sane size
        raise _too_many(None, None, max_pixels) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise NotAnImage(
            "these bytes are not an image we can read; send a JPEG, PNG, GIF, WebP or BMP file"
        ) from e
    width, height = img.size
    if width < 1 or height < 1:
        raise NotAnImage(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise _too_many(width, height, max_pixels)
    return img


def _too_many(width: int | None, height: int | None, max_pixels: int) -> TooManyPixels:
    size = f"{width}x{height} ({width * height:,} pixels)" if width else "far larger than that"
    return TooManyPixels(f"the image is {size}; the limit is {max_pixels:,} pixels. Scale it down and send it again.")


def orientation_of(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block should not make a good photo unusable
        log.debug("ignoring unreadable EXIF data", exc_info=True)
        return 1
    return value if value in _ORIENTATION else 1


def inspect(data: bytes, max_pixels: int = MAX_PIXELS) -> Decoded:
    """Check that `data` decodes completely, without running a model; `pixels` is a tiny thumbnail.

    For images stored without detection: a truncated or corrupt file is refused all the same.
    """
    return preprocess(data, (8, 8), max_pixels)


def preprocess(data: bytes, size: tuple[int, int], max_pixels: int = MAX_PIXELS) -> Decoded:
    """Decode `data` and produce the model input: upright, RGB, plain resize to `size` (width, height)."""
    img = open_image(data, max_pixels)
    fmt = img.format or "?"
    orientation = orientation_of(img)
    swap = orientation in (5, 6, 7, 8)
    width, height = (img.height, img.width) if swap else img.size
    # The frame we resize to is the stored one; transposing the small result is cheaper than the big one.
    target = (size[1], size[0]) if swap else size
    try:
        if fmt == "JPEG":
            # Decode at 1/2, 1/4 or 1/8 scale in libjpeg when the target is that small: 6x faster.
            img.draft("RGB", target)
        img.seek(0)  # first frame of an animation
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
        img = img.resize(target, Image.Resampling.BILINEAR, reducing_gap=3.0)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise NotAnImage(f"the image data is truncated or corrupt ({e}); send the complete file") from e
    if orientation != 1:
        img = img.transpose(_ORIENTATION[orientation])
    pixels = np.asarray(img, dtype=np.uint8)[np.newaxis, ...]
    return Decoded(fmt, CONTENT_TYPES.get(fmt, "application/octet-stream"), width, height, pixels)


# ---------------------------------------------------------------------------------------------------------
# Postprocessing (pure)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    x_min: float
    y_min: float
    x_max: float
    y_max: float


@dataclass(frozen=True)
class Detection:
    label: str
    confidence: float
    box: Box

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def postprocess(
    boxes: np.ndarray,
    classes: np.ndarray,
    scores: np.ndarray,
    count: np.ndarray | float,
    labels: list[str],
    threshold: float,
) -> list[Detection]:
    """Turn the post-processing op's raw arrays into detections.

    boxes [1,N,4] (ymin, xmin, ymax, xmax, 0..1), classes [1,N], scores [1,N], count [1]. Keeps scores
    at or above `threshold`, drops class ids with no label or the placeholder `???`, clamps boxes to
    0..1, sorts by confidence (highest first).
    """
    boxes = np.asarray(boxes).reshape(-1, 4)
    classes = np.asarray(classes).reshape(-1)
    scores = np.asarray(scores).reshape(-1)
    n = min(int(np.asarray(count).reshape(-1)[0]), len(scores), len(classes), len(boxes))
    found = []
    for i in range(n):
        score = float(scores[i])
        if not score >= threshold:  # also drops NaN
            continue
        class_id = int(classes[i])
        if not 0 <= class_id < len(labels) or labels[class_id] in ("", "???"):
            continue
        y0, x0, y1, x1 = (min(max(float(v), 0.0), 1.0) for v in boxes[i])
        box = Box(round(min(x0, x1), 4), round(min(y0, y1), 4), round(max(x0, x1), 4), round(max(y0, y1), 4))
        found.append(Detection(labels[class_id], round(score, 4), box))
    found.sort(key=lambda d: d.confidence, reverse=True)
    return found


# ---------------------------------------------------------------------------------------------------------
# The detector
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    decoded: Decoded
    detections: list[Detection]
    timings: dict[str, float]  # milliseconds: preprocess, wait, invoke, postprocess


class _Model:
    """A loaded model: labels, input spec, output roles and a pool of interpreters."""

    def __init__(self, path: str, interpreter_class: Any, pool: int, threads: int):
        self.path = path
        self.labels = load_labels(path)
        with open(path, "rb") as f:
            self.sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        self.interpreters: queue.SimpleQueue = queue.SimpleQueue()
        first = None
        for _ in range(pool):
            try:
                it = interpreter_class(model_path=path, num_threads=threads)
                it.allocate_tensors()
            except (ValueError, RuntimeError) as e:
                raise ModelInvalid(f"{path} is not a TFLite model this runtime can load: {e}") from e
            self.interpreters.put(it)
            first = first or it
        (inp,) = first.get_input_details()
        _, h, w, _ = (int(v) for v in inp["shape"])
        self.size = (w, h)
        self.input_index = inp["index"]
        self.input_dtype = inp["dtype"]
        self.roles = output_roles(first)

    def invoke(self, pixels: np.ndarray) -> tuple[float, float, tuple[np.ndarray, ...]]:
        if self.input_dtype == np.uint8:
            tensor = pixels
        elif self.input_dtype == np.int8:
            tensor = (pixels.astype(np.int16) - 128).astype(np.int8)
        else:  # float models trained by TFLite Model Maker expect [-1, 1]
            tensor = (pixels.astype(np.float32) - 127.5) / 127.5
        t0 = time.perf_counter()
        it = self.interpreters.get()  # an interpreter is never used by two threads at once
        t1 = time.perf_counter()
        try:
            it.set_tensor(self.input_index, tensor)
            it.invoke()
            raw = tuple(it.get_tensor(self.roles[r]).copy() for r in _OUTPUT_ROLES)
        finally:
            self.interpreters.put(it)
        return t1 - t0, time.perf_counter() - t1, raw


class Detector:
    """Detects objects in image bytes. Safe to call from many threads.

    `pool` interpreters of `threads` CPU threads each serve concurrent callers; while none is free a
    caller waits. The model is loaded on first use and again whenever the file appears or changes, so a
    server started without a model starts detecting once `make model` has put one in place.
    """

    def __init__(
        self,
        model_path: str,
        *,
        threshold: float = 0.5,
        threads: int | None = None,
        pool: int | None = None,
        max_pixels: int = MAX_PIXELS,
        interpreter_class: Any = None,
    ):
        self.model_path = model_path
        self.threshold = threshold
        cores = os.cpu_count() or 1
        self.threads = threads or cores
        # Measured (bench/detect.py, README table): one N-thread interpreter behind a lock serialises
        # concurrent callers; N one-thread interpreters leave a lone caller at half speed. N interpreters of
        # N threads each are as fast as the best of both for one caller and for two.
        self.pool = pool or self.threads
        self.max_pixels = max_pixels
        if interpreter_class is None:
            interpreter_class, self.runtime = _load_runtime()
        else:
            self.runtime = getattr(interpreter_class, "__module__", "custom")
        self._interpreter_class = interpreter_class
        self._model: _Model | None = None
        self._lock = threading.Lock()
        self._failed_stat: tuple | None = None
        self._error: ModelError | None = None

    # -- model state -------------------------------------------------------------------------------------

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self.model_path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def load(self) -> _Model:
        """The loaded model, loading it now if needed; raises ModelMissing or ModelInvalid."""
        model = self._model
        if model is not None:
            return model
        with self._lock:
            if self._model is not None:
                return self._model
            stat = self._stat()
            if self._error is not None and stat == self._failed_stat:
                raise self._error  # the same file failed before; do not reload it on every request
            try:
                if self._interpreter_class is None:
                    raise ModelMissing(
                        "no TFLite runtime is installed; run `pip install ai-edge-litert` (see requirements.txt)"
                    )
                if stat is None:
                    raise ModelMissing(
                        f"no detection model at {self.model_path}; run `make model` (or `python detect.py --fetch`) "
                        "or point DETECT_MODEL at a .tflite detection model"
                    )
                self._model = _Model(self.model_path, self._interpreter_class, self.pool, self.threads)
            except ModelError as e:
                self._failed_stat, self._error = stat, e
                raise
            self._error = None
            log.info(
                "loaded %s (%s, input %dx%d, %d labels, %d interpreter(s) x %d thread(s))",
                self.model_path, self.runtime, *self._model.size, len(self._model.labels), self.pool, self.threads,
            )
            return self._model

    def fingerprint(self, threshold: float | None = None) -> str:
        """What identifies a detection result: the model file's digest and the threshold."""
        model = self.load()
        return f"{model.sha256[:16]}@{self.threshold if threshold is None else threshold:g}"

    @property
    def ready(self) -> bool:
        try:
            self.load()
        except ModelError:
            return False
        return True

    @property
    def error(self) -> str | None:
        """Why detection is unavailable, or None."""
        try:
            self.load()
        except ModelError as e:
            return str(e)
        return None

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ready": True,
            "model": self.model_path,
            "runtime": self.runtime,
            "threshold": self.threshold,
            "interpreters": self.pool,
            "threads": self.threads,
        }
        try:
            model = self.load()
        except ModelError as e:
            out.update(ready=False, error=str(e))
        else:
            out["input_size"] = list(model.size)
        return out

    # -- detection ---------------------------------------------------------------------------------------

    def detect(self, data: bytes, threshold: float | None = None) -> Result:
        """Decode `data`, run the model and return the detections (see `postprocess`)."""
        model = self.load()
        t0 = time.perf_counter()
        decoded = preprocess(data, model.size, self.max_pixels)
        t1 = time.perf_counter()
        wait, invoke, raw = model.invoke(decoded.pixels)
        t2 = time.perf_counter()
        detections = postprocess(*raw, model.labels, self.threshold if threshold is None else threshold)
        t3 = time.perf_counter()
        timings = {"preprocess": t1 - t0, "wait": wait, "invoke": invoke, "postprocess": t3 - t2}
        return Result(decoded, detections, {k: v * 1000 for k, v in timings.items()})


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def main(argv: Iterable[str] | None = None) -> int:
    import settings

    defaults = settings.load()
    parser = argparse.ArgumentParser(prog="detect.py", description="Detect objects in photos, or fetch a model.")
    parser.add_argument("photos", nargs="*", metavar="PHOTO")
    parser.add_argument("--model", default=defaults.model, help=f"model path [DETECT_MODEL, default {defaults.model}]")
    parser.add_argument("--threshold", type=float, default=defaults.detect_threshold, help="minimum confidence")
    parser.add_argument(
        "--fetch", nargs="?", const=DEFAULT_MODEL, choices=sorted(MODELS), metavar="NAME",
        help=f"download a known model ({', '.join(sorted(MODELS))}; default {DEFAULT_MODEL}) into --models-dir",
    )
    parser.add_argument("--models-dir", default="models", help="where --fetch saves models (default: models)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.fetch:
        try:
            path = fetch_model(MODELS[args.fetch], args.models_dir)
        except ModelFetchError as e:
            log.error("%s", e)
            return 1
        print(path)
        return 0
    if not args.photos:
        parser.error("name at least one PHOTO, or --fetch")

    detector = Detector(args.model, threshold=args.threshold, threads=defaults.detect_threads, pool=1)
    status = 0
    for photo in args.photos:
        try:
            with open(photo, "rb") as f:
                data = f.read()
            t = time.perf_counter()
            result = detector.detect(data)
            ms = (time.perf_counter() - t) * 1000
        except ModelError as e:
            log.error("%s", e)
            return 2
        except (DetectError, OSError) as e:
            print(json.dumps({"file": photo, "error": str(e)}), flush=True)
            status = 1
            continue
        line = {"file": photo, "detections": [d.to_dict() for d in result.detections], "ms": round(ms, 1)}
        print(json.dumps(line), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
