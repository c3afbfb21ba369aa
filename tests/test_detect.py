"""detect.py with the real model on real photos, hostile bytes, both output layouts, model fetching."""

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

import detect
import imaging
from helpers import peak_rss_mb, reset_peak_rss, rss_mb
from loopback import Loopback, dropped, ok, status

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def labels_found(result):
    return {d.label for d in result.detections}


# --------------------------------------------------------------------------------------------------------
# Real model, real photos
# --------------------------------------------------------------------------------------------------------


def test_every_photo_finds_what_expected_json_says(detector, photo, expected):
    assert expected["threshold"] == detector.threshold
    for name, want in expected["images"].items():
        result = detector.detect(photo(name))
        found = labels_found(result)
        assert set(want["must"]) <= found, (name, found)
        assert not set(want.get("must_not", [])) & found, (name, found)
        if want.get("nothing"):
            assert result.detections == [], name
        for label, seen in want.get("seen", {}).items():
            if label in want["must"]:
                best = max(d.confidence for d in result.detections if d.label == label)
                assert best == pytest.approx(max(seen), abs=0.05), (name, label)


def test_detections_are_sorted_thresholded_and_normalised(detector, photo):
    result = detector.detect(photo("kite_and_cold.jpg"))
    confidences = [d.confidence for d in result.detections]
    assert len(confidences) >= 5
    assert confidences == sorted(confidences, reverse=True)
    assert min(confidences) >= 0.5
    for d in result.detections:
        b = d.box
        assert 0.0 <= b.x_min < b.x_max <= 1.0 and 0.0 <= b.y_min < b.y_max <= 1.0
        assert d.label != "???"


def test_a_lower_threshold_finds_more(detector, photo):
    strict = detector.detect(photo("table.jpg"))
    loose = detector.detect(photo("table.jpg"), threshold=0.3)
    assert strict.detections == []
    assert len(loose.detections) >= 2 and min(d.confidence for d in loose.detections) >= 0.3


def test_decoded_metadata(detector, photo):
    result = detector.detect(photo("cat_1080p.jpg"))
    assert (result.decoded.format, result.decoded.content_type) == ("JPEG", "image/jpeg")
    assert (result.decoded.width, result.decoded.height) == (1920, 1080)
    assert set(result.timings) == {"preprocess", "wait", "invoke", "postprocess"}
    bmp = detector.detect(photo("cat.bmp")).decoded
    assert bmp.content_type == "image/bmp"


