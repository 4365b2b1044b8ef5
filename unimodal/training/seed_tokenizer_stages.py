"""Training the SEED image tokenizer in its two stages (arXiv 2307.08041).

- :class:`SeedTokenizerStage1`: the causal Q-Former learns to read the frozen vision features with
  a contrastive loss between its *last* causal query embedding and a text embedding of the
  caption (InfoNCE both ways, label smoothing 0.1). Builds the whole tokenizer; only the Q-Former
  and the text side train.
- :class:`SeedTokenizerStage2`: starts from stage 1's exported tokenizer, freezes the Q-Former and
  trains the codebook, the decoder and (if configured) the small pixel decoder:
  ``5 * vq + 2 * reconstruction (1 - cosine, causal embeddings) + 0.5 * distillation (MSE to the
  target image embedding) + pixels (MSE)``. The small pixel decoder reads the embedding the codes
  decode to, the one it is given at inference (unCLIP at full scale is trained apart, on real
  image embeddings); a pixel decoder that read the target embedding instead would learn from an
  input the codes never reach at inference, and decodes every picture of the digits world alike.

Both write the tokenizer to ``{default_root_dir}/tokenizer`` at the end of fit (``export_dir``, a new,
empty or earlier tokenizer directory, overrides), the input of stage 2 and of ``unimodal data encode
--image_tokenizer``. Data are image-caption documents of ordinary shards (``unimodal.data.pairs.ImageTextPairs``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from unimodal.checkpoints.files import staged_directory
from unimodal.modalities.seed_tokenizer import CONFIG_FILE, EncoderSpec, SeedConfig, SeedTokenizer, load_encoder
from unimodal.modalities.vocab import VocabLayout
from unimodal.schema import local_path
from unimodal.training.bad_samples import CountsBadSamples
from unimodal.training.optim import OptimizerConfig, build_optimizer

log = logging.getLogger("unimodal.train")


# ----------------------------------------------------------------------------------------------
# modules


class SeedTokenizerModule(CountsBadSamples, L.LightningModule):
    """What both stages share: the caption layout, the optimiser, the export at the end of fit."""

    tokenizer: SeedTokenizer
    # the frozen vision and target encoders stay in eval mode on purpose (SeedTokenizer.train)
    frozen_modules_in_eval = True

    def __init__(self, vocab: dict[str, Any] | None, optimizer: OptimizerConfig | None, export_dir: str | None):
        super().__init__()
        if vocab is None:
            raise ValueError("model.vocab is not set: it is linked from the data module's caption tokenizer (data.tokenizer)")
        self.layout = VocabLayout.from_dict(vocab)
        self.optimizer_config = optimizer or OptimizerConfig()
        self.export_dir = export_dir
        out = Path(export_dir) if export_dir else None
        if out is not None and (out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file())):
            # checked before training: the tokenizer written at the end replaces what is there
            raise FileExistsError(f"model.export_dir {out} holds something other than a SEED tokenizer; give a new or empty "
                                  "directory (a SEED tokenizer written there before is replaced)")

    def configure_optimizers(self) -> dict:
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        return build_optimizer(self, self.optimizer_config, int(total))

    def export_pretrained(self, out: str | Path) -> None:
        """The tokenizer's own directory format, as ``unimodal export`` of a checkpoint writes it."""
        self.tokenizer.save_pretrained(out)

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        _, skipped = self.bad_samples.add(batch, self.device)
        if skipped:
            self.log("data/samples_skipped", float(skipped), batch_size=1)

    def on_train_end(self) -> None:
        self.bad_samples.report(self.device, self.trainer.is_global_zero)

    def on_fit_end(self) -> None:
        """Write the tokenizer, whole or not at all (a staged directory). At the end of fit, not of
        training: a run resumed from its last step trains no more, and Lightning then skips
        ``on_train_end``, which left a run that died before writing it without one for good."""
        if self.trainer.is_global_zero:
            out = Path(self.export_dir or Path(self.trainer.default_root_dir) / "tokenizer")
            with staged_directory(out, replace=True) as staging:
                self.export_pretrained(staging)
            log.info("SEED tokenizer written to %s", out)


