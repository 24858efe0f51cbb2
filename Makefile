# `make run`: set up .venv (once) and run the main job on the embedded digits data.
# `make test`: same set-up, then the test suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The tests run one per core, at most 4 at once (pytest-xdist; each test keeps one torch thread; an
# idle worker takes over tests queued for a busy one, and the long script tests start first):
# on a 2-vCPU machine the suite takes about 8 minutes instead of 14. PYTEST_ARGS="-n 0" runs them
# in one process, e.g. to read a failing test's output in order; PYTEST_ARGS="-n auto -m 'not slow'"
# leaves out the 15 tests that run a whole script or job for 8-70 s each (6 minutes instead of 8).
PYTEST_ARGS ?= -n auto --maxprocesses 4 --dist worksteal

.PHONY: run test setup bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,reconstruction]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) scripts/stream.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) scripts/bench.py $(ARGS)

clean:
	rm -rf $(VENV) runs out .pytest_cache
