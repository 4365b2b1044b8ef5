"""The benchmark scripts keep working on a CPU, so the GPU check never finds them broken."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import data_pipeline  # noqa: E402
import diffusion_head  # noqa: E402
import generation  # noqa: E402
import head_overlap  # noqa: E402
import hostile_inputs  # noqa: E402
import media_cache  # noqa: E402
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


TINY_OVERLAP = ["--rows", "2", "--backbone_steps", "3", "--pictures", "2", "--slots", "2", "--steps", "3", "--hidden", "32",
                "--layers", "1", "--rounds", "1"]


def test_the_head_overlap_benchmark_checks_the_worker_draws_what_this_process_draws(monkeypatch):
    threads = torch.get_num_threads()
    figures = head_overlap.main(TINY_OVERLAP)
    assert set(figures) >= {"one after the other", "head in a thread", "head in the worker process"}
    assert all(ms > 0 for ms in figures.values()) and torch.get_num_threads() == threads
    # a worker that draws otherwise (here: each row with another row's generator) fails the benchmark instead of timing it

    def swapped(head, conn):
        while (request := conn.recv()) is not None:
            hidden, states = request
            conn.send(head_overlap.draw(head, hidden, states[::-1]))

    monkeypatch.setattr(head_overlap, "head_worker", swapped)
    with pytest.raises(AssertionError, match="drew other features"):
        head_overlap.main(TINY_OVERLAP)


def test_the_serving_breakdown_times_each_stage_one_at_a_time_and_batched():
    feed = _Run._feed
    bodies = [{**body, "max_tokens": 8} for body in serving.requests(4)]
    for head_worker in (False, True):
        assistant = media_assistant()
        best = serving.breakdown(assistant, bodies, rounds=1, head_worker=head_worker)
        (alone, alone_calls), (together, together_calls) = best["one at a time"], best["batched"]
        assert alone_calls["total"] == 4 and together_calls["total"] == 1
        assert together_calls["backbone steps"] < alone_calls["backbone steps"]
        assert all(alone[stage] > 0 and together[stage] > 0 for stage in ("prompts", "prefill", "backbone steps", "token sampling"))
        assert _Run._feed is feed  # the clocks are taken off again
        assert assistant.engine.head_worker is None  # the worker is closed again


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "gpu_check.log").read_text()
    assert "framework / bare loop" in log and "Transfusion images" in log and "feed ratio" in log


@pytest.mark.parametrize("script, argv", [
    # each would otherwise run its workload and end in a traceback (or, for generation, a wrong rate)
    (train_step, ["--model", "tiny", "--device", "cpu", "--seq-len", "256", "--batch", "1", "--steps", "3", "--warmup", "0"]),
    (train_step, ["--model", "tiny", "--device", "cpu", "--seq-len", "256", "--batch", "1", "--steps", "3", "--warmup", "3"]),
    (data_pipeline, ["--mix", "text", "--workers", "a"]),
    (data_pipeline, ["--mix", "text", "--workers", "0", "--batches", "0"]),
    (diffusion_head, ["--width", "32", "--hidden", "16", "--features", "8", "--repeats", "0"]),
    (media_cache, ["--documents", "5", "--epochs", "0"]),
    (serving, ["--rounds", "0"]),
    (generation, ["--text-batches", "--families", "orthus", "--rounds", "1", "--images", "1", "--reference-images", "2",
                  "--slots", "2", "--steps", "100", "--image-hidden", "64", "--image-layers", "1"]),
    (hostile_inputs, ["no/such/export"]),
])
def test_a_bad_benchmark_argument_is_one_line(script, argv, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe paths are relative to the repository
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_the_serving_benchmark_refuses_a_port_another_server_answers_on():
    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthy) as other:
        thread = threading.Thread(target=other.serve_forever, daemon=True)
        thread.start()
        try:
            with pytest.raises(SystemExit, match="in use"):
                with serving.serving(Path("no/such/export"), 1, other.server_address[1]):
                    pytest.fail("the benchmark would time the server that was already there")
        finally:
            other.shutdown()


@pytest.mark.parametrize("pytest_output, pytest_status, returncode", [
    ("14 passed", 0, 0),
    ("SKIPPED [1] tests/test_gpu.py:51: needs CUDA\n13 passed, 1 skipped", 0, 1),
    ("no tests ran, 923 deselected", 5, 1),
])
def test_gpu_check_fails_on_a_cuda_machine_unless_every_gpu_test_ran(tmp_path, pytest_output, pytest_status, returncode):
    """A stand-in Python that reports CUDA and the given pytest outcome: the check passes only when
    gpu tests ran and none skipped."""
    python = tmp_path / "python"
    python.write_text(
        '#!/usr/bin/env bash\n'
        'case "$*" in\n'
        '  *cuda.is_available*) echo 1 ;;\n'
        '  *"-m pytest"*) printf "%b\\n" "$FAKE_PYTEST_OUTPUT"; exit "$FAKE_PYTEST_STATUS" ;;\n'
        '  *"import xformers"*) exit 1 ;;\n'
        '  *) echo figures ;;\n'
        'esac\n'
    )
    python.chmod(0o755)
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=str(python), UNIMODAL_DATA_HOME=str(tmp_path),
               FAKE_PYTEST_OUTPUT=pytest_output, FAKE_PYTEST_STATUS=str(pytest_status))
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == returncode, result.stdout + result.stderr
