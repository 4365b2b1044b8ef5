"""The batch the model consumes: packed sequences with their masks, positions and continuous slots."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

# the label of a position with no discrete target (torch's cross-entropy default ignore_index)
IGNORE_INDEX = -100
# per-batch counts that stay on the host when a batch moves to a device
HOST_FIELDS = ("window_label_tokens", "samples_read", "samples_skipped", "skipped_from")


@dataclass
class PackedBatch:
    """A batch of packed sequences; ``features`` holds the continuous slots in row-major order."""

    input_ids: torch.Tensor  # [B, L] long
    modality_ids: torch.Tensor  # [B, L] long
    position_ids: torch.Tensor  # [B, L] long
    doc_ids: torch.Tensor  # [B, L] long, 0 = padding
    block_ids: torch.Tensor  # [B, L] long, -1 = causal
    labels: torch.Tensor  # [B, L] long, IGNORE_INDEX where no discrete target
    target_mask: torch.Tensor  # [B, L] bool, content at t is predicted (any modality)
    continuous_mask: torch.Tensor  # [B, L] bool
    features: torch.Tensor  # [N, D] float, N = continuous_mask.sum()
    # label tokens of the gradient-accumulation window this batch belongs to (set by the data module)
    window_label_tokens: torch.Tensor = field(default_factory=lambda: torch.tensor(0))
    # samples read and skipped as bad by the stream since its previous batch: they travel with the
    # batches, so counts from every DataLoader worker reach the training process
    samples_read: torch.Tensor = field(default_factory=lambda: torch.tensor(0))
    samples_skipped: torch.Tensor = field(default_factory=lambda: torch.tensor(0))
    skipped_from: str = ""  # the shard of the last of those skipped, for the line that stops a run

    def to(self, device: torch.device | str, non_blocking: bool | None = None) -> PackedBatch:
        """The per-position tensors on ``device``; the counts stay on the CPU, where the training
        step reads them without waiting for the GPU. Copies to a GPU are queued, not
        waited for (safe from host memory: the source is staged before the call returns), so the
        host prepares the next step while the GPU finishes this one."""
        if non_blocking is None:
            non_blocking = torch.device(device).type == "cuda"
        kept = {name: getattr(self, name) for name in HOST_FIELDS}
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if f.name not in HOST_FIELDS
        }
        return PackedBatch(**moved, **kept)

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())
