# The two commands of README: `make run` and `make test`. Everything else is a helper of those.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
MODEL  ?= models/efficientdet_lite0.tflite

.PHONY: run test prereqs need-testdata model testdata bench soak clean

# What the pinned requirements have wheels for, checked before pip (which would only say "No matching
# distribution found for ..."): Python 3.11 to 3.13, 64-bit, Linux x86-64/aarch64 or macOS arm64 (the
# LiteRT runtime has no armv7l and no Intel-Mac wheel), and venv's pip (Debian's python3-venv). It checks
# the interpreter that will run pip: the one in $(VENV) when it is there, else $(PYTHON).
define PREREQS_PY
import importlib.util, platform, struct, sys
v, machine, system = tuple(sys.version_info[:2]), platform.machine().lower(), platform.system()
where = f"{sys.executable} is Python {v[0]}.{v[1]} on {system} {machine}"
problems = []
if not (3, 11) <= v <= (3, 13):
    problems.append("imgsvc needs Python 3.11, 3.12 or 3.13; name one with PYTHON, e.g. make run PYTHON=python3.12")
if struct.calcsize("P") != 8:
    problems.append("this Python is 32-bit; the detection runtime has 64-bit wheels only: use a 64-bit OS (on a Raspberry Pi, 64-bit Raspberry Pi OS)")
elif system == "Darwin" and machine != "arm64":
    problems.append("the detection runtime has no wheel for Intel Macs (macOS x86-64): use a Mac with Apple silicon, or Linux")
elif system == "Linux" and machine not in ("x86_64", "amd64", "aarch64", "arm64"):
    problems.append(f"the detection runtime has no wheel for Linux {machine}: use a 64-bit OS on x86-64 or aarch64 (64-bit Raspberry Pi OS)")
elif system not in ("Linux", "Darwin"):
    problems.append("make run is made for Linux and macOS (on Windows, use WSL)")
if sys.prefix != sys.base_prefix:
    if importlib.util.find_spec("pip") is None:
        problems.append("the virtual environment has no pip (made without python3-venv?): sudo apt install python3-venv, then make clean")
elif importlib.util.find_spec("ensurepip") is None:
    problems.append("python -m venv needs ensurepip: sudo apt install python3-venv (Debian, Ubuntu, Raspberry Pi OS)")
if problems:
    sys.exit("\n".join([f"make: {where}; it cannot run imgsvc:"] + [f"  - {p}" for p in problems]))
endef
export PREREQS_PY

## make prereqs: the check above (make run and make test run it first).
prereqs:
	@if [ -x $(PY) ]; then python=$(PY); else python=$(PYTHON); fi; "$$python" -c "$$PREREQS_PY"

# A stamp per requirements file, so pip runs only when the pins change.
$(VENV)/.run-deps: requirements.txt | prereqs
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev-deps: requirements.txt requirements-dev.txt | prereqs
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@ $(VENV)/.run-deps

# The PostgreSQL driver, for the tests' [postgresql] half: only where PostgreSQL's binaries are (Debian
# keeps initdb in /usr/lib/postgresql/*/bin, off PATH) or TEST_POSTGRES_URL names a server.
PG_INITDB := $(wildcard /usr/lib/postgresql/*/bin/initdb) $(shell command -v initdb 2>/dev/null)
PG_DEPS   := $(if $(strip $(PG_INITDB) $(TEST_POSTGRES_URL)),$(VENV)/.postgres-deps)

$(VENV)/.postgres-deps: requirements.txt requirements-postgres.txt | prereqs
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-postgres.txt
	touch $@

## make run: install, fetch the default model if it is missing (carry on without it offline), serve.
run: prereqs $(VENV)/.run-deps
	@test -f "$(MODEL)" || $(PY) detect.py --fetch efficientdet_lite0 || \
	  echo "make: could not fetch the model; the server starts and detection answers 503 until it is present"
	$(PY) server.py

## make test: ruff (ruff.toml), then the whole pytest suite. The test data comes from TESTDATA_DIR and
## DETECT_MODEL, else from testdata/, downloaded first when it is missing (need-testdata). The page tests
## use Debian's Chromium, else Playwright's own, installed only when its download host answers; without
## either they are skipped. The store and image-API tests run on SQLite and again on a throwaway PostgreSQL
## cluster (tests/postgres.py) when PostgreSQL's binaries are here, else that half is left out with one
## line saying so.
test: prereqs need-testdata $(VENV)/.dev-deps $(PG_DEPS)
	$(VENV)/bin/ruff check .
	@test -x /usr/bin/chromium || $(PY) tests/chromium.py
	$(PY) -m pytest -q

need-testdata:
	@$(PYTHON) tests/testdata.py --ensure

## make model: download the default model (sha256 checked) into models/.
model: $(VENV)/.run-deps
	$(PY) detect.py --fetch efficientdet_lite0

## make testdata: download the test photos and the SSD test model into testdata/ (needs internet, or
## TESTDATA_BASE_URL naming a mirror). All or nothing: a failed download leaves testdata/ as it was.
testdata:
	$(PYTHON) tests/testdata.py testdata

## make bench: the benchmarks of bench/, printing the numbers README quotes.
bench: $(VENV)/.dev-deps
	$(PY) bench/detect.py
	$(PY) bench/api.py
	$(PY) bench/jobs.py
	$(PY) bench/page.py
	$(PY) bench/vision.py
	$(PY) bench/ingest.py

## make soak: faults and load against the real server (writers, kill -9, slowloris, hung hosts, Imgur
## storm, disk full: ~5 minutes; the disk-full scenario needs root), then bench/bounds.py (decode bombs,
## slow senders and the disk floor, thread-holding load, job floods: ~10 minutes). SOAK_MINUTES=30 adds
## the long soak.
soak: $(VENV)/.dev-deps
	$(PY) bench/soak.py $(if $(SOAK_MINUTES),--soak-minutes $(SOAK_MINUTES))
	$(PY) bench/bounds.py

clean:
	rm -rf $(VENV) .pytest_cache
