"""Exact resume on CPU, SIGTERM checkpoints, atomic checkpoint writes, ``--resume auto``."""

from __future__ import annotations

import csv
import logging
import os
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from unimodal.training.recipes import load_recipe, make_cli, run_training
from unimodal.training.module import UnimodalModule
from unimodal.checkpoints.files import AtomicCheckpointIO, find_latest_checkpoint
from unimodal.errors import UserError
from unimodal.training.resume import Preempted
from unimodal.worlds import resolve

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "text" / "tiny.yaml"
STEPS = 6


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """The tiny text recipe with dropout, so a resume that lost the RNG state would differ."""
    config = load_recipe(RECIPE, tiny=True)
    config["model"]["init_args"]["backbone"]["config"].update(attention_dropout=0.2, hidden_size=64, intermediate_size=128)
    config["data"]["init_args"].update(seq_len=64, batch_size=2, steps_per_epoch=4, val_datasets=None)
    path = tmp_path_factory.mktemp("recipe") / "tiny-dropout.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(recipe: Path, run: Path, *extra: str) -> None:
    run_training([
        str(recipe), f"--trainer.default_root_dir={run}", f"--trainer.max_steps={STEPS}",
        "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.limit_val_batches=0", *extra,
    ], resolve_path=resolve)


def train_until_sigterm(monkeypatch, step: int, recipe: Path, run: Path, *extra: str, match: str | None = None) -> None:
    """Train with a SIGTERM sent during ``step`` (counted from 1), as a preempting scheduler would."""

    def preempt(self):
        if self.trainer.global_step == step - 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as patch:
        patch.setattr(UnimodalModule, "on_after_backward", preempt)
        with pytest.raises(Preempted, match=match):
            train(recipe, run, *extra)


def losses(run: Path) -> dict[int, float]:
    """train/loss by step over every version of the run's CSV log (a resumed run adds a version)."""
    out = {}
    for metrics in sorted(run.glob("logs/version_*/metrics.csv")):
        with metrics.open() as f:
            out.update({int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f)
                        if row.get("train/loss") and row["train/loss"] != "nan"})
    return out


