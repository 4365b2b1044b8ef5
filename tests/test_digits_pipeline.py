"""The digits demo pipeline (recipes/pipelines/digits.yaml), shortened by its tiny: sections:
both stages train, the final model exports with LoRA merged, loads for chat, and the digits
scoreboard is written with its seven scored keys (the slow test: the suite's judges train)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import unimodal
from unimodal.cli import main as unimodal_main
from unimodal.training.pipeline import run_pipeline
from unimodal.worlds import resolve

ROOT = Path(__file__).resolve().parents[1]
SCORED = ["caption_acc", "transcribe_acc", "draw_acc", "speak_acc", "interleaved_acc", "judge_image_acc", "judge_audio_acc"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """Run the tiny pipeline once; its root."""
    root = tmp_path_factory.mktemp("digits") / "demo"
    results = run_pipeline(ROOT / "recipes" / "pipelines" / "digits.yaml", tiny=True, root=root, resolve_path=resolve)
    assert [(r.name, r.status, r.steps) for r in results] == [("pretrain", "done", 3), ("chat_sft", "done", 3)]
    assert all(math.isfinite(r.train_loss) and math.isfinite(r.val_loss) for r in results)
    return root


def test_stages_export_one_merged_any_to_any_model_that_chats(demo):
    # the chat stage started from the pretrained export and trained LoRA plus the diffusion head
    resolved = (demo / "chat_sft" / "recipe.yaml").read_text()
    assert str(demo / "pretrain" / "export") in resolved
    config = json.loads((demo / "chat_sft" / "export" / "unimodal.json").read_text())
    processor = json.loads((demo / "chat_sft" / "export" / "processor.json").read_text())
    assert config["adapter"] is None  # LoRA merged: one self-contained directory
    assert processor["layout"]["code_ranges"] == {"image": 512, "audio": 512}
    assert processor["layout"]["code_layers"] == {"audio": 2}

    # the recipe's sampling defaults travel with the export
    assert config["generation"] == {"text": {"temperature": 0.0}, "image": {"cfg_scale": 2.0}, "audio": {"top_p": 0.7}}
    assert "generation" not in config["model"]

    # the speech codec travels inside the export (no builtin: path that would build the world
    # anew under another working directory); pixel patches need no files
    assert processor["codecs"]["audio"]["init_args"]["path"] == "codecs/audio"
    assert (demo / "chat_sft" / "export" / "codecs" / "audio" / "codebooks.npy").is_file()
    assert "builtin:" not in json.dumps(processor["codecs"])

    assistant = unimodal.load(demo / "chat_sft" / "export", device="cpu")
    assert assistant.codecs["audio"].fingerprint() == json.loads((demo / "chat_sft" / "export" / "codecs" / "audio" / "codec.json").read_text())["fingerprint"]
    settings = assistant.settings
    assert (settings.text.temperature, settings.image.cfg_scale, settings.audio.top_p) == (0.0, 2.0, 0.7)
    reply = assistant.chat([{"role": "user", "content": "Say the number 7."}], max_new_tokens=12, seed=0)
    assert all(part.type in ("text", "image", "audio") for part in reply.parts)


def test_scoreboard_is_written_with_every_key(demo):
    board = demo / "scoreboard.json"
    args = ["eval", str(demo / "chat_sft" / "export"), "--suite", "digits", "--out", str(board), "--limit", "1", "--max_new_tokens", "24"]
    assert unimodal_main(args) == 0
    report = json.loads(board.read_text())
    for key in SCORED:
        assert 0.0 <= report[key] <= 1.0, key
    assert report["image_codec_roundtrip_acc"] is not None and report["audio_codec_roundtrip_acc"] is not None



@pytest.fixture(scope="module")
def full_size_pretrain(tmp_path_factory) -> Path:
    """The demo pipeline's first stage at its full size, for two steps: an export of the
    architecture the chat recipe expects."""
    root = tmp_path_factory.mktemp("digits-full") / "demo"
    pipeline = tmp_path_factory.mktemp("pipeline") / "pretrain-only.yaml"
    pipeline.write_text(f"stages:\n  - name: pretrain\n    recipe: {ROOT / 'recipes' / 'digits' / 'pretrain.yaml'}\n")
    run_pipeline(pipeline, root=root, every_stage={"trainer.max_steps": 2, "trainer.val_check_interval": 2}, resolve_path=resolve)
    return root


def test_the_chat_sft_header_command_fine_tunes_an_export(full_size_pretrain, tmp_path):
    """recipes/digits/chat_sft.yaml's own command, pointed at a pretrained export: the export's
    Processor supplies what the recipe leaves out (code ranges and layers, codecs, feature
    width), which failed before with 'vocabulary layout ... is not a prefix'. Only the paths, the
    step count and the run directory differ from the header."""
    header = (ROOT / "recipes" / "digits" / "chat_sft.yaml").read_text().splitlines()[0]
    command = header.removeprefix("# Command: unimodal ").replace("runs/pipelines/digits", str(full_size_pretrain)).split()
    assert command[:2] == ["train", "recipes/digits/chat_sft.yaml"]
    command[1] = str(ROOT / command[1])
    extra = ["--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    assert unimodal_main([*command, *extra]) == 0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_an_export_is_fine_tuned_with_init_from_alone(full_size_pretrain, tmp_path):
    """The command of docs/lora.md: the recipe names another run's tokenizer; the export's wins."""
    export = full_size_pretrain / "pretrain" / "export"
    command = ["train", str(ROOT / "recipes" / "digits" / "chat_sft.yaml"), f"--model.init_args.init_from={export}"]
    extra = ["--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    assert unimodal_main([*command, *extra]) == 0
