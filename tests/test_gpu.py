"""On a CUDA device: numbers compared with the CPU, not the absence of a crash.

``benchmarks/gpu_check.sh`` runs these (``pytest -m gpu``) and fails if any is skipped on a CUDA
machine. They need no xformers (its tests carry the ``xformers`` mark).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from inference_helpers import family_model, tiny_model
from test_engine import GREEDY, prompt, text_ids

from conftest import CharTokenizer, logged
from unimodal.cli import main as unimodal_main
from unimodal.inference.engine import Engine
from unimodal.models.generation import GenerationSettings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "distributed"))

from tiny import LossRecorder, WindowedData, make_module, packed_sequences, trainer_kwargs  # noqa: E402

from unimodal.training.optim import OptimizerConfig  # noqa: E402
from unimodal.training.strategies import DeepSpeed  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# one recipe per family, run with --tiny: the family's own modalities on its own code path
FAMILY_RECIPES = ["orthus/base", "llamafusion/pretrain", "mio/stage1_alignment", "seed/pretrain_lora"]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1"]


def train(recipe: str, run: Path, *extra: str) -> list[float]:
    code = unimodal_main(["train", str(ROOT / "recipes" / f"{recipe}.yaml"), f"--trainer.default_root_dir={run}", *QUIET, *extra])
    assert code == 0
    return logged(run, "train/loss")


@pytest.mark.parametrize("recipe", FAMILY_RECIPES)
def test_each_family_trains_a_bf16_step_on_flex_attention(recipe, tmp_path):
    """``precision: auto`` and ``attention: auto`` pick bf16 and FlexAttention on the GPU; the
    first losses equal the CPU's fp32 losses within bf16 error."""
    gpu = train(recipe, tmp_path / "gpu", "--tiny", "--trainer.max_steps=2")
    config = next((tmp_path / "gpu").glob("logs/version_*/config.yaml")).read_text()
    assert "precision: bf16-mixed" in config and "attention: auto" in config
    cpu = train(recipe, tmp_path / "cpu", "--tiny", "--trainer.max_steps=2", "--trainer.accelerator=cpu",
                "--model.init_args.backbone.attention=sdpa", "--trainer.precision=32-true")
    assert all(torch.isfinite(torch.tensor(gpu)))
    assert gpu[0] == pytest.approx(cpu[0], rel=0.03), (gpu, cpu)


def test_twenty_steps_on_the_gpu_end_at_the_cpu_fp32_loss(tmp_path):
    steps = ["--trainer.max_steps=20", "--trainer.val_check_interval=20"]
    gpu = train("text/tiny", tmp_path / "gpu", *steps)
    cpu = train("text/tiny", tmp_path / "cpu", *steps, "--trainer.accelerator=cpu", "--trainer.precision=32-true",
                "--model.init_args.backbone.attention=sdpa")
    assert len(gpu) == len(cpu) == 20
    assert gpu[-1] == pytest.approx(cpu[-1], rel=0.02), (gpu[-1], cpu[-1])


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_fp32_greedy_decoding_gives_the_cpu_tokens(attention):
    from test_attention_backends import with_backend

    model = tiny_model()
    prompts = [prompt(model, "hello world"), prompt(model, "hi")]
    settings = GenerationSettings(text=GREEDY, max_new_tokens=32)
    cpu = [text_ids(g) for g in Engine(model, CharTokenizer()).generate(prompts, settings)]
    cuda = [text_ids(g) for g in Engine(with_backend(model, attention).cuda(), CharTokenizer()).generate(prompts, settings)]
    assert cuda == cpu and all(len(ids) == 32 for ids in cuda)


def test_image_generation_on_the_gpu_matches_the_cpu():
    """A LlamaFusion-style model (modality experts, bidirectional image block) draws the same
    picture from the same seed, in fp32, on both devices."""
    model = family_model("llamafusion")
    doc = prompt(model, "draw", bidirectional=("image",), begin="<|boi|>")
    settings = GenerationSettings(text=GREEDY, max_new_tokens=8, seed=3, max_media=1)
    cpu = Engine(model, CharTokenizer()).generate([doc], settings)[0]
    cuda = Engine(model.cuda(), CharTokenizer()).generate([doc], settings)[0]
    assert cpu.segments[0].type == cuda.segments[0].type == "image"
    torch.testing.assert_close(torch.as_tensor(cuda.segments[0].data), torch.as_tensor(cpu.segments[0].data), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_on_one_gpu(stage, tmp_path):
    L.seed_everything(0)
    recorder = LossRecorder()
    trainer = L.Trainer(**trainer_kwargs(tmp_path, accelerator="cuda", precision="bf16-mixed",
                                         strategy=DeepSpeed(stage=stage), max_steps=8, callbacks=[recorder]))
    trainer.fit(make_module(optimizer=OptimizerConfig(lr=1e-2, warmup_steps=0)), datamodule=WindowedData(packed_sequences(2, 2), 1, 1))
    seen = recorder.losses
    assert trainer.global_step == 8 and all(torch.isfinite(torch.tensor(seen)))
    # two batches alternate: each ends below where it started
    assert seen[-2] < seen[0] and seen[-1] < seen[1], seen


def test_an_audio_codec_moved_to_the_gpu_encodes_and_decodes_as_on_the_cpu():
    """load_codec(..., device="cuda") moves the model; the codec moves its inputs after it."""
    import numpy as np

    from test_discrete_encode import ENCODEC
    from unimodal.modalities.audio import HFAudioCodec

    codec = HFAudioCodec.from_config(ENCODEC, layers=2)
    wave = 0.3 * np.sin(2 * np.pi * 220 * np.arange(8000) / 16000)
    codes = codec.encode_waveform(wave, 16000)
    audio = codec.decode_codes(codes)
    codec.model.to("cuda")
    assert np.array_equal(codec.encode_waveform(wave, 16000), codes)
    assert np.allclose(codec.decode_codes(codes), audio, atol=1e-4)
