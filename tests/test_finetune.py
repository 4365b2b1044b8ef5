"""Fine-tuning an export: the export records its training data, a fine-tune replays it, warns
about the tasks its new data leaves out, and reports each task's loss before and after."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from unimodal.checkpoints.load import read_export_config
from unimodal.cli import main as unimodal_main
from unimodal.data.datamodule import ShardSet, training_mixture
from unimodal.data.sentencepiece_trainer import train_tokenizer
from unimodal.data.tasks import document_task
from unimodal.data.tokenizer import load_tokenizer
from unimodal.schema import Document, Part

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--trainer.enable_progress_bar=false", "--trainer.max_steps=2", "--trainer.val_check_interval=2"]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_replay_takes_its_share_of_the_documents():
    mixture = training_mixture([ShardSet("new/a", 3), ShardSet("new/b", 1)], ["old/x", ShardSet("new/a", 1)], replay_weight=0.2)
    shares = {d.path: round(d.weight, 6) for d in mixture}
    assert shares == {"new/a": 0.6 + 0.1, "new/b": 0.2, "old/x": 0.1}
    assert training_mixture(["new/a"], ["old/x"], replay_weight=0.0) == [ShardSet("new/a", 1.0)]
    with pytest.raises(ValueError, match="replay_weight must be in"):
        training_mixture(["new/a"], ["old/x"], replay_weight=1.0)
    # an export's record is a file someone hands you: a weight of NaN or infinity would reach the sampler
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weights must be finite numbers >= 0"):
            training_mixture(["new/a"], [ShardSet("old/x", bad)], replay_weight=0.5)


def test_a_task_is_named_by_the_media_given_and_written():
    chat = Document([Part("text", text="draw", role="user", loss=False), Part("image", data=b"", role="assistant", loss=True),
                     Part("text", text="a seven", role="assistant", loss=True)])
    assert document_task(chat) == "text -> image+text"
    assert document_task(Document([Part("audio", data=b""), Part("text", text="five")])) == "document audio+text"


def test_a_fine_tune_replays_its_exports_data_and_reports_every_task(tmp_path, caplog):
    base, export, tuned = tmp_path / "base", tmp_path / "export", tmp_path / "tuned"
    stage1 = str(ROOT / "recipes" / "mio" / "stage1_alignment.yaml")
    assert unimodal_main(["train", stage1, "--tiny", f"--trainer.default_root_dir={base}", *QUICK]) == 0
    assert unimodal_main(["export", str(base), "--out", str(export)]) == 0
    record = json.loads((export / "unimodal.json").read_text())["training_data"]
    assert [Path(d["path"]).name for d in record["datasets"]] == ["image_text", "text", "speech"]
    assert abs(sum(d["weight"] for d in record["datasets"]) - 1) < 1e-6 and record["val_datasets"]

    text_only = next(d["path"] for d in record["datasets"] if d["path"].endswith("text") and "image" not in d["path"])
    caplog.set_level(logging.INFO, logger="unimodal")
    args = ["train", str(ROOT / "recipes" / "mio" / "stage2_interleaved.yaml"), "--tiny", f"--trainer.default_root_dir={tuned}",
            f"--model.init_args.init_from={export}", f"--data.init_args.datasets=[{text_only}]", *QUICK]
    assert unimodal_main(args) == 0
    config = yaml.safe_load((tuned / "logs" / "version_0" / "config.yaml").read_text())
    assert [d["path"] for d in config["data"]["init_args"]["replay"]] == [d["path"] for d in record["datasets"]]
    warning = next(r.getMessage() for r in caplog.records if "tasks" in r.getMessage() and r.levelno == logging.WARNING)
    assert "covers 1 of the" in warning and "document audio+text" in warning and "75% of the documents" in warning
    report = json.loads((tuned / "finetune_report.json").read_text())
    tasks = {row["task"]: row for row in report["tasks"]}
    assert {"old: document image+text", "old: document audio+text", "old: document text"} <= set(tasks)
    assert not any(task.startswith("new:") for task in tasks)  # the recipe validates on the export's own sets
    assert all(row["before"] > 0 and row["after"] > 0 for row in tasks.values())
    assert any(row["before"] != row["after"] for row in tasks.values())  # two steps of training moved them

    caplog.clear()
    # streamed new data (a pipe: command, opted in): sampled for the coverage warning, left out of the
    # export's record (an export names local files only), so the export still loads
    piped = f"pipe:cat {min(Path(text_only).glob('*.tar'))}"
    quiet = [*args[:-len(QUICK) - 1], f"--data.init_args.datasets=[{piped}]", "--data.init_args.allow_pipe_urls=true",
             "--data.init_args.replay_weight=0", f"--trainer.default_root_dir={tmp_path / 'forgetful'}",
             f"--data.init_args.val_datasets=[{text_only}]", *QUICK]
    assert unimodal_main(quiet) == 0
    assert any("may forget them" in r.getMessage() for r in caplog.records)
    # its export records the older validation sets too, for the next fine-tune's report
    assert unimodal_main(["export", str(tmp_path / "forgetful"), "--out", str(tmp_path / "forgetful-export")]) == 0
    again = json.loads((tmp_path / "forgetful-export" / "unimodal.json").read_text())["training_data"]
    assert [d["path"] for d in again["val_datasets"]] == [d["path"] for d in record["val_datasets"]] + [str(Path(text_only).resolve())]
    assert again["datasets"] == [] and any("leaves out the streamed shard sets pipe:cat" in r.getMessage() for r in caplog.records)
    assert read_export_config(tmp_path / "forgetful-export")["training_data"] == again


def test_a_misspelt_init_from_is_named(tmp_path, capsys):
    missing = tmp_path / "bsae"
    args = ["train", str(ROOT / "recipes" / "digits" / "chat_sft.yaml"), f"--model.init_args.init_from={missing}", *QUICK]
    assert unimodal_main(args) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"unimodal train: error: init_from {missing} does not exist"
    # a run directory (or a .ckpt) is not an export: said before the recipe's own tokenizer is looked for
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    args = ["train", str(ROOT / "recipes" / "digits" / "chat_sft.yaml"), f"--model.init_args.init_from={tmp_path / 'run'}", *QUICK]
    assert unimodal_main(args) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"unimodal train: error: init_from {tmp_path / 'run'} is not a unimodal export directory (no unimodal.json); "
        f"write one with `unimodal export {tmp_path / 'run'} --out DIR` and give DIR")


def test_an_incomplete_export_or_a_file_of_one_is_one_line(tmp_path, capsys):
    """An export without modules.safetensors would have trained on with a fresh image head."""
    base, export = tmp_path / "base", tmp_path / "export"
    orthus = str(ROOT / "recipes" / "orthus" / "base.yaml")
    assert unimodal_main(["train", orthus, "--tiny", f"--trainer.default_root_dir={base}", *QUICK]) == 0
    assert unimodal_main(["export", str(base), "--out", str(export)]) == 0
    # a generic recipe keeps the export's image head: its replay brings pictures it must read
    chat = ["train", str(ROOT / "recipes" / "lora" / "chat_sft.yaml"), "--tiny", f"--model.init_args.init_from={export}",
            f"--trainer.default_root_dir={tmp_path / 'chat'}", *QUICK]
    assert unimodal_main(chat) == 0
    config = yaml.safe_load((tmp_path / "chat" / "logs" / "version_0" / "config.yaml").read_text())
    assert list(config["model"]["init_args"]["continuous"]) == ["image"]
    capsys.readouterr()
    args = ["train", orthus, "--tiny", f"--trainer.default_root_dir={tmp_path / 'next'}", *QUICK]
    assert unimodal_main([*args, f"--model.init_args.init_from={export / 'unimodal.json'}"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"unimodal train: error: init_from {export / 'unimodal.json'} is a file of an export; give its directory, {export}")
    assert unimodal_main([*args, f"--model.init_args.init_from={export}", "--model.init_args.backbone.config.hidden_size=256"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"unimodal train: error: --model.init_args.backbone.config.hidden_size: the backbone comes from init_from {export}, "
        "with its own architecture; drop the option, or train without init_from")
    # a tokenizer of the same size passes the layout check, yet its ids name other text
    corpus = tmp_path / "other.jsonl"
    corpus.write_text("".join(json.dumps({"parts": [{"type": "text", "text": f"quartz fjord {i} nymph glyph vex {i * 7}"}]}) + "\n"
                              for i in range(400)))
    other = train_tokenizer(corpus, tmp_path / "other.model", vocab_size=load_tokenizer(export / "tokenizer.model").vocab_size)
    assert unimodal_main([*args, f"--model.init_args.init_from={export}", f"--data.init_args.tokenizer={other}"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"unimodal train: error: --data.init_args.tokenizer {other} is not the tokenizer init_from {export} was trained with "
        f"({export / 'tokenizer.model'}): its ids name other text; drop the option to use the export's")
    (export / "modules.safetensors").rename(tmp_path / "modules.safetensors")
    assert unimodal_main([*args, f"--model.init_args.init_from={export}"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"unimodal train: error: {export} lacks modules.safetensors, which holds its image weights; "
        "copy the export whole, or export its checkpoint again")
    (tmp_path / "modules.safetensors").rename(export / "modules.safetensors")
    (export / "model.safetensors").unlink()
    assert unimodal_main(["eval", str(export), "--suite", "digits", "--limit", "1"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"unimodal eval: error: {export} holds no model weights (model.safetensors or pytorch_model.bin, whole or sharded "
        "with an .index.json); copy the model directory whole")
