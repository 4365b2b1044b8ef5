"""The UnifiedModel: embed every modality, run the HF decoder once, score with every head.

Plug points for the modality issues:
- ``adapters``: modality name -> module mapping continuous features ``[N, D]`` to ``[N, H]``,
  used at the packed batch's continuous slots of that modality;
- ``heads``: name -> :class:`Head`, each turning the final hidden states into loss terms.
The text LM head is the backbone's own output embedding over the whole (extended) vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from unimodal.data.packing import IGNORE_INDEX, PackedBatch
from unimodal.models.attention import build_attention_mask
from unimodal.modalities.registry import MODALITY_IDS, VocabLayout


@dataclass
class LossTerm:
    """A summed loss and how many items it sums over; the trainer decides how to normalise."""

    total: torch.Tensor
    count: torch.Tensor


class Head(Protocol):
    def __call__(self, hidden: torch.Tensor, batch: PackedBatch) -> dict[str, LossTerm]: ...


class LinearAdapter(nn.Module):
    """Continuous features to the backbone width; the simplest input adapter."""

    def __init__(self, feature_dim: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(feature_dim, hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


class UnifiedModel(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        layout: VocabLayout,
        adapters: dict[str, nn.Module] | None = None,
        heads: dict[str, nn.Module] | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.layout = layout
        self.adapters = nn.ModuleDict(adapters or {})
        self.heads = nn.ModuleDict(heads or {})

    @property
    def hidden_size(self) -> int:
        return self.backbone.config.hidden_size

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        embeds = self.backbone.get_input_embeddings()(batch.input_ids)
        if batch.features.numel() == 0 and not self.adapters:
            return embeds
        slots = batch.continuous_mask
        slot_modality = batch.modality_ids[slots]
        features = batch.features.to(embeds.dtype)
        adapted = torch.zeros(features.shape[0], embeds.shape[-1], dtype=embeds.dtype, device=embeds.device)
        for name, adapter in self.adapters.items():
            rows = slot_modality == MODALITY_IDS[name]
            # every adapter runs every step, so ZeRO-3 ranks without this modality do not hang
            adapted = adapted + adapter(features).to(embeds.dtype) * rows[:, None]
        if features.shape[0] and not self.adapters:
            raise ValueError("the batch holds continuous features but the model has no input adapter")
        return embeds.masked_scatter(slots[..., None], adapted)

    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:
        decoder = self.backbone.get_decoder()
        mask = build_attention_mask(batch.doc_ids, batch.block_ids)
        out = decoder(
            inputs_embeds=self.embed(batch),
            attention_mask=mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.backbone.get_output_embeddings()(hidden).float()
        # padding rows of the vocabulary are never valid outputs
        padding = torch.arange(logits.shape[-1], device=logits.device) >= self.layout.used_size
        return logits.masked_fill(padding, float("-inf"))

    def forward(self, batch: PackedBatch) -> dict[str, LossTerm]:
        """Summed losses per term: ``ce/<modality>`` for every vocabulary target, plus each head's."""
        hidden = self.hidden_states(batch)
        losses = self.cross_entropy(hidden, batch)
        for head in self.heads.values():
            losses.update(head(hidden, batch))
        return losses

    def cross_entropy(self, hidden: torch.Tensor, batch: PackedBatch) -> dict[str, LossTerm]:
        # logits only where there is a target: saves the [B, L, V] tensor on long packed batches
        selected = batch.labels != IGNORE_INDEX
        logits = self.logits(hidden[selected])
        labels = batch.labels[selected]
        per_token = F.cross_entropy(logits, labels, reduction="none")
        # the target's modality is the modality of the next position
        target_modality = torch.roll(batch.modality_ids, shifts=-1, dims=1)[selected]
        losses = {}
        for name, modality_id in MODALITY_IDS.items():
            rows = target_modality == modality_id
            if name == "text" or rows.any():
                losses[f"ce/{name}"] = LossTerm(per_token[rows].sum(), rows.sum())
        return losses