def test_sigterm_saves_and_resume_auto_gives_the_same_losses(recipe, tmp_path, monkeypatch, caplog):
    reference = tmp_path / "reference"
    train(recipe, reference)
    expected = losses(reference)
    assert sorted(expected) == list(range(STEPS))

    # steps_per_epoch=4: the run is stopped in its second epoch, one batch into it
    run = tmp_path / "interrupted"
    train_until_sigterm(monkeypatch, 5, recipe, run, match=r"stopped by SIGTERM at step 5 \(saved .*last.ckpt\); continue with --resume auto")
    assert not [r for r in caplog.records if r.name.startswith("unimodal") and "SIGTERM" in r.getMessage()]  # the error line says it
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 5
    assert not list((run / "checkpoints").glob(".tmp-*"))

    train(recipe, run, "--resume=auto")
    resumed = losses(run)
    assert sorted(resumed) == list(range(STEPS))
    assert resumed == expected  # bit-identical on CPU: weights, optimiser, schedule, RNG and data position restored
    # the resumed run writes last.ckpt again, not a last-v1.ckpt beside the interrupted state
    assert [p.name for p in (run / "checkpoints").glob("last*.ckpt")] == ["last.ckpt"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == STEPS


def validating_every_2_steps(recipe: Path, tmp_path: Path, batches: int) -> tuple[Path, tuple[str, ...]]:
    """The recipe with ``batches`` validation batches, and the options that validate every 2 steps."""
    config = yaml.safe_load(recipe.read_text())
    config["data"]["init_args"].update(val_datasets=[{"path": "builtin:text/val"}], val_batches=batches)
    validating = tmp_path / "validating.yaml"
    validating.write_text(yaml.safe_dump(config))
    return validating, (f"--trainer.limit_val_batches={batches}", "--trainer.val_check_interval=2", "--trainer.num_sanity_val_steps=0")


def test_a_run_stopped_at_an_epochs_end_where_it_validated_resumes_with_the_same_losses(recipe, tmp_path, monkeypatch):
    """SIGTERM during step 4, the last of an epoch (steps_per_epoch 4), where the uninterrupted run
    validates (every 2 steps). The resumed run starts the next pass before its saved RNG state is
    set again, the uninterrupted one after it, and it need not validate there again: neither may
    move the dropout masks drawn after."""
    validating, every_2 = validating_every_2_steps(recipe, tmp_path, 1)
    reference = tmp_path / "reference"
    train(validating, reference, *every_2)
    run = tmp_path / "interrupted"
    train_until_sigterm(monkeypatch, 4, validating, run, *every_2)
    train(validating, run, *every_2, "--resume=auto")
    assert losses(run) == losses(reference)


def test_sigterm_during_the_last_step_still_stops_the_job(recipe, tmp_path, monkeypatch):
    """A run whose last step saw SIGTERM saves and stops as any other, so that a pipeline does not
    go on to export and to its next stage while the scheduler waits for it to stop."""
    run = tmp_path / "last"
    train_until_sigterm(monkeypatch, STEPS, recipe, run, match=rf"stopped by SIGTERM at step {STEPS} \(saved .*last.ckpt\)")
    train(recipe, run, "--resume=auto")  # nothing left to train: it ends at once
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == STEPS


def test_sigterm_during_validation_saves_after_the_next_step_and_resumes_exactly(recipe, tmp_path, monkeypatch):
    """Lightning's validation loop stops at its SIGTERM flag before any training batch ends, so a
    single-device run pre-empted while it validated stopped with no checkpoint at all."""
    validating, every_2 = validating_every_2_steps(recipe, tmp_path, 2)
    reference = tmp_path / "reference"
    train(validating, reference, *every_2)
    validate = UnimodalModule.validation_step

    def preempt(self, batch, batch_idx):
        if self.trainer.global_step == 2 and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return validate(self, batch, batch_idx)

    run = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        patch.setattr(UnimodalModule, "validation_step", preempt)
        with pytest.raises(Preempted, match=r"stopped by SIGTERM at step 3 \(saved .*last.ckpt\)"):
            train(validating, run, *every_2)
    train(validating, run, *every_2, "--resume=auto")
    assert losses(run) == losses(reference)


def test_resuming_with_other_data_settings_says_which(recipe, tmp_path, caplog):
    """The data position is counted in batches: a resume with another batch size cannot continue
    the stream where it stopped, and says so instead of going on silently."""
    run = tmp_path / "run"
    train(recipe, run, "--trainer.max_steps=2")
    with caplog.at_level(logging.WARNING, logger="unimodal.train"):
        train(recipe, run, "--resume=auto", "--trainer.max_steps=3")
        assert not [r for r in caplog.records if "differ from the checkpoint" in r.getMessage()]
        train(recipe, run, "--resume=auto", "--trainer.max_steps=4", "--data.init_args.batch_size=1")
    said = [r.getMessage() for r in caplog.records if "differ from the checkpoint" in r.getMessage()]
    assert len(said) == 1 and "data.init_args.batch_size: 2 -> 1" in said[0]


def test_resuming_with_other_dataloader_workers_or_shuffle_buffer_says_so(caplog):
    """Each DataLoader worker is seeded and reads shards of its own, so the batches counted in the
    checkpoint are other batches with another worker count or shuffle buffer."""
    from unimodal.checkpoints.files import RUN_CONFIG_KEY
    from unimodal.training.resume import RunState

    saved = {"data": {"init_args": {"num_workers": 0, "shuffle_buffer": 256, "replay_weight": 0.5, "chat_template": "chatml"}}}
    now = {"data": {"init_args": {"num_workers": 4, "shuffle_buffer": 64, "replay_weight": 0.2, "chat_template": "vicuna"}}}
    with caplog.at_level(logging.WARNING, logger="unimodal.train"):
        RunState(now).on_load_checkpoint(SimpleNamespace(global_rank=0, world_size=1), None, {RUN_CONFIG_KEY: saved})
    said = " ".join(r.getMessage() for r in caplog.records if "differ from the checkpoint" in r.getMessage())
    for change in ("num_workers: 0 -> 4", "shuffle_buffer: 256 -> 64", "replay_weight: 0.5 -> 0.2", "chat_template: chatml -> vicuna"):
        assert change in said


def test_each_rank_draws_its_own_noise_after_one_seed_built_one_model():
    """``seed_everything`` gives every rank one seed (one model); the diffusion noise, timesteps
    and dropout each rank then draws must differ, except on rank 0 (a one-device run is unchanged)
    and on a resumed rank, which restores its own saved stream."""
    from unimodal.training.resume import RunState

    def first_draw(rank: int, resumed: bool = False) -> torch.Tensor:
        torch.manual_seed(0)
        state = RunState()
        state._pending = {"saved": "state"} if resumed else None
        state.on_train_start(SimpleNamespace(global_rank=rank, world_size=2), None)
        return torch.rand(4)

    torch.manual_seed(0)
    unseeded = torch.rand(4)
    assert torch.equal(first_draw(0), unseeded)
    assert not torch.equal(first_draw(1), unseeded)
    assert not torch.equal(first_draw(1), first_draw(2))
    assert torch.equal(first_draw(1, resumed=True), unseeded)


def test_validation_draws_its_own_fixed_stream_and_leaves_trainings_as_it_was():
    """A checkpoint saved at a step that ends in a validation holds the RNG state from before it,
    and the resumed run does not validate there again: training's draws must not depend on it."""
    from types import SimpleNamespace

    from unimodal.training.resume import RunState

    state, trainer = RunState(), SimpleNamespace(global_rank=0)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    draws = []
    for _ in range(2):
        state.on_validation_start(trainer, None)
        draws.append(torch.rand(4))  # diffusion noise and timesteps of validation losses
        state.on_validation_end(trainer, None)
    torch.testing.assert_close(torch.rand(4), expected)  # training goes on as if nothing had run
    torch.testing.assert_close(draws[0], draws[1])  # every evaluation draws the same noise
    after = torch.rand(4)
    torch.manual_seed(3)
    torch.rand(4)
    state.on_validation_start(trainer, None)
    torch.rand(4)
    state.on_exception(trainer, None, RuntimeError("cut short"))  # a validation that raised hands them back too
    torch.testing.assert_close(torch.rand(4), after)


def test_a_rank_a_resumed_checkpoint_saved_no_stream_of_draws_its_own():
    """Resumed on more ranks than saved: the extra rank must not replay rank 0's noise."""
    from unimodal.training.resume import RNG_KEY, RunState, _rng_state

    torch.manual_seed(0)
    saved = [_rng_state()]
    draws = []
    for rank in (0, 1):
        trainer = SimpleNamespace(global_rank=rank, world_size=2)
        state = RunState()
        state.on_load_checkpoint(trainer, None, {RNG_KEY: saved})
        torch.manual_seed(0)
        state.on_train_start(trainer, None)
        state.on_train_batch_start(trainer, None, None, 0)
        draws.append(torch.rand(4))
    assert not torch.equal(draws[0], draws[1])


def test_a_run_resumed_from_an_earlier_step_is_newest_and_a_changed_lr_is_said_to_be_kept(recipe, tmp_path, caplog):
    """Resumed from step 2 of a run that reached 4, the run writes ``step=4-v1`` beside the first
    ``step=4``; its ``last.ckpt`` at step 6 is still the newest. A changed lr on resume cannot
    take effect (the optimizer state holds it), and the run says so."""
    run = tmp_path / "again"
    train(recipe, run, "--trainer.max_steps=4", "--checkpoint_every_n_steps=2")
    first = run / "checkpoints" / "epoch=0-step=2.ckpt"
    train(recipe, run, f"--ckpt_path={first}", "--trainer.max_steps=6", "--checkpoint_every_n_steps=2")
    assert (run / "checkpoints" / "epoch=0-step=4-v1.ckpt").is_file()
    assert torch.load(find_latest_checkpoint(run / "checkpoints"), weights_only=False)["global_step"] == 6
    lr = load_recipe(recipe, tiny=False)["model"]["init_args"]["optimizer"]["lr"]
    with caplog.at_level(logging.WARNING, logger="unimodal.train"):
        train(recipe, run, "--resume=auto", "--trainer.max_steps=7", "--model.init_args.optimizer.lr=0.5")
    said = [r.getMessage() for r in caplog.records if "optimizer state" in r.getMessage()]
    assert len(said) == 1 and f"model.init_args.optimizer.lr: {lr} -> 0.5" in said[0]


def test_resuming_with_other_parameters_trained_is_refused_naming_the_change(recipe, tmp_path):
    """The optimizer state is a list by position: freezing layer 1 in place of layer 0 (as many
    values) loaded layer 0's moments onto layer 1 without a word."""
    run = tmp_path / "frozen"
    train(recipe, run, "--trainer.max_steps=2", "--model.init_args.frozen=[backbone.model.layers.0.*]")
    with pytest.raises(UserError, match=r"^the checkpoint trained other parameters than this run would \(model\.init_args\.frozen: "
                       r"\['backbone\.model\.layers\.0\.\*'\] -> \['backbone\.model\.layers\.1\.\*'\]\)"):
        train(recipe, run, "--resume=auto", "--trainer.max_steps=4", "--model.init_args.frozen=[backbone.model.layers.1.*]")
    train(recipe, run, "--resume=auto", "--trainer.max_steps=4", "--model.init_args.frozen=[backbone.model.layers.0.*]")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_trust_checkpoint_is_a_flag_as_the_refusal_of_a_sharded_directory_says():
    """``--ckpt_path DIR`` is refused with "pass --trust_checkpoint"; that alone must parse."""
    for given, trusted in ((["--trust_checkpoint"], True), (["--trust_checkpoint=false"], False), ([], False)):
        cli = make_cli([str(RECIPE), "--tiny", *given], resolve, parse_only=True)
        assert cli.config["trust_checkpoint"] is trusted


def test_ctrl_c_ends_the_run_in_one_line_naming_the_checkpoint_to_resume_from(recipe, tmp_path, monkeypatch):
    """Lightning answers Ctrl-C by exiting with status 1 and a line of its own, saving nothing."""
    from unimodal.training.resume import Interrupted

    def interrupt_at_step_3(self):
        if self.trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    handler = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(UnimodalModule, "on_after_backward", interrupt_at_step_3)
    # a job started in the background by a non-interactive shell inherits SIGINT ignored, where
    # no Ctrl-C could reach it either: Python's own handler stands in for a terminal's
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(Interrupted, match=r"interrupted \(Ctrl-C\) at step 3, without saving; the newest checkpoint is .*checkpoints/last.ckpt \(step 2\); continue with --resume auto") as stopped:
            train(recipe, tmp_path / "run", "--checkpoint_every_n_steps=2")
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT from then on
    assert stopped.value.exit_code == 130


def test_last_ckpt_holds_the_last_step_and_a_longer_run_resumes_from_it_exactly(recipe, tmp_path):
    """A run whose max_steps falls between step checkpoints: last.ckpt is its last step (Lightning
    left the last multiple there), saved mid-epoch, so raising max_steps and resuming continues
    the data where it stopped (a checkpoint saved after the loop started the next epoch)."""
    reference = tmp_path / "reference"
    train(recipe, reference)
    run = tmp_path / "shorter"
    train(recipe, run, "--trainer.max_steps=3", "--checkpoint_every_n_steps=2")
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3 and last["UnimodalDataModule"]["epoch"] == 0 and last["UnimodalDataModule"]["batches"] == 3
    train(recipe, run, "--resume=auto", "--checkpoint_every_n_steps=5")  # another interval: the same last.ckpt goes on
    assert losses(run) == losses(reference)
    assert not list((run / "checkpoints").glob("last-v*.ckpt"))
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] > 3


