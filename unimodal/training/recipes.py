"""``unimodal train``: LightningCLI over UnimodalModule-like modules and data modules.

The vocabulary layout is linked from the data module to the model, so a recipe states the
tokenizer once. Every run writes under ``trainer.default_root_dir``: CSV logs in ``logs/``,
TensorBoard in ``tb/``, checkpoints in ``checkpoints/`` (``last.ckpt`` always), unless the
recipe configures its own loggers or ModelCheckpoint.

A recipe may carry a top-level ``tiny:`` mapping of dotted keys to values. ``--tiny`` applies
it (a tiny random backbone, built-in data, a few steps) so every recipe runs on a CPU through
the same code path; without ``--tiny`` the mapping is ignored.

``--resume auto`` continues from the newest checkpoint of the run directory (or starts fresh);
checkpoints are written atomically, carry the RNG states and the resolved config, and SIGTERM
saves one before the run stops (``unimodal.training.resume``).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import logging
import os
import re
import warnings
from argparse import ArgumentError
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
from lightning.pytorch.utilities.model_helpers import is_overridden

from unimodal.checkpoints.files import (
    AtomicCheckpointIO,
    checkpoint_step,
    find_latest_checkpoint,
    is_checkpoint,
    newest_readable_checkpoint,
    read_checkpoint,
)
from unimodal.checkpoints.load import CONFIG_FILE, RENAMED_CLASSES, read_export_config
from unimodal.data.processor import media_settings
from unimodal.data.shards import present_shard_sets
from unimodal.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from unimodal.errors import UserError
from unimodal.yaml_files import read_yaml
from unimodal.schema import BUILTIN_PREFIX
from unimodal.training.divergence import StopOnDivergence
from unimodal.training.finetune import FineTuneReport
from unimodal.training.recipe_keys import check_arguments
from unimodal.training.progress import ParameterSummary, StepProgressBar
from unimodal.locks import run_lock
from unimodal.training.resume import Interrupted, Preempted, RunState, SaveOnSigterm, StepCheckpoint
from unimodal.launch import launched_rank
from unimodal.training.strategies import register_strategies

log = logging.getLogger("unimodal.train")


class UnimodalCLI(LightningCLI):
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise ArgumentError(None, _with_near_matches(err.message, parser)) from None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None, help="checkpoint to resume from: a path, or 'last' (the run's newest, as --resume auto)"
        )
        parser.add_argument(
            "--trust_checkpoint", type=bool, default=False, nargs="?", const=True,  # a flag, as the refusal says to pass it
            help="allow --ckpt_path to name a sharded (DeepSpeed or FSDP2) checkpoint directory: its files are read with "
            "pickle, which can run code, so only for a run of your own or a source you trust",
        )
        parser.add_argument(
            "--resume", type=str | None, default=None,
            help="'auto': continue from the newest checkpoint in the run's checkpoint directory, or start fresh",
        )
        parser.add_argument(
            "--checkpoint_every_n_steps", type=int, default=100, help="step interval of the default checkpoint callback"
        )
        parser.add_argument(
            "--keep_last_k", type=int, default=3,
            help="step checkpoints kept besides last.ckpt (older ones, and temporary files of dead writers, are removed); -1 keeps all",
        )
        parser.link_arguments("trainer.accumulate_grad_batches", "data.init_args.accumulate_grad_batches")
        parser.link_arguments(
            "data", "model.init_args.vocab", compute_fn=lambda data: data.layout.to_dict(), apply_on="instantiate"
        )

    def instantiate_trainer(self, **kwargs) -> Trainer:
        if self._get(self.config_init, "keep_last_k") < -1:
            raise UserError(f"--keep_last_k must be -1 (keep all) or 0 or more, got {self._get(self.config_init, 'keep_last_k')}")
        config = self._get(self.config_init, "trainer", default={})
        root = Path(config.get("default_root_dir") or "runs/default")
        if config.get("logger") in (None, True):
            kwargs["logger"] = [CSVLogger(root, name="logs"), TensorBoardLogger(root, name="tb")]
        callbacks = list(config.get("callbacks") or [])
        if config.get("enable_checkpointing") is not False and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            every = self._get(self.config_init, "checkpoint_every_n_steps")
            # every step checkpoint is kept by Lightning; the checkpoint IO prunes to keep_last_k
            callbacks.append(StepCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=every, save_last=True, save_top_k=-1))
        bar_wanted = config.get("enable_progress_bar") is not False and _RICH_AVAILABLE
        if bar_wanted and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(StepProgressBar())
        if config.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in callbacks):
            callbacks.append(ParameterSummary())
            kwargs["enable_model_summary"] = False  # else Lightning says it skips adding its own
        if kwargs.get("logger", config.get("logger")) and not any(isinstance(c, LearningRateMonitor) for c in callbacks):
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        self.checkpoint_dir = next(
            (Path(c.dirpath) for c in callbacks if isinstance(c, ModelCheckpoint) and c.dirpath), root / "checkpoints"
        )
        run_config = yaml.safe_load(self.parser.dump(self.config, skip_unset=False))
        run_config.pop("config", None)
        callbacks += [RunState(run_config), SaveOnSigterm(self.checkpoint_dir), StopOnDivergence()]
        init_from = getattr(self.model, "init_from", None)
        # a fine-tune that replays an export's data (replay set explicitly empty, as a pipeline's
        # planned stages have it, opts out of the report too)
        if init_from and getattr(self.datamodule, "replay", None) and (Path(init_from) / CONFIG_FILE).is_file():
            record = read_export_config(init_from).get("training_data")
            if record:
                callbacks.append(FineTuneReport(init_from, record))
        kwargs["callbacks"] = callbacks
        plugins = list(config.get("plugins") or [])
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO(self._get(self.config_init, "keep_last_k"))]
        return super().instantiate_trainer(**kwargs)


def _with_near_matches(message: str, parser: LightningArgumentParser) -> str:
    """An unrecognised option's error, followed by the parser's closest option names."""
    unknown = [word.split("=")[0] for word in message.partition("unrecognized arguments:")[2].split() if word.startswith("--")]
    group = re.match(r"Group '([\w.]+)' does not accept option '(\w+)'", message)
    if group:
        unknown.append(f"--{group[1]}.{group[2]}")
    if not unknown:
        return message
    known = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
    near = [match for key in unknown for match in difflib.get_close_matches(key, known, n=3, cutoff=0.75)
            or [option for option in known if option.endswith("." + key.removeprefix("--"))][:3]]  # the group left out
    return f"{message} (did you mean {', '.join(near)}?)" if near else message


TINY_KEY = "tiny"
# class paths of format-1 recipes: old -> current. A recipe naming one is refused with the current
# path (a format-1 export is upgraded as it is read: RENAMED_CLASSES)
MOVED_CLASSES = {
    **RENAMED_CLASSES,
    "unimodal.training.seed_stages.ImageTextPairs": "unimodal.data.pairs.ImageTextPairs",
    "unimodal.training.seed_stages.SeedTokenizerStage1": "unimodal.training.seed_tokenizer_stages.SeedTokenizerStage1",
    "unimodal.training.seed_stages.SeedTokenizerStage2": "unimodal.training.seed_tokenizer_stages.SeedTokenizerStage2",
}


def resolve_builtin(value: Any, resolve_path: Callable[[str], str] | None, replaced: Collection[str] = (), at: str = "") -> Any:
    """``value`` with every ``builtin:NAME/...`` string replaced by ``resolve_path`` of it: the
    one place built-in names become paths. Without a resolver they are left for ``local_path``
    to refuse in one line. Keys in ``replaced`` (dotted, those the command line sets) are left as
    they are: a built-in dataset is built only when the run reads it."""
    if resolve_path is None or at in replaced:
        return value
    if isinstance(value, str):
        return resolve_path(value) if value.startswith(BUILTIN_PREFIX) else value
    if isinstance(value, dict):
        return {k: resolve_builtin(v, resolve_path, replaced, f"{at}.{k}" if at else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_builtin(v, resolve_path, replaced, at) for v in value]
    return value


def check_class_paths(value: Any, where: str) -> None:
    """Refuse a class path that moved, naming its new spelling."""
    if isinstance(value, dict):
        path = value.get("class_path")
        if isinstance(path, str) and path in MOVED_CLASSES:
            raise UserError(f"{where}: class_path {path} is now {MOVED_CLASSES[path]}")
        for child in value.values():
            check_class_paths(child, where)
    elif isinstance(value, list):
        for child in value:
            check_class_paths(child, where)


def set_dotted(config: dict[str, Any], dotted: str, value: Any) -> None:
    node = config
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[leaf] = value


def load_recipe(path: Path, tiny: bool, resolve_path: Callable[[str], str] | None = None,
                replaced: Collection[str] = ()) -> dict[str, Any]:
    """The recipe as a dict, with its ``tiny`` overrides applied or dropped, built-in names resolved
    but at the dotted keys in ``replaced``."""
    config = read_yaml(path, "recipe") or {}
    if not isinstance(config, dict):
        raise ValueError(f"recipe {path}: expected a mapping at the top level")
    overrides = config.pop(TINY_KEY, None) or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"recipe {path}: '{TINY_KEY}:' maps dotted keys to values (trainer.max_steps: 20), not a "
                         f"{type(overrides).__name__}")
    if tiny:
        if not overrides:
            raise ValueError(f"recipe {path} has no '{TINY_KEY}:' section, so it cannot run with --tiny")
        for dotted, value in overrides.items():
            set_dotted(config, dotted, value)
    check_class_paths(config, str(path))
    return resolve_builtin(config, resolve_path, replaced)


def _check_init_from(init_from: Path, config: dict[str, Any], overrides: list[str]) -> None:
    """``init_from`` names an export directory, and the command line does not reshape the backbone
    that ``build_model`` will read from it (its ``config.json`` included) nor give another tokenizer."""
    if not init_from.exists():
        raise FileNotFoundError(f"init_from {init_from} does not exist")
    if init_from.is_file() and (init_from.parent / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"init_from {init_from} is a file of an export; give its directory, {init_from.parent}")
    unified = str((config.get("model") or {}).get("class_path", "")).rpartition(".")[2] == "UnimodalModule"
    if unified and not (init_from / CONFIG_FILE).is_file():  # a run directory or a .ckpt
        raise FileNotFoundError(f"init_from {init_from} is not a unimodal export directory (no {CONFIG_FILE}); "
                                f"write one with `unimodal export {init_from} --out DIR` and give DIR")
    fixed = next((a.split("=")[0] for a in overrides if a.startswith("--model.init_args.backbone.config")), None)
    if fixed:
        raise UserError(f"{fixed}: the backbone comes from init_from {init_from}, with its own architecture; "
                        "drop the option, or train without init_from")
    given = _override(overrides, "data.init_args.tokenizer")
    if unified and given:  # one of the same size passes the layout check, yet its ids mean other text
        trained = init_from / read_export_config(init_from)["processor"]["tokenizer"]
        if tokenizer_fingerprint(load_tokenizer(given)) != tokenizer_fingerprint(load_tokenizer(trained)):
            raise UserError(f"--data.init_args.tokenizer {given} is not the tokenizer init_from {init_from} was trained with "
                            f"({trained}): its ids name other text; drop the option to use the export's")


def inherit_from_export(config: dict[str, Any], source: str | Path, tokenizer: bool = False, replay: bool = True) -> None:
    """Fine-tuning a model starts from its Processor: the data settings a recipe leaves out (code
    ranges and layers, codecs, feature width, bidirectional and input layers) are taken from the
    export ``source``'s ``processor.json``, the continuous modules and routing the recipe leaves
    out from its model, and its tokenizer (when the recipe names none, or
    always with ``tokenizer``: another tokenizer could not match the model's vocabulary), so model,
    vocabulary and data agree. The data the export records it was trained on becomes
    ``data.init_args.replay`` unless the recipe names its own (``docs/finetune.md``); without
    ``replay`` (a pipeline's planned stages) it becomes empty instead. A directory that is not a
    unified-model export is left alone."""
    source = Path(source)
    if not (source / CONFIG_FILE).is_file():
        return
    export = read_export_config(source)
    processor = export["processor"]
    data_args = (config.get("data") or {}).get("init_args") or {}
    if tokenizer or not data_args.get("tokenizer"):
        set_dotted(config, "data.init_args.tokenizer", str(source / processor["tokenizer"]))
    for key, value in media_settings(processor).items():
        if key not in data_args:
            set_dotted(config, f"data.init_args.{key}", value)
    model_args = (config.get("model") or {}).get("init_args") or {}
    for key in ("continuous", "routing"):  # the export's image head and experts, where the recipe names none
        if export["model"].get(key) and not model_args.get(key):
            set_dotted(config, f"model.init_args.{key}", copy.deepcopy(export["model"][key]))
    recorded = {d["path"]: d for d in (export.get("training_data") or {}).get("datasets") or []}
    if "replay" not in data_args and recorded and not replay:
        set_dotted(config, "data.init_args.replay", [])
    elif "replay" not in data_args and recorded:
        present, missing = present_shard_sets(recorded)
        if missing:
            log.warning("%s was trained on data that is not on this machine (%s), so that data is not replayed; "
                        "name shard sets with --data.init_args.replay", source, ", ".join(missing))
        if present:
            set_dotted(config, "data.init_args.replay", [recorded[path] for path in present])


def _override(args: list[str], dotted: str) -> str | None:
    """The value a command line gives ``--DOTTED`` (``--a.b=v`` or ``--a.b v``), if any."""
    for i, arg in enumerate(args):
        if arg.startswith(f"--{dotted}="):
            return arg.partition("=")[2]
        if arg == f"--{dotted}" and i + 1 < len(args):
            return args[i + 1]
    return None


def auto_precision() -> str:
    """``precision: auto``: bf16 mixed precision on a GPU that has bf16 (Ampere and later), fp32
    elsewhere (CPU autocast to bf16 is slower than fp32 on most CPUs)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def _resolve_precision(config: dict[str, Any]) -> None:
    trainer = config.get("trainer")
    if isinstance(trainer, dict) and trainer.get("precision") == "auto":
        trainer["precision"] = auto_precision()


def _resolve_precision_args(args: list[str]) -> list[str]:
    """``--trainer.precision=auto`` (or ``... auto``) on the command line, resolved."""
    out = []
    for arg in args:
        if arg == "--trainer.precision=auto" or (out and out[-1] == "--trainer.precision" and arg == "auto"):
            arg = arg.replace("auto", auto_precision())
        out.append(arg)
    return out


def _resolve_arg(arg: str, resolve_path: Callable[[str], str] | None) -> str:
    """One command-line word with its built-in names resolved: ``builtin:...``, ``--key=builtin:...``
    or a YAML list or mapping that holds them (``--data.init_args.datasets=[{path: builtin:...}]``)."""
    name, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    if resolve_path is None or BUILTIN_PREFIX not in value:
        return arg
    if not value.startswith(BUILTIN_PREFIX):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return arg  # not YAML: jsonargparse says what is wrong with it
        if not isinstance(parsed, list | dict):
            return arg
        value = json.dumps(resolve_builtin(parsed, resolve_path))
    else:
        value = resolve_builtin(value, resolve_path)
    return f"{name}{eq}{value}"


def make_cli(args: list[str], resolve_path: Callable[[str], str] | None = None, parse_only: bool = False,
             **kwargs: Any) -> UnimodalCLI:
    """Parse ``RECIPE.yaml [--tiny] [overrides]`` into a LightningCLI with model, data and trainer
    (with ``parse_only``, left as configs: a wrong key still fails, nothing is built).

    ``resolve_path`` turns ``builtin:`` names of the recipe and the overrides into paths
    (``unimodal.worlds.resolve``, which the command line passes)."""
    tiny = "--tiny" in args
    args = [_resolve_arg(a, resolve_path) for a in args if a != "--tiny"]
    if args and not args[0].startswith("-"):
        replaced = {a[2:].partition("=")[0] for a in args[1:] if a.startswith("--")}  # the command line's values win
        config = load_recipe(Path(args[0]), tiny, resolve_path, replaced)
        check_arguments(config, args[1:], f"recipe {args[0]}")
        given = _override(args[1:], "config")
        if given is not None and Path(given).is_file():  # jsonargparse reads it after this, aliases and all
            read_yaml(Path(given), "--config")
        init_from = _override(args[1:], "model.init_args.init_from") or ((config.get("model") or {}).get("init_args") or {}).get("init_from")
        builds = not parse_only and not {"--print_config", "--help", "-h"} & {a.split("=")[0] for a in args}
        if builds and init_from:  # before the tokenizer it would give, which is then the recipe's
            _check_init_from(Path(init_from), config, args[1:])
        if init_from:
            inherit_from_export(config, init_from, tokenizer=True)  # a command-line tokenizer still wins
        _resolve_precision(config)
        # jsonargparse takes the resolved recipe as YAML text in place of a path
        args = ["--config", yaml.safe_dump(config, sort_keys=False), *args[1:]]
    return _cli(_ParseOnly if parse_only else UnimodalCLI, _resolve_precision_args(args), **kwargs)


def check_recipe(config: dict[str, Any]) -> None:
    """Parse a recipe's config (overrides applied) as ``unimodal train`` does, building nothing: a
    misspelt key or a value of the wrong type raises the same ``ArgumentError``, in seconds."""
    check_arguments(config, [], "recipe")
    config = copy.deepcopy(config)
    _resolve_precision(config)
    config["seed_everything"] = False  # nothing is seeded (nor logged) for a check
    _cli(_ParseOnly, ["--config", yaml.safe_dump(config, sort_keys=False)])


class _ParseOnly(UnimodalCLI):
    def instantiate_classes(self) -> None:
        """Nothing is built: the model, the data (and its datasets) and the trainer stay configs."""


def _cli(cli_class: type[UnimodalCLI], args: list[str], **kwargs: Any) -> UnimodalCLI:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    register_strategies()  # plain names (deepspeed_stage_2, ...) get the CPU-capable strategy
    options: dict[str, Any] = {
        "save_config_callback": SaveConfigCallback,
        "save_config_kwargs": {"overwrite": True},
        # a wrong key is an ArgumentError the command line prints as one line, not usage and exit
        "parser_kwargs": {
            "exit_on_error": False, "allow_abbrev": False, "prog": "unimodal train RECIPE [--tiny]",
            "description": "Train one stage from RECIPE. --tiny applies the recipe's tiny: section (a CPU-sized model "
                           "and data) before the options below, which override the recipe's keys.",
        },
        **kwargs,
    }
    with warnings.catch_warnings():
        # `unimodal pipeline` and `unimodal train` hand their own parsed arguments over on purpose;
        # Lightning would warn (and print the whole recipe) because sys.argv holds others
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        try:
            return cli_class(
                LightningModule,
                LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                args=args,
                run=False,
                auto_configure_optimizers=False,
                **options,
            )
        except MisconfigurationException as err:  # the Trainer refusing a setting (max_steps=-5): the user's to fix
            raise UserError(str(err)) from None


LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")  # --ckpt_path values Lightning resolves itself


def resume_path(cli: UnimodalCLI) -> str | None:
    """The checkpoint ``fit`` starts from: ``--ckpt_path``, or what ``--resume`` selects."""
    ckpt_path, resume = cli.config.get("ckpt_path"), cli.config.get("resume")
    if ckpt_path == "last" and resume is None:  # one meaning of "the run's newest checkpoint"
        ckpt_path, resume = None, "auto"
    if resume is None:
        if ckpt_path is not None and Path(ckpt_path).exists():
            check_given_checkpoint(Path(ckpt_path), trust=bool(cli.config.get("trust_checkpoint")))
        elif ckpt_path not in (None, *LIGHTNING_CKPT_NAMES):  # before the trainer starts, and writes logs
            raise FileNotFoundError(f"--ckpt_path {ckpt_path} does not exist")
        earlier = find_latest_checkpoint(cli.checkpoint_dir) if ckpt_path is None else None
        if earlier is not None:
            log.warning(
                "%s holds checkpoints of an earlier run (newest: %s); this run starts afresh beside them, and Lightning "
                "names its own with a version suffix (last-v1.ckpt, ...). To continue the earlier run instead, pass "
                "--resume auto; to keep runs apart, give this one its own --trainer.default_root_dir",
                cli.checkpoint_dir, earlier.name,
            )
        return ckpt_path
    if ckpt_path is not None:
        raise ValueError("give --ckpt_path or --resume, not both")
    if resume != "auto":
        raise ValueError(f"--resume takes 'auto' (use --ckpt_path=PATH for a given checkpoint), got {resume!r}")
    newest = newest_readable_checkpoint(Path(cli.checkpoint_dir), "--resume auto")
    return None if newest is None else str(newest)


def _first_keys(mismatch: str, shown: int = 3) -> str:
    """torch's ``Missing key(s) in state_dict: "a", "b", ...`` cut to its first keys and a count."""
    head, colon, keys = mismatch.partition(": ")
    names = keys.rstrip(".").split(", ") if colon and keys.startswith('"') else []
    if len(names) <= shown:
        return mismatch
    return f"{head}: {', '.join(names[:shown])} and {len(names) - shown} more"


def state_dict_mismatch(err: RuntimeError) -> str | None:
    """torch's first line of what did not fit when ``load_state_dict`` failed (its first keys and
    a count), None for any other error."""
    if "Error(s) in loading state_dict" not in str(err):
        return None
    return _first_keys(next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), ""))


