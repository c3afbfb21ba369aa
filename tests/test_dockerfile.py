"""The Dockerfile cannot be built here (no Docker engine); this keeps it in step with `make run`."""

import os
import re

import detect
import settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dockerfile() -> str:
    with open(os.path.join(ROOT, "Dockerfile"), encoding="utf-8") as f:
        return f.read()


def test_same_steps_as_make_run():
    text = dockerfile()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert "pip install --no-cache-dir -r requirements.txt" in text
    fetched = re.search(r"python detect.py --fetch (\w+) --models-dir (\S+)", text)
    assert fetched and fetched.group(1) == detect.DEFAULT_MODEL
    model_env = re.search(r"DETECT_MODEL=(\S+)", text).group(1)
    assert model_env == f"{fetched.group(2)}/{detect.MODELS[detect.DEFAULT_MODEL].filename}"
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
    assert "HEALTHCHECK" in text and "/health" in text
