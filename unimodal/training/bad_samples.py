"""The run's bad samples, summed over every DataLoader worker and rank before the limit applies.

Each worker's stream only counts what it skips (and warns about each one where it reads it); its
batches carry the counts here. Applying ``max_bad_fraction`` to the sum keeps one worker's bad
shard from stopping a run whose data is otherwise fine, and makes every rank stop at the same
step when the whole run's data is too broken.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from unimodal.batch import PackedBatch
from unimodal.data.shards import BadSamplePolicy, TooManyBadSamples
from unimodal.training.strategies import world_size

log = logging.getLogger("unimodal.train")

# what each training batch carries about the samples its stream read since its previous batch
COUNT_FIELDS = ("samples_read", "samples_skipped", "skipped_from")


class BadSampleTally:
    """Samples read and skipped in this run; ``add`` stops the run (on every rank) past the limit.

    With several ranks the counts are summed every ``every`` micro-batches (every rank adds the
    same number of batches, so all check at the same one): a sum is a host sync, which would
    otherwise stall the GPU at every step.
    """

    def __init__(self, max_bad_fraction: float | None = None, every: int = 16) -> None:
        self.limit = BadSamplePolicy() if max_bad_fraction is None else BadSamplePolicy(max_bad_fraction)
        self.every = every
        self.local = torch.zeros(2, dtype=torch.long)  # read, skipped on this rank
        self.shard = ""  # the last shard this rank skipped samples of
        self.batches = 0
        self.last = (0, 0)  # the run's totals when they were last summed

    def add(self, batch: PackedBatch | Mapping[str, Any], device: torch.device) -> tuple[int, int]:
        """Count ``batch``'s samples (the fields of a packed batch, the keys of an image-caption
        one); the run's totals (read, skipped) as last summed."""
        read, skipped, shard = (batch[k] if isinstance(batch, Mapping) else getattr(batch, k) for k in COUNT_FIELDS)
        self.local += torch.stack([torch.as_tensor(read), torch.as_tensor(skipped)]).long().cpu()
        self.shard = shard or self.shard
        self.batches += 1
        if world_size() > 1 and self.batches % self.every:
            return self.last
        read, skipped = self.last = self.totals(device)
        if self.limit.over_limit(skipped, read):
            where = f"the last on this rank in {self.shard}" if self.shard else "none of them on this rank"
            raise TooManyBadSamples(
                f"too many bad samples: {skipped} of {read} skipped over every rank and DataLoader worker "
                f"({skipped / read:.1%}, max_bad_fraction={self.limit.max_bad_fraction}; {where}); the warnings "
                "above say why each was skipped, and `unimodal data inspect SHARD` checks a shard"
            )
        return read, skipped

    def totals(self, device: torch.device) -> tuple[int, int]:
        """The run's (read, skipped) over every rank; with several, every rank must call it."""
        counts = self.local
        if world_size() > 1:
            counts = counts.to(device, copy=True)  # all_reduce works in place
            dist.all_reduce(counts)
        read, skipped = (int(c) for c in counts.tolist())
        return read, skipped

    def report(self, device: torch.device, is_global_zero: bool) -> None:
        """One line at the end of a run that skipped any sample (every rank must call it)."""
        read, skipped = self.totals(device)
        if skipped and is_global_zero:
            log.warning("data: skipped %d of %d samples as bad in this run, over every rank and worker", skipped, read)


class CountsBadSamples:
    """For a LightningModule whose batches carry :data:`COUNT_FIELDS`: the run's tally, limited by
    its data module's ``max_bad_fraction``."""

    _bad_samples: BadSampleTally | None = None

    @property
    def bad_samples(self) -> BadSampleTally:
        if self._bad_samples is None:
            datamodule = self.trainer.datamodule if self._trainer is not None else None
            self._bad_samples = BadSampleTally(getattr(datamodule, "max_bad_fraction", None))
        return self._bad_samples
