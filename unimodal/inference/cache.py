"""The batched KV cache the engine decodes on, and the clean embeddings of continuous features it
is fed.

The cache holds every row at the same length; which cached positions are real is tracked per row
(``valid``), so left padding, finished rows and rows that sit out another row's step are never
attended.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from unimodal.batch import IGNORE_INDEX, PackedBatch
from unimodal.data.processor import EncodedDocument
from unimodal.models.attention import decoder_mask, for_backend
from unimodal.models.backbone import attention_window, cache_keyword, check_window
from unimodal.models.unified import UnifiedModel
from unimodal.schema import MODALITY_IDS


class KVCache:
    """The batched KV cache with, per row, which cached positions are real and the next position id."""

    def __init__(self, model: UnifiedModel, docs: Sequence[EncodedDocument], pad_id: int):
        self.model = model
        self.decoder = model.backbone.get_decoder()
        self.cache_argument = cache_keyword(type(self.decoder))
        self.embed_tokens = model.backbone.get_input_embeddings()
        self.device = self.embed_tokens.weight.device
        self.dtype = self.embed_tokens.weight.dtype
        self.pad_id = pad_id
        self.cache = DynamicCache()
        self._ones: torch.Tensor | None = None
        self.lengths = [len(d) for d in docs]
        self.window = attention_window(model.backbone.config)
        check_window(self.window, max(self.lengths, default=0))
        embeds, real, blocks, modality = self._prompt_embeddings(docs)
        positions = (real.cumsum(1) - 1).clamp(min=0)
        # a fresh cache: the prompt's queries and keys coincide, so prefill takes the backend's own mask
        mask = decoder_mask(model.backbone.config._attn_implementation, real.long(), blocks)
        out = self._run(embeds, mask, positions, modality)
        self.valid = real
        self.next_pos = real.sum(1)
        self.last = out[:, -1]
        # every cached position of every row is real: one-position steps need no explicit mask
        self.dense = bool(real.all())

    @property
    def rows(self) -> int:
        return self.valid.shape[0]

    def _prompt_embeddings(self, docs: Sequence[EncodedDocument]) -> tuple[torch.Tensor, ...]:
        """Left-padded prompt embeddings (continuous slots take their modality's clean embedding),
        which positions are real, bidirectional block ids and modality ids."""
        rows, width = len(docs), max(self.lengths)
        arrays = {
            "input_ids": np.full((rows, width), self.pad_id, np.int64),
            "modality_ids": np.zeros((rows, width), np.int64),
            "block_ids": np.full((rows, width), -1, np.int64),
            "continuous_mask": np.zeros((rows, width), bool),
            "doc_ids": np.zeros((rows, width), np.int64),
        }
        for row, doc in enumerate(docs):
            cols = slice(width - len(doc), width)
            arrays["input_ids"][row, cols] = doc.ids
            arrays["modality_ids"][row, cols] = doc.modality
            arrays["block_ids"][row, cols] = doc.block
            arrays["continuous_mask"][row, cols] = doc.continuous
            arrays["doc_ids"][row, cols] = 1
        tensors = {k: torch.from_numpy(v).to(self.device) for k, v in arrays.items()}
        features = [d.features for d in docs if len(d.features)]
        batch = PackedBatch(
            features=torch.from_numpy(np.concatenate(features)).to(self.device) if features else torch.zeros(0, 0, device=self.device),
            position_ids=(tensors["doc_ids"].cumsum(1) - 1).clamp(min=0),
            labels=torch.full_like(tensors["input_ids"], IGNORE_INDEX),
            target_mask=torch.zeros_like(tensors["continuous_mask"]),
            **tensors,
        )
        embeds = self.embed_tokens(batch.input_ids)
        if batch.continuous_mask.any():
            slot_modality = batch.modality_ids[batch.continuous_mask]
            adapted = torch.zeros(len(slot_modality), embeds.shape[-1], dtype=embeds.dtype, device=self.device)
            for name, modality_id in MODALITY_IDS.items():
                rows_of = slot_modality == modality_id
                if not rows_of.any():
                    continue
                if name not in self.model.continuous:
                    raise ValueError(f"the prompt holds continuous {name} features but the model has no continuous {name} adapter")
                adapted[rows_of] = embed_features(self.model, name, batch.features[rows_of], batch, rows_of).to(embeds.dtype)
            embeds = embeds.masked_scatter(batch.continuous_mask[..., None], adapted)
        return embeds, batch.doc_ids > 0, batch.block_ids, batch.modality_ids

    def _run(self, embeds: torch.Tensor, mask: dict[str, Any], positions: torch.Tensor, modality: torch.Tensor | None) -> torch.Tensor:
        """One decoder call on the cache; ``mask`` holds the decoder's mask arguments."""
        if self.model.routing is not None:  # modality experts (LlamaFusion) route each position
            self.model.routing.set(modality)
        out = self.decoder(
            inputs_embeds=embeds, position_ids=positions, use_cache=True, **mask, **{self.cache_argument: self.cache}
        )
        return out.last_hidden_state

    def step(
        self,
        embeds: torch.Tensor,
        real: torch.Tensor | None,
        modality: torch.Tensor | None,
        bidirectional: bool = False,
        commit: bool = True,
    ) -> torch.Tensor:
        """Run ``embeds [R, q, H]`` (of modality ids ``modality [R, q]``, needed with modality
        experts) on top of the cache; ``real [R, q]`` marks positions that count (None: all).

        A real query sees the row's real cached positions and the chunk's real positions before it
        (all of them when ``bidirectional``); a hole sees only itself. Without ``commit`` the cache
        is cropped back afterwards, so the call leaves no trace.
        """
        rows, q = embeds.shape[:2]
        if self.window is not None:
            check_window(self.window, int(self.next_pos.max()) + q)
        everything = real is None
        if everything:
            real = self._all_real(rows, q)
        if everything and self.dense and q == 1:
            mask = None  # the backbone's own causal mask over a cache without holes
        else:
            eye = torch.eye(q, dtype=torch.bool, device=self.device)
            inner = real[:, None, :] & real[:, :, None]
            if not bidirectional:
                inner = inner & torch.tril(torch.ones(q, q, dtype=torch.bool, device=self.device))
            prefix = self.valid[:, None, :] & real[:, :, None]
            mask = torch.cat([prefix.expand(rows, q, self.valid.shape[1]), inner | eye], dim=-1)[:, None]
        positions = self.next_pos[:, None] + (torch.arange(q, device=self.device) if everything else (real.cumsum(1) - 1).clamp(min=0))
        mask = for_backend(self.model.backbone.config._attn_implementation, mask)
        hidden = self._run(embeds.to(self.dtype), {"attention_mask": mask}, positions, modality)
        if not commit:
            self.cache.crop(-q)
            return hidden
        self.valid = torch.cat([self.valid, real], dim=1)
        if everything:
            self.next_pos = self.next_pos + q
            self.last = hidden[:, -1].to(self.last.dtype)
            return hidden
        self.dense = False
        self.next_pos = self.next_pos + real.sum(1)
        last_real = (real.cumsum(1) == real.sum(1, keepdim=True)) & real
        picked = (hidden * last_real[..., None]).sum(1)
        self.last = torch.where(real.any(1)[:, None], picked.to(self.last.dtype), self.last)
        return hidden

    def _all_real(self, rows: int, q: int) -> torch.Tensor:
        if self._ones is None or self._ones.shape != (rows, q):
            self._ones = torch.ones(rows, q, dtype=torch.bool, device=self.device)
        return self._ones

    def step_rows(self, rows: list[int], embeds: torch.Tensor, modality: str, bidirectional: bool, commit: bool) -> torch.Tensor:
        """``step`` where only ``rows`` take part, with ``embeds [len(rows), q, H]`` of one modality;
        their hidden states."""
        q = embeds.shape[1]
        full = torch.zeros(self.rows, q, embeds.shape[-1], dtype=self.dtype, device=self.device)
        real = torch.zeros(self.rows, q, dtype=torch.bool, device=self.device)
        index = torch.tensor(rows, device=self.device)
        full[index] = embeds.to(self.dtype)
        real[index] = True
        ids = torch.where(real, MODALITY_IDS[modality], MODALITY_IDS["text"])
        return self.step(full, real, ids, bidirectional, commit)[index]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (beam search)."""
        self.cache.reorder_cache(index)
        self.valid = self.valid[index]
        self.next_pos = self.next_pos[index]
        self.last = self.last[index]


def embed_features(model: UnifiedModel, name: str, features: torch.Tensor, batch: PackedBatch | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Clean (noise-free) input embeddings of continuous features: the modality's ``embed_clean``,
    or, for understanding-only adapters without one, its training ``embed``."""
    modality = model.continuous[name]
    features = features.to(compute_dtype(modality))
    embed_clean = getattr(modality, "embed_clean", None)
    if embed_clean is not None:
        return embed_clean(features)
    if batch is None:
        raise ValueError(f"the continuous {name} modality has no embed_clean, so the engine cannot feed it generated features")
    return modality.embed(features, batch, rows)[0]


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a modality's own weights compute in (a bf16 backbone may feed an fp32 head)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def padded_ids(prompts: Sequence[EncodedDocument], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt token ids ``[B, width]`` and which of them are real."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.from_numpy(np.asarray(prompt.ids, dtype=np.int64))
        valid[row, width - len(prompt) :] = True
    return ids.to(device), valid.to(device)
