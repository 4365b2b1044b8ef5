"""End to end on CPU: build the text corpus offline, pack it, train recipes/text/tiny.yaml."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from unimodal.cli import main as unimodal_main
from unimodal.worlds import builtin

from conftest import logged

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "text" / "tiny.yaml"


def overrides(run: Path) -> list[str]:
    return [f"--trainer.default_root_dir={run}"]


def test_tiny_text_recipe_learns_and_checkpoints(tmp_path):
    run = tmp_path / "run"
    code = unimodal_main(["train", str(RECIPE), "--trainer.max_steps=50", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false", *overrides(run)])
    assert code == 0
    losses = logged(run, "train/loss")
    assert len(losses) == 50
    assert sum(losses[-5:]) / 5 < 0.9 * losses[0], losses
    assert logged(run, "val/loss")
    assert logged(run, "train/tokens_per_s")
    assert logged(run, "lr/pg1")  # the decayed parameter group
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list(run.glob("tb/version_*/events.out.tfevents.*"))


def test_print_config_shows_the_resolved_recipe(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "unimodal.cli", "train", str(RECIPE), *overrides(tmp_path), "--print_config"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "class_path: unimodal.training.UnimodalModule" in result.stdout
    assert "seq_len: 256" in result.stdout


def test_a_wrong_config_key_is_one_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "unimodal.cli", "train", str(RECIPE), "--trainer.max_stepz=3"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert result.returncode != 0
    assert "max_stepz" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_model_that_fails_to_build_is_one_line_naming_the_reason(tmp_path, capsys):
    args = ["train", str(RECIPE), "--model.init_args.generation={imag: {}}", f"--trainer.default_root_dir={tmp_path}"]
    assert unimodal_main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "unknown generation setting 'imag'" in errors[0] and "Namespace(" not in errors[0]


def test_a_codec_that_fails_to_build_inside_the_data_module_is_one_line(tmp_path, capsys):
    codecs = "{image: {class_path: unimodal.modalities.image_discrete.PatchVQCodec, init_args: {path: /nonexistent}}}"
    args = ["train", str(RECIPE), f"--data.init_args.codecs={codecs}", f"--trainer.default_root_dir={tmp_path}"]
    assert unimodal_main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("unimodal ")]
    assert errors == ["unimodal train: error: /nonexistent: not a PatchVQCodec directory (needs codec.json and codebook.npy)"]


def test_a_missing_model_directory_is_one_clear_error(capsys):
    assert unimodal_main(["chat", "somewhere"]) == 2
    assert "somewhere" in capsys.readouterr().err


def test_builtin_data_is_built_once_and_resolved(data_home):
    path = Path(builtin.resolve("builtin:text/tokenizer.model"))
    assert path.is_file() and path.is_relative_to(data_home)
    with pytest.raises(ValueError, match="unknown built-in dataset 'nope'"):
        builtin.resolve("builtin:nope/train")


def test_stdlib_corpus_has_no_docstring_in_both_splits(tmp_path):
    """Inherited docstrings (``argparse.BooleanOptionalAction`` reads as ``argparse.Action``) are
    written once, so no validation document is a training document too."""
    from unimodal.worlds.stdlib_text import write_corpus

    write_corpus(tmp_path)
    texts = {s: [json.loads(line)["parts"][0]["text"] for line in (tmp_path / f"{s}.jsonl").open()] for s in ("train", "val")}
    assert not set(texts["train"]) & set(texts["val"])
    assert len(set(texts["train"])) == len(texts["train"])


def test_chat_world_has_no_answer_in_both_splits(tmp_path):
    """A two-turn chat answers a second object too: that object gets no chat of its own, which
    the split could put on the other side, training on a validation answer."""
    from unimodal.data.shards import read_documents
    from unimodal.worlds.chat import build_chat

    build_chat(tmp_path)
    answers = {split: [p.text for doc in read_documents(tmp_path / split) for p in doc.parts if p.role == "assistant"]
               for split in ("train", "val")}
    assert answers["train"] and answers["val"] and not set(answers["train"]) & set(answers["val"])


def test_tiny_applies_the_recipe_overrides(tmp_path):
    from unimodal.training.recipes import load_recipe

    assert load_recipe(RECIPE, tiny=True)["trainer"]["max_steps"] == 20
    assert "tiny" not in load_recipe(RECIPE, tiny=False)


def test_builtin_data_from_an_older_build_is_rebuilt(tmp_path, monkeypatch):
    """A data home whose stamp names another build version is rebuilt, not silently read."""
    calls = []

    def build(root: Path) -> None:
        calls.append(root)
        (root / "data.txt").write_text(f"build {len(calls)}")

    monkeypatch.setenv("UNIMODAL_DATA_HOME", str(tmp_path))
    monkeypatch.setitem(builtin.BUILDERS, "toy", build)
    monkeypatch.setitem(builtin.BUILD_VERSIONS, "toy", 2)
    path = Path(builtin.resolve("builtin:toy/data.txt"))
    builtin.resolve("builtin:toy/data.txt")
    assert path.read_text() == "build 1" and len(calls) == 1
    (tmp_path / "toy" / ".built").write_text("")  # what an older release left
    builtin.resolve("builtin:toy/data.txt")
    assert path.read_text() == "build 2"


def test_builtin_data_is_built_again_after_an_interrupted_build_but_never_over_the_users_files(tmp_path, monkeypatch):
    """A folder without a stamp was removed to build in: a build cut short, or the user's own
    data in a data home shared with it ($UNIMODAL_DATA_HOME/chat, say), lost without a word."""
    calls = []

    def build(root: Path) -> None:
        calls.append(root)
        (root / "data.txt").write_text("half")
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setenv("UNIMODAL_DATA_HOME", str(tmp_path))
    monkeypatch.setitem(builtin.BUILDERS, "toy", build)
    with pytest.raises(KeyboardInterrupt):
        builtin.resolve("builtin:toy/data.txt")
    assert Path(builtin.resolve("builtin:toy/data.txt")).read_text() == "half" and len(calls) == 2
    assert (tmp_path / "toy" / ".built").exists() and not (tmp_path / "toy.building").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    monkeypatch.setitem(builtin.BUILDERS, "mine", build)
    with pytest.raises(FileExistsError, match=r"mine holds files that no build of the built-in 'mine' data left"):
        builtin.resolve("builtin:mine/data.txt")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"] and len(calls) == 2


def test_the_progress_bar_of_a_step_based_run_counts_to_its_last_step():
    from types import SimpleNamespace

    from unimodal.training.progress import StepProgressBar

    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=50)
    assert bar._get_train_description(0).strip() == "Epoch 0 (to step 50)"
    assert bar.total_train_batches == 50  # not the steps left: a resumed run reads 17/50, not 17/34
    shown = []
    bar._update = lambda task, current: shown.append(current)
    bar._update_metrics = bar.refresh = lambda *args: None
    bar.train_progress_bar_id = 0
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=50, global_step=17)
    bar.on_train_batch_end(bar._trainer, None, None, None, batch_idx=70)  # a micro-batch's index under accumulation
    assert shown == [17]
    bar._trainer = SimpleNamespace(max_epochs=3, max_steps=-1)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"


def test_a_step_based_bar_keeps_one_clock_across_epochs(tmp_path):
    """Lightning resets the bar's task at every epoch: a run's bar read "1100/1100 0:00:31" after
    352 s, the time of its last epoch beside the steps of all of them."""
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from unimodal.training.progress import StepProgressBar

    class Clocks(StepProgressBar):
        def __init__(self):
            super().__init__()
            self.started: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module):
            super().on_train_epoch_start(trainer, pl_module)
            self.started.append(self.progress.tasks[self.train_progress_bar_id].start_time)

    bar = Clocks()
    trainer = L.Trainer(max_steps=6, max_epochs=-1, limit_train_batches=2, limit_val_batches=0, callbacks=[bar], logger=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(BoringModel())
    assert trainer.current_epoch == 3 and len(bar.started) == 3 and len(set(bar.started)) == 1, bar.started


def test_the_model_summary_gives_the_parameters_and_no_flops_it_cannot_count(tmp_path, capsys, caplog):
    """Lightning counts FLOPs only in a forward of an ``example_input_array``, which a model fed
    packed batches has none of: its summary said "0 FLOPs" for every module and in total."""
    import logging

    caplog.set_level(logging.INFO)
    assert unimodal_main(["train", str(RECIPE), "--tiny", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1",
                          "--trainer.limit_val_batches=0"]) == 0
    shown = capsys.readouterr().out + caplog.text
    assert "Total params" in shown and "Trainable params" in shown and "Modules in eval mode" in shown
    assert "flops" not in shown.lower() and "model summary" not in shown.lower()
    assert "model: " not in caplog.text  # the totals are said once, by the summary
    caplog.clear()
    assert unimodal_main(["train", str(RECIPE), "--tiny", f"--trainer.default_root_dir={tmp_path / 'quiet'}", "--trainer.max_steps=1",
                          "--trainer.limit_val_batches=0", "--trainer.enable_model_summary=false"]) == 0
    assert "Total params" not in capsys.readouterr().out + caplog.text
    assert re.search(r"model: [\d.]+M parameters, [\d.]+M trainable", caplog.text)


def test_a_diverging_run_stops_with_status_3_and_keeps_its_checkpoints_finite(tmp_path, capsys):
    import torch

    from unimodal.training.exporting import export

    run = tmp_path / "run"
    code = unimodal_main([
        "train", str(RECIPE), "--model.init_args.optimizer.lr=1e6", "--trainer.max_steps=30", "--checkpoint_every_n_steps=1",
        "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0", *overrides(run),
    ])
    assert code == 3
    err = capsys.readouterr().err
    assert "training stopped before that step changed any weight" in err
    assert f"start a new run from its weights (unimodal export {run} --out DIR, then --model.init_args.init_from=DIR)" in err
    checkpoints = sorted((run / "checkpoints").glob("*.ckpt"))
    assert checkpoints  # the steps before the loss went bad were saved, and are whole
    for checkpoint in checkpoints:
        state = torch.load(checkpoint, weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())

    # a checkpoint with non-finite weights (from elsewhere) is not exported
    spoiled = torch.load(checkpoints[-1], weights_only=True)
    name = next(iter(spoiled["state_dict"]))
    spoiled["state_dict"][name] = torch.full_like(spoiled["state_dict"][name], float("nan"))
    torch.save(spoiled, tmp_path / "nan.ckpt")
    with pytest.raises(ValueError, match="non-finite"):
        export(tmp_path / "nan.ckpt", tmp_path / "export")


def test_an_fp16_loss_scale_overflow_is_skipped_by_the_scaler_not_taken_for_divergence(tmp_path):
    """Under 16-mixed the GradScaler's overflow (inf gradients after unscaling, a finite loss) is
    routine: it skips the step and lowers the scale. CPU has no 16-mixed preset, so the plugin is
    given with a scale that overflows at once."""
    import lightning as L
    import torch
    from lightning.pytorch.plugins.precision import MixedPrecision

    sys.path.insert(0, str(ROOT / "tests" / "distributed"))
    from tiny import WindowedData, make_module, packed_sequences, trainer_kwargs

    from unimodal.training.divergence import StopOnDivergence

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    trainer = L.Trainer(**trainer_kwargs(
        tmp_path, max_steps=2, precision=None, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], callbacks=[StopOnDivergence()],
    ))
    trainer.fit(make_module(), datamodule=WindowedData(packed_sequences(0, 2), 1, 1))
    assert trainer.global_step == 2 and scaler.get_scale() < 2.0**100


def test_a_run_without_validation_data_is_not_warned_about_it(tmp_path, recwarn):
    """`val_datasets: null` (quickstart's bring-your-own-data command) is a choice; Lightning
    warned that the validation loader was empty."""
    assert unimodal_main([
        "train", str(RECIPE), "--tiny", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1",
        "--data.init_args.val_datasets=null", "--trainer.enable_progress_bar=false",
    ]) == 0
    assert not [w for w in recwarn if "Total length" in str(w.message)]


def test_a_builtin_dataset_the_command_line_replaces_is_never_built(tmp_path):
    """The quickstart's own-data command overrides every data path of recipes/text/tiny.yaml, yet
    the built-in text corpus was built first (a minute, and a data/generated the user never asked for)."""
    from unimodal.training.recipes import make_cli

    resolved = []

    def resolve(name: str) -> str:
        resolved.append(name)
        return str(tmp_path / name.removeprefix("builtin:"))

    overrides = ["--data.init_args.datasets=[{path: mine}]", "--data.init_args.tokenizer", "mine/tokenizer.model",
                 "--data.init_args.val_datasets=null"]
    make_cli([str(RECIPE), *overrides], resolve_path=resolve, parse_only=True)
    assert resolved == []
    make_cli([str(RECIPE), "--data.init_args.val_datasets=null"], resolve_path=resolve, parse_only=True)
    assert sorted(resolved) == ["builtin:text/tokenizer.model", "builtin:text/train"]
