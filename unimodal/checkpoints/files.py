"""Checkpoint files: atomic writes, finding the newest checkpoint of a run.

- :class:`AtomicCheckpointIO` writes every checkpoint file to a temporary name in the same
  directory and renames it, so a crash (or a kill) during a save leaves the previous file whole.
- :func:`find_latest_checkpoint` is what ``--resume auto`` and ``unimodal export RUN_DIR`` read.
- :func:`prune_checkpoints` keeps the newest ``keep_last_k`` step checkpoints (``last.ckpt``
  always) and removes the temporary files of writers that died mid-save.
- :func:`read_checkpoint` reads one with ``torch.load(weights_only=True)``: tensors and plain
  values only, so a checkpoint someone hands you cannot run code while it is read.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import pickle
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from unimodal.errors import UserError, refuse_nonempty
from unimodal.locks import run_lock

log = logging.getLogger("unimodal.checkpoints")

TEMP_PREFIX = ".tmp-"
# a run's last checkpoint, and those of later runs in the same directory (Lightning's version suffix)
LAST_NAME = re.compile(r"last(-v\d+)?\.ckpt")
# the names step checkpoints get (Lightning's "{epoch}-{step}", a later run's "-vN"): the only files pruned
STEP_NAME = re.compile(r"(epoch=\d+-)?step=\d+(-v\d+)?\.ckpt")
# the checkpoint key under which ``unimodal train`` stores the run's resolved config
RUN_CONFIG_KEY = "unimodal_run_config"
# the checkpoint key of the time (``time.time()``) it was saved at: what "newest" means
SAVED_AT_KEY = "unimodal_saved_at"
# the checkpoint key of the directory the run trained in: its config's relative paths start there
WORKDIR_KEY = "unimodal_workdir"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, written to ``.tmp-NAME`` and renamed into place; with
    ``keep_last_k``, each save then prunes its directory (:func:`prune_checkpoints`)."""

    def __init__(self, keep_last_k: int | None = None):
        super().__init__()
        self.keep_last_k = keep_last_k

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{path.name}")
        try:
            super().save_checkpoint(checkpoint, temp, storage_options)
            with open(temp, "rb") as written:
                os.fsync(written.fileno())
            os.replace(temp, path)
        except OSError as err:  # a full disk, say: name the checkpoint, not its temporary file
            raise OSError(err.errno, err.strerror, str(path)) from err
        finally:
            with contextlib.suppress(OSError):  # a read-only file system refuses even this
                temp.unlink(missing_ok=True)
        if self.keep_last_k is not None:
            prune_checkpoints(path.parent, self.keep_last_k)


DEEPSPEED_TAG_FILE = "latest"  # DeepSpeed's pointer to the tag folder of the newest save
LIGHTNING_META_FILE = "meta.pt"  # Lightning's FSDP2 state beside torch.distributed.checkpoint's shards
# the file a sharded checkpoint directory writes last
COMPLETE_MARKERS = (DEEPSPEED_TAG_FILE, LIGHTNING_META_FILE)


def _complete_marker(path: Path) -> Path | None:
    return next((path / name for name in COMPLETE_MARKERS if (path / name).is_file()), None)


def is_checkpoint(path: Path) -> bool:
    """A checkpoint file, or a sharded checkpoint directory whose save finished."""
    return not path.name.startswith(TEMP_PREFIX) and (path.is_file() or _complete_marker(path) is not None)


def _checkpoint_time(path: Path) -> float:
    marker = _complete_marker(path) if path.is_dir() else None
    return (marker or path).stat().st_mtime


VERSION = re.compile(r"-v(\d+)\.ckpt$")
STEP = re.compile(r"step=(\d+)")


def _recency(path: Path) -> tuple[bool, float, int, float, float]:
    """How recent a checkpoint is: the time a file records it was saved at (``SAVED_AT_KEY``),
    which a copy keeps. Names cannot tell: a kill between a step file and ``last.ckpt`` leaves the
    step newer, and a run resumed from an earlier step writes ``-vN`` step files older than its
    ``last.ckpt``. A sharded directory ranks by the time its save finished (its marker file), a
    file that cannot be read by its file time, so that a damaged newest one is found and passed
    over with a warning. Files that record no time (Lightning's own saves, older runs) rank below,
    by Lightning's names: a later run's ``-vN``, a run's ``last``, the step named; file times
    break ties."""
    file_time = _checkpoint_time(path)
    saved: float | None = file_time
    if path.is_file():
        stat = path.stat()
        # keyed by what any write changes (ctime, which no one can set, and the inode a rename brings)
        saved = _recorded_time(str(path), stat.st_ino, stat.st_ctime_ns, stat.st_mtime_ns, stat.st_size)
    version = VERSION.search(path.name)
    step = STEP.search(path.name)
    order = math.inf if LAST_NAME.fullmatch(path.name) else int(step.group(1)) if step else -1
    return saved is not None, saved or 0.0, int(version.group(1)) if version else 0, order, file_time


@functools.lru_cache(maxsize=256)
def _recorded_time(path: str, inode: int, ctime_ns: int, mtime_ns: int, size: int) -> float | None:
    """The save time a checkpoint file records (None for one that records none; its file time for
    one that cannot be read), read once per version of the file: each save sorts its directory."""
    try:
        checkpoint = read_checkpoint(path)
    except UserError:
        return mtime_ns / 1e9
    if not isinstance(checkpoint, dict):
        return mtime_ns / 1e9
    saved = checkpoint.get(SAVED_AT_KEY)
    return float(saved) if isinstance(saved, (int, float)) else None