def _jpeg(img: Image.Image, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _match(a, b, tol=0.06):
    """Each detection of `a` has one in `b` with the same label and a box within `tol`."""
    for d in a:
        assert any(
            e.label == d.label
            and all(abs(getattr(d.box, k) - getattr(e.box, k)) <= tol for k in ("x_min", "y_min", "x_max", "y_max"))
            for e in b
        ), (d, b)


def test_exif_orientation_6_gives_boxes_in_the_displayed_frame(detector, photo):
    upright = Image.open(io.BytesIO(photo("pets.jpg"))).convert("RGB")
    reference = detector.detect(_jpeg(upright)).detections
    assert [d.label for d in reference] == ["dog", "dog"]
    # Stored rotated 90 degrees counter-clockwise with orientation 6 ("rotate 90 CW to display"): a viewer
    # shows the upright photo, so the boxes must be the upright ones.
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    tagged = detector.detect(_jpeg(stored, orientation=6))
    assert (tagged.decoded.width, tagged.decoded.height) == upright.size
    _match(reference, tagged.detections)
    _match(tagged.detections, reference)
    # Without the tag the same pixels are sideways, and the boxes are elsewhere: the check above can fail.
    untagged = detector.detect(_jpeg(stored)).detections
    assert (untagged == []) or any(
        abs(d.box.x_min - r.box.x_min) > 0.1 for d in untagged for r in reference
    )


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_any_pixel_mode_is_converted(detector, photo, mode):
    img = Image.open(io.BytesIO(photo("pets.jpg"))).convert("RGB")
    fmt = {"CMYK": "JPEG", "L": "JPEG"}.get(mode, "PNG")
    buf = io.BytesIO()
    img.convert(mode).save(buf, fmt)
    result = detector.detect(buf.getvalue())
    if mode in ("RGBA", "P", "CMYK"):
        assert "dog" in labels_found(result)


def test_animated_gif_uses_the_first_frame(detector, photo):
    first = Image.open(io.BytesIO(photo("pets.jpg"))).convert("RGB").resize((400, 300))
    blank = Image.new("RGB", first.size, "white")
    buf = io.BytesIO()
    first.save(buf, "GIF", save_all=True, append_images=[blank, blank], duration=100)
    assert "dog" in labels_found(detector.detect(buf.getvalue()))
    buf = io.BytesIO()
    blank.save(buf, "GIF", save_all=True, append_images=[first], duration=100)
    assert detector.detect(buf.getvalue()).detections == []


def test_webp_is_accepted(detector, photo):
    buf = io.BytesIO()
    Image.open(io.BytesIO(photo("pets.jpg"))).save(buf, "WEBP", quality=90)
    result = detector.detect(buf.getvalue())
    assert result.decoded.content_type == "image/webp" and "dog" in labels_found(result)


# --------------------------------------------------------------------------------------------------------
# Bad input: typed errors, small memory
# --------------------------------------------------------------------------------------------------------


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels; its data is one compressed row of zeros."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + 3 * width), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "data, error",
    [
        (b"", imaging.NotAnImage),
        (os.urandom(4096), imaging.NotAnImage),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", imaging.UnsupportedFormat),
        (b"\xc5\xd0\xd3\xc6" + b"\x00" * 64, imaging.UnsupportedFormat),
        (b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n", imaging.UnsupportedFormat),
        (b"II*\x00\x08\x00\x00\x00" + b"\x00" * 64, imaging.UnsupportedFormat),
        (b"MM\x00*\x00\x00\x00\x08" + b"\x00" * 64, imaging.UnsupportedFormat),
        (b"8BPS\x00\x01" + b"\x00" * 64, imaging.UnsupportedFormat),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", imaging.UnsupportedFormat),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", imaging.UnsupportedFormat),
    ],
    ids=["empty", "random", "eps", "eps-binary", "pdf", "tiff-le", "tiff-be", "psd", "heic", "svg"],
)
def test_bytes_that_are_not_an_allowed_image(detector, data, error):
    with pytest.raises(error) as e:
        detector.detect(data)
    assert "JPEG" in str(e.value)  # the message says what to send instead


def test_a_real_tiff_is_refused_by_name(detector, photo):
    buf = io.BytesIO()
    Image.open(io.BytesIO(photo("pets.jpg"))).save(buf, "TIFF")
    with pytest.raises(imaging.UnsupportedFormat, match="TIFF"):
        detector.detect(buf.getvalue())


