# Quick start:  make demo   (set up and run the gateway in front of four simulated Aztec nodes,
#                            on 127.0.0.1:8080; another port: make demo DEMO_PORT=9090)
#               make test   (set up and run the whole test suite)
PYTHON    ?= python3
VENV      ?= .venv
BIN        = $(VENV)/bin
STAMP      = $(VENV)/.installed
DEMO_PORT ?= 8080

.PHONY: demo test test-fast bench install lock clean

# Every dependency at the version pinned in constraints.txt (the Docker image uses the same file).
$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --constraint constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Pin the newest versions that satisfy setup.py again (runtime, test and otel extras, for Python 3.11).
lock: $(STAMP)
	$(BIN)/pip install --quiet pip-tools
	$(BIN)/pip-compile --quiet --upgrade --extra test --extra otel --strip-extras --no-emit-index-url \
	    --no-emit-find-links --output-file constraints.txt setup.py

demo: $(STAMP)
	$(BIN)/sentinel-proxy run --demo --listen tcp:$(DEMO_PORT):interface=127.0.0.1

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
