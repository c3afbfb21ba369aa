"""tests/chromium.py and the page tests' skip: without /usr/bin/chromium, Playwright's browser is
installed only when its download host answers, and without any browser the page tests skip in one line."""

import os
import socket
import subprocess
import sys

import chromium
from loopback import Loopback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(browsers, download_host: str) -> subprocess.CompletedProcess:
    # PLAYWRIGHT_BROWSERS_PATH: where Playwright keeps its browsers; PLAYWRIGHT_DOWNLOAD_HOST: where it
    # downloads them from (both Playwright's own variables).
    env = {**os.environ, "PLAYWRIGHT_BROWSERS_PATH": str(browsers), "PLAYWRIGHT_DOWNLOAD_HOST": download_host}
    return subprocess.run([sys.executable, os.path.join(ROOT, "tests", "chromium.py")], env=env,
                          capture_output=True, text=True, timeout=120)


def test_offline_nothing_is_tried_and_nothing_said(tmp_path):
    done = run_script(tmp_path, f"http://127.0.0.1:{closed_port()}")
    assert done.returncode == 0 and done.stderr == ""
    assert os.listdir(tmp_path) == []  # `playwright install` makes its folders first: it never ran


def test_online_it_installs_and_a_failure_does_not_stop_make_test(tmp_path):
    with Loopback({}) as host:  # a download host answering 404 to everything
        done = run_script(tmp_path, host.url(""))
        assert sum(host.hits.values()) >= 1  # the install went for the browser
    assert done.returncode == 0
    assert done.stderr.splitlines()[-1].startswith("chromium: `playwright install chromium` failed (Error: ")


def test_an_installed_browser_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("PLAYWRIGHT_BROWSERS_PATH", str(tmp_path))
    locations, _ = chromium.plan()
    assert locations and not chromium.installed(locations)
    for location in locations:
        os.makedirs(location)
        open(os.path.join(location, "INSTALLATION_COMPLETE"), "w").close()
    assert chromium.playwright_has_it()
    done = run_script(tmp_path, f"http://127.0.0.1:{closed_port()}")
    assert done.returncode == 0 and done.stderr == ""


def test_without_any_chromium_the_page_tests_skip_in_one_line(tmp_path):
    env = {**os.environ, "CHROMIUM_PATH": str(tmp_path / "no-chromium"), "PLAYWRIGHT_BROWSERS_PATH": str(tmp_path)}
    other = "tests/test_testdata.py::test_the_real_manifest_lists_what_conftest_reads"  # everything else runs
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_page.py", other],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout
    skipped = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) == 1 and "no Chromium" in skipped[0] and "playwright install chromium" in skipped[0]
    assert done.stdout.splitlines()[-1].startswith("1 passed, 1 skipped")
