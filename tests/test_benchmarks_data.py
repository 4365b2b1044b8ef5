"""benchmarks/data_pipeline.py at its smallest settings: it runs, and its figures are sane."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark() -> ModuleType:
    """The benchmarks are scripts, not a package: load the file itself (registered, as its
    dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location("benchmarks_data_pipeline", ROOT / "benchmarks" / "data_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_data_pipeline_figures_are_sane(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the recipe paths are relative to the repository
    (report,) = load_benchmark().main(["--mix", "text", "--workers", "0", "--batches", "2"])
    loader = report.loader[0]
    assert loader.batches == 2 and loader.per_second(loader.positions) > 0 and loader.per_second(loader.useful) > 0
    for delivery in (loader, report.packed, report.padded):
        assert 0 < delivery.share <= 1
    # the same documents on both sides, every token kept: only the batching differs
    assert report.packed.useful == report.padded.useful > 0
    assert report.packed.useful_per_batch >= report.padded.useful_per_batch
    assert report.packing_gain > 0 and report.encode_seconds > 0
    printed = capsys.readouterr().out
    for figure in ("cores:", "non-padding share", "feed ratio", "packed/padded useful tokens/s"):
        assert figure in printed
