"""The Dockerfile cannot be built here (no Docker engine). These keep it in step with `make run`, and run
the steps that can run without Docker, its model step and its health check, as the container would."""

import fnmatch
import os
import re
import shutil
import socket
import subprocess
import sys
import threading

import pytest
from test_server import start_server, stop_server

import detect
import settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = detect.MODELS[detect.DEFAULT_MODEL]


def dockerfile() -> str:
    with open(os.path.join(ROOT, "Dockerfile"), encoding="utf-8") as f:
        return f.read()


def instruction(keyword: str, containing: str) -> str:
    """The one `keyword` instruction of the Dockerfile that contains `containing`, continuation lines joined."""
    found = [i for i in re.findall(rf"^{keyword} (.*?)(?<!\\)$", dockerfile(), re.M | re.S) if containing in i]
    assert len(found) == 1, found
    return found[0]


def test_same_steps_as_make_run():
    text = dockerfile()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert "pip install --no-cache-dir -r requirements.txt" in text
    fetched = re.search(r"python detect.py --fetch (\w+) --models-dir (\S+);", text)
    assert fetched and fetched.group(1) == detect.DEFAULT_MODEL
    workdir = re.search(r"^WORKDIR (\S+)", text, re.M).group(1)
    model_env = re.search(r"DETECT_MODEL=(\S+)", text).group(1)
    assert model_env == f"{workdir}/{fetched.group(2)}/{DEFAULT.filename}"
    assert re.search(r'^CMD \["python", "server.py"\]', text, re.M)
    # every module server.py needs is copied: they all sit at the top level as *.py
    assert "COPY *.py openapi.json ./" in text and "COPY static/ static/" in text


def test_container_settings():
    text = dockerfile()
    env = dict(re.findall(r"\b([A-Z_]+)=(\S+)", text.split("WORKDIR")[0]))
    known = {s.env for s in settings.SETTINGS} | {"PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}
    assert set(env) <= known
    assert env["HOST"] == "0.0.0.0" and env["PORT"] == "8080" and env["IMAGES_DB"].startswith("/data/")
    assert "VOLUME /data" in text and "EXPOSE 8080" in text
    assert re.search(r"^USER (?!root)\w+", text, re.M)


# -- the model: from the build context when it is there, else downloaded ------------------------------------


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context: the last matching rule decides, and a
    rule matching a folder matches what is inside it, as Docker reads the file."""
    with open(os.path.join(ROOT, ".dockerignore"), encoding="utf-8") as f:
        rules = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    ignored = False
    parts = path.split("/")
    for rule in rules:
        pattern = rule.removeprefix("!").strip("/")
        if any(fnmatch.fnmatchcase("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)):
            ignored = not rule.startswith("!")
    return ignored


def test_the_default_model_is_the_one_file_of_models_in_the_build_context():
    assert not dockerignored(f"models/{DEFAULT.filename}")
    for other in ("models/ssd_mobilenet_v1.tflite", f"models/.{DEFAULT.filename}.x1.part", "data/images.db",
                  "testdata/images/pets.jpg", ".venv/bin/python", "tests/conftest.py"):
        assert dockerignored(other), other
    assert not dockerignored("server.py") and not dockerignored("static/js/app.js")


def test_the_model_copy_is_optional():
    # A wildcard that matches nothing copies nothing, next to a source that always matches.
    copy = instruction("COPY", "model[s]/")
    sources, dest = copy.split()[:-1], copy.split()[-1]
    assert sources[1] == f"model[s]/{DEFAULT.filename[:-1]}[{DEFAULT.filename[-1]}]"
    assert os.path.isfile(os.path.join(ROOT, sources[0])) and dest == "models/"
    assert f"rm models/{sources[0]}" in instruction("RUN", "--fetch")


class ProxyRecorder:
    """A "proxy" on loopback that writes down each request line it gets and hangs up: the model step's
    download goes there (https_proxy), so the test sees it asked for and nothing reaches the internet."""

    def __init__(self):
        self.lines: list[str] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    self.lines.append(conn.recv(4096).split(b"\r\n", 1)[0].decode("latin-1"))
                except OSError:
                    pass

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (a close alone does not, on Linux)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def model_step(tmp_path):
    """run(model file bytes or None) -> (completed process, models/ listing, proxy request lines): the
    Dockerfile's model step in a copy of /app, with the SSD model (the test model) in place of the default."""
    app = tmp_path / "app"
    (app / "models").mkdir(parents=True)
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name == "openapi.json":  # COPY *.py openapi.json ./
            shutil.copy(os.path.join(ROOT, name), app / name)
    command = instruction("RUN", "--fetch").replace(detect.DEFAULT_MODEL, "ssd_mobilenet_v1")
    ssd = detect.MODELS["ssd_mobilenet_v1"]
    proxy = ProxyRecorder()

    def run(model: bytes | None):
        shutil.copy(app / "openapi.json", app / "models" / "openapi.json")  # the COPY's always-there source
        if model is not None:
            (app / "models" / ssd.filename).write_bytes(model)
        env = {"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], "HOME": str(tmp_path),
               "https_proxy": proxy.url, "HTTPS_PROXY": proxy.url, "http_proxy": proxy.url, "HTTP_PROXY": proxy.url}
        done = subprocess.run(["sh", "-c", command], cwd=app, env=env, capture_output=True, text=True, timeout=60)
        return done, sorted(os.listdir(app / "models")), list(proxy.lines)

    yield run
    proxy.close()


def test_a_model_in_the_build_context_is_checked_and_used_without_a_download(model_step, model_path):
    with open(model_path, "rb") as f:
        model = f.read()
    done, files, asked = model_step(model)
    assert done.returncode == 0, done.stderr
    assert files == [detect.MODELS["ssd_mobilenet_v1"].filename] and asked == []


def test_a_wrong_model_in_the_build_context_fails_the_build(model_step):
    done, _, asked = model_step(b"not the model")
    assert done.returncode != 0 and asked == []
    assert "from the build context has sha256" in done.stderr and "build again" in done.stderr


def test_without_a_model_in_the_build_context_it_is_downloaded(model_step):
    done, files, asked = model_step(None)
    ssd = detect.MODELS["ssd_mobilenet_v1"]
    host = ssd.url.split("/")[2]
    assert asked and asked[0].startswith(f"CONNECT {host}:443 "), asked  # the fetch went for the model's URL
    assert done.returncode != 0 and "could not download" in done.stderr  # the "proxy" hung up on it
    assert files == []  # nothing half-downloaded left behind


# -- the health check: on $PORT ------------------------------------------------------------------------------


def healthcheck(port: int) -> subprocess.CompletedProcess:
    command = instruction("HEALTHCHECK", "/health").split(" CMD ", 1)[1]
    env = {"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], "PORT": str(port)}
    return subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True, timeout=30)


def test_the_health_check_asks_the_server_on_its_port(tmp_path, model_path):
    proc, base, _ = start_server(tmp_path, "--model", model_path)
    try:
        port = int(base.rsplit(":", 1)[1])
        assert port != 8080
        assert healthcheck(port).returncode == 0
    finally:
        stop_server(proc)
    # and fails when nothing answers there
    assert healthcheck(port).returncode != 0
