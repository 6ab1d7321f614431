# Set-up and entry points. `make repro` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The semantic router's own offline config validator (vllm-sr), in a venv of its own: tests check the
# exported router config with it (tests/test_router_config.py; VLLM_SR points elsewhere).
ROUTER_VENV := .venv-vllm-sr
export VLLM_SR ?= $(CURDIR)/$(ROUTER_VENV)/bin/vllm-sr
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install router-validator repro test lint bench bench-llm bench-scale bench-setup s3-local clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.lock -e ".[dev]"
	touch $@

router-validator: $(ROUTER_VENV)/bin/vllm-sr

$(ROUTER_VENV)/bin/vllm-sr:
	$(PYTHON) -m venv $(ROUTER_VENV)
	$(ROUTER_VENV)/bin/pip install --quiet --disable-pip-version-check vllm-sr==0.4.0

repro: install
	$(BIN)/dvc repro

test: install router-validator
	$(BIN)/ruff check src stages tests benchmarks
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check src stages tests benchmarks
	$(BIN)/ruff format --check src stages tests

clean-venv:
	rm -rf $(VENV)

# Loopback S3 for development: moto's server on 127.0.0.1:$(S3_PORT), in the foreground, data in
# memory (Ctrl-C stops it and drops everything). Points the default remote `storage` at it in
# .dvc/config.local (dummy credentials) and creates the bucket.
S3_PORT ?= 5555
S3_BUCKET ?= cachelora
s3-local: install
	$(BIN)/dvc remote modify --local storage endpointurl http://127.0.0.1:$(S3_PORT)
	$(BIN)/dvc remote modify --local storage access_key_id testing
	$(BIN)/dvc remote modify --local storage secret_access_key testing
	$(BIN)/moto_server -H 127.0.0.1 -p $(S3_PORT) & server=$$!; \
	trap 'kill $$server 2>/dev/null' EXIT INT TERM; \
	until $(BIN)/python -c "import socket; socket.create_connection(('127.0.0.1', $(S3_PORT)), 1)" 2>/dev/null; do \
		kill -0 $$server 2>/dev/null || exit 1; sleep 0.2; done; \
	$(BIN)/python -c "import boto3; boto3.client('s3', endpoint_url='http://127.0.0.1:$(S3_PORT)', \
		region_name='us-east-1', aws_access_key_id='testing', aws_secret_access_key='testing')\
		.create_bucket(Bucket='$(S3_BUCKET)')" || exit 1; \
	echo "s3-local: S3 at http://127.0.0.1:$(S3_PORT), bucket $(S3_BUCKET); Ctrl-C stops it"; \
	wait $$server

bench: install
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_evaluate.py
	$(BIN)/python benchmarks/bench_pipeline.py
	$(BIN)/python benchmarks/render.py --write-readme

bench-llm: install
	$(BIN)/python benchmarks/bench_llm.py

bench-scale: install
	$(BIN)/python benchmarks/bench_scale.py
	$(BIN)/python benchmarks/render.py --write-readme

bench-setup:
	bash benchmarks/bench_setup.sh
