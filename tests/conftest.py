"""Shared fixtures: tiny random models built in code, no downloads."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class CharTokenizer:
    """A byte-level tokenizer for tests: ids 0-3 are pad/bos/eos/unk, bytes follow."""

    vocab_size = 260
    pad_id, bos_id, eos_id = 0, 1, 2

    def encode(self, text: str) -> list[int]:
        return [4 + b for b in text.encode()]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 4 for i in ids if 4 <= i < 260).decode(errors="replace")


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()


TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
}


@pytest.fixture
def tiny_llama_config() -> dict:
    return dict(TINY_LLAMA)


@pytest.fixture
def one_thread():
    """Tiny models run far faster on one thread than on a contended 2-core pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def data_home(tmp_path_factory):
    """Built-in data goes to one fresh directory per test session: each world is built once,
    the way a first run builds it, and never touches the user's data/generated."""
    home = tmp_path_factory.mktemp("data-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNIMODAL_DATA_HOME", str(home))
        yield home


def logged(run: Path, name: str) -> list[float]:
    """Metric ``name`` of a run's CSV log, in step order, at the steps that measured it (a step
    whose batch has no target for a loss term logs NaN for it)."""
    (metrics,) = run.glob("logs/version_*/metrics.csv")
    with metrics.open() as f:
        values = [float(row[name]) for row in csv.DictReader(f) if row.get(name)]
    return [v for v in values if not math.isnan(v)]
