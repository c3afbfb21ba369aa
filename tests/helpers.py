"""Small helpers shared by the test files (fixtures live in conftest.py)."""

import base64
import io
import re
import time
from http import HTTPStatus

from PIL import Image

PROBLEM_KEYS = {"type", "title", "status", "detail"}
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def wait_for(predicate, timeout: float = 10.0) -> None:
    """Until `predicate()` holds (the state of real parts in other threads), failing after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the condition")
        time.sleep(0.005)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def jpeg(color=(200, 30, 30), size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def assert_problem(res, code: int, members: tuple[str, ...] = ()) -> str:
    """`res` is an RFC 9457 problem with status `code` and no traceback, with exactly the extension
    `members` beside the four standard ones; returns its detail."""
    assert res.status_int == code, res.text[:500]
    assert res.content_type == "application/problem+json", res.headers
    body = res.json
    assert set(body) == PROBLEM_KEYS | set(members), body
    assert body["status"] == code and body["type"] == "about:blank" and body["title"] == HTTPStatus(code).phrase
    assert isinstance(body["detail"], str) and body["detail"].strip()
    assert "Traceback" not in res.text and 'File "' not in res.text
    return body["detail"]


def _status_kb(key: str, pid: str = "self") -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


def reset_peak_rss(pid: str = "self") -> None:
    """Start a new peak: VmHWM drops to the current RSS (Linux `clear_refs` 5). Skips where /proc is not."""
    import pytest

    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError as e:
        pytest.skip(f"cannot reset the peak RSS here ({e}); this check needs Linux /proc")


def peak_rss_mb(pid: str = "self") -> float:
    """The peak RSS (VmHWM) since the last reset_peak_rss, in MB."""
    return _status_kb("VmHWM", pid) / 1024


def rss_mb(pid: str = "self") -> float:
    """The RSS now (VmRSS), in MB."""
    return _status_kb("VmRSS", pid) / 1024


def make_certificate(folder, subject_alt_name: str):
    """A self-signed certificate and key in `folder` for `subject_alt_name` ("DNS:host" or "IP:addr"):
    (cert path, key path). Skips the test where openssl is missing or fails."""
    import shutil
    import subprocess

    import pytest

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl command not available to make a test certificate")
    cert, key = folder / "cert.pem", folder / "key.pem"
    name = subject_alt_name.split(":", 1)[1]
    result = subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
            "-addext", f"subjectAltName={subject_alt_name}",
        ],
        capture_output=True,
        timeout=30,
    )
    if result.returncode != 0:
        pytest.skip(f"openssl could not make a certificate: {result.stderr.decode(errors='replace')}")
    return cert, key