class SeedTokenizerStage1(SeedTokenizerModule):
    """Contrastive alignment of the last causal query with the caption (SEED stage 1).

    ``vision``: the encoder the Q-Former reads, frozen as in the paper (a pretrained EVA-CLIP)
    unless ``train_vision``: a randomly initialised stand-in then trains with the Q-Former, since
    random frozen features keep too little (docs/families-on-digits.md); ``target``: the encoder
    whose image embedding stage 2 distils into (unCLIP's CLIP vision tower with projection; the
    vision encoder's pooled output when unset); ``text_encoder``: any HF text model (its
    ``config`` gets the caption tokenizer's vocabulary size), mean-pooled.
    """

    def __init__(
        self,
        vision: EncoderSpec,
        text_encoder: EncoderSpec,
        tokenizer: SeedConfig | None = None,
        target: EncoderSpec | None = None,
        contrastive_dim: int = 256,
        label_smoothing: float = 0.1,
        train_vision: bool = False,
        vocab: dict[str, Any] | None = None,
        optimizer: OptimizerConfig | None = None,
        export_dir: str | None = None,
    ):
        super().__init__(vocab, optimizer, export_dir)
        self.save_hyperparameters()
        self.vision_spec, self.target_spec, self.text_spec = vision, target, text_encoder
        self.seed_config = tokenizer or SeedConfig()
        self.contrastive_dim, self.label_smoothing = contrastive_dim, label_smoothing
        self.train_vision = train_vision

    def configure_model(self) -> None:
        if hasattr(self, "text_encoder"):
            return
        target = load_encoder(self.target_spec) if self.target_spec is not None else None
        projection = self.target_spec.projection if self.target_spec is not None else True
        self.tokenizer = SeedTokenizer(self.seed_config, load_encoder(self.vision_spec), target, projection)
        for module in (self.tokenizer.to_code, self.tokenizer.quantizer, self.tokenizer.decoder, self.tokenizer.pixel_decoder):
            if module is not None:
                module.requires_grad_(False)  # stage 2 trains these
        self.tokenizer.vision.requires_grad_(self.train_vision)
        spec = self.text_spec
        if spec.config:
            spec = EncoderSpec(config={**spec.config, "vocab_size": self.layout.text_size})
        self.text_encoder = load_encoder(spec)
        if self.text_encoder.get_input_embeddings().num_embeddings < self.layout.text_size:
            raise ValueError(f"text encoder has {self.text_encoder.get_input_embeddings().num_embeddings} token rows; the caption tokenizer has {self.layout.text_size}")
        self.image_proj = nn.Linear(self.seed_config.width, self.contrastive_dim)
        self.text_proj = nn.Linear(self.text_encoder.config.hidden_size, self.contrastive_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        causal = self.tokenizer.causal_embeddings(self.tokenizer.pixels(batch["images"]))
        image = F.normalize(self.image_proj(causal[:, -1]), dim=-1)
        hidden = self.text_encoder(input_ids=batch["text_ids"], attention_mask=batch["text_mask"].long()).last_hidden_state
        mask = batch["text_mask"][..., None].to(hidden.dtype)
        text = F.normalize(self.text_proj((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)), dim=-1)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * image @ text.t()
        labels = torch.arange(len(logits), device=logits.device)
        loss = 0.5 * (
            F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
            + F.cross_entropy(logits.t(), labels, label_smoothing=self.label_smoothing)
        )
        accuracy = (logits.argmax(-1) == labels).float().mean()
        size = len(labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/contrastive_accuracy", accuracy, batch_size=size)
        return loss


STAGE2_WEIGHTS = {"vq": 5.0, "reconstruction": 2.0, "distillation": 0.5, "pixels": 1.0}


class SeedTokenizerStage2(SeedTokenizerModule):
    """Codebook, reconstruction and distillation with the Q-Former frozen (SEED stage 2).

    ``init_from``: the tokenizer directory stage 1 exported (or a ``builtin:`` one). ``loss_weights`` default to the
    paper's (vq 5, reconstruction 2, distillation 0.5) plus the small pixel decoder's MSE (1).
    """

    def __init__(
        self,
        init_from: str,
        loss_weights: dict[str, float] | None = None,
        vocab: dict[str, Any] | None = None,
        optimizer: OptimizerConfig | None = None,
        export_dir: str | None = None,
    ):
        super().__init__(vocab, optimizer, export_dir)
        self.save_hyperparameters()
        unknown = set(loss_weights or {}) - set(STAGE2_WEIGHTS)
        if unknown:
            raise ValueError(f"loss_weights: unknown terms {sorted(unknown)}; known: {list(STAGE2_WEIGHTS)}")
        self.init_from = init_from
        self.loss_weights = {**STAGE2_WEIGHTS, **(loss_weights or {})}

    def configure_model(self) -> None:
        if hasattr(self, "tokenizer"):
            return
        # from_pretrained returns eval mode, which Lightning keeps: the modules this stage trains go
        # back to train mode, the frozen ones stay in eval (SeedTokenizer.train)
        self.tokenizer = SeedTokenizer.from_pretrained(local_path(self.init_from)).train()
        self.tokenizer.qformer.requires_grad_(False).eval()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokenizer = self.tokenizer
        pixels = tokenizer.pixels(batch["images"])
        with torch.no_grad():
            causal = tokenizer.causal_embeddings(pixels)
            target = tokenizer.target_embedding(pixels)
        codes, quantized, vq = tokenizer.quantize(causal)
        reconstructed, embedding = tokenizer.decoder(quantized)
        terms = {
            "vq": vq,
            "reconstruction": (1 - F.cosine_similarity(reconstructed, causal, dim=-1)).mean(),
            "distillation": F.mse_loss(embedding, target),
        }
        if tokenizer.pixel_decoder is not None:
            size = tokenizer.config.pixel_decoder_size
            want = F.interpolate(batch["images"].permute(0, 3, 1, 2).float() / 255.0, size=(size, size), mode="area")
            terms["pixels"] = F.mse_loss(tokenizer.pixel_decoder(embedding), want)
        loss = sum(self.loss_weights[name] * value for name, value in terms.items())
        size = len(pixels)
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/codes_used", float(codes.unique().numel()), batch_size=size)
        return loss
