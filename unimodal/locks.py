"""One process at a time in a directory a command fills: a training run's checkpoints, a
pipeline's root, a shard set, a built-in world. Two writers would both write the same files, and
one's work would be lost or the set would mix both."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from unimodal.errors import UserError


@contextlib.contextmanager
def run_lock(directory: Path, instead: str = "give this one another --trainer.default_root_dir") -> Iterator[None]:
    """Hold ``directory`` for this process, or refuse in one line naming the holder and ``instead``."""
    with _held(directory, instead):
        yield


@contextlib.contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """Hold ``directory`` for this process, waiting while another holds it: ranks and dataloader
    workers that start together build it once, and the later ones find it built."""
    with _held(directory, None):
        yield


@contextlib.contextmanager
def _held(directory: Path, instead: str | None) -> Iterator[None]:
    """The operating system drops the lock when its process ends, however it ends, so a crash leaves
    no stale lock. The lock file sits beside the directory (``RUN/.checkpoints.lock``), which then
    holds its own files only, and is removed on the way out, so that finished commands leave
    nothing beside what they wrote. ``instead``: refuse at once, with that advice, rather than wait."""
    parent = directory.parent
    if parent.exists() and not parent.is_dir():  # a file where the directory goes: the error any other write there gets
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f".{directory.name}.lock"
    handle = _locked(path, directory, instead)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # while still held: a process that opened it meanwhile sees it gone, and retries
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _locked(path: Path, directory: Path, instead: str | None) -> IO[str]:
    """``path`` opened and locked, as the file that is at ``path`` now: a holder removes the file
    when it is done, so a lock taken on a file it has just removed holds nothing, and is taken again."""
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (fcntl.LOCK_NB if instead is not None else 0))
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"{directory} is in use by another run ({holder}); wait for it to end, or {instead}") from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(handle.fileno()).st_ino:
            return handle
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
