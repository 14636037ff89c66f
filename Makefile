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
	# the network sweep in its own process: its ~150 MONAI networks grow one process past 24 GiB after the rest
	$(PY) -m pytest -q -p no:cacheprovider --ignore=tests/test_sweep.py
	$(PY) -m pytest -q -p no:cacheprovider tests/test_sweep.py

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
