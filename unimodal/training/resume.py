"""Resuming runs exactly and saving on pre-emption (checkpoint files: ``unimodal.checkpoints.files``).

- :class:`RunState` stores what Lightning's checkpoint lacks for an exact resume: the RNG states
  of every rank (dropout, noise), restored just before the first resumed step so that nothing
  run in between (sanity checks, data loader start-up) shifts them; and the run's resolved
  config, which ``unimodal export`` reads. The data position is the data module's
  ``state_dict`` (see ``UnimodalDataModule``); model, optimiser, scheduler and step are Lightning's.
- :class:`SaveOnSigterm` turns a SIGTERM (pre-emption) into a checkpoint at the next optimizer
  step boundary, after which Lightning stops the run.
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from unimodal.checkpoints.files import RUN_CONFIG_KEY, SAVED_AT_KEY, WORKDIR_KEY
from unimodal.data.tokenizer import tokenizer_fingerprint
from unimodal.errors import UserError
from unimodal.training.strategies import world_size

log = logging.getLogger("unimodal.train")

RNG_KEY = "unimodal_rng"
VALIDATION_SEED = 20_231
# the names of the parameters the run trains, in order: what the optimizer state's entries belong to
TRAINED_KEY = "unimodal_trained"
# a digest of the text tokenizer's pieces: a resumed run must read the same text from the same ids
TOKENIZER_KEY = "unimodal_tokenizer"


class Stopped(UserError):
    """A run stopped by a signal; ``how_to_continue`` says how to go on (``--resume auto`` for a
    training run, the same command again for a pipeline)."""

    def __init__(self, what: str, how_to_continue: str = "continue with --resume auto"):
        super().__init__(f"{what}; {how_to_continue}" if how_to_continue else what)
        self.what = what


class Preempted(Stopped):
    """The run stopped on SIGTERM after saving a checkpoint."""

    exit_code = 143  # 128 + SIGTERM, as if the signal had ended the process


class Interrupted(Stopped):
    """The run stopped on Ctrl-C; Lightning saves nothing then (SIGTERM does: :class:`Preempted`)."""

    exit_code = 130  # 128 + SIGINT


def _rng_state() -> dict[str, Any]:
    # plain types and tensors only: Lightning loads checkpoints with torch.load(weights_only=True)
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RunState(Callback):
    """Saves every rank's RNG states and the run config in checkpoints; restores the RNG on resume."""

    def __init__(self, run_config: dict[str, Any] | None = None):
        self.run_config = run_config
        self._pending: dict[str, Any] | None = None
        self._before_validation: dict[str, Any] | None = None
        self._tokenizer_digest: str | None = None

    def tokenizer_digest(self, trainer: Trainer) -> str | None:
        """The run's text tokenizer's fingerprint, once (None for data without a tokenizer)."""
        if self._tokenizer_digest is None:
            tokenizer = getattr(trainer.datamodule, "tokenizer", None)
            if hasattr(tokenizer, "pieces"):
                self._tokenizer_digest = tokenizer_fingerprint(tokenizer)
        return self._tokenizer_digest

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        states = [_rng_state()]
        if world_size() > 1:
            states = [None] * world_size()
            dist.all_gather_object(states, _rng_state())
        checkpoint[RNG_KEY] = states
        checkpoint[SAVED_AT_KEY] = time.time()
        checkpoint[WORKDIR_KEY] = os.getcwd()
        checkpoint[TRAINED_KEY] = _trained(pl_module)
        checkpoint[TOKENIZER_KEY] = self.tokenizer_digest(trainer)
        if self.run_config is not None:
            checkpoint[RUN_CONFIG_KEY] = self.run_config

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(RUN_CONFIG_KEY) or {}
        tokenizer = checkpoint.get(TOKENIZER_KEY)
        if tokenizer is not None and self.tokenizer_digest(trainer) not in (None, tokenizer):
            # same vocabulary size, other pieces: a rebuilt data set or a retrained tokenizer at the same path
            raise UserError(
                f"the checkpoint was trained with another tokenizer than this run's ({getattr(trainer.datamodule, 'tokenizer_path', '')}): "
                "its ids name other text, which its weights would misread; resume with the tokenizer it trained with, "
                "or start a new run"
            )
        trained = checkpoint.get(TRAINED_KEY)
        if trained is not None and trained != _trained(pl_module):
            # the optimizer state is a list by position: it would load onto other parameters of the same
            # shapes without a word (or fail in torch's terms when the count differs)
            changed = _changed_settings(saved, self.run_config or {}, TRAINED_PARAMETER_KEYS)
            raise UserError(
                f"the checkpoint trained other parameters than this run would ({'; '.join(changed) or 'the model differs'}), "
                "so its optimizer state does not fit them; resume with the settings it trained with, or start a new run "
                "from its weights (init_from)"
            )
        changed = _changed_settings(saved, self.run_config or {}, DATA_POSITION_KEYS)
        if changed:
            log.warning(
                "resuming with data settings that differ from the checkpoint's (%s): the data position is counted in "
                "batches of the old settings, so the stream does not continue exactly where it stopped", "; ".join(changed),
            )
        ignored = _changed_settings(saved, self.run_config or {}, RESTORED_OPTIMIZER_KEYS)
        if ignored:
            log.warning(
                "resuming keeps the checkpoint's optimizer state, so these changes do not take effect (%s); to train on "
                "with them, start a new run from the checkpoint's weights (init_from)", "; ".join(ignored),
            )
        states = checkpoint.get(RNG_KEY)
        if not states:
            return
        rank = trainer.global_rank
        if len(states) != trainer.world_size:
            log.warning("checkpoint holds RNG states of %d ranks, this run has %d: random streams differ from an uninterrupted run", len(states), trainer.world_size)
        # a rank the checkpoint has no stream of draws its own (on_train_start), not rank 0's again
        self._pending = states[rank] if rank < len(states) else None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Every rank starts from one seed, which builds one model; from the first step on each rank
        draws its own diffusion noise, timesteps and dropout, or the global batch would repeat one
        draw ``world_size`` times. Rank 0 keeps its stream, so a one-device run is unchanged, and a
        resumed run restores each rank's own saved state instead."""
        if trainer.global_rank > 0 and self._pending is None:
            torch.manual_seed(torch.initial_seed() + trainer.global_rank)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Validation draws from a stream of its own, the same at every evaluation (comparable
        diffusion losses), and leaves training's streams as it found them: a run resumed from a
        checkpoint saved just before a validation, which it does not repeat, draws what an
        uninterrupted run draws."""
        self._before_validation = _rng_state()
        torch.manual_seed(VALIDATION_SEED + trainer.global_rank)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._before_validation is not None:
            _set_rng_state(self._before_validation)
            self._before_validation = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.on_validation_end(trainer, pl_module)  # a validation cut short hands training its streams back too

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            _set_rng_state(self._pending)
            self._pending = None


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with ``last.ckpt`` written at the step that ends the run.

    Lightning writes "last" at the end of training only if it wrote no checkpoint before, so a run
    whose ``max_steps`` is not a multiple of ``every_n_train_steps`` would keep the last multiple's
    weights in ``last.ckpt`` (and export them). And what is saved after the loop has ended marks
    the unfinished epoch as done, so a run resumed with a higher ``max_steps`` would go on with
    the next epoch's data. Here ``last.ckpt`` is written at the batch that reaches ``max_steps``,
    mid-epoch, where a resume continues exactly as an uninterrupted run would.
    """

    @property
    def state_key(self) -> str:
        """The same whatever the interval: a run resumed with another ``--checkpoint_every_n_steps``
        restores this callback's state, so it goes on writing ``last.ckpt`` instead of starting a
        ``last-v1.ckpt`` beside a stale one."""
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if 0 < trainer.max_steps <= trainer.global_step:
            self._write_last_if_behind(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write_last_if_behind(trainer)  # an epoch-bound run (max_steps -1) ends here

    def write_last(self, trainer: Trainer) -> Path:
        """Save ``last.ckpt`` now (as Lightning names it: ``last-v1.ckpt`` beside an earlier
        run's) and return its path."""
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        return Path(self.last_model_path)

    def _write_last_if_behind(self, trainer: Trainer) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self.write_last(trainer)


# what the data position (epoch, batches trained on) means: batches of these settings on this many
# ranks and DataLoader workers (each worker is seeded and reads shards of its own); the template,
# the rule for overlong documents, the codecs and their input layers change documents' token
# counts, and so what the packed batches hold
DATA_POSITION_KEYS = (
    "data.init_args.datasets", "data.init_args.replay", "data.init_args.replay_weight", "data.init_args.seq_len",
    "data.init_args.batch_size", "data.init_args.seed", "data.init_args.steps_per_epoch", "data.init_args.num_workers",
    "data.init_args.shuffle_buffer", "data.init_args.chat_template", "data.init_args.overlong", "data.init_args.codecs",
    "data.init_args.input_layers", "trainer.accumulate_grad_batches", "trainer.devices", "trainer.num_nodes",
)


# what a resume restores from the optimizer's state dict, whatever the recipe says now (the
# schedule's shape, warmup and floor, is rebuilt from the recipe and does change)
RESTORED_OPTIMIZER_KEYS = tuple(f"model.init_args.optimizer.{key}" for key in ("lr", "betas", "eps", "weight_decay"))


# what decides which parameters train
TRAINED_PARAMETER_KEYS = tuple(f"model.init_args.{key}" for key in ("trainable", "frozen", "routing", "lora"))


def _trained(pl_module: LightningModule) -> list[str]:
    return [name for name, parameter in pl_module.named_parameters() if parameter.requires_grad]


def _changed_settings(saved: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    """``KEY: OLD -> NEW`` for each of ``keys`` the run changed (a checkpoint without a run
    config, or a key neither has, counts as unchanged)."""

    def get(config: dict[str, Any], dotted: str) -> Any:
        for part in dotted.split("."):
            config = config.get(part) if isinstance(config, dict) else None
        return config

    changed = []
    for key in keys:
        old, new = get(saved, key), get(current, key)
        if saved and old != new:
            changed.append(f"{key}: {old} -> {new}")
    return changed


class SaveOnSigterm(Callback):
    """On SIGTERM, save ``last.ckpt`` at the next optimizer-step boundary; Lightning then stops.

    With gradient accumulation the stop waits for the window's optimizer step, so the checkpoint
    never holds half a window. Ranks agree on stopping (any rank signalled stops all).
    """

    def __init__(self, dirpath: str | Path):
        self.dirpath = Path(dirpath)
        self.saved: Path | None = None
        self._held = False
        self._signalled = False  # a SIGTERM this rank got while several run, not yet agreed on

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Lightning's SIGTERM handler (registered after this hook) broadcasts from inside the
        handler, a collective that only the signalled rank enters: a SIGTERM to one rank of several
        hung them all. And Lightning stops a rank whose own flag is set after its batch, alone and
        unsaved when the signal came after the ranks agreed for that batch, or during validation,
        whose loop stops at the flag before any training batch ends to save at. So the handler
        here only notes the signal (passing it on to the processes Lightning started), for the
        ranks to agree on at the next training batch's end."""
        connector = trainer._signal_connector

        def note(signum: int, frame: Any) -> None:
            if not (connector.received_sigterm or self._signalled) and trainer.strategy.launcher is not None:
                trainer.strategy.launcher.kill(signum)
            self._signalled = True

        connector._sigterm_notifier_fn = note  # the instance's, which Lightning's registration reads

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        stop = trainer.received_sigterm or self._signalled or self._held
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop or self.saved is not None:
            return
        progress = trainer.fit_loop.epoch_loop.batch_progress
        at_step = progress.current.processed % trainer.accumulate_grad_batches == 0 or progress.is_last_batch
        # Lightning raises SIGTERMException after this batch while its flag is set: hold it until
        # the optimizer step (the flag is Lightning's; there is no public setter)
        trainer._signal_connector.received_sigterm = at_step
        self._held = not at_step
        if at_step:
            # through the run's checkpoint callback when it has one, so that it knows this file
            # for its own: a resumed run writes last.ckpt again instead of a last-v1.ckpt beside it
            last = next((c for c in trainer.checkpoint_callbacks if isinstance(c, StepCheckpoint) and c.save_last), None)
            if last is not None:
                self.saved = last.write_last(trainer)
            else:
                self.saved = self.dirpath / "last.ckpt"
                trainer.save_checkpoint(self.saved)
