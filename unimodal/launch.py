"""What a launcher (torchrun, SLURM, Lightning) told this process, read before torch is imported:
the CLI filters its log lines by it and a run takes its lock by it."""

from __future__ import annotations

import os


def launched_rank() -> int:
    """This process's rank as its launcher set it, before any process group exists: torchrun's
    ``RANK``, SLURM's ``SLURM_PROCID`` in a job of several tasks, else Lightning's ``LOCAL_RANK``
    on node ``NODE_RANK`` (0 only for the first process of a run; exact under torchrun and SLURM)."""
    if os.environ.get("RANK"):
        return int(os.environ["RANK"])
    if os.environ.get("SLURM_PROCID") and int(os.environ.get("SLURM_NTASKS") or 1) > 1:
        return int(os.environ["SLURM_PROCID"])
    local, node = int(os.environ.get("LOCAL_RANK") or 0), int(os.environ.get("NODE_RANK") or 0)
    return local + node * int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