def test_truncated_jpeg(detector, photo):
    data = photo("cat_1080p.jpg")
    with pytest.raises(imaging.NotAnImage, match="truncated or corrupt"):
        detector.detect(data[: len(data) // 2])


def test_decompression_bomb_is_refused_without_decoding(detector):
    bomb = _png_header_only(30000, 30000)
    assert len(bomb) < 200_000
    reset_peak_rss()
    before = rss_mb()
    with pytest.raises(imaging.TooManyPixels, match="limit is 50,000,000 pixels"):
        detector.detect(bomb)
    with pytest.raises(imaging.TooManyPixels, match="8000x8000"):  # under Pillow's own guard: ours says the size
        detector.detect(_png_header_only(8000, 8000))
    # Decoding it would need 2.7 GB; refusing it must not grow the process by more than a few MB.
    assert peak_rss_mb() - before < 50


def test_pixel_limit_is_a_parameter(model_path, photo):
    small = detect.Detector(model_path, threads=1, pool=1, max_pixels=1000 * 1000)
    with pytest.raises(imaging.TooManyPixels, match="1920x1080"):
        small.detect(photo("cat_1080p.jpg"))


# --------------------------------------------------------------------------------------------------------
# Postprocessing by hand
# --------------------------------------------------------------------------------------------------------

LABELS = ["person", "bicycle", "???", "dog"]


def test_postprocess_thresholds_sorts_clamps_and_drops_unknown_ids():
    boxes = np.array([[[0.1, 0.2, 0.5, 0.6], [-0.2, 0.0, 1.3, 0.5], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]])
    classes = np.array([[0, 3, 2, 7, 1, 1]], dtype=np.float32)
    scores = np.array([[0.6, 0.9, 0.95, 0.99, 0.49, np.nan]], dtype=np.float32)
    out = detect.postprocess(boxes, classes, scores, np.array([6.0]), LABELS, 0.5)
    assert [(d.label, d.confidence) for d in out] == [("dog", 0.9), ("person", 0.6)]
    assert out[0].box == detect.Box(0.0, 0.0, 0.5, 1.0)  # clamped, x from column 1, y from column 0
    assert out[1].box == detect.Box(0.2, 0.1, 0.6, 0.5)
    assert out[0].to_dict() == {"label": "dog", "confidence": 0.9, "box": {"x_min": 0.0, "y_min": 0.0, "x_max": 0.5, "y_max": 1.0}}


def test_postprocess_respects_count():
    boxes = np.zeros((1, 3, 4)) + [0, 0, 1, 1]
    out = detect.postprocess(boxes, np.array([[0, 0, 0]]), np.array([[0.9, 0.8, 0.7]]), np.array([2.0]), LABELS, 0.5)
    assert len(out) == 2


# --------------------------------------------------------------------------------------------------------
# Output layouts: mapped by what they are, never by position
# --------------------------------------------------------------------------------------------------------


class FakeEfficientDet:
    """Reports EfficientDet-Lite0's layout: outputs listed as scores, boxes, count, classes."""

    with_ops = True
    # tensor index of each output, deliberately not in the op's order
    SCORES, BOXES, COUNT, CLASSES = 600, 601, 602, 603

    def __init__(self, model_path, num_threads=1):
        self.inputs = None

    def allocate_tensors(self):
        pass

    def get_input_details(self):
        return [{"index": 0, "shape": np.array([1, 320, 320, 3]), "dtype": np.uint8, "name": "serving_default_images:0"}]

    def get_output_details(self):
        return [
            {"index": self.SCORES, "name": "StatefulPartitionedCall:1", "shape": np.array([1, 25])},
            {"index": self.BOXES, "name": "StatefulPartitionedCall:3", "shape": np.array([1, 25, 4])},
            {"index": self.COUNT, "name": "StatefulPartitionedCall:0", "shape": np.array([1])},
            {"index": self.CLASSES, "name": "StatefulPartitionedCall:2", "shape": np.array([1, 25])},
        ]

    def _get_ops_details(self):
        return [
            {"op_name": "CONV_2D", "outputs": np.array([5])},
            {
                "op_name": "TFLite_Detection_PostProcess",
                "outputs": np.array([self.BOXES, self.CLASSES, self.SCORES, self.COUNT]),
            },
        ]

    def set_tensor(self, index, value):
        assert value.shape == (1, 320, 320, 3) and value.dtype == np.uint8
        self.inputs = value

    def invoke(self):
        pass

    def get_tensor(self, index):
        return {
            self.SCORES: np.array([[0.9, 0.7] + [0.0] * 23], dtype=np.float32),
            self.BOXES: np.array([[[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 0.8]] + [[0, 0, 0, 0]] * 23], dtype=np.float32),
            self.COUNT: np.array([2.0], dtype=np.float32),
            self.CLASSES: np.array([[17, 0] + [0] * 23], dtype=np.float32),
        }[index]


class FakeNamedOutputs(FakeEfficientDet):
    """A runtime without op details: outputs carry the metadata's tensor names instead."""

    def get_output_details(self):
        names = {self.SCORES: "detection_scores", self.BOXES: "detection_boxes", self.COUNT: "num_detections", self.CLASSES: "detection_classes"}
        return [{**d, "name": names[d["index"]]} for d in super().get_output_details()]

    _get_ops_details = None


@pytest.mark.parametrize("fake", [FakeEfficientDet, FakeNamedOutputs])
def test_efficientdet_output_layout_is_mapped_by_role(model_path, photo, fake):
    d = detect.Detector(model_path, threads=1, pool=1, interpreter_class=fake)
    result = d.detect(photo("pets.jpg"))
    assert [(x.label, x.confidence) for x in result.detections] == [("dog", 0.9), ("person", 0.7)]
    assert result.detections[0].box == detect.Box(0.2, 0.1, 0.4, 0.3)


def test_real_ssd_layout_is_boxes_classes_scores_count(detector):
    model = detector.load()
    it = model.interpreters.get()
    try:
        positions = [d["index"] for d in it.get_output_details()]
    finally:
        model.interpreters.put(it)
    assert [model.roles[r] for r in ("boxes", "classes", "scores", "count")] == positions


def test_a_model_without_the_postprocess_op_is_invalid(model_path, photo):
    class NoPostProcess(FakeNamedOutputs):
        def get_output_details(self):
            return [{"index": 1, "name": "logits", "shape": np.array([1, 1001])}]

    d = detect.Detector(model_path, threads=1, pool=1, interpreter_class=NoPostProcess)
    with pytest.raises(detect.ModelInvalid, match="TFLite_Detection_PostProcess"):
        d.detect(photo("pets.jpg"))


# --------------------------------------------------------------------------------------------------------
# Model files: missing, invalid, labels, appearing later
# --------------------------------------------------------------------------------------------------------


def _strip_labels(model_path: str, dest) -> None:
    """The model's flatbuffer without the zip appended to it (so it has no labelmap.txt)."""
    data = open(model_path, "rb").read()
    dest.write_bytes(data[: data.index(b"PK\x03\x04")])


def test_missing_model_then_it_appears(tmp_path, model_path, photo):
    path = tmp_path / "model.tflite"
    d = detect.Detector(str(path), threads=1, pool=1)
    assert not d.ready
    with pytest.raises(detect.ModelMissing, match="make model"):
        d.detect(photo("pets.jpg"))
    assert "make model" in d.info()["error"]
    shutil.copy(model_path, path)
    assert d.ready  # no restart needed
    assert "dog" in labels_found(d.detect(photo("pets.jpg")))


def test_garbage_model_is_invalid(tmp_path, photo):
    path = tmp_path / "model.tflite"
    path.write_bytes(b"not a model" * 100)
    d = detect.Detector(str(path), threads=1, pool=1)
    with pytest.raises(detect.ModelInvalid):
        d.detect(photo("pets.jpg"))
    assert d.info()["ready"] is False


def test_labels_beside_the_model_win_and_no_labels_is_an_error(tmp_path, model_path, photo):
    bare = tmp_path / "bare.tflite"
    _strip_labels(model_path, bare)
    with pytest.raises(detect.ModelInvalid, match="labelmap.txt"):
        detect.Detector(str(bare), threads=1, pool=1).detect(photo("pets.jpg"))
    labels = detect.load_labels(model_path)
    labels[17] = "hound"
    (tmp_path / "bare.labels.txt").write_text("\n".join(labels) + "\n")
    d = detect.Detector(str(bare), threads=1, pool=1)
    assert labels_found(d.detect(photo("pets.jpg"))) == {"hound"}


def test_labels_come_from_the_model_zip(model_path):
    labels = detect.load_labels(model_path)
    assert (len(labels), labels[0], labels[16], labels[17], labels[11]) == (90, "person", "cat", "dog", "???")


# --------------------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------------------


def test_concurrent_callers_get_the_same_answers_as_one(detector, photo):
    names = ["pets.jpg", "cat.bmp", "coupleanddog.jpeg", "traffic_0001.bmp"]
    want = {n: detector.detect(photo(n)).detections for n in names}
    got, errors = {}, []

    def work(name):
        try:
            for _ in range(5):
                got.setdefault(name, []).append(detector.detect(photo(name)).detections)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert not errors
    for name in names:
        assert got[name] == [want[name]] * 5


# --------------------------------------------------------------------------------------------------------
# Fetching models
# --------------------------------------------------------------------------------------------------------


def _entry(url: str, body: bytes) -> detect.KnownModel:
    return detect.KnownModel("test", url, hashlib.sha256(body).hexdigest(), "test.tflite")


def test_fetch_model_saves_a_checked_file(tmp_path):
    body = os.urandom(300_000)
    with Loopback({"/m": ok(body)}) as srv:
        path = detect.fetch_model(_entry(srv.url("/m"), body), str(tmp_path / "models"))
    assert open(path, "rb").read() == body
    assert os.listdir(tmp_path / "models") == ["test.tflite"]


def test_fetch_model_wrong_sha256_leaves_nothing(tmp_path):
    body = os.urandom(1000)
    with Loopback({"/m": ok(body + b"x")}) as srv:
        with pytest.raises(detect.ModelFetchError, match="sha256"):
            detect.fetch_model(_entry(srv.url("/m"), body), str(tmp_path))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("route", [dropped(b"x" * 10_000, claimed=100_000), status(404)], ids=["dropped", "404"])
def test_fetch_model_failures_leave_nothing(tmp_path, route):
    with Loopback({"/m": route}) as srv:
        with pytest.raises(detect.ModelFetchError):
            detect.fetch_model(_entry(srv.url("/m"), b""), str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_fetch_model_keeps_an_existing_model_when_the_download_fails(tmp_path):
    (tmp_path / "test.tflite").write_bytes(b"old")
    with Loopback({"/m": status(500)}) as srv:
        with pytest.raises(detect.ModelFetchError):
            detect.fetch_model(_entry(srv.url("/m"), b"new"), str(tmp_path))
    assert (tmp_path / "test.tflite").read_bytes() == b"old"


def test_known_models():
    assert detect.DEFAULT_MODEL == "efficientdet_lite0"
    assert detect.MODELS["efficientdet_lite0"].sha256.startswith("dee1b4af")
    assert detect.MODELS["ssd_mobilenet_v1"].sha256.startswith("61d59809")


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------


def test_cli_prints_one_json_line_per_photo(model_path, images_dir):
    photos = [os.path.join(images_dir, n) for n in ("pets.jpg", "dragonfly.bmp")]
    out = subprocess.run(
        [sys.executable, "detect.py", "--model", model_path, *photos],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    ).stdout.splitlines()
    lines = [json.loads(line) for line in out]
    assert [line["file"] for line in lines] == photos
    assert {d["label"] for d in lines[0]["detections"]} == {"dog"}
    assert set(lines[0]["detections"][0]["box"]) == {"x_min", "y_min", "x_max", "y_max"}
    assert lines[1]["detections"] == [] and lines[1]["ms"] > 0


def test_cli_without_a_model_says_how_to_get_one(tmp_path, images_dir):
    proc = subprocess.run(
        [sys.executable, "detect.py", "--model", str(tmp_path / "none.tflite"), os.path.join(images_dir, "pets.jpg")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "make model" in proc.stderr and proc.stdout == ""


# --------------------------------------------------------------------------------------------------------
# The model file changes under a running detector
# --------------------------------------------------------------------------------------------------------


def _relabelled(model_path: str, dest, rename: dict[str, str]) -> None:
    """The same network with another labelmap.txt appended: a different file that loads, with other names."""
    import zipfile

    labels = detect.load_labels(model_path)
    _strip_labels(model_path, dest)
    with zipfile.ZipFile(dest, "a") as z:
        z.writestr("labelmap.txt", "\n".join(rename.get(label, label) for label in labels) + "\n")


def _replace(path, write) -> None:
    """Write the new file beside `path` and rename it over (as `make model` does), with a new mtime."""
    tmp = path.with_name(path.name + ".new")
    write(tmp)
    st = os.stat(path)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    os.replace(tmp, path)


def test_a_changed_model_file_is_loaded_again(tmp_path, model_path, photo):
    path = tmp_path / "model.tflite"
    shutil.copy(model_path, path)
    d = detect.Detector(str(path), threads=1, pool=1)
    first = d.detect(photo("pets.jpg"))
    assert "dog" in labels_found(first)
    _replace(path, lambda p: _relabelled(model_path, p, {"dog": "hound"}))
    second = d.detect(photo("pets.jpg"))
    assert "hound" in labels_found(second) and "dog" not in labels_found(second)
    assert second.fingerprint != first.fingerprint  # cached detections of the old model are not reused
    assert "error" not in d.info()


def test_detections_under_way_finish_on_the_old_model(tmp_path, model_path, photo):
    from ai_edge_litert.interpreter import Interpreter

    entered, release = threading.Event(), threading.Event()

    class Held(Interpreter):
        """The real interpreter; invoke() waits while the test holds it."""

        def invoke(self):
            if not release.is_set():
                entered.set()
                assert release.wait(10)
            return super().invoke()

    path = tmp_path / "model.tflite"
    shutil.copy(model_path, path)
    d = detect.Detector(str(path), threads=1, pool=1, interpreter_class=Held)
    d.load()
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("old", d.detect(photo("pets.jpg"))))
    t.start()
    assert entered.wait(10)  # a detection is inside the old model's interpreter
    _replace(path, lambda p: _relabelled(model_path, p, {"dog": "hound"}))
    release.set()
    new = d.detect(photo("pets.jpg"))  # loads the new file meanwhile
    t.join(10)
    assert "dog" in labels_found(out["old"]) and "hound" in labels_found(new)


def test_a_changed_file_that_fails_to_load_leaves_the_good_model_serving(tmp_path, model_path, photo):
    path = tmp_path / "model.tflite"
    shutil.copy(model_path, path)
    d = detect.Detector(str(path), threads=1, pool=1)
    assert "dog" in labels_found(d.detect(photo("pets.jpg")))
    _replace(path, lambda p: p.write_bytes(b"half a model" * 100))
    assert "dog" in labels_found(d.detect(photo("pets.jpg")))  # still the last good model
    info = d.info()
    assert info["ready"] is True and "labelmap.txt" in info["error"] and "still serving" in info["error"]
    _replace(path, lambda p: shutil.copy(model_path, p))  # fixed: the error goes
    assert "dog" in labels_found(d.detect(photo("pets.jpg")))
    assert "error" not in d.info()


def test_a_deleted_model_file_leaves_the_loaded_model_serving(tmp_path, model_path, photo):
    path = tmp_path / "model.tflite"
    shutil.copy(model_path, path)
    d = detect.Detector(str(path), threads=1, pool=1)
    d.load()
    os.unlink(path)
    assert "dog" in labels_found(d.detect(photo("pets.jpg")))
    info = d.info()
    assert info["ready"] is True and "is gone" in info["error"]


def test_the_runtime_prints_nothing_raw_on_stderr(model_path, images_dir):
    """LiteRT writes "INFO: Created TensorFlow Lite XNNPACK delegate" to fd 2 itself; it goes to the log at
    DEBUG instead, and other stderr output around it still arrives."""
    out = subprocess.run(
        [sys.executable, "detect.py", "--model", model_path, os.path.join(images_dir, "pets.jpg")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "XNNPACK" not in out.stderr and "loaded" in out.stderr


@pytest.mark.parametrize("cores", [1, 2, 3, 4, 8, 16, 64])
def test_the_default_layout_never_runs_away(cores):
    pool, threads = detect.default_layout(cores)
    assert pool * threads <= 2 * cores and 1 <= threads <= 4 and 1 <= pool <= 8
    if cores == 2:
        assert (pool, threads) == (2, 2)  # the layout measured best on 2 cores


def test_the_detector_follows_the_cores_it_may_use(model_path):
    d = detect.Detector(model_path)
    assert (d.pool, d.threads) == detect.default_layout(detect.usable_cores())
