"""The benchmark scripts keep working on a CPU, so the GPU check never finds them broken."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import diffusion_head  # noqa: E402
import serving  # noqa: E402
import train_step  # noqa: E402
from inference_helpers import media_assistant  # noqa: E402

from unimodal.inference.engine import _Run  # noqa: E402
from unimodal.modalities.vocab import VocabLayout  # noqa: E402
from unimodal.models.heads import ConditionedHead  # noqa: E402
from unimodal.models.attention import build_attention_mask  # noqa: E402


@pytest.mark.parametrize("images", [False, True])
def test_synthetic_batches_and_the_attention_pairs_they_allow(images):
    layout = VocabLayout(text_size=512)
    batches = train_step.synthetic_batches(layout, steps=4, seq_len=1024, batch=2, images=images)
    assert any(bool((b.block_ids >= 0).any()) for b in batches)
    assert any(bool(b.continuous_mask.any()) for b in batches) == images
    # packed, not one document per row (documents of up to a whole row leave gaps)
    assert sum(int((b.doc_ids > 0).sum()) for b in batches) > 0.8 * 4 * 2 * 1024
    for batch in batches:
        real = batch.doc_ids > 0
        allowed = build_attention_mask(batch.doc_ids, batch.block_ids)[:, 0]
        assert train_step.attention_pairs(batch) == int(allowed[real].sum())


def test_the_diffusion_head_benchmark_checks_that_both_sides_agree(monkeypatch):
    assert diffusion_head.main(["--rows", "2", "--steps", "4", "--width", "32", "--hidden", "16", "--features", "8", "--repeats", "1"]) > 0
    # a planned head that drifted from the plain one fails the benchmark instead of timing it
    modulations = ConditionedHead.modulations
    monkeypatch.setattr(ConditionedHead, "modulations", lambda self, t: modulations(self, t) + 0.1)
    with pytest.raises(Exception, match="close"):
        diffusion_head.main(["--rows", "2", "--steps", "4", "--width", "32", "--hidden", "16", "--features", "8", "--repeats", "1"])


def test_the_serving_breakdown_times_each_stage_one_at_a_time_and_batched():
    feed = _Run._feed
    bodies = [{**body, "max_tokens": 8} for body in serving.requests(4)]
    best = serving.breakdown(media_assistant(), bodies, rounds=1)
    (alone, alone_calls), (together, together_calls) = best["one at a time"], best["batched"]
    assert alone_calls["total"] == 4 and together_calls["total"] == 1
    assert together_calls["backbone steps"] < alone_calls["backbone steps"]
    assert all(alone[stage] > 0 and together[stage] > 0 for stage in ("prompts", "prefill", "backbone steps", "token sampling"))
    assert _Run._feed is feed  # the clocks are taken off again


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "gpu_check.log").read_text()
    assert "framework / bare loop" in log and "Transfusion images" in log
