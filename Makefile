# Quick start:  make demo   (set up and run the gateway in front of four simulated Aztec nodes)
#               make test   (set up and run the whole test suite)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: demo test test-fast bench install clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/twistd -n --pidfile= sentinel-proxy --demo

test: $(STAMP)
	$(BIN)/python -m pytest

# The in-memory and loopback tests only, in seconds: no subprocesses, browser, redis-server or load loops.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m 'not slow' -q

# A load benchmark (needs wrk: apt-get install wrk); not part of the tests. See docs/performance.md.
bench: $(STAMP)
	$(BIN)/python bench/run_bench.py

clean:
	rm -rf $(VENV) build *.egg-info twisted/plugins/dropin.cache .pytest_cache .hypothesis
