# One venv, pinned by constraints.txt; README, CI (.ci/run) and this file use the same commands.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
BUNDLE ?= bundles/classification_2d

.PHONY: install test lint format prune benchmark benchmark-quick

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e ".[test]"
	# test-only oracle: the dl-backtrace package without its TensorFlow dependency
	$(PIP) install -q --no-deps "dl-backtrace==0.0.25" || echo "dl-backtrace not installed: its oracle test will skip"
	touch $@

test: install
	$(PY) -m ruff check monai_iaprune tests benchmarks
	$(VENV)/bin/lint-imports
	# the network sweep (~150 MONAI networks) in its own process, beside the rest: one torch thread each, one core
	# each; the sweep's output follows the rest's, and either failing fails the target
	@log=$$(mktemp); \
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider tests/test_sweep.py > $$log 2>&1 & sweep=$$!; \
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider --ignore=tests/test_sweep.py; rest=$$?; \
	wait $$sweep; swept=$$?; echo "--- tests/test_sweep.py (run beside the rest)"; cat $$log; rm -f $$log; \
	test $$rest -eq 0 && test $$swept -eq 0

lint: install
	$(PY) -m ruff check monai_iaprune tests benchmarks
	$(VENV)/bin/lint-imports
	$(PY) -m ruff format --check monai_iaprune tests benchmarks

format: install
	$(PY) -m ruff format monai_iaprune tests benchmarks
	$(PY) -m ruff check --fix monai_iaprune tests benchmarks

# the main job: the 2D classification bundle's prune run on its offline synthetic default
prune: install
	cd $(BUNDLE) && $(abspath $(PY)) -m monai.bundle run prune --config_file "['configs/train.json','configs/prune.json']"

benchmark: install
	$(PY) benchmarks/run.py

benchmark-quick: install
	$(PY) benchmarks/run.py --quick
