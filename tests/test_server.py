"""server.py: the app factory, /health, the one error shape, the real process on a real socket."""

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

import detect
import imaging
import server
import settings
from helpers import assert_problem  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def app(service):
    return service.client





def test_health_with_a_model(app, model_path):
    body = app.get("/health").json
    assert body["status"] == "ok" and body["version"] == server.__version__
    det = body["detector"]
    assert det["ready"] is True and det["model"] == os.path.basename(model_path)  # never where it lives
    assert det["runtime"].startswith("ai-edge-litert ") and det["input_size"] == [300, 300]


def test_health_without_a_model_says_how_to_fix_it(tmp_path, make_service):
    missing = detect.Detector(str(tmp_path / "missing.tflite"), threads=1, pool=1)
    body = make_service(detector=missing).client.get("/health").json
    assert body["status"] == "ok"
    assert body["detector"]["ready"] is False and "make model" in body["detector"]["error"]


def test_health_says_whether_imgur_uploads_are_on(app, make_service):
    import imgur

    assert app.get("/health").json["imgur"] == {"enabled": False}  # no IMGUR_CLIENT_ID
    uploader = imgur.ImgurClient(client_id="test-client", api_url="http://127.0.0.1:9")  # never reached here
    assert make_service(uploader=uploader).client.get("/health").json["imgur"] == {"enabled": True}


def test_unknown_route_is_problem_json(app):
    assert_problem(app.get("/nope", status=404), 404)


def test_wrong_method_is_problem_json(app):
    detail = assert_problem(app.post("/health", status=405), 405)
    assert "GET" in detail


def test_unexpected_error_is_a_500_without_traceback_and_is_logged(service, caplog):
    wsgi = service.wsgi

    @wsgi.get("/boom")
    def boom():
        raise RuntimeError("secret internals")

    res = service.client.get("/boom", status=500)
    detail = assert_problem(res, 500)
    assert "secret" not in res.text and "log" in detail
    assert any(r.exc_info and "secret internals" in str(r.exc_info[1]) for r in caplog.records)


def test_domain_errors_map_to_their_status(service):
    wsgi = service.wsgi
    errors = {
        "/bomb": (imaging.TooManyPixels("too big"), 413),
        "/junk": (imaging.UnsupportedFormat("tiff"), 422),
        "/nomodel": (detect.ModelMissing("run make model"), 503),
    }
    for path, (error, _) in errors.items():
        wsgi.route(path, callback=lambda e=error: (_ for _ in ()).throw(e))
    client = service.client
    for path, (error, status) in errors.items():
        assert assert_problem(client.get(path, status=status), status) == str(error)


# --------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------


def test_flags_win_over_environment_over_defaults():
    env = {"PORT": "9000", "HOST": "0.0.0.0", "DETECT_THRESHOLD": "0.3", "ALLOW_PRIVATE_URLS": "1"}
    s = settings.load(["--port", "9100"], env)
    assert (s.port, s.host, s.detect_threshold, s.allow_private_urls) == (9100, "0.0.0.0", 0.3, True)
    d = settings.load([], {})
    assert (d.port, d.host, d.db, d.model) == (8080, "127.0.0.1", "data/images.db", "models/efficientdet_lite0.tflite")
    assert d.detect_threads == 0 and d.detect_interpreters == 0 and d.max_image_bytes == 20971520  # 0: sized by the cores
    assert d.upload_workers == 4 and d.imgur_api_url == "https://api.imgur.com" and d.allow_private_urls is False


@pytest.mark.parametrize("env", [{"PORT": "eighty"}, {"DETECT_THRESHOLD": "1.5"}, {"UPLOAD_WORKERS": "-1"}, {"ALLOW_PRIVATE_URLS": "maybe"},
                                 {"THUMBNAIL_READ_AHEAD": "1001"}])
def test_bad_settings_name_the_variable(env):
    with pytest.raises(settings.SettingError, match=next(iter(env))):
        settings.load([], env)


def test_secrets_are_not_shown():
    s = settings.load([], {"IMGUR_CLIENT_ID": "abc123", "IMGUR_CLIENT_SECRET": "shh"})
    assert "abc123" not in repr(s) and "shh" not in repr(s)
    assert s.public()["imgur_client_id"] is True and s.public()["imgur_refresh_token"] is False


