"""Sharded weights: DeepSpeed ZeRO-3's partitions, and FSDP2's per-parameter shards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn


def gathered(params: Iterable[nn.Parameter], modifier_rank: int | None = None) -> Any:
    """A context in which ZeRO-3-partitioned ``params`` are whole (with ``modifier_rank`` set,
    that rank's changes are kept and re-partitioned on exit); a no-op for plain parameters."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)


def load_safetensors(module: nn.Module, file: Path, all_of_module: bool = False, only_module: bool = True) -> tuple[list[str], list[str]]:
    """Load the tensors of the safetensors ``file`` into ``module`` (into its ZeRO-3 partitions
    too); returns (loaded names, names ``module`` lacks). Refused in one line naming the file: a
    file that cannot be read, a tensor of another shape, and, as asked, weights ``module`` lacks
    (``only_module``) or weights of ``module`` the file lacks (``all_of_module``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file} cannot be read ({str(err).strip().splitlines()[0]})") from None
    with gathered([p for n, p in module.named_parameters() if n in state], modifier_rank=0):
        own = module.state_dict()
        unexpected = [name for name in state if name not in own]
        if unexpected and only_module:
            raise ValueError(f"{file} holds weights this model has no place for: {', '.join(unexpected[:5])}")
        missing = [name for name in own if name not in state]
        if missing and all_of_module:
            raise ValueError(f"{file} lacks weights of this model: {', '.join(missing[:5])}")
        for name, tensor in state.items():
            if name in own and own[name].shape != tensor.shape:
                raise ValueError(f"{file}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(own[name].shape)}")
        usable = {name: tensor for name, tensor in state.items() if name in own}
        module.load_state_dict(usable, strict=False)
    return sorted(usable), unexpected


def fully_shard_model(model: nn.Module, mesh: Any, bf16: bool = False, cpu_offload: bool = False,
                      reshard_after_forward: bool = True) -> None:
    """Shard ``model`` (a UnifiedModel) with FSDP2 over ``mesh``: one unit per decoder layer, then
    the root. Frozen and LoRA parameters shard like any other (FSDP2 shards each parameter on its
    own), and every unit runs on every rank every step, as the modalities already do for ZeRO-3."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    options = {
        "mesh": mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy(),
        "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    }
    for layer in model.backbone.get_decoder().layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **options)
    # The root stays gathered from forward to backward, as FSDP2 does for a root by default: the
    # embeddings and heads are needed again at once, and the losses come back inside LossTerm
    # objects, in which FSDP2 (torch 2.11) finds no output to hook: it would run backward on freed weights.
    fully_shard(model, reshard_after_forward=False, **options)
