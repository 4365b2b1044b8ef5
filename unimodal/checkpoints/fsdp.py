"""Checkpoint conversion: an FSDP2 checkpoint directory to one file.

Lightning's ``ModelParallelStrategy`` (``fsdp2``) saves a ``torch.distributed.checkpoint``
directory: ``.metadata`` and one ``__RANK_0.distcp`` shard per rank, then ``meta.pt`` (the rest of
Lightning's state) last. ``torch.distributed.checkpoint`` reads ``.metadata`` with pickle, so a
directory is trusted input, like a DeepSpeed one (docs/checkpoints.md).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from unimodal.checkpoints.files import LIGHTNING_META_FILE, AtomicCheckpointIO, read_checkpoint
from unimodal.errors import UserError


def is_fsdp_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file() and (path / LIGHTNING_META_FILE).is_file()


def fsdp_to_file(checkpoint_dir: str | Path, out_path: str | Path, trust: bool = False) -> Path:
    """One Lightning checkpoint file with the full weights (``state_dict``, as saved) and
    Lightning's state from ``meta.pt``; optimizer states are dropped."""
    path = Path(checkpoint_dir)
    if not is_fsdp_checkpoint(path):
        raise FileNotFoundError(f"{path} is not an FSDP checkpoint directory (expected .metadata, *.distcp and {LIGHTNING_META_FILE})")
    if not trust:
        raise UserError(
            f"{path} is an FSDP checkpoint, whose .metadata torch.distributed.checkpoint reads with pickle "
            "(which can run code); pass --trust_checkpoint if it comes from a run of your own or a source you trust"
        )
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    checkpoint = read_checkpoint(path / LIGHTNING_META_FILE)
    with tempfile.TemporaryDirectory(prefix="unimodal-fsdp-") as scratch:
        merged = Path(scratch) / "merged.pt"
        dcp_to_torch_save(path, merged)
        checkpoint["state_dict"] = read_checkpoint(merged)["state_dict"]
    out = Path(out_path)
    AtomicCheckpointIO().save_checkpoint(checkpoint, out)  # whole or not at all: a crash leaves no half file to refuse
    return out