def test_resume_auto_without_checkpoints_starts_fresh_and_rejects_both_options(recipe, tmp_path):
    run = tmp_path / "fresh"
    train(recipe, run, "--resume=auto", "--trainer.max_steps=1")
    assert find_latest_checkpoint(run / "checkpoints").name == "last.ckpt"
    with pytest.raises(ValueError, match="not both"):
        train(recipe, run, "--resume=auto", "--ckpt_path=last")
    # --ckpt_path=last means the same: a fresh start where there is none, else the newest
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(recipe, tmp_path / "fresh-last", "--ckpt_path=last", "--trainer.max_steps=1")
    assert not [w for w in caught if "no last checkpoint" in str(w.message)]  # Lightning's, whose hint is wrong here
    train(recipe, run, "--ckpt_path=last", "--trainer.max_steps=2")
    assert torch.load(find_latest_checkpoint(run / "checkpoints"), weights_only=False)["global_step"] == 2
    assert not (run / "checkpoints" / "last-v1.ckpt").exists()  # continued, not started beside


def test_a_fresh_run_beside_an_earlier_ones_checkpoints_keeps_them_and_says_so(recipe, tmp_path, caplog):
    run = tmp_path / "again"
    train(recipe, run, "--trainer.max_steps=1")
    with caplog.at_level(logging.WARNING, logger="unimodal.train"):
        train(recipe, run, "--trainer.max_steps=1")
    said = [r.getMessage() for r in caplog.records if "earlier run" in r.getMessage()]
    assert len(said) == 1 and "newest: last.ckpt" in said[0] and "--resume auto" in said[0]
    assert sorted(p.name for p in (run / "checkpoints").glob("last*.ckpt")) == ["last-v1.ckpt", "last.ckpt"]
    assert find_latest_checkpoint(run / "checkpoints").name == "last-v1.ckpt"