def test_help_lists_every_setting():
    out = subprocess.run([sys.executable, "server.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for s in settings.SETTINGS:
        assert s.env in out
        if s.flag:
            assert s.flag in out


def test_readme_documents_every_setting_route_and_command(service):
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    for s in settings.SETTINGS:
        assert f"`{s.env}`" in readme, s.env
    for route in service.wsgi.routes:
        rule = re.sub(r"<(\w+)(:[^>]*)?>", r"{\1}", route.rule)
        assert f"{route.method} {rule}" in readme, (route.method, rule)
    for command in ("make run", "make test", "make model", "make testdata", "make bench"):
        assert command in readme


# --------------------------------------------------------------------------------------------------------
# The real process
# --------------------------------------------------------------------------------------------------------


def start_listening(argv: list[str], env: dict | None, what: str):
    """Start `python <argv>` (a program that logs "listening on http://..."): (process, base URL, log lines).

    The log list keeps filling while it runs: a thread drains its stderr, because a full pipe would
    block its logging, and with it the program.
    """
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    listening = threading.Event()
    found: list[str] = []

    def drain():
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m and not found:
                found.append(m.group(1))
                listening.set()
        listening.set()  # it exited

    proc.log_lines = lambda: lines
    proc.drain = threading.Thread(target=drain, name=f"{what}-stderr", daemon=True)
    proc.drain.start()
    if listening.wait(30) and found:
        return proc, found[0], lines
    proc.kill()
    proc.wait()
    proc.drain.join(5)
    raise AssertionError(f"{what} did not start:\n" + "".join(lines))


def start_server(tmp_path, *args, env=None):
    """Start `python server.py` on a free port: (process, base URL, log lines)."""
    return start_listening(
        ["server.py", "--port", "0", "--db", str(tmp_path / "images.db"), *args],
        {**os.environ, "MIN_FREE_DISK_MB": "0", **(env or {})}, "server",
    )


def stop_server(proc, timeout: float = 15) -> str:
    """SIGTERM, wait, and return everything the server logged."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        proc.drain.join(5)
        raise AssertionError(
            f"the server did not stop within {timeout} s of SIGTERM:\n" + "".join(proc.log_lines())
        ) from None
    proc.drain.join(5)
    return "".join(proc.log_lines())


def test_smoke_real_process_real_socket(tmp_path, model_path, photo):
    proc, base, _ = start_server(tmp_path, "--model", model_path)
    try:
        with urllib.request.urlopen(base + "/health", timeout=10) as res:
            assert res.status == 200 and json.load(res)["detector"]["ready"] is True
        body = json.dumps({"image": base64.b64encode(photo("pets.jpg")).decode(), "detect": True}).encode()
        req = urllib.request.Request(base + "/images", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as res:
            created = json.load(res)
        assert created["objects"] == ["dog"]
        with urllib.request.urlopen(f"{base}/images?objects=dog", timeout=10) as res:
            assert [i["id"] for i in json.load(res)] == [created["id"]]
        with urllib.request.urlopen(base + created["file_url"], timeout=10) as res:
            assert res.read() == photo("pets.jpg") and res.headers["Content-Type"] == "image/jpeg"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "/nope", timeout=10)
        assert e.value.code == 404 and e.value.headers["Content-Type"] == "application/problem+json"
    finally:
        err = stop_server(proc)
    assert proc.returncode == 0
    assert "stopping on SIGTERM" in err


def test_server_starts_without_a_model_and_says_so_once(tmp_path):
    proc, base, lines = start_server(tmp_path, "--model", str(tmp_path / "none.tflite"))
    try:
        for _ in range(3):
            with urllib.request.urlopen(base + "/health", timeout=10) as res:
                assert json.load(res)["detector"]["ready"] is False
    finally:
        err = stop_server(proc)
    assert err.count("object detection is unavailable") == 1 and "make model" in err


def test_a_database_that_cannot_be_opened_is_a_503(service, tmp_path):

    import os
    import shutil

    service.store.shutdown()  # no pooled connection left: the next request must open the file again
    db = service.settings.db
    os.rename(db, db + ".moved")
    os.mkdir(db)  # a folder where the file was: sqlite cannot open it
    try:
        detail = assert_problem(service.client.get("/images", status=503), 503)
        assert "database" in detail
    finally:
        shutil.rmtree(db)
        os.rename(db + ".moved", db)


def test_sigterm_stops_the_server_right_after_a_keep_alive_client_leaves(tmp_path, model_path):
    import http.client

    for _ in range(3):  # the race is in waitress' loop; a few rounds make a miss likely to show
        proc, base, _ = start_server(tmp_path, "--model", model_path)
        host, port = base.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/health")
        assert conn.getresponse().read()
        conn.close()  # waitress sees the close while the signal arrives
        # The bug this guards against is a server that never stops; 30 s allows for a loaded machine.
        err = stop_server(proc, timeout=30)
        assert proc.returncode == 0, err


def test_slow_header_senders_do_not_lock_out_new_clients(tmp_path, model_path):
    """Slowloris: 150 connections that never finish their headers; a new client is still served."""
    import socket
    import time as _time

    proc, base, _ = start_server(tmp_path, "--model", model_path)
    host, port = base.removeprefix("http://").split(":")
    slow = []
    try:
        for _ in range(150):
            s = socket.create_connection((host, int(port)), timeout=5)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and never the rest
            slow.append(s)
        _time.sleep(0.5)  # let the server take them in
        t = _time.monotonic()
        with urllib.request.urlopen(base + "/health", timeout=5) as res:
            assert res.status == 200
        assert _time.monotonic() - t < 2
    finally:
        for s in slow:
            s.close()
        stop_server(proc)


# --------------------------------------------------------------------------------------------------------
# Start-up failures: one line saying what to do, exit status 2, no traceback
# --------------------------------------------------------------------------------------------------------


def _run_server(tmp_path, *args, env=None):
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("IMAGES_DB", None)
    return subprocess.run(
        [sys.executable, "server.py", "--db", str(tmp_path / "db" / "images.db"), *args],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=60,
    )


def _one_line_failure(result) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and 'File "' not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("server.py: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_port_in_use_is_one_line(tmp_path, model_path):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        line = _one_line_failure(_run_server(tmp_path, "--port", str(taken.getsockname()[1]), "--model", model_path))
    finally:
        taken.close()
    assert "in use" in line and "--port" in line and "0 picks a free one" in line


def test_a_database_that_cannot_be_made_is_one_line(tmp_path, model_path):
    (tmp_path / "file").write_text("a file, not a folder")
    result = _run_server(tmp_path, "--db", str(tmp_path / "file" / "images.db"), "--model", model_path)
    line = _one_line_failure(result)
    assert "IMAGES_DB" in line and "--db" in line


def test_a_bad_setting_is_one_line(tmp_path):
    line = _one_line_failure(_run_server(tmp_path, env={"PORT": "eighty"}))
    assert "PORT" in line and "--help" in line


def test_an_address_not_of_this_machine_is_one_line(tmp_path, model_path):
    line = _one_line_failure(_run_server(tmp_path, "--host", "192.0.2.1", "--port", "0", "--model", model_path))
    assert "HOST" in line and "--host" in line