def check_given_checkpoint(path: Path, trust: bool) -> None:
    """A checkpoint named on the command line may come from anywhere: a file must hold tensors and
    plain values only (read here once, memory-mapped, so that a refusal is one line), and a
    sharded directory, whose files its strategy reads with pickle, needs ``--trust_checkpoint``.
    The run's own checkpoints (``--resume auto``) are trusted."""
    if path.is_file():
        contents = read_checkpoint(path)
        if not isinstance(contents, dict) or not isinstance(contents.get("state_dict"), dict):
            raise UserError(f"{path} is not a training checkpoint (it holds no state_dict); --ckpt_path takes a .ckpt that "
                            "`unimodal train` wrote (to start from an export's weights, set model.init_args.init_from)")
    elif not path.is_dir():  # a FIFO, a device, a socket
        raise UserError(f"{path} is not a regular file; --ckpt_path takes a .ckpt file or a sharded checkpoint directory")
    elif not is_checkpoint(path):
        run, checkpoints = (path.parent, path) if path.name == "checkpoints" else (path, path / "checkpoints")
        newest = find_latest_checkpoint(checkpoints)
        if newest is None:
            raise UserError(f"{path} is a directory but not a checkpoint, and holds none in {checkpoints}; "
                            "--ckpt_path takes a .ckpt file or a sharded checkpoint directory")
        raise UserError(f"{path} is a directory but not a checkpoint; to continue the run it holds, pass "
                        f"--trainer.default_root_dir={run} --resume auto, or give one of its checkpoints (the newest: --ckpt_path={newest})")
    elif not trust:
        raise UserError(
            f"{path} is a sharded checkpoint directory, whose files are read with pickle (which can run code); "
            "pass --trust_checkpoint if it comes from a run of your own or a source you trust"
        )


