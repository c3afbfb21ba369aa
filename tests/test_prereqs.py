"""`make prereqs`, which `make run` and `make test` run before pip: the Python version, 64 bits, a platform
the runtime has wheels for, and venv's pip. Each case runs the Makefile's own check in a real Python
told to report other facts (a fake interpreter: the system Python is not one of our parts)."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTSIDE_A_VENV = "sys.prefix = sys.base_prefix"
# make as if typed in a shell, also when these tests run under `make test`
MAKE_ENV = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}


def fake_python(tmp_path, prelude: str) -> str:
    """An executable that runs `-c CODE` in this Python after `prelude` (which may change sys, platform...)."""
    runner = tmp_path / "fake_python.py"
    runner.write_text(
        "import os, platform, struct, sys\n"
        "sys.executable, code = sys.argv[1], sys.argv[2]\n"
        f"{prelude}\n"
        "sys.argv = ['-c']\n"
        "exec(compile(code, '<string>', 'exec'), {'__name__': '__main__'})\n"
    )
    path = tmp_path / "python3"
    path.write_text(f'#!/bin/sh\n[ "$1" = -c ] || exit 64\nexec "{sys.executable}" "{runner}" "$0" "$2"\n')
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def checkout(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("Makefile", "requirements.txt", "requirements-dev.txt"):
        shutil.copy(os.path.join(ROOT, name), root / name)
    return root


def make(root, target: str, python: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", target, f"PYTHON={python}"], cwd=root, env=MAKE_ENV,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("prelude", [
    "",  # this very Python, in its venv
    OUTSIDE_A_VENV,
    "sys.version_info = (3, 13, 1); platform.machine = lambda: 'aarch64'",  # a Raspberry Pi, 64-bit OS
    "sys.version_info = (3, 12, 8); platform.system = lambda: 'Darwin'; platform.machine = lambda: 'arm64'",
])
def test_what_the_runtime_has_wheels_for_passes_silently(tmp_path, checkout, prelude):
    done = make(checkout, "prereqs", fake_python(tmp_path, prelude))
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


@pytest.mark.parametrize("prelude, said", [
    ("sys.version_info = (3, 10, 12)", "needs Python 3.11, 3.12 or 3.13; name one with PYTHON"),
    ("sys.version_info = (3, 14, 0)", "needs Python 3.11, 3.12 or 3.13"),
    ("_size = struct.calcsize; struct.calcsize = lambda f: 4 if f == 'P' else _size(f); platform.machine = lambda: 'aarch64'",
     "this Python is 32-bit"),  # 32-bit Raspberry Pi OS on a 64-bit kernel says aarch64
    ("platform.machine = lambda: 'armv7l'", "no wheel for Linux armv7l: use a 64-bit OS"),
    ("platform.system = lambda: 'Darwin'; platform.machine = lambda: 'x86_64'", "no wheel for Intel Macs"),
    (OUTSIDE_A_VENV + "; sys.modules['ensurepip'] = None", "sudo apt install python3-venv"),
    ("sys.modules['pip'] = None", "the virtual environment has no pip"),
])
def test_what_it_cannot_run_on_is_said_before_pip(tmp_path, checkout, prelude, said):
    python = fake_python(tmp_path, prelude)
    done = make(checkout, "prereqs", python)
    assert done.returncode != 0
    assert said in done.stderr and "it cannot run imgsvc" in done.stderr.splitlines()[0]
    assert "No matching distribution" not in done.stderr and "Traceback" not in done.stderr


def test_make_run_stops_at_the_check_before_making_the_venv(tmp_path, checkout):
    done = make(checkout, "run", fake_python(tmp_path, "sys.version_info = (3, 9, 2)"))
    assert done.returncode != 0 and "Python 3.9" in done.stderr and "needs Python 3.11" in done.stderr
    assert not (checkout / ".venv").exists()  # no venv made, pip never ran


def test_the_venv_python_is_the_one_checked_once_it_exists(tmp_path, checkout):
    # A venv made earlier by an unsupported Python is reported, whatever PYTHON says now.
    (checkout / ".venv" / "bin").mkdir(parents=True)
    os.symlink(fake_python(tmp_path, "sys.version_info = (3, 10, 0)"), checkout / ".venv" / "bin" / "python")
    done = make(checkout, "prereqs", sys.executable)
    assert done.returncode != 0 and "needs Python 3.11" in done.stderr and ".venv/bin/python" in done.stderr


def test_make_n_shows_the_check_first():
    for target in ("run", "test"):
        done = subprocess.run(["make", "-n", "-B", "--no-print-directory", target], cwd=ROOT, env=MAKE_ENV,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        assert "PREREQS_PY" in lines[0]
        assert lines.index(next(line for line in lines if "pip install" in line)) > 0
        if target == "test":
            assert "tests/testdata.py --ensure" in lines[1]
