# clipforge: `make demo` trains a tiny CLIP on real digits; `make test` runs the suite.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_DIR ?= .demo
export HF_HUB_OFFLINE := 1
export WANDB_SILENT := true
export PYTHONUNBUFFERED := 1

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast lint format bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# torch and torchvision are pinned first so pip takes the builds this machine serves locally;
# the stamp makes a re-run with an unchanged pyproject.toml a no-op.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)  ## create .venv with everything (seconds when nothing changed)

demo: $(STAMP)  ## MNIST digits -> shards -> tokenizer -> 2-process DeepSpeed training -> zero-shot accuracy
	bash launch/demo.sh $(RUN_DIR)

test: $(STAMP)  ## the test suite (CPU; gloo; DeepSpeed)
	$(BIN)/python -m pytest -q tests --ignore=tests/bench

lint: $(STAMP)  ## ruff lint + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)  ## benchmarks against the peers, figures into docs/benchmarks.md
	$(BIN)/python -m pytest -q -s tests/bench

clean:  ## remove demo output and caches (keeps .venv)
	rm -rf $(RUN_DIR) .pytest_cache .ruff_cache
