"""Image modalities that read *and generate* continuous features.

- :class:`TokenDiffusionImage` (Orthus, MAR-style heads): soft-VQ input, causal attention inside the
  image, and a per-token diffusion head that predicts slot ``s`` from the final hidden state at
  ``s - 1``. Generation is token by token (``sample_next``).
- :class:`TransfusionImage` (Transfusion, LlamaFusion): noised patch latents are the input,
  attention is bidirectional inside the image, and the backbone's outputs at the image positions
  predict the noise through the output adapter. Generation denoises the whole image block
  (``denoise_block``).

Both add the loss term ``diffusion/image``: the per-slot MSE summed over target slots, with the
number of target slots as its count (``UnimodalModule`` divides and applies
``loss_weights["diffusion/image"]``). Both can drop the conditioning of a generated image in
training (``cond_dropout``, for classifier-free guidance): the image span ``<|boi|> ... <|eoi|>``
is cut off from the rest of its document, so it sees only itself, exactly like an unconditional
prompt made of ``<|boi|>`` alone.

A target image is *understood* when it opens its document and a caption follows it (the
image-first half of Transfusion's image-caption pairs): Transfusion's noise limiting
(``noise_limit``) applies to it and it is never dropped. Every other target image is *generated*:
it has a prompt before it (a caption, an instruction, a chat turn, a story so far), so it trains
over the full noise range and takes part in conditioning dropout. Text after a generated image
does not make it a captioned one: a chat template's end-of-turn markers, or the next line of a
story, follow every picture an assistant draws. Fewer than ``min_text_after`` text tokens (a
begin- or end-of-sequence token alone) are neither a prompt nor a caption.

Under DeepSpeed ZeRO-3 every module here runs on every rank every step: on a batch without
images the head and adapters run on a dummy input whose output enters the loss times zero.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unimodal.batch import PackedBatch
from unimodal.models.adapters import SoftVQ, build_patch_adapters
from unimodal.models.diffusion import DiffusionSchedule, ScheduleConfig, guided
from unimodal.models.heads import DiffusionHead
from unimodal.models.sharding import load_safetensors
from unimodal.models.unified import ContinuousModality, LossTerm, UnifiedModel
from unimodal.schema import MODALITY_IDS

IMAGE = MODALITY_IDS["image"]
TERM = "diffusion/image"


@dataclass
class ImageSpans:
    """Images of a batch: their row, first and last slot position, and each slot's image index."""

    row: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return len(self.row)


def image_spans(positions: torch.Tensor) -> ImageSpans:
    """Group slot positions ``[N, 2]`` (row-major) into images: runs of consecutive positions."""
    rows, cols = positions[:, 0], positions[:, 1]
    new = torch.ones(len(positions), dtype=torch.bool, device=positions.device)
    new[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1] + 1)
    starts = new.nonzero()[:, 0]
    ends = torch.cat([starts[1:] - 1, starts.new_tensor([len(positions) - 1])]) if len(starts) else starts
    return ImageSpans(rows[starts], cols[starts], cols[ends], new.long().cumsum(0) - 1)


def text_around(batch: PackedBatch, spans: ImageSpans) -> tuple[torch.Tensor, torch.Tensor]:
    """How many text positions precede each image (before its ``<|boi|>``) and follow it (after
    its ``<|eoi|>``) in its own document."""
    length = batch.doc_ids.shape[1]
    docs = batch.doc_ids[spans.row]
    same_doc = docs == docs.gather(1, spans.end[:, None])
    text = same_doc & (batch.modality_ids[spans.row] == MODALITY_IDS["text"])
    columns = torch.arange(length, device=docs.device)[None]
    before = (text & (columns < (spans.start - 1)[:, None])).sum(1)
    after = (text & (columns > (spans.end + 1)[:, None])).sum(1)
    return before, after


