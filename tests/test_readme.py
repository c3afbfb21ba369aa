"""README's runnable shell examples, run as written against the real server, so README cannot drift.

A runnable block is a ```sh block whose first line is `# try`. Each runs under `bash -e` in a folder that
holds the test photo as `dog.jpg`, in README order, after the placeholders below are filled in. curl
runs with `--fail-with-body`, so every HTTP answer must be a success unless the block says otherwise.
When a block's answer is shown (the first ```json block after it, or an untyped one starting with an HTTP
status line, before the next heading),
every JSON document the block prints must have that block's keys (nested objects and the first item of
arrays too), and the status line must match. Values are not compared: ids, times and hashes differ.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
from test_server import ROOT, start_server, stop_server

from fake_imgur import FakeImgur
from loopback import Loopback, ok, status

README = os.path.join(ROOT, "README.md")
BLOCK = re.compile(r"```sh\n(# try[^\n]*\n.*?)```", re.S)
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
EXAMPLE_JOB = "6f2b0a58-8d2c-4c52-9d1e-3f0f3c6a1b7e"


def blocks() -> list[tuple[str, str | None, str | None]]:
    """(script, kind, documented answer): the answer is the first fenced block after the script, before
    the next heading, when it is JSON or untyped (an HTTP exchange)."""
    text = open(README, encoding="utf-8").read()
    out = []
    for m in BLOCK.finditer(text):
        after = text[m.end():]
        stop = min([i for i in (after.find("\n#"), after.find("```sh")) if i >= 0] or [len(after)])
        answer = FENCE.search(after[:stop])
        if answer and answer.group(1) in ("json", ""):
            out.append((m.group(1), answer.group(1), answer.group(2)))
        else:
            out.append((m.group(1), None, None))
    return out


def json_documents(text: str) -> list:
    """Every JSON object or array printed, in order (other output, such as HTML or headers, is skipped)."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while True:
        starts = [j for j in (text.find("{", i), text.find("[", i)) if j >= 0]
        if not starts:
            return out
        i = min(starts)
        try:
            value, end = decoder.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        out.append(value)
        i = end


def same_keys(documented, actual, where: str = "") -> None:
    if isinstance(documented, dict):
        assert isinstance(actual, dict), f"{where or 'the answer'} is not an object: {actual!r}"[:300]
        assert set(actual) == set(documented), f"{where or 'top level'}: README has {sorted(documented)}, the service {sorted(actual)}"
        for key, value in documented.items():
            if actual[key] is not None and value is not None:
                same_keys(value, actual[key], f"{where}.{key}")
    elif isinstance(documented, list) and documented and actual:
        assert isinstance(actual, list), f"{where} is not an array"
        same_keys(documented[0], actual[0], f"{where}[0]")


def test_readme_has_runnable_examples():
    found = blocks()
    assert len(found) >= 10, "README's examples lost their `# try` marks"
    for script, _, _ in found:
        assert "curl" in script or "python" in script


@pytest.fixture(scope="module")
def readme_site(tmp_path_factory, model_path, images_dir):
    photo = open(os.path.join(images_dir, "pets.jpg"), "rb").read()
    routes = {
        "/golden-retriever.jpg": ok(photo, "image/jpeg"),
        "/a.jpg": ok(photo, "image/jpeg"),
        "/b.png": status(404),
    }
    with FakeImgur() as imgur, Loopback(routes) as host:
        env = {"IMGUR_CLIENT_ID": imgur.client_id, "IMGUR_API_URL": imgur.url, "ALLOW_PRIVATE_URLS": "1"}
        proc, base, _ = start_server(tmp_path_factory.mktemp("readme"), "--model", model_path, env=env)
        try:
            yield base, host
        finally:
            stop_server(proc)


def test_every_runnable_example_works_as_written(readme_site, tmp_path, images_dir):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed; README's examples use it")
    base, host = readme_site
    shutil.copy(os.path.join(images_dir, "pets.jpg"), tmp_path / "dog.jpg")
    # The one table of placeholders: what README writes -> what this run has.
    fill = {
        "http://127.0.0.1:8080": base,
        "https://example.com/photos/golden-retriever.jpg": host.url("/golden-retriever.jpg"),
        "https://example.com/a.jpg": host.url("/a.jpg"),
        "https://example.com/b.png": host.url("/b.png"),
    }
    wrapper = 'curl() { command curl --fail-with-body --max-time 60 "$@"; }\n'
    ran = 0
    for script, kind, documented in blocks():
        if "python " in script or "make " in script:
            continue  # tools and servers of their own: tests/test_sandbox.py and the Makefile tests run those
        text = script
        for placeholder, real in sorted(fill.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(placeholder, real)
        result = subprocess.run(
            ["bash", "-e", "-c", wrapper + text], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"README example failed:\n{script}\n--- stderr:\n{result.stderr}\n--- stdout:\n{result.stdout[:2000]}"
        ran += 1
        docs = json_documents(result.stdout)
        if documented is not None and kind == "" and documented.startswith("HTTP/"):
            code = documented.split()[1]
            assert re.search(rf"^HTTP/[\d.]+ {code}\b", result.stdout, re.M), (script, result.stdout[:500])
            documented = documented[documented.index("\n\n") + 2:] if "\n\n" in documented else ""
            kind = "json"
        if kind == "json" and documented.strip():
            want = json.loads(documented)
            assert docs, f"README shows JSON after this example, it printed none:\n{script}\n{result.stdout[:500]}"
            for doc in docs:
                same_keys(want, doc)
        if any(isinstance(d, dict) and "jobId" in d for d in docs):
            job = next(d["jobId"] for d in docs if isinstance(d, dict) and "jobId" in d)
            fill[EXAMPLE_JOB] = job  # later examples read this job
    assert ran >= 10