def run_training(args: list[str], resolve_path: Callable[[str], str] | None = None) -> Trainer:
    """``unimodal train``: build from the recipe and fit; returns the trainer."""
    return fit_cli(make_cli(args, resolve_path))


def fit_cli(cli: UnimodalCLI) -> Trainer:
    """Fit a parsed CLI, resuming as ``--ckpt_path``/``--resume`` say; returns the trainer.

    Raises :class:`Preempted` when SIGTERM stopped the run (after it saved a checkpoint).
    """
    # the launcher's rank: before fit every process's trainer says rank 0
    ckpt_path = resume_path(cli)  # its refusals come before anything is written
    lock = run_lock(cli.checkpoint_dir) if launched_rank() == 0 else contextlib.nullcontext()
    with lock:
        return _fit(cli, ckpt_path)


def _fit(cli: UnimodalCLI, ckpt_path: str | None) -> Trainer:
    try:
        with warnings.catch_warnings():
            # the stream splits its shards by rank and worker itself (UnimodalDataModule), so a
            # length on an IterableDataset is right; and a Lightning-internal torch deprecation
            warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
            # DeepSpeed's ZeRO calls torch collectives torch deprecates: nothing a run can change, once per step
            warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
            # resume_path says it once and how to go on; Lightning's also came on every --resume auto
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            if not getattr(cli.datamodule, "val_datasets", True):
                # no validation data is a choice (val_datasets: null), not an empty loader by mistake
                warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")
            if getattr(cli.model, "frozen_modules_in_eval", False):
                warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
            if getattr(cli.trainer.strategy, "zero_stage_3", False):
                # Lightning's note points at its own consolidation docs, not this project's commands
                warnings.filterwarnings("ignore", message="When saving the DeepSpeed Stage 3 checkpoint")
                if launched_rank() == 0:
                    log.info("ZeRO-3 saves each checkpoint as a directory of per-rank shards: --ckpt_path reads it as it is, "
                             "`unimodal export DIR --out OUT --trust_checkpoint` exports it, `unimodal convert zero-to-fp32 DIR OUT --trust_checkpoint` makes it one file")
            if is_overridden("load_state_dict", cli.datamodule, LightningDataModule):
                # Lightning only asks the loader whether it can resume mid-epoch; this data module
                # restores the stream position itself (UnimodalDataModule.state_dict)
                warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
            cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    except RuntimeError as err:
        mismatch = state_dict_mismatch(err)
        if mismatch is None:
            raise
        raise UserError(f"checkpoint {ckpt_path} does not fit this recipe's model: {mismatch}") from None
    except SIGTERMException:
        saved = next((c.saved for c in cli.trainer.callbacks if isinstance(c, SaveOnSigterm)), None)
        where = f"saved {saved}" if saved else "no checkpoint saved"
        raise Preempted(f"stopped by SIGTERM at step {cli.trainer.global_step} ({where})") from None
    except SystemExit:  # Lightning's answer to Ctrl-C: it tears down, then exits with status 1
        if not cli.trainer.interrupted:
            raise
        newest = find_latest_checkpoint(cli.checkpoint_dir)
        step = checkpoint_step(newest)
        at = f" (step {step})" if step is not None else ""
        stopped = f"interrupted (Ctrl-C) at step {cli.trainer.global_step}, without saving"
        if newest is None:
            raise Interrupted(f"{stopped}; no checkpoint was saved yet", how_to_continue="") from None
        raise Interrupted(f"{stopped}; the newest checkpoint is {newest}{at}") from None
    return cli.trainer
