# `make demo` and `make test` each work on a fresh machine: they create .venv, install torch
# first (a CPU wheel where no GPU build is wanted; see docs/install.md), then the package.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup test test-all demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

test: setup
	$(BIN)/pytest -q -m "not slow and not gpu"

test-all: setup
	$(BIN)/pytest -q

demo: setup
	$(BIN)/unimodal train recipes/text/tiny.yaml
	@echo
	@echo "Logs: runs/text-tiny/logs (CSV) and runs/text-tiny/tb (tensorboard --logdir runs/text-tiny/tb)"
	@echo "Checkpoints: runs/text-tiny/checkpoints"

bench: setup
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) data/generated runs
