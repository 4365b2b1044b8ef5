"""ZeRO-3 and FSDP2 in two processes where only one rank's batches hold images: nothing hangs,
the image experts start as copies of the text weights (partitioned at construction under ZeRO-3),
and the added modules train."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed" / "continuous_zero3.py"

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.parametrize("strategy", ["deepspeed_stage_3", "fsdp2"])
def test_sharded_training_with_an_image_free_rank(tmp_path, strategy):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
               "--out", str(tmp_path), "--strategy", strategy]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    for name in ("orthus", "llamafusion"):
        saved = torch.load(tmp_path / f"{name}.pt", weights_only=False)
        assert len(saved["losses"]) == 3
        moved = [n for n in saved["initial"] if not torch.equal(saved["initial"][n], saved["final"][n])]
        assert any(n.startswith("continuous.") for n in moved), name
        if name == "llamafusion":
            q_image = saved["initial"]["backbone.model.layers.0.self_attn.q_proj.experts.image.weight"]
            assert torch.equal(q_image, saved["text_q"])  # copied from the partitioned text weights
            assert any(".experts.image." in n for n in moved)