def test_a_crash_during_a_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_latest_checkpoint_is_the_newest_and_ignores_partial_writes(tmp_path):
    from unimodal.checkpoints.files import SAVED_AT_KEY

    def write(name: str, saved_at: float | None = None, directory: Path = tmp_path) -> Path:
        path = directory / name
        torch.save({} if saved_at is None else {SAVED_AT_KEY: saved_at}, path)
        os.utime(path, (1, 1))  # file times as a copy without -p leaves them: no help
        return path

    assert find_latest_checkpoint(tmp_path / "missing") is None
    # a kill between the step file and last.ckpt: the step is newer, whatever the names say
    write("last.ckpt", 5.0)
    step = write("epoch=0-step=10.ckpt", 10.0)
    (tmp_path / ".tmp-1-last.ckpt").write_bytes(b"partial")
    assert find_latest_checkpoint(tmp_path) == step
    # a run resumed from an earlier step writes -v1 step files older than its last.ckpt
    last = write("last.ckpt", 50.0)
    write("epoch=0-step=28-v1.ckpt", 40.0)
    assert find_latest_checkpoint(tmp_path) == last
    # a file that cannot be read ranks by its file time, to be found and passed over with a warning
    damaged = tmp_path / "epoch=0-step=30.ckpt"
    damaged.write_bytes(b"cut short")
    assert find_latest_checkpoint(tmp_path) == damaged
    damaged.unlink()
    torch.save([1, 2], tmp_path / "epoch=0-step=31.ckpt")  # readable, but not a checkpoint: the same
    assert find_latest_checkpoint(tmp_path) == tmp_path / "epoch=0-step=31.ckpt"
    # a sharded directory by the time its save finished: a DeepSpeed run resumed beside file checkpoints
    sharded = tmp_path / "last-v1.ckpt"
    sharded.mkdir()
    (sharded / "latest").write_text("global_step40")
    assert find_latest_checkpoint(tmp_path) == sharded
    # checkpoints that record no time (and sharded directories) by names: a later run's, a run's last, its latest step
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    write("epoch=0-step=5.ckpt", directory=legacy)
    write("last.ckpt", directory=legacy)
    assert find_latest_checkpoint(legacy) == legacy / "last.ckpt"
    (legacy / "last.ckpt").unlink()
    write("epoch=0-step=10.ckpt", directory=legacy)
    assert find_latest_checkpoint(legacy) == legacy / "epoch=0-step=10.ckpt"
    write("last-v1.ckpt", directory=legacy)  # a later run's, started beside the earlier one
    assert find_latest_checkpoint(legacy) == legacy / "last-v1.ckpt"


