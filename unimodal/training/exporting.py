"""``unimodal export``: a training checkpoint -> an export directory (``unimodal.checkpoints``).

The trained LightningModule is rebuilt as LightningCLI built it, from the hyperparameters the
checkpoint carries, and loaded strictly. A unified model is written by
``checkpoints.export.write_export``; a module with a format of its own (a SEED tokenizer stage)
writes itself with ``export_pretrained``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.cli import instantiate_module

from unimodal.checkpoints.export import checkpoint_file, write_export
from unimodal.checkpoints.files import RUN_CONFIG_KEY, WORKDIR_KEY, read_checkpoint, staged_directory
from unimodal.checkpoints.load import ExportError, check_untrusted
from unimodal.errors import refuse_nonempty
from unimodal.models.unified import ContinuousModality
from unimodal.specs import own_class
from unimodal.training.recipes import check_class_paths, resolve_builtin, state_dict_mismatch

log = logging.getLogger("unimodal.export")


def _check_classes(hparams: dict[str, Any], file: Path) -> None:
    """The classes the module is rebuilt from, which jsonargparse imports and calls: its own class
    and its continuous modalities (a factory type, for which jsonargparse takes any callable) must
    be unimodal's own (``specs.own_class``). So must any ``{class_path: ...}`` elsewhere: in an
    argument typed ``Any`` (``generation``, ``vocab``) jsonargparse imports and builds it too."""
    check_untrusted(hparams, file, "a checkpoint")
    check_untrusted([hparams.get("_class_path"), hparams.get("continuous")], file, "a checkpoint", code_strings=True)
    named = [("the module", hparams.get("_class_path"), LightningModule)]
    named += [(f"continuous.{name}", spec.get("class_path") if isinstance(spec, dict) else spec, ContinuousModality)
              for name, spec in (hparams.get("continuous") or {}).items()]
    for what, path, base in named:
        if not (isinstance(path, str) and own_class(path, base)):
            raise ExportError(f"{file}: {what} is {path!r}, not a {base.__name__} of unimodal's; export reads checkpoints written by `unimodal train`")


def _module_from_checkpoint(checkpoint: dict[str, Any], hparams: dict[str, Any]) -> LightningModule:
    """The trained LightningModule, built as LightningCLI built it, with the checkpoint's weights."""
    spec = {k: v for k, v in hparams.items() if k != "_instantiator"}
    source = spec.get("init_from")
    if source and not Path(source).is_dir():  # it defines the architecture the weights fit
        raise ExportError(f"the checkpoint's model was initialised from {source}, which no longer exists; export needs it")
    with _quiet("unimodal.train", "unimodal.export"):
        module = instantiate_module(LightningModule, spec)
        if hasattr(module, "configure_model"):
            module.configure_model()
    try:
        module.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as err:
        mismatch = state_dict_mismatch(err)
        if mismatch is None:
            raise
        raise ExportError(
            f"the checkpoint's weights do not fit the model its settings build: {mismatch} (a DeepSpeed checkpoint saved "
            "with exclude_frozen_parameters: true holds no frozen weights, which an export needs)"
        ) from None
    module.eval()
    return module


@contextlib.contextmanager
def _working_directory(path: str | None) -> Iterator[None]:
    """The run's relative paths (init_from, tokenizer, data, the record of what it trained on)
    mean what they meant where it trained: export works from there while that directory exists
    (a moved project keeps the current one)."""
    if not path or not os.path.isdir(path):
        yield
        return
    here = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(here)


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Only warnings from these loggers: the rebuild would repeat the training run's build lines
    (model size, LoRA, initialised from), which say nothing about the export."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export(
    ckpt: str | Path,
    out_dir: str | Path,
    merge_lora: bool = False,
    replace: bool = False,
    resolve_path: Callable[[str], str] | None = None,
    trust_checkpoint: bool = False,
) -> Path:
    """Write the export directory of a checkpoint: a ``.ckpt`` file, a DeepSpeed checkpoint
    directory, or a run directory (its newest checkpoint). Returns ``out_dir``.

    ``replace`` allows replacing an existing directory; ``resolve_path`` turns the ``builtin:``
    names an older checkpoint may hold (runs resolve them at the command line);
    ``trust_checkpoint`` allows a DeepSpeed directory (read with pickle by DeepSpeed).
    """
    out = Path(out_dir)
    if not replace:
        refuse_nonempty(out, "export to a new directory")
    target = out.absolute()
    with tempfile.TemporaryDirectory(prefix="unimodal-export-") as scratch:
        file = checkpoint_file(Path(ckpt), Path(scratch), trust_checkpoint)
        checkpoint = read_checkpoint(file)
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):  # torch.save of a bare tensor
            raise ExportError(f"{file} is not a training checkpoint: export reads checkpoints written by `unimodal train`")
        run_config = checkpoint.get(RUN_CONFIG_KEY)
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        if run_config is None or "_class_path" not in hparams:
            raise ExportError(f"{file} has no run config: export reads checkpoints written by `unimodal train`")
        check_class_paths(hparams, str(file))
        _check_classes(hparams, file)
        spoiled = next((name for name, t in checkpoint["state_dict"].items() if t.is_floating_point() and not t.isfinite().all()), None)
        if spoiled is not None:
            raise ExportError(f"{file}: {spoiled} holds non-finite values (the run diverged); export an earlier checkpoint")
        step = int(checkpoint.get("global_step", 0))
        # the file a run directory stood for; a sharded checkpoint (merged in scratch) by its directory
        exported = (Path(ckpt) if file.is_relative_to(scratch) else file).resolve()
        with _working_directory(checkpoint.get(WORKDIR_KEY)):
            hparams, run_config = resolve_builtin(hparams, resolve_path), resolve_builtin(run_config, resolve_path)
            module = _module_from_checkpoint(checkpoint, hparams)
            del checkpoint
            with staged_directory(target, replace) as staging:
                if hasattr(module, "export_pretrained"):  # a module with its own format (e.g. a media tokenizer)
                    module.export_pretrained(staging)
                else:
                    write_export(
                        module.model,
                        staging,
                        spec=hparams,
                        data=(run_config.get("data") or {}).get("init_args") or {},
                        merge_lora=merge_lora,
                        lora=hparams.get("lora"),
                        generation=hparams.get("generation"),
                        source={"checkpoint": str(exported), "global_step": step},
                    )
    log.info("exported %s to %s", exported, out)
    return out
