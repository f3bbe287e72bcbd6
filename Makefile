# The two commands a newcomer runs (see README): `make demo` and `make test`.
# Both create .venv with the CPU build of torch and install the package when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN ?= runs/demo
PRESET ?= tiny
PYTEST_ARGS ?=

.PHONY: setup demo test test-quick lint bench clean-runs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	# Pin the CPU build first: an unpinned torch would pull several GB of CUDA packages.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/polyteacher pipeline --preset $(PRESET) --out $(RUN)

# lint-imports checks the layers written in pyproject.toml ([tool.importlinter]) before the tests run.
test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest $(PYTEST_ARGS)

test-quick: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# The quick benchmarks (minutes, no run directory needed); the others take a run: see docs/results.md.
bench: $(STAMP)
	$(PY) -m benchmarks.data_prep
	$(PY) -m benchmarks.ngram_step

clean-runs:
	rm -rf runs