class FakeBatches(torch.utils.data.IterableDataset):
    """Batches 0..9 with label counts 1..10: enough to see which ones a loader yields."""

    epoch = 0

    def __iter__(self):
        for i in range(10):
            yield SimpleNamespace(index=i, num_label_tokens=i + 1, window_label_tokens=None)


def test_a_resumed_loader_drops_the_trained_batches_and_keeps_window_boundaries():
    from unimodal.data.datamodule import WindowedLoader

    loader = WindowedLoader(FakeBatches(), window=2, epoch=lambda: 3, done=lambda epoch: 5 if epoch == 3 else 0,
                            collate_fn=lambda b: b)
    batches = list(loader)
    assert [b.index for b in batches] == [5, 6, 7, 8, 9]
    # batch 5 ends the window it started in (4, 5); the windows after it are whole again
    assert [int(b.window_label_tokens) for b in batches] == [6, 7 + 8, 7 + 8, 9 + 10, 9 + 10]


def test_sigterm_waits_for_the_optimizer_step_of_an_accumulation_window(tmp_path):
    from unimodal.training.resume import SaveOnSigterm

    saved = []
    progress = SimpleNamespace(current=SimpleNamespace(processed=0), is_last_batch=False)
    trainer = SimpleNamespace(
        received_sigterm=True, world_size=1, accumulate_grad_batches=4, global_step=0,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
        save_checkpoint=saved.append, checkpoint_callbacks=[],
    )
    trainer._signal_connector = trainer  # the flag Lightning reads lives on its signal connector
    callback = SaveOnSigterm(tmp_path)
    for processed in (5, 6, 7):  # SIGTERM during the window of batches 5-8
        progress.current.processed = processed
        callback.on_train_batch_end(trainer, None, None, None, processed - 1)
        assert not saved and trainer.received_sigterm is False  # Lightning keeps going
    progress.current.processed = 8
    callback.on_train_batch_end(trainer, None, None, None, 7)
    assert saved == [tmp_path / "last.ckpt"] and trainer.received_sigterm is True  # saved, then Lightning stops