def load_added_modules(module: nn.Module, path: str | Path) -> None:
    """Load a safetensors state dict into ``module``; every key must match (no silent mismatch)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from: {path} does not exist")
    try:
        load_safetensors(module, path, all_of_module=True)
    except ValueError as err:
        raise ValueError(f"init_from: {err}") from None


class ContinuousImage(ContinuousModality):
    """What both image diffusion modalities share: the schedule, image spans, conditioning dropout.

    Attributes for the generation engine: ``attention`` ("causal" or "bidirectional"),
    ``slots_per_item`` (continuous slots per image), ``feature_dim``; ``schedule`` is the one
    :class:`DiffusionSchedule` used for training and sampling.
    """

    attention = ""

    def __init__(
        self,
        feature_dim: int,
        slots_per_item: int,
        schedule: ScheduleConfig | None,
        cond_dropout: float,
        min_text_after: int,
    ):
        super().__init__()
        if not 0.0 <= cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {cond_dropout}")
        self.feature_dim = feature_dim
        self.slots_per_item = slots_per_item
        self.schedule = DiffusionSchedule(schedule)
        self.cond_dropout = cond_dropout
        self.min_text_after = min_text_after
        self._owner: list[UnifiedModel] = []  # a list keeps the owner out of the module tree

    def attach(self, model: UnifiedModel) -> None:
        self._owner[:] = [model]

    @property
    def owner(self) -> UnifiedModel:
        if not self._owner:
            raise RuntimeError(f"{type(self).__name__} is not attached to a UnifiedModel")
        return self._owner[0]

    @staticmethod
    def slot_positions(batch: PackedBatch, rows: torch.Tensor) -> torch.Tensor:
        """``[N, 2]`` (row, position) of this modality's slots, in the order of its features."""
        return batch.continuous_mask.nonzero()[rows]

    def understood(self, batch: PackedBatch, spans: ImageSpans) -> torch.Tensor:
        """Target images that open their document and have a caption after them."""
        before, after = text_around(batch, spans)
        target = batch.target_mask[spans.row, spans.start]
        return target & (before < self.min_text_after) & (after >= self.min_text_after)

    def generated(self, batch: PackedBatch, spans: ImageSpans) -> torch.Tensor:
        """Target images that are not understood ones: a prompt, however short, comes before them."""
        return batch.target_mask[spans.row, spans.start] & ~self.understood(batch, spans)

    def prepare(self, batch: PackedBatch) -> PackedBatch:
        """Conditioning dropout: a dropped generated image gets a document id of its own."""
        if not self.training or self.cond_dropout == 0:
            return batch
        positions = (batch.continuous_mask & (batch.modality_ids == IMAGE)).nonzero()
        spans = image_spans(positions)
        drop = self.generated(batch, spans) & (torch.rand(len(spans), device=positions.device) < self.cond_dropout)
        if not drop.any():
            return batch
        doc_ids = batch.doc_ids.clone()
        fresh = int(doc_ids.max()) + 1
        for row, start, end in zip(spans.row[drop].tolist(), spans.start[drop].tolist(), spans.end[drop].tolist()):
            doc_ids[row, start - 1 : end + 2] = fresh  # <|boi|>, the slots, <|eoi|>
            fresh += 1
        return PackedBatch(**{**vars(batch), "doc_ids": doc_ids})


