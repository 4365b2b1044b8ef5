# `make demo` and `make test` each work on a fresh machine: they create .venv, install torch
# first (a CPU wheel where no GPU build is wanted; see docs/install.md), then the package.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup test test-compat test-all demo families bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

test: setup
	$(BIN)/pytest -q -m "not slow and not gpu and not xformers"

# the same suite on the GPU machines' stack (torch 2.11, transformers 5.17, lightning 2.6.6), in a
# venv of its own; PyPI's torch 2.11 is a CUDA build (about 5 GB with its libraries) that runs on a CPU
COMPAT := .compat/gpu-stack
$(COMPAT)/.installed: pyproject.toml
	$(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/pip install --quiet torch==2.11.0
	$(COMPAT)/bin/pip install --quiet -e '.[dev]' transformers==5.17.0 lightning==2.6.6
	touch $@

test-compat: $(COMPAT)/.installed
	PATH=$(abspath $(COMPAT))/bin:$$PATH $(COMPAT)/bin/pytest -q -m "not slow and not gpu and not xformers" -p no:cacheprovider

test-all: setup
	$(BIN)/pytest -q

# the main job (docs/first-hour.md): build the digits world, pretrain then chat-SFT with LoRA,
# export, and score the held-out split; finished stages are skipped when run again
demo: setup
	$(BIN)/unimodal pipeline recipes/pipelines/digits.yaml --root runs/demo
	ln -sfn chat_sft/export runs/demo/model
	$(BIN)/unimodal eval runs/demo/model --suite digits --out runs/demo/scoreboard.json
	@echo
	@echo "Scoreboard: runs/demo/scoreboard.json. Logs: runs/demo/*/logs (CSV), runs/demo/*/tb (TensorBoard)."
	@echo "Chat with the model: $(BIN)/unimodal chat runs/demo/model"

# each family's --tiny recipes trained on the digits world and scored (docs/families-on-digits.md)
families: setup
	$(BIN)/python docs/tools/families_on_digits.py --root runs/families

bench: setup
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) .compat data/generated runs