def test_runs_keep_their_last_k_step_checkpoints_and_clear_dead_writers_files(tmp_path):
    import os
    import subprocess
    import sys

    from unimodal.checkpoints.files import prune_checkpoints

    directory = tmp_path / "checkpoints"
    directory.mkdir()
    from unimodal.checkpoints.files import SAVED_AT_KEY

    for step in range(5):
        torch.save({SAVED_AT_KEY: 10.0 + step}, directory / f"step={step}.ckpt")
        os.utime(directory / f"step={step}.ckpt", (5 - step, 5 - step))  # the recorded times count, not the file times
    for name in ("last.ckpt", "last-v1.ckpt", "last-v2.ckpt"):  # each run's last: never pruned
        torch.save({SAVED_AT_KEY: 0.0}, directory / name)
    for name in ("pretrained.ckpt", "best-loss=0.31.ckpt"):  # a user's files, a callback's own names: never pruned
        torch.save({SAVED_AT_KEY: 1.0}, directory / name)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (directory / f".tmp-{dead}-last.ckpt").write_bytes(b"half")
    (directory / f".tmp-{os.getpid()}-last.ckpt").write_bytes(b"being written")
    prune_checkpoints(directory, 3)
    left = sorted(p.name for p in directory.iterdir())
    assert left == [f".tmp-{os.getpid()}-last.ckpt", "best-loss=0.31.ckpt", "last-v1.ckpt", "last-v2.ckpt", "last.ckpt", "pretrained.ckpt",
                    "step=2.ckpt", "step=3.ckpt", "step=4.ckpt"]


def test_a_run_keeps_keep_last_k_checkpoints(tmp_path):
    recipe = ROOT / "recipes" / "text" / "tiny.yaml"
    run_training([
        str(recipe), "--tiny", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=5", "--checkpoint_every_n_steps=1",
        "--keep_last_k=2", "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
    ], resolve_path=resolve)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert names == ["epoch=0-step=4.ckpt", "epoch=0-step=5.ckpt", "last.ckpt"]


