"""On-device object detection with a TFLite detection model (EfficientDet-Lite0 by default).

Two layers, as in Frigate's detectors: `Detector` turns image bytes into the four raw arrays of the
model's TFLite_Detection_PostProcess op; `postprocess()` is a pure function that turns those arrays into
labelled, thresholded, sorted boxes, so it can be fed by hand in tests.

Runtime: LiteRT (`ai-edge-litert`), falling back to `tflite_runtime` when LiteRT is not installed.
Decoding pixels is imaging.py's; this module owns the model: the known-model table and `fetch_model`,
labels, output roles, the interpreter pool, `postprocess` and `Detector`. It never imports Bottle; it
raises the typed errors below and server.py maps them to HTTP.

Command line:
    python detect.py [--model PATH] PHOTO...     one JSON line per photo
    python detect.py --fetch [NAME]              download a known model into models/
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import queue
import re
import sys
import tempfile
import threading
import time
import urllib.request
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

import imaging

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


class DetectError(Exception):
    """Base of every error this module raises; the message says what was wrong and what to do."""


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
        from importlib.metadata import version

        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, f"ai-edge-litert {version('ai-edge-litert')}"
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        from tflite_runtime.interpreter import Interpreter

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
                roles = dict(zip(_OUTPUT_ROLES, (int(i) for i in op["outputs"]), strict=True))
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
        score = round(float(scores[i]), 4)  # what is shown, so a detection shown at 0.7383 is kept at 0.7383
        if not score >= threshold:  # also drops NaN
            continue
        class_id = int(classes[i])
        if not 0 <= class_id < len(labels) or labels[class_id] in ("", "???"):
            continue
        y0, x0, y1, x1 = (min(max(float(v), 0.0), 1.0) for v in boxes[i])
        box = Box(round(min(x0, x1), 4), round(min(y0, y1), 4), round(max(x0, x1), 4), round(max(y0, y1), 4))
        found.append(Detection(labels[class_id], score, box))
    found.sort(key=lambda d: d.confidence, reverse=True)
    return found


# ---------------------------------------------------------------------------------------------------------
# The detector
# ---------------------------------------------------------------------------------------------------------


# The lowest confidence the detector reports as a candidate, whatever threshold a caller asks for: each
# caller filters the candidates at its own (POST /images at DETECT_THRESHOLD, /v1/vision/* at the request's
# min_confidence). Below it a model's anchors are noise, and min_confidence=0 would return every one.
CANDIDATE_FLOOR = 0.05


@dataclass
class Result:
    decoded: imaging.Decoded
    detections: list[Detection]  # at the threshold asked for (the detector's by default)
    timings: dict[str, float]  # milliseconds: preprocess, wait, invoke, postprocess
    fingerprint: str  # the model and threshold that produced `detections` (Detector.fingerprint)
    candidates: list[Detection] = field(default_factory=list)  # down to CANDIDATE_FLOOR, same order
    model_name: str | None = None  # the model file's stem (Detector.model_name), for people

    def above(self, min_confidence: float) -> list[Detection]:
        """The candidates at or above `min_confidence` (never below CANDIDATE_FLOOR), highest first."""
        return [d for d in self.candidates if d.confidence >= min_confidence]


_STDERR_LOCK = threading.Lock()
_CHATTER = re.compile(rb"^INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.\s*$")


@contextlib.contextmanager
def _runtime_chatter_to_log():
    """LiteRT's C++ core prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." straight to
    file descriptor 2 on its first allocate_tensors, outside Python's logging; there is no switch for it
    in the Python API. For that call, fd 2 goes to a temporary file; afterwards that line is logged at
    DEBUG and anything else written meanwhile (by any thread) is written back to stderr unchanged."""
    with _STDERR_LOCK:
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all: nothing to tidy
            yield
            return
        with tempfile.TemporaryFile() as capture:
            sys.stderr.flush()
            os.dup2(capture.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                capture.seek(0)
                for line in capture.read().splitlines(keepends=True):
                    if _CHATTER.match(line):
                        log.debug("%s", line.decode("utf-8", "replace").strip())
                    else:
                        os.write(2, line)


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
                with _runtime_chatter_to_log():
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


MAX_THREADS_PER_INTERPRETER = 4  # XNNPACK on a small model gains little past 4 (Pi figures are at 4)
MAX_INTERPRETERS = 8


def usable_cores() -> int:
    """The cores this process may run on (taskset, cgroups), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_layout(cores: int) -> tuple[int, int]:
    """(interpreters, threads each) for `cores`: min(cores, 4) threads each, and as many interpreters as
    keep all of them within 2 x cores (at most 8).

    Measured at 1 and 2 cores only (bench/detect.py --layouts under taskset, README): at 1 core every
    layout served within noise of 1 x 1; at 2 cores 2 x 2 was among the best for one caller and for two,
    and 4 x 4 (16 threads) was no clear loss. Past 2 cores it is reasoned, not measured: the old N x N
    default made 16 x 16 = 256 threads (and 16 interpreters' memory) on a 16-core laptop; this keeps
    threads and interpreters bounded by the cores.
    """
    threads = max(1, min(cores, MAX_THREADS_PER_INTERPRETER))
    return max(1, min(MAX_INTERPRETERS, 2 * cores // threads)), threads


class Detector:
    """Detects objects in image bytes. Safe to call from many threads.

    `pool` interpreters of `threads` CPU threads each serve concurrent callers; while none is free a
    caller waits. The model is loaded on first use and again whenever the file appears or changes (its
    size or mtime), so a server started without a model starts detecting once `make model` has put one
    in place, and a better model dropped over the old one is picked up without a restart:
    - a changed file that loads replaces the model; detections under way finish on the old one;
    - a changed file that fails to load leaves the last good model serving, and `info()` shows why;
    - a deleted file leaves the loaded model serving, and `info()` says the file is gone.

    Decoding reserves its memory from `budget` (imaging.DecodeBudget) first, so concurrent detections
    of large images wait for each other instead of holding all their pixels at once.
    """

    def __init__(
        self,
        model_path: str,
        *,
        threshold: float = 0.5,
        threads: int | None = None,
        pool: int | None = None,
        max_pixels: int = imaging.MAX_PIXELS,
        budget: imaging.DecodeBudget | None = None,
        interpreter_class: Any = None,
        observe: Callable[[str, dict[str, float]], None] | None = None,
    ):
        """`observe(model_name, timings_ms)`: told of each detection once it is done (metrics.DetectionTimes),
        with the model file's stem and Result.timings plus `total`."""
        self.model_path = model_path
        self.observe = observe
        self.threshold = threshold
        _, default_threads = default_layout(usable_cores())
        self.threads = threads or default_threads
        # Every interpreter's threads together stay within 2 x cores (default_layout's rule).
        self.pool = pool or max(1, min(MAX_INTERPRETERS, 2 * usable_cores() // self.threads))
        self.max_pixels = max_pixels
        # The process's decode budget (server.build_parts makes one for all); a Detector of its own has one.
        self.budget = budget if budget is not None else imaging.DecodeBudget()
        if interpreter_class is None:
            interpreter_class, self.runtime = _load_runtime()
        else:
            self.runtime = getattr(interpreter_class, "__module__", "custom")
        self._interpreter_class = interpreter_class
        self._model: _Model | None = None
        self._model_stat: tuple | None = None  # the file's (mtime, size) when _model was loaded from it
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
        """The model to use now, (re)loading the file if it appeared or changed.

        Raises ModelMissing or ModelInvalid only when there is no good model at all.
        """
        stat = self._stat()
        model = self._model
        if model is not None and (stat == self._model_stat or stat is None or stat == self._failed_stat):
            return model  # unchanged; or gone / known bad, and the last good model keeps serving
        with self._lock:
            model = self._model
            if model is not None and (stat == self._model_stat or stat is None or stat == self._failed_stat):
                return model
            if self._error is not None and stat == self._failed_stat:
                raise self._error  # the same file failed before; do not reload it on every request
            try:
                if self._interpreter_class is None:
                    raise ModelMissing(
                        "no TFLite runtime is installed; run `pip install ai-edge-litert` (see requirements.txt)"
                    )
                if stat is None:
                    raise ModelMissing(
                        f"no detection model at {self.model_path}; run `make model` (or `.venv/bin/python detect.py --fetch` in this folder) "
                        "or point DETECT_MODEL at a .tflite detection model"
                    )
                loaded = _Model(self.model_path, self._interpreter_class, self.pool, self.threads)
            except ModelError as e:
                self._failed_stat, self._error = stat, e
                if model is None:
                    raise
                log.error("%s changed but cannot be used (%s); still serving the model loaded before", self.model_path, e)
                return model
            self._model, self._model_stat = loaded, stat
            self._error = self._failed_stat = None
            log.info(
                "%s %s (%s, input %dx%d, %d labels, %d interpreter(s) x %d thread(s))",
                "reloaded" if model is not None else "loaded", self.model_path, self.runtime, *loaded.size,
                len(loaded.labels), self.pool, self.threads,
            )
            return loaded

    @property
    def model_name(self) -> str:
        """The model file's name without `.tflite`: what people call the model (the API's `model_name`)."""
        return os.path.splitext(os.path.basename(self.model_path))[0]

    def fingerprint(self, threshold: float | None = None) -> str:
        """What identifies a detection result: the model file's digest and the threshold."""
        return _fingerprint(self.load(), self.threshold if threshold is None else threshold)

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
        name = os.path.basename(self.model_path)
        out: dict[str, Any] = {
            "ready": True,
            "model": name,  # the file name: where it lives on this machine is nobody else's business
            "runtime": self.runtime,
            "threshold": self.threshold,
            "interpreters": self.pool,
            "threads": self.threads,
        }
        try:
            model = self.load()
        except ModelError as e:
            out.update(ready=False, error=str(e).replace(self.model_path, name))  # the log has the full path
            return out
        out["input_size"] = list(model.size)
        if self._stat() is None:
            out["error"] = f"the model file {name} is gone; still serving the model loaded before"
        elif self._error is not None:
            out["error"] = f"{str(self._error).replace(self.model_path, name)} (still serving the model loaded before)"
        return out

    # -- detection ---------------------------------------------------------------------------------------

    def detect(
        self, data: bytes, threshold: float | None = None, budget: imaging.DecodeBudget | None = None
    ) -> Result:
        """Decode `data`, run the model and return the detections (see `postprocess`).

        `budget`: the decode budget to reserve from, when not the detector's own (Ingest passes the
        service's). Raises imaging's errors, DecodeBusy and TooLargeToDecode included.
        """
        model = self.load()  # this call's model, even if the file is replaced meanwhile
        threshold = self.threshold if threshold is None else threshold
        t0 = time.perf_counter()
        decoded = imaging.preprocess(data, model.size, self.max_pixels, budget or self.budget)
        t1 = time.perf_counter()
        wait, invoke, raw = model.invoke(decoded.pixels)
        t2 = time.perf_counter()
        detections = postprocess(*raw, model.labels, threshold)
        candidates = postprocess(*raw, model.labels, CANDIDATE_FLOOR)  # for callers that filter by themselves
        t3 = time.perf_counter()
        timings = {"preprocess": t1 - t0, "wait": wait, "invoke": invoke, "postprocess": t3 - t2}
        timings_ms = {k: v * 1000 for k, v in timings.items()}
        if self.observe is not None:
            self.observe(self.model_name, {**timings_ms, "total": (t3 - t0) * 1000})
        return Result(decoded, detections, timings_ms, _fingerprint(model, threshold), candidates, self.model_name)

    def close(self) -> None:
        """Let go of the loaded model: its interpreters are freed once the detections running on it end
        (each holds its own reference). A later detect() would load the file again."""
        with self._lock:
            self._model = self._model_stat = None


def _fingerprint(model: _Model, threshold: float) -> str:
    """`<the model's sha256, 16 digits>@<the threshold>`: the threshold exactly (0.5 as "0.5", as :g wrote
    it; 0.73828126 whole, which :g's six digits would have made 0.738281, another threshold's name)."""
    short = f"{threshold:g}"
    return f"{model.sha256[:16]}@{short if float(short) == threshold else repr(float(threshold))}"


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

    budget = imaging.DecodeBudget(defaults.decode_memory_mb * imaging.MB, defaults.decode_wait_ms / 1000)
    detector = Detector(
        args.model, threshold=args.threshold, threads=defaults.detect_threads or None, pool=1,
        max_pixels=defaults.max_pixels, budget=budget,
    )
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
        except (imaging.ImageError, OSError) as e:
            print(json.dumps({"file": photo, "error": str(e)}), flush=True)
            status = 1
            continue
        line = {"file": photo, "detections": [d.to_dict() for d in result.detections], "ms": round(ms, 1)}
        print(json.dumps(line), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
