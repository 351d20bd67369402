# Quickstart: `make demo` and `make test`; both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow test-minatar benchmark clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The continual-MinAtar tests need gymnax (the `minatar` extra), which `make test` skips without.
test-minatar: $(STAMP)
	$(PY) -m pip install --quiet --no-deps -r requirements-minatar.lock
	$(PY) -m pytest -q tests/test_continual_minatar.py

benchmark: $(STAMP)
	$(PY) -m experiments.benchmark

clean:
	rm -rf $(VENV) results .pytest_cache