def checkpoints_newest_first(directory: str | Path) -> list[Path]:
    """The checkpoints (``*.ckpt`` files and sharded directories) in ``directory``, newest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.glob("*.ckpt") if is_checkpoint(p)), key=_recency, reverse=True)


def find_latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest checkpoint (``*.ckpt`` file or sharded directory) in ``directory``, or None."""
    return next(iter(checkpoints_newest_first(directory)), None)


def newest_readable_checkpoint(directory: str | Path, reader: str) -> Path | None:
    """The newest checkpoint in ``directory`` that reads (sharded directories are taken as they
    are): a file cut short by a disk or a copy gone wrong is passed over, with a warning naming
    ``reader`` (the command that reads it), for the one before."""
    damaged = []
    for checkpoint in checkpoints_newest_first(directory):
        if checkpoint.is_file():
            try:
                read_checkpoint(checkpoint)
            except UserError as err:
                damaged.append(str(err))
                continue
        for reason in damaged:
            log.warning("%s; %s takes the one before it, %s", reason, reader, checkpoint)
        return checkpoint
    if damaged:
        raise UserError(f"{reader} found no readable checkpoint in {directory}: {damaged[0]}")
    return None


def _writer_alive(temp: Path) -> bool:
    """Whether the process that writes ``.tmp-PID-NAME`` still runs (on this machine)."""
    pid = temp.name[len(TEMP_PREFIX):].partition("-")[0]
    if not pid.isdigit():
        return True  # not ours: leave it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prune_checkpoints(directory: str | Path, keep_last_k: int) -> list[Path]:
    """Remove all but the ``keep_last_k`` newest step checkpoints and the ``.tmp-`` files whose
    writer is gone; returns what was removed. A resumed run's checkpoint callback knows nothing of
    the files before it, so this looks at the directory itself. A run's last checkpoint is never
    removed: ``last.ckpt``, and ``last-vN.ckpt``, the last of each later run started beside it;
    nor is a file named otherwise (a user's own, a callback's with its own file names)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = [temp for temp in directory.glob(f"{TEMP_PREFIX}*") if not _writer_alive(temp)]
    if keep_last_k >= 0:
        steps = [p for p in directory.glob("*.ckpt") if STEP_NAME.fullmatch(p.name) and is_checkpoint(p)]
        if len(steps) > keep_last_k:
            removed += sorted(steps, key=_recency, reverse=True)[keep_last_k:]
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


def checkpoint_step(checkpoint: Path | None) -> int | None:
    """The step a single-file checkpoint was saved at (None for none, or a sharded directory)."""
    if checkpoint is None or checkpoint.is_dir():
        return None
    return int(read_checkpoint(checkpoint).get("global_step", 0))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A single-file checkpoint's contents. ``unimodal train`` writes tensors and plain values
    only (the RNG states included), so anything else is refused rather than unpickled."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        # torch's message is a paragraph; the line naming what the file asked for is the one that matters
        lines = [line for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        reason = lines[0].strip() if lines else type(err).__name__
        raise UserError(
            f"{path} holds objects other than tensors and plain values, which could run code when loaded; "
            f"unimodal reads checkpoints written by `unimodal train` only ({reason})"
        ) from None
    except (RuntimeError, OSError) as err:  # torch's zip reader: a file cut short, or not a checkpoint at all
        if isinstance(err, FileNotFoundError):
            raise
        first = re.split(r"\.\s", str(err).strip())[0] or type(err).__name__  # torch's first sentence ("torch.save" keeps its dot)
        if "_use_new_zipfile_serialization" in first:  # torch's advice to whoever wrote it, not to this reader
            first = "not the zip archive torch.save writes"
        raise UserError(f"{path} cannot be read as a checkpoint: it is truncated or not a checkpoint ({first[:200]})") from None



@contextlib.contextmanager
def staged_directory(out_dir: str | Path, replace: bool) -> Iterator[Path]:
    """A fresh directory beside ``out_dir`` that becomes ``out_dir`` when the block completes; one
    that fails is removed. An export it replaces is set aside, under a hidden name of its own, until
    the new one is in place (:func:`replace_directory`), so a crash never leaves neither. Two
    commands writing one ``out_dir`` at once would share the staging directory: the second is refused."""
    out = Path(out_dir)
    with run_lock(out.absolute(), "write to another directory"):
        if not replace:
            refuse_nonempty(out, "write to a new directory")
        staging = out.with_name(f".{out.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        replace_directory(staging, out, aside=out.with_name(f".{out.name}.previous"))


def replace_directory(source: Path, target: Path, aside: Path | None = None) -> None:
    """Move the finished directory ``source`` to ``target``. An old ``target`` is set aside first,
    as ``aside`` (default ``NAME-previous.ckpt``, which ``--resume auto`` finds after a crash
    between the two renames), and removed last. An ``aside`` left by a crash after the second
    rename is older than ``target``: it goes first (a directory cannot be renamed over it). The
    name is this module's own, never one a user may have given a directory of theirs."""
    old = aside or target.with_name(f"{target.stem}-previous{target.suffix}")
    if target.exists():
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(source, target)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
