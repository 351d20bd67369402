# Quickstart: `make demo` and `make test`; both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# `make test-floor`: the library's tests (every test module but the experiments' below) in .venv-floor, where each
# direct dependency is installed at its lower bound in pyproject.toml. A test module of a new experiment goes here.
EXPERIMENT_TESTS := tests/test_benchmark.py tests/test_checkpoint_compatibility.py tests/test_continual_imagenet.py \
  tests/test_continual_minatar.py tests/test_data.py tests/test_divergence.py tests/test_divergence_mechanism.py tests/test_incremental_cifar100.py \
  tests/test_optimizers.py tests/test_permuted_mnist.py tests/test_plasticity_experiments.py tests/test_plasticity_probes.py \
  tests/test_ppo.py tests/test_run_statistics.py tests/test_runner.py tests/test_runner_faults.py \
  tests/test_protocol.py tests/test_runner_package.py tests/test_slippery_ant.py tests/test_slowly_changing_regression.py
LIBRARY_TESTS = $(filter-out $(EXPERIMENT_TESTS),$(wildcard tests/test_*.py))
FLOOR_VENV := .venv-floor
FLOOR_PY := $(FLOOR_VENV)/bin/python
FLOOR_STAMP := $(FLOOR_VENV)/.installed
DOCS_STAMP := $(VENV)/.docs-installed

.PHONY: setup demo test lint test-slow test-minatar test-floor dist wheel-check docs benchmark clean

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

# Formatting and lint rules are in pyproject.toml ([tool.ruff]); `ruff format .` applies the formatting.
lint: $(STAMP)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The continual-MinAtar tests need gymnax (the `minatar` extra), which `make test` skips without.
test-minatar: $(STAMP)
	$(PY) -m pip install --quiet --no-deps -r requirements-minatar.lock
	$(PY) -m pytest -q tests/test_continual_minatar.py

$(FLOOR_STAMP): pyproject.toml .ci/floor_requirements.py
	rm -rf $(FLOOR_VENV)
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_PY) -m pip install --quiet --upgrade pip
	$(FLOOR_PY) .ci/floor_requirements.py dev > $(FLOOR_VENV)/floors.txt
	$(FLOOR_PY) -m pip install --quiet -r $(FLOOR_VENV)/floors.txt
	touch $(FLOOR_STAMP)

test-floor: $(FLOOR_STAMP)
	@# Every floor is installed exactly (a dependency of another package could have moved one).
	$(FLOOR_PY) -m pip list --format=freeze | grep -Fx -f $(FLOOR_VENV)/floors.txt | tee $(FLOOR_VENV)/found.txt
	test $$(wc -l < $(FLOOR_VENV)/found.txt) -eq $$(wc -l < $(FLOOR_VENV)/floors.txt)
	$(FLOOR_PY) -m pytest -q $(LIBRARY_TESTS)

dist: $(STAMP)
	$(PY) -m pip install --quiet build==1.6.1
	rm -rf dist
	$(PY) -m build --outdir dist .

wheel-check: dist
	$(PY) .ci/wheel_check.py dist

$(DOCS_STAMP): $(STAMP) docs/requirements.txt
	$(PY) -m pip install --quiet -r docs/requirements.txt
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	rm -rf docs/_build docs/_autosummary
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	$(PY) -m pytest -q -p no:cacheprovider --doctest-modules cbp_jax

benchmark: $(STAMP)
	$(PY) -m experiments.benchmark

clean:
	rm -rf $(VENV) $(FLOOR_VENV) results dist docs/_build docs/_autosummary .pytest_cache