def test_resume_auto_passes_over_a_damaged_newest_checkpoint(recipe, tmp_path, caplog):
    run = tmp_path / "damaged"
    train(recipe, run, "--trainer.max_steps=3", "--checkpoint_every_n_steps=2")
    last = run / "checkpoints" / "last.ckpt"
    os.truncate(last, 3000)  # cut short by a full disk or a copy gone wrong
    os.utime(last)  # still the newest
    from unimodal.cli import main as unimodal_main

    with caplog.at_level(logging.WARNING, logger="unimodal.checkpoints"):  # export passes over it the same way
        assert unimodal_main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    assert any("export takes the one before it" in r.getMessage() for r in caplog.records)
    assert yaml.safe_load((tmp_path / "export" / "unimodal.json").read_text())["source"]["global_step"] == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unimodal.checkpoints"):
        train(recipe, run, "--resume=auto", "--trainer.max_steps=4", "--checkpoint_every_n_steps=2")
    said = [r.getMessage() for r in caplog.records if "--resume auto takes the one before it" in r.getMessage()]
    assert len(said) == 1 and "last.ckpt cannot be read as a checkpoint" in said[0] and "step=2" in said[0]
    # the run went on and wrote whole ones beside the damaged file, which stays for its owner to look at
    newest = find_latest_checkpoint(run / "checkpoints")
    assert newest != last and torch.load(newest, weights_only=False)["global_step"] == 4 and last.stat().st_size == 3000


def test_a_given_checkpoint_that_is_not_one_is_one_line(tmp_path):
    from safetensors.torch import save_file

    from unimodal.errors import UserError
    from unimodal.training.recipes import check_given_checkpoint

    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pt")
    (tmp_path / "notes.ckpt").write_text("see the run.txt file for details")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "ran" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "weights.pt", tmp_path / "ran" / "checkpoints" / "last.ckpt")
    for path, message in (
        # torch 2.13 reads a safetensors file as a checkpoint without a state_dict; 2.11 refuses it while reading
        (tmp_path / "model.safetensors", ("is not a training checkpoint (it holds no state_dict)", "cannot be read as a checkpoint")),
        (tmp_path / "weights.pt", "is not a training checkpoint (it holds no state_dict)"),
        (tmp_path / "notes.ckpt", "cannot be read as a checkpoint: it is truncated or not a checkpoint (not the zip archive torch.save writes)"),
        (tmp_path / "run", f"is a directory but not a checkpoint, and holds none in {tmp_path / 'run' / 'checkpoints'}; "
                           "--ckpt_path takes a .ckpt file or a sharded checkpoint directory"),
        (tmp_path / "ran" / "checkpoints", f"pass --trainer.default_root_dir={tmp_path / 'ran'} --resume auto, or give one of its "
                                           f"checkpoints (the newest: --ckpt_path={tmp_path / 'ran' / 'checkpoints' / 'last.ckpt'})"),
    ):
        with pytest.raises(UserError) as caught:
            check_given_checkpoint(path, trust=True)
        assert any(m in str(caught.value) for m in ((message,) if isinstance(message, str) else message))
        assert "\n" not in str(caught.value)


def test_a_missing_ckpt_path_is_refused_before_the_run_writes_anything(tmp_path, capsys):
    from unimodal.cli import main as unimodal_main

    run = tmp_path / "run"
    args = ["train", str(ROOT / "recipes" / "text" / "tiny.yaml"), "--tiny", f"--trainer.default_root_dir={run}"]
    assert unimodal_main([*args, f"--ckpt_path={tmp_path / 'typo.ckpt'}"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"unimodal train: error: --ckpt_path {tmp_path / 'typo.ckpt'} does not exist"
    assert not run.exists()  # no logs/version_0 left behind by a run that never started


def test_resuming_with_another_tokenizer_of_the_same_size_is_refused(recipe, tmp_path):
    """A data set rebuilt under a stopped run (a retrained tokenizer at the same path, of the same
    size) resumed it silently: its first steps had learnt ids that now name other text."""
    import json

    from unimodal.data.sentencepiece_trainer import train_tokenizer

    run = tmp_path / "run"
    train(recipe, run, "--trainer.max_steps=2")
    upper = tmp_path / "upper.jsonl"
    with open(resolve("builtin:text/train.jsonl")) as lines, upper.open("w") as out:
        for line in lines:
            parts = json.loads(line)["parts"]
            out.write(json.dumps({"parts": [{**part, "text": part["text"].upper()} for part in parts]}) + "\n")
    other = train_tokenizer(upper, tmp_path / "other.model", vocab_size=1024)
    with pytest.raises(UserError, match=r"^the checkpoint was trained with another tokenizer than this run's \(.*other\.model\): "):
        train(recipe, run, "--resume=auto", "--trainer.max_steps=4", f"--data.init_args.tokenizer={other}")
    train(recipe, run, "--resume=auto", "--trainer.max_steps=4")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
