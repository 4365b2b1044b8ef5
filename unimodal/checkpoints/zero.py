"""Checkpoint conversion: DeepSpeed ZeRO shards to one fp32 file."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from unimodal.checkpoints.files import DEEPSPEED_TAG_FILE, AtomicCheckpointIO
from unimodal.errors import UserError

log = logging.getLogger("unimodal.train")


class NotADeepSpeedCheckpoint(ValueError):
    pass


def _describe_deepspeed_dir(path: Path) -> str | None:
    """None when ``path`` looks like a Lightning DeepSpeed checkpoint directory, else what is wrong."""
    latest = path / DEEPSPEED_TAG_FILE
    if not latest.is_file():
        return "it has no 'latest' file"
    tag = latest.read_text().strip()
    if not (path / tag).is_dir():
        return f"its 'latest' file names the tag folder {tag!r}, which does not exist"
    if not any((path / tag).glob("*_model_states.pt")):
        return f"its tag folder {tag!r} holds no *_model_states.pt file"
    if not any((path / tag).glob("*_optim_states.pt")):
        return f"its tag folder {tag!r} holds no *_optim_states.pt file (ZeRO shards)"
    return None


def zero_ranks(path: Path) -> int | None:
    """How many data-parallel ranks wrote a DeepSpeed checkpoint directory (one optimizer-state
    shard each), None when ``path`` is not one."""
    if _describe_deepspeed_dir(path) is not None:
        return None
    tag = (path / DEEPSPEED_TAG_FILE).read_text().strip()
    return len(list((path / tag).glob("*_optim_states.pt")))


def zero_to_fp32(checkpoint_dir: str | Path, out_path: str | Path, tag: str | None = None, trust: bool = False) -> Path:
    """Convert a Lightning DeepSpeed (ZeRO-1/2/3) checkpoint directory to one fp32 file.

    ``checkpoint_dir`` is the directory ``trainer.save_checkpoint`` (or ``ModelCheckpoint``)
    writes under DeepSpeed: ``latest``, ``checkpoint/zero_pp_rank_*_model_states.pt`` and
    ``*_optim_states.pt``, one pair per rank. DeepSpeed's
    ``get_fp32_state_dict_from_zero_checkpoint`` merges the shards. As with Lightning's
    ``convert_zero_checkpoint_to_fp32_state_dict``, the output is an ordinary Lightning
    checkpoint: ``torch.load(out, weights_only=False)["state_dict"]`` holds every parameter in
    float32 under the LightningModule's names (``model.backbone...``), frozen ones included,
    next to the Lightning state (``hyper_parameters``, ``global_step``, ...), so
    ``UnimodalModule.load_from_checkpoint(out)`` reads it. Optimizer states are not kept, nor
    are DeepSpeed's bookkeeping entries (Lightning's converter keeps those, including a second
    copy of the frozen parameters).

    DeepSpeed reads its shard files with ``torch.load(weights_only=False)``, which runs whatever a
    pickle asks: ``trust`` says the directory comes from a source you trust (a run of your own);
    without it the conversion is refused in one line.

    Raises ``FileNotFoundError`` when the path does not exist and ``NotADeepSpeedCheckpoint``
    (a ``ValueError``) when it is not a DeepSpeed checkpoint directory.
    """
    path = Path(checkpoint_dir)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file():
        raise NotADeepSpeedCheckpoint(
            f"{path} is a file, not a DeepSpeed checkpoint directory; checkpoints saved without "
            "DeepSpeed are already a single file and need no conversion"
        )
    problem = _describe_deepspeed_dir(path)
    if problem is not None and tag is None:
        # a common slip: the tag folder ("checkpoint") or a file inside it instead of its parent
        if _describe_deepspeed_dir(path.parent) is None:
            raise NotADeepSpeedCheckpoint(
                f"{path} is the inside of a DeepSpeed checkpoint; pass its parent directory {path.parent}"
            )
        raise NotADeepSpeedCheckpoint(
            f"{path} is not a DeepSpeed checkpoint directory: {problem} (expected 'latest' and "
            "<tag>/zero_pp_rank_*_model_states.pt written by a DeepSpeed strategy)"
        )
    if tag is not None and not (path / tag).is_dir():
        raise NotADeepSpeedCheckpoint(f"{path} has no checkpoint tag folder {tag!r}")
    if not trust:
        raise UserError(
            f"{path} is a DeepSpeed checkpoint, whose files DeepSpeed reads with pickle (which can run code); "
            "pass --trust_checkpoint if it comes from a run of your own or a source you trust"
        )

    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()) as chatter:  # the merger prints its progress
        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(path), tag)
    log.debug("%s", chatter.getvalue())
    tag = tag or (path / DEEPSPEED_TAG_FILE).read_text().strip()
    # rank 0's model-states file carries Lightning's state (stage 3 names it per rank)
    model_file = next(
        (f for f in (path / tag / "mp_rank_00_model_states.pt", path / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt") if f.is_file()),
        None,
    )
    if model_file is None:
        raise NotADeepSpeedCheckpoint(f"{path / tag} has no rank-0 model-states file")
    client = torch.load(model_file, map_location="cpu", weights_only=False)
    # DeepSpeed's own entries (the module copy, shapes, frozen fragments, ...) are not Lightning's
    # state and can be as large as the model: drop them
    checkpoint = {key: value for key, value in client.items() if key not in _DEEPSPEED_KEYS}
    checkpoint["state_dict"] = {_strip(key, "_forward_module."): value for key, value in state_dict.items()}
    out = Path(out_path)
    AtomicCheckpointIO().save_checkpoint(checkpoint, out)  # whole or not at all: a crash leaves no half file to refuse
    return out


_DEEPSPEED_KEYS = {
    "module",
    "buffer_names",
    "optimizer",
    "param_shapes",
    "frozen_param_shapes",
    "shared_params",
    "frozen_param_fragments",
    "lr_scheduler",
    "data_sampler",
    "random_ltd",
    "sparse_tensor_module_names",
    "csr_tensor_module_names",
    "skipped_steps",
    "global_steps",
    "global_samples",
    "dp_world_size",
    "mp_world_size",
    "checkpoint_parallel_dimensions",
    "universal_checkpoint_info",
    "ds_config",
    "ds_version",
}


def _strip(key: str, prefix: str) -> str:
    # checkpoints of Lightning < 2.1 name parameters through a wrapper module
    return key[len(prefix) :] if key.startswith(prefix) else key
