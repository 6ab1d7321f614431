# Set-up and entry points. `make repro` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install repro test lint bench bench-setup s3-local clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.lock -e ".[dev]"
	touch $@

repro: install
	$(BIN)/dvc repro

test: install
	$(BIN)/ruff check src stages tests benchmarks
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check src stages tests benchmarks
	$(BIN)/ruff format --check src stages tests

clean-venv:
	rm -rf $(VENV)

s3-local: install
	$(BIN)/cachelora s3 local

bench: install
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_evaluate.py
	$(BIN)/python benchmarks/bench_pipeline.py
	$(BIN)/python benchmarks/render.py --write-readme

bench-setup:
	bash benchmarks/bench_setup.sh
