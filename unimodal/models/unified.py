"""The UnifiedModel: embed every modality, run the HF decoder once, score with every head.

Plug points for modalities:
- ``continuous``: modality name -> :class:`ContinuousModality`, which embeds that modality's
  continuous slots (``embed``) and adds its own loss terms from the final hidden states
  (``loss``, e.g. a diffusion head); state such as sampled noise flows from one to the other;
- discrete media codes live in the vocabulary (``VocabLayout.code_ranges``) and are scored by
  the LM head like text.
The text LM head is the backbone's own output embedding over the whole (extended) vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from unimodal.batch import IGNORE_INDEX, PackedBatch
from unimodal.modalities.vocab import VocabLayout
from unimodal.models.attention import decoder_mask, longest_document
from unimodal.models.backbone import attention_window, check_window
from unimodal.models.routing import ModalityRouter
from unimodal.schema import MODALITY_IDS


@dataclass
class LossTerm:
    """A summed loss and how many items it sums over; the trainer decides how to normalise."""

    total: torch.Tensor
    count: torch.Tensor


class ContinuousModality(nn.Module):
    """A modality carried as continuous features: its input adapter and, optionally, its loss.

    ``embed`` maps the slot features ``[N, D]`` of this modality to ``[N, H]`` and may return
    state (noise, timesteps) that ``loss`` needs. Both run on every step even with ``N == 0``,
    so DeepSpeed ZeRO-3 ranks whose batch lacks the modality still gather the same parameters.
    ``feature_dim`` is ``D``, which the data's features must match.
    """

    feature_dim: int

    def attach(self, model: UnifiedModel) -> None:
        """Called once by the UnifiedModel that owns this modality (e.g. to find the backbone's
        embedding rows it mixes); keep no module reference to ``model`` (it would be a cycle)."""

    def prepare(self, batch: PackedBatch) -> PackedBatch:
        """A chance to rewrite the batch before anything runs (e.g. conditioning dropout in training)."""
        return batch

    def embed(self, features: torch.Tensor, batch: PackedBatch, rows: torch.Tensor) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def loss(self, hidden: torch.Tensor, batch: PackedBatch, state: Any) -> dict[str, LossTerm]:
        return {}


def check_item_slots(continuous: dict[str, ContinuousModality], codecs: dict[str, Any]) -> None:
    """A generating modality writes ``slots_per_item`` slots an item and its codec decodes exactly
    ``slots`` of them: where the two differ, training runs (the slots of each item are trained
    wherever they fall) and only drawing fails, so both are checked before either happens."""
    for name, module in continuous.items():
        own, codec = getattr(module, "slots_per_item", None), getattr(codecs.get(name), "slots", None)
        if isinstance(own, int) and isinstance(codec, int) and own != codec:
            raise ValueError(f"the model's {name} items are {own} slots (continuous.{name}.init_args.slots_per_item) but its "
                             f"{name} codec writes {codec}: set slots_per_item to the codec's")


class LinearAdapter(ContinuousModality):
    """Features to the backbone width, no generative loss: understanding-only inputs."""

    def __init__(self, hidden_size: int, feature_dim: int):
        super().__init__()
        self.feature_dim = feature_dim
        self.proj = nn.Linear(feature_dim, hidden_size)

    def embed(self, features: torch.Tensor, batch: PackedBatch, rows: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.proj(features), None


class UnifiedModel(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        layout: VocabLayout,
        continuous: dict[str, ContinuousModality] | None = None,
        routing: ModalityRouter | None = None,
        ce_chunk: int = 0,
    ):
        super().__init__()
        if ce_chunk < 0:
            raise ValueError(f"backbone.ce_chunk must be >= 0 (0: no chunking), got {ce_chunk}")
        self.ce_chunk = ce_chunk
        self.backbone = backbone
        self.layout = layout
        self.continuous = nn.ModuleDict(continuous or {})
        # set when the backbone's layers carry modality experts (unimodal.models.routing)
        self.routing = routing
        for modality in self.continuous.values():
            modality.attach(self)

    @property
    def hidden_size(self) -> int:
        return self.backbone.config.hidden_size

    def embed(self, batch: PackedBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        """Token embeddings with continuous slots replaced by their modality's embedding."""
        embeds = self.backbone.get_input_embeddings()(batch.input_ids)
        slot_modality = batch.modality_ids[batch.continuous_mask]
        unclaimed = torch.ones_like(slot_modality, dtype=torch.bool)
        adapted = torch.zeros(len(slot_modality), embeds.shape[-1], dtype=embeds.dtype, device=embeds.device)
        states = {}
        for name, modality in self.continuous.items():
            rows = slot_modality == MODALITY_IDS[name]
            unclaimed &= ~rows
            out, states[name] = modality.embed(batch.features[rows], batch, rows)
            adapted = adapted.index_put((rows.nonzero()[:, 0],), out.to(embeds.dtype))
        if unclaimed.any():
            raise ValueError(
                "the batch holds continuous features for a modality the model has no continuous adapter for "
                f"(model: {sorted(self.continuous) or 'none'})"
            )
        return embeds.masked_scatter(batch.continuous_mask[..., None], adapted), states

    def hidden_states(self, batch: PackedBatch, embeds: torch.Tensor | None = None) -> torch.Tensor:
        window = attention_window(self.backbone.config)
        if window is not None:
            check_window(window, longest_document(batch.doc_ids))
        decoder = self.backbone.get_decoder()
        mask = decoder_mask(self.backbone.config._attn_implementation, batch.doc_ids, batch.block_ids)
        if self.routing is not None:
            self.routing.set(batch.modality_ids)
        out = decoder(
            inputs_embeds=self.embed(batch)[0] if embeds is None else embeds,
            position_ids=batch.position_ids,
            **mask,
            use_cache=False,
        )
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.backbone.get_output_embeddings()(hidden).float()
        cap = getattr(self.backbone.config, "final_logit_softcapping", None)
        if cap:  # Gemma 2 squashes its logits into (-cap, cap), as its own forward does
            logits = torch.tanh(logits / cap) * cap
        # padding rows of the vocabulary are never valid outputs
        padding = torch.arange(logits.shape[-1], device=logits.device) >= self.layout.used_size
        return logits.masked_fill(padding, float("-inf"))

    def forward(self, batch: PackedBatch) -> dict[str, LossTerm]:
        """Summed losses per term: ``ce/<modality>`` for every vocabulary target, plus each head's."""
        for modality in self.continuous.values():
            batch = modality.prepare(batch)
        embeds, states = self.embed(batch)
        hidden = self.hidden_states(batch, embeds)
        losses = self.cross_entropy(hidden, batch)
        for name, modality in self.continuous.items():
            losses.update(modality.loss(hidden, batch, states[name]))
        return losses

    def token_losses(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy of ``hidden [N, H]``; with ``ce_chunk`` the logits exist one
        chunk at a time and are recomputed in backward (one more head matmul, a few % of a step)."""
        if not self.ce_chunk or len(labels) <= self.ce_chunk:
            return self._logit_loss(hidden, labels)
        return torch.cat([
            checkpoint(self._logit_loss, h, y, use_reentrant=False)
            for h, y in zip(hidden.split(self.ce_chunk), labels.split(self.ce_chunk))
        ])

    def _logit_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(hidden), labels, reduction="none")

    def cross_entropy(self, hidden: torch.Tensor, batch: PackedBatch) -> dict[str, LossTerm]:
        # logits only where there is a target: saves the [B, L, V] tensor on long packed batches
        selected = batch.labels != IGNORE_INDEX
        per_token = self.token_losses(hidden[selected], batch.labels[selected])
        # the target's modality is the modality of the next position
        target_modality = torch.roll(batch.modality_ids, shifts=-1, dims=1)[selected]
        # a term for every modality the vocabulary has codes for, in every batch (its count may be
        # 0): the same terms each step, with no host sync to ask which are present
        losses = {}
        for name, modality_id in MODALITY_IDS.items():
            if name == "text" or name in self.layout.code_ranges:
                rows = target_modality == modality_id
                losses[f"ce/{name}"] = LossTerm(per_token[rows].sum(), rows.sum())
        return losses
