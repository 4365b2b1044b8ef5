# `make demo` and `make test` each work on a fresh machine: they create .venv, install torch
# first (a CPU wheel where no GPU build is wanted; see docs/install.md), then the package.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := .venv
BIN := $(VENV)/bin
TEXT_DATA := data/generated/text
export HF_HUB_OFFLINE := 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup test test-all demo text-data bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

$(TEXT_DATA)/.built: $(VENV)/.installed
	$(BIN)/unimodal data text-corpus --out $(TEXT_DATA)
	$(BIN)/unimodal data tokenizer $(TEXT_DATA)/train.jsonl --out $(TEXT_DATA)/tokenizer.model --vocab-size 1024
	$(BIN)/unimodal data pack $(TEXT_DATA)/train.jsonl --out $(TEXT_DATA)/train --max-docs-per-shard 64
	$(BIN)/unimodal data pack $(TEXT_DATA)/val.jsonl --out $(TEXT_DATA)/val --max-docs-per-shard 64
	touch $@

text-data: $(TEXT_DATA)/.built

test: setup
	$(BIN)/pytest -q -m "not slow and not gpu"

test-all: setup
	$(BIN)/pytest -q

demo: text-data
	$(BIN)/unimodal train recipes/text/tiny.yaml
	@echo
	@echo "Logs: runs/text-tiny/logs (CSV) and runs/text-tiny/tb (tensorboard --logdir runs/text-tiny/tb)"
	@echo "Checkpoints: runs/text-tiny/checkpoints"

bench: text-data
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) data/generated runs