class TokenDiffusionImage(ContinuousImage):
    """Orthus: soft-VQ input, causal attention inside images, a per-token diffusion head.

    Training: for every image slot ``s`` whose content is a target, the head is conditioned on
    the final hidden state at ``s - 1`` and learns to denoise ``latent_scale * features[s]``;
    each target is repeated ``batch_mul`` times with independent noise and timesteps.

    Generation engine interface:

    - ``attention = "causal"``; ``slots_per_item``; ``feature_dim``;
    - ``embed_clean(features [N, D]) -> [N, H]``: input embeddings of generated features, to
      commit them to the KV cache;
    - ``sample_next(hidden [B, H], *, cfg_scale=1.0, steps=None, generator=None) -> [B, D]``:
      the next slot's features from the hidden state at the position before it (``cfg_scale``,
      ``steps`` and ``generator``: one, or one per row, which the engine passes so that requests
      with different settings share a call and each row's noise is its own). With any
      ``cfg_scale != 1`` pass ``2B`` rows (the conditional rows first, then the unconditional
      ones, e.g. from the prompt "Generate an image."); guidance applies to the head output.

    The soft-VQ mixes the backbone's image-token embedding rows ``token_ids`` (a buffer):
    ``unimodal convert orthus`` stores Chameleon's; otherwise they default to the vocabulary's
    ``image`` code range, which must then hold ``codebook_size`` codes.
    """

    attention = "causal"

    def __init__(
        self,
        hidden_size: int,
        feature_dim: int = 256,
        slots_per_item: int = 1024,
        codebook_size: int = 8192,
        temperature: float = 1.0,
        head_width: int = 1536,
        head_depth: int = 3,
        batch_mul: int = 8,
        latent_scale: float = 0.1,
        schedule: ScheduleConfig | None = None,
        cond_dropout: float = 0.0,
        min_text_after: int = 2,
        init_from: str | None = None,
    ):
        super().__init__(feature_dim, slots_per_item, schedule, cond_dropout, min_text_after)
        if batch_mul < 1:
            raise ValueError(f"batch_mul must be >= 1, got {batch_mul}")
        self.soft_vq = SoftVQ(feature_dim, codebook_size, temperature)
        self.head = DiffusionHead(feature_dim, hidden_size, head_width, head_depth)
        self.register_buffer("token_ids", torch.full((codebook_size,), -1, dtype=torch.long))
        self.batch_mul = batch_mul
        self.latent_scale = latent_scale
        if init_from:
            load_added_modules(self, init_from)

    def attach(self, model: UnifiedModel) -> None:
        super().attach(model)
        size = len(self.token_ids)
        if (self.token_ids < 0).any() and model.layout.code_ranges.get("image") == size:
            self.token_ids.copy_(model.layout.range_offset("image") + torch.arange(size))

    def _token_rows(self) -> torch.Tensor:
        """The backbone's embedding rows the soft-VQ mixes (through the embedding module, so
        ZeRO-3 gathers its weight)."""
        size, vocab = len(self.token_ids), self.owner.layout.size
        if (self.token_ids < 0).any():  # neither loaded (init_from, a checkpoint) nor set by attach
            raise ValueError(
                f"TokenDiffusionImage mixes {size} image-token embedding rows but none are set: give the vocabulary an "
                f"image code range of that size (data code_ranges: {{image: {size}}}) or start from `unimodal convert orthus`"
            )
        if int(self.token_ids.max()) >= vocab:
            raise ValueError(f"soft-VQ token ids reach {int(self.token_ids.max())}, beyond the {vocab}-row vocabulary")
        return self.owner.backbone.get_input_embeddings()(self.token_ids)

    def embed_clean(self, features: torch.Tensor) -> torch.Tensor:
        rows = self._token_rows()
        return self.soft_vq(features, rows)

    def embed(self, features: torch.Tensor, batch: PackedBatch, rows: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return self.embed_clean(features), (features, self.slot_positions(batch, rows))

    def loss(self, hidden: torch.Tensor, batch: PackedBatch, state: Any) -> dict[str, LossTerm]:
        features, positions = state
        target = batch.target_mask[positions[:, 0], positions[:, 1]]
        x0 = features[target].float() * self.latent_scale
        cond = hidden[positions[target, 0], positions[target, 1] - 1]
        count = len(x0)
        if count == 0:  # ZeRO-3: the head runs on every rank every step
            x0, cond = x0.new_zeros(1, self.feature_dim), hidden.new_zeros(1, hidden.shape[-1])
        x0, cond = x0.repeat(self.batch_mul, 1), cond.repeat(self.batch_mul, 1)
        t = self.schedule.sample_timesteps(len(x0), x0.device)
        noise = torch.randn_like(x0)
        prediction = self.head(self.schedule.noised(x0, noise, t), t, cond)
        per_slot = self.schedule.loss(prediction, x0, noise, t).view(self.batch_mul, -1).mean(0)
        total = per_slot.sum() * (1.0 if count else 0.0)
        return {TERM: LossTerm(total, torch.tensor(count, device=x0.device))}

    @torch.no_grad()
    def sample_next(
        self,
        hidden: torch.Tensor,
        *,
        cfg_scale: float | Sequence[float] = 1.0,
        steps: int | None | Sequence[int | None] = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        on_step: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """The next slot's features from ``hidden [B, H]`` (``2B`` rows with guidance, conditional
        first; settings one or one per row, see ``DiffusionSchedule.sample``); ``on_step`` runs
        before each sampler step (the engine's deadline check)."""
        rows = hidden.shape[0]
        if guided(cfg_scale) and rows % 2:
            raise ValueError(f"classifier-free guidance needs conditional and unconditional rows (2B), got {rows}")
        batch = rows // 2 if guided(cfg_scale) else rows
        head = self.head.conditioned(hidden)
        x = self.schedule.sample(
            head,
            (batch, self.feature_dim),
            cfg_scale=cfg_scale,
            steps=steps,
            generator=generator,
            device=hidden.device,
            on_step=on_step,
            plan=head.plan,
        )
        return x / self.latent_scale


def _transfusion_schedule() -> ScheduleConfig:
    """Transfusion: cosine schedule, epsilon prediction, T = 1000; 250 DDIM steps at inference."""
    return ScheduleConfig(
        prediction="epsilon", beta_schedule="squaredcos_cap_v2", zero_terminal_snr=False,
        timestep_spacing="leading", sampler="ddim", sample_steps=250,
    )


class TransfusionImage(ContinuousImage):
    """Transfusion / LlamaFusion: noised patch latents in, the noise predicted at the same positions.

    Training: each target image gets one timestep (at most ``noise_limit`` when a caption follows
    it) and noise; the input adapter embeds the noised patches with the timestep, the backbone
    runs with bidirectional attention inside the image (``data.init_args.bidirectional:
    [image]``), and the output adapter maps the hidden states at the image's own slots to the
    prediction. Images that are not targets (inputs to understand) go in clean, at ``t = 0``.
    ``patchify`` is ``linear`` or ``unet`` (``patch`` must equal the codec's patch size;
    ``unet_channels`` has one width per level, ``log2(patch) + 1`` of them).

    Generation engine interface:

    - ``attention = "bidirectional"``; ``slots_per_item``; ``feature_dim``;
    - ``embed_clean(features [N, D]) -> [N, H]`` (``N`` a multiple of ``slots_per_item``): the
      clean image at ``t = 0``, to commit a finished image to the KV cache;
    - ``denoise_block(run_backbone, batch_size, *, cfg_scale=1.0, steps=None, generator=None)
      -> [B, slots_per_item, D]``: the sampler loop (settings one, or one per row). ``run_backbone(embeds [R, N, H]) -> [R, N, H]``
      must place ``embeds`` at the ``N`` image slots after the cached prefix (``<|boi|>`` last),
      attend bidirectionally among them, leave the cache unchanged, and return the final hidden
      states (after the decoder's norm) at those slots. ``R = B`` without guidance; with
      any ``cfg_scale != 1``, ``R = 2B``: rows ``[:B]`` continue the conditional prefixes and rows
      ``[B:]`` the unconditional ones (``<|boi|>`` alone), both with the same noisy image.
    """

    attention = "bidirectional"

    def __init__(
        self,
        hidden_size: int,
        feature_dim: int = 32,
        slots_per_item: int = 256,
        patchify: str = "unet",
        patch: int = 2,
        unet_channels: list[int] | None = None,
        norm_groups: int = 32,
        schedule: ScheduleConfig | None = None,
        noise_limit: int = 500,
        cond_dropout: float = 0.1,
        min_text_after: int = 2,
        init_from: str | None = None,
    ):
        super().__init__(feature_dim, slots_per_item, schedule or _transfusion_schedule(), cond_dropout, min_text_after)
        self.input_adapter, self.output_adapter = build_patch_adapters(
            patchify, feature_dim, hidden_size, patch, unet_channels, norm_groups
        )
        self.noise_limit = noise_limit
        if init_from:
            load_added_modules(self, init_from)

    def _as_images(self, features: torch.Tensor) -> torch.Tensor:
        n, d = features.shape
        if n % self.slots_per_item:
            raise ValueError(f"{n} image slots are not whole images of slots_per_item={self.slots_per_item}")
        return features.reshape(n // self.slots_per_item, self.slots_per_item, d)

    def embed_clean(self, features: torch.Tensor) -> torch.Tensor:
        images = self._as_images(features)
        t = torch.zeros(len(images), device=features.device)
        return self.input_adapter(images, t)[0].reshape(len(features), -1)

    def embed(self, features: torch.Tensor, batch: PackedBatch, rows: torch.Tensor) -> tuple[torch.Tensor, Any]:
        positions = self.slot_positions(batch, rows)
        spans = image_spans(positions)
        lengths = torch.bincount(spans.index, minlength=len(spans))
        if (lengths != self.slots_per_item).any():
            raise ValueError(f"images of {lengths.tolist()} slots; TransfusionImage expects {self.slots_per_item} per image")
        x0 = self._as_images(features).float()
        target = batch.target_mask[spans.row, spans.start]
        limited = self.understood(batch, spans)
        max_t = torch.where(limited, float(self.noise_limit), float("inf"))
        t = torch.where(target, self.schedule.sample_timesteps(len(x0), x0.device, max_t), 0.0)
        noise = torch.randn_like(x0)
        x_t = torch.where(target[:, None, None], self.schedule.noised(x0, noise, t), x0)
        if len(x0) == 0:  # ZeRO-3: the adapters run on every rank every step
            dummy, dummy_t = x0.new_zeros(1, self.slots_per_item, self.feature_dim), t.new_zeros(1)
            embeds, skips = self.input_adapter(dummy, dummy_t)
            return embeds[:0].reshape(0, embeds.shape[-1]), (x0, noise, dummy_t, target, skips, positions, embeds)
        embeds, skips = self.input_adapter(x_t, t)
        return embeds.reshape(len(features), -1), (x0, noise, t, target, skips, positions, None)

    def loss(self, hidden: torch.Tensor, batch: PackedBatch, state: Any) -> dict[str, LossTerm]:
        x0, noise, t, target, skips, positions, dummy = state
        if dummy is not None:
            out = self.output_adapter(dummy.new_zeros(dummy.shape), t, skips)
            total = 0.0 * (out.float().sum() + dummy.float().sum())
            return {TERM: LossTerm(total, torch.tensor(0, device=hidden.device))}
        n, s, d = x0.shape
        image_hidden = hidden[positions[:, 0], positions[:, 1]].reshape(n, s, -1)
        prediction = self.output_adapter(image_hidden, t, skips)
        per_image = self.schedule.loss(prediction, x0, noise, t)  # mean over slots and features
        total = (per_image * target).sum() * s
        return {TERM: LossTerm(total, target.sum() * s)}

    @torch.no_grad()
    def denoise_block(
        self,
        run_backbone: Callable[[torch.Tensor], torch.Tensor],
        batch_size: int,
        *,
        cfg_scale: float | Sequence[float] = 1.0,
        steps: int | None | Sequence[int | None] = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> torch.Tensor:
        device = next(self.parameters()).device

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            embeds, skips = self.input_adapter(x_t[:batch_size], t[:batch_size])
            if len(x_t) > batch_size:  # guided: the same noisy image under both prefixes
                embeds, skips = torch.cat([embeds, embeds]), [torch.cat([s, s]) for s in skips]
            return self.output_adapter(run_backbone(embeds), t, skips)

        return self.schedule.sample(
            denoise,
            (batch_size, self.slots_per_item, self.feature_dim),
            cfg_scale=cfg_scale,
            steps=steps,
            generator=generator,
            device=device,
        )
