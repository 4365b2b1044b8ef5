"""Working on weights that DeepSpeed ZeRO-3 may have partitioned at construction."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

from torch import nn


def gathered(params: Iterable[nn.Parameter], modifier_rank: int | None = None) -> Any:
    """A context in which ZeRO-3-partitioned ``params`` are whole (with ``modifier_rank`` set,
    that rank's changes are kept and re-partitioned on exit); a no-op for plain parameters."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)
