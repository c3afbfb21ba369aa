# The two commands of README: `make run` and `make test`. Everything else is a helper of those.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
MODEL  ?= models/efficientdet_lite0.tflite

.PHONY: run test need-testdata model testdata bench soak clean

# A stamp per requirements file, so pip runs only when the pins change.
$(VENV)/.run-deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev-deps: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@ $(VENV)/.run-deps

## make run: install, fetch the default model if it is missing (carry on without it offline), serve.
run: $(VENV)/.run-deps
	@test -f "$(MODEL)" || $(PY) detect.py --fetch efficientdet_lite0 || \
	  echo "make: could not fetch the model; the server starts and detection answers 503 until it is present"
	$(PY) server.py

## make test: the whole pytest suite. The test data comes from TESTDATA_DIR and DETECT_MODEL, else from
## testdata/, downloaded first when it is missing (need-testdata). The page tests use Debian's Chromium,
## else Playwright's own, installed only when its download host answers; without either they are skipped.
test: need-testdata $(VENV)/.dev-deps
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

## make soak: faults and load against the real server (writers, kill -9, slowloris, hung hosts, Imgur
## storm, disk full: ~5 minutes; the disk-full scenario needs root). SOAK_MINUTES=30 adds the long soak.
soak: $(VENV)/.dev-deps
	$(PY) bench/soak.py $(if $(SOAK_MINUTES),--soak-minutes $(SOAK_MINUTES))

clean:
	rm -rf $(VENV) .pytest_cache
