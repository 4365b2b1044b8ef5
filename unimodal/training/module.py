"""The LightningModule that trains a UnifiedModel: loss weighting, normalisation, optimiser, logs."""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.strategies import DeepSpeedStrategy

from unimodal.batch import PackedBatch
from unimodal.checkpoints.load import check_extends, init_from_export, read_export_config
from unimodal.errors import UserError
from unimodal.modalities.vocab import VocabLayout
from unimodal.models.attention import check_trainable
from unimodal.models.backbone import BackboneConfig, compile_layers, freeze_unused, import_backbone_class
from unimodal.models.build import backbone_spec, build_model
from unimodal.models.generation import GenerationSettings
from unimodal.models.lora import LoraSettings, apply_lora
from unimodal.models.sharding import fully_shard_model
from unimodal.models.unified import ContinuousModality, LossTerm, UnifiedModel, check_item_slots
from unimodal.schema import MODALITY_IDS
from unimodal.training.bad_samples import CountsBadSamples
from unimodal.training.optim import OptimizerConfig, build_optimizer
from unimodal.training.policy import apply_trainable_policy, parameter_counts
from unimodal.training.strategies import FSDP, world_size

log = logging.getLogger("unimodal.train")


def _check_loss_weights(weights: dict[str, float], continuous: dict[str, Any]) -> None:
    """Every loss term is named ``KIND/MODALITY`` (``ce/text``, ``diffusion/image``); a weight for
    a misspelt one would weigh nothing and leave its term at 1 without a word."""
    known = [f"ce/{name}" for name in MODALITY_IDS] + [f"diffusion/{name}" for name in continuous]
    for name in weights:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=2, cutoff=0.6)
            hint = f" (did you mean {' or '.join(map(repr, near))}?)" if near else ""
            raise ValueError(f"loss_weights: {name!r} is not a loss term{hint}; terms are KIND/MODALITY: {', '.join(known)}")


class UnimodalModule(CountsBadSamples, L.LightningModule):
    """Trains a UnifiedModel on packed batches.

    Cross-entropy terms (``ce/<modality>``) are summed and divided by the number of label tokens
    in the whole optimizer step (all accumulation micro-batches on all ranks), so accumulation and
    data parallelism give the same gradient as one big batch. Other heads' terms are per-item
    means of each micro-batch, averaged over the step's micro-batches and ranks (one without items
    of a term adds 0). ``loss_weights`` maps a term name to its weight (default 1). ``continuous``
    maps a modality to a factory (``class_path`` + ``init_args`` in YAML) called with the backbone's
    hidden size. ``routing`` lists modalities that get their own experts in every decoder layer
    (LlamaFusion; ``unimodal.models.routing``), copied from the text weights at build time.
    ``lora`` adds LoRA after the trainable policy (``unimodal.models.lora``; with LoRA an unset
    ``trainable`` means only the LoRA weights train). ``init_from`` names an export directory of
    a previous stage: its backbone, adapter (merged) and shared framework modules initialise
    this model (``unimodal.checkpoints.load.init_from_export``); a code range whose codec differs
    from the one that model was trained with (a refit codec, docs/refit-codec.md) is refused
    unless ``reinit_codes`` names it, which restarts its rows. ``generation`` holds the sampling
    defaults an export of this model carries (the keys of ``GenerationSettings.replace``, e.g.
    ``{image: {cfg_scale: 2}}``): ``unimodal.load`` starts from them, call arguments override.

    The model is built in ``configure_model`` so DeepSpeed ZeRO-3 can shard it at construction.
    """

    def __init__(
        self,
        backbone: BackboneConfig,
        vocab: dict[str, Any] | None = None,
        continuous: dict[str, Callable[[int], ContinuousModality]] | None = None,
        loss_weights: dict[str, float] | None = None,
        optimizer: OptimizerConfig | None = None,
        trainable: list[str] | None = None,
        frozen: list[str] | None = None,
        routing: list[str] | None = None,
        lora: LoraSettings | None = None,
        init_from: str | None = None,
        generation: dict[str, Any] | None = None,
        reinit_codes: list[str] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        GenerationSettings.from_dict(generation)  # a wrong key fails now, not after training
        if vocab is None:
            raise ValueError("model.vocab is not set: it is linked from the data module's tokenizer (data.tokenizer)")
        self.layout = VocabLayout.from_dict(vocab)
        self.backbone_config = backbone
        self.continuous = dict(continuous or {})
        self.loss_weights = dict(loss_weights or {})
        self.optimizer_config = optimizer or OptimizerConfig()
        self.trainable = trainable
        self.frozen = list(frozen or [])
        self.routing = list(routing or [])
        self.lora = lora
        self.init_from = init_from
        self.reinit_codes = list(reinit_codes or [])
        if self.reinit_codes and not init_from:
            raise ValueError("reinit_codes restarts code rows of the model init_from names; init_from is not set")
        self.model: UnifiedModel | None = None
        self._last_batch: tuple[float, torch.Tensor] | None = None
        self._scored: tuple[int, torch.Tensor] | None = None  # a step and whether its batch had a target, read a step later
        self._val_sums: dict[str, torch.Tensor] = {}  # term -> [summed loss, targets] over the validation epoch
        self._said: set[str] = set()  # warnings given (once a run each)

    def setup(self, stage: str) -> None:
        """Before ``configure_model`` and the ZeRO-3 ``zero.Init`` around it (see
        :func:`import_backbone_class`)."""
        import_backbone_class(backbone_spec(self.backbone_config, self.init_from))

    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.init_from:
            trained = VocabLayout.from_dict(read_export_config(self.init_from)["processor"]["layout"])
            check_extends(trained, self.layout, self.init_from, reinit=self.reinit_codes)
        self.model = build_model(self.backbone_config, self.layout, self.continuous, self.routing, backbone_path=self.init_from)
        if self.init_from:
            init_from_export(self.model, self.init_from, reinit=self.reinit_codes)
        if self.lora is not None and self.trainable is None:
            if self.frozen:  # nothing to freeze: a typo in it would otherwise pass unseen
                raise ValueError(f"frozen={self.frozen} does nothing here: with LoRA and no model.trainable every weight but "
                                 "the adapters' is frozen already; set trainable to train some base weights beside them")
            self.model.requires_grad_(False)
        else:
            apply_trainable_policy(self.model, self.trainable, self.frozen)
            freeze_unused(self.model.backbone)
        if self.lora is not None:
            apply_lora(self.model, self.lora, list(range(self.layout.text_size, self.layout.used_size)))
        if self.reinit_codes and not (self.model.backbone.get_input_embeddings().weight.requires_grad
                                      or (self.lora is not None and self.lora.train_new_tokens)):  # they would stay one blur
            raise ValueError(
                f"reinit_codes restarts the {', '.join(self.reinit_codes)} rows but this run does not train the embeddings: "
                "set --model.init_args.lora.train_new_tokens=true (LoRA) or make the embeddings trainable"
            )
        if self.backbone_config.compile:
            compile_layers(self.model.backbone)
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDP):
            fully_shard_model(
                self.model, strategy.device_mesh["data_parallel"], bf16=str(self.trainer.precision).startswith("bf16"),
                cpu_offload=strategy.cpu_offload, reshard_after_forward=strategy.reshard_after_forward,
            )
        if not any(isinstance(c, ModelSummary) for c in (self._trainer.callbacks if self._trainer is not None else [])):
            n_train, n_total = parameter_counts(self.model)  # else the summary's totals say it, once
            log.info("model: %.2fM parameters, %.2fM trainable", n_total / 1e6, n_train / 1e6)

    def _step_scale(self, batch: PackedBatch) -> torch.Tensor:
        """Factor turning a micro-batch CE sum into its share of the step's per-token mean."""
        accumulate = self.trainer.accumulate_grad_batches
        window = batch.window_label_tokens.cpu()  # a no-op after PackedBatch.to: no GPU sync
        if window <= 0:  # no window information: this micro-batch stands for its window
            window = torch.tensor(batch.num_label_tokens * accumulate)
        tokens = window.to(self.device, torch.float32)
        world = world_size()
        if world > 1:
            dist.all_reduce(tokens)
        return accumulate * world / tokens.clamp(min=1.0)

    def combine(self, losses: dict[str, LossTerm], ce_scale: torch.Tensor | None) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for name, term in losses.items():
            weight = self.loss_weights.get(name, 1.0)
            if name.startswith("ce/"):
                value = term.total * ce_scale if ce_scale is not None else term.total / term.count.clamp(min=1)
            else:
                value = term.total / term.count.clamp(min=1)
            total = total + weight * value
        return total

    def _why_no_target(self) -> str:
        seq_len = getattr(self.trainer.datamodule, "seq_len", "?")
        return ("either every assistant turn of its chats is unsupervised (\"loss\": false or \"weight\": 0), or chats cut "
                f"into pieces of seq_len={seq_len} leave pieces without an assistant turn (raise seq_len)")

    def _log_terms(self, losses: dict[str, LossTerm], batch_size: int) -> torch.Tensor:
        """Every term and ``train/loss`` at every step, NaN where the batch has no target for it:
        Lightning logs a metric's last value again at a step that does not log it, which would show
        an old loss as this step's, and a loss of 0 would read as a perfect score. Returns whether
        any term had a target, on the device."""
        nan = torch.tensor(float("nan"), device=self.device)
        for name, term in losses.items():
            self.log(f"train/{name}", torch.where(term.count > 0, term.total.detach() / term.count.clamp(min=1), nan),
                     batch_size=batch_size)
        scored = torch.stack([term.count for term in losses.values()]).gt(0).any()
        self.log("train/loss", torch.where(scored, self.combine(losses, None).detach(), nan), prog_bar=True, batch_size=batch_size)
        return scored

    def _warn_if_unscored(self) -> None:
        """Once a run: the last batch had no target (read a step later, when the device has computed it)."""
        if self._scored is None:
            return
        (step, scored), self._scored = self._scored, None
        if "train" not in self._said and not bool(scored):
            self._said.add("train")
            log.warning("a training batch (step %d) has no target to score, so its train/loss is NaN (and so is a term's "
                        "at a step without a target for it); %s", step, self._why_no_target())

    def on_fit_start(self) -> None:
        """The data's feature width against the model's, and the attention backend against the
        device, before any sample is read: a mismatch would otherwise fail every sample as bad data,
        and flex on CPU would fail only after the sanity validation. A loss weight must name a term
        (checked here, not when a checkpoint's module is rebuilt for export)."""
        _check_loss_weights(self.loss_weights, self.continuous)
        check_trainable(self.model.backbone.config._attn_implementation, self.device)
        try:
            check_item_slots(dict(self.model.continuous.items()), getattr(self.trainer.datamodule, "codecs", {}))
        except ValueError as err:
            raise UserError(str(err)) from None
        data_dim = getattr(self.trainer.datamodule, "feature_dim", None)
        for name, module in self.model.continuous.items():
            if data_dim and module.feature_dim != data_dim:
                raise UserError(
                    f"the model's {name} features are {module.feature_dim} wide (model.init_args.continuous.{name}.init_args.feature_dim) "
                    f"but the data's are {data_dim} (data.init_args.feature_dim): set both to the width the {name} codec writes"
                )

    def training_step(self, batch: PackedBatch, batch_idx: int) -> torch.Tensor:
        _, skipped = self.bad_samples.add(batch, self.device)
        if skipped:
            self.log("data/samples_skipped", float(skipped), batch_size=1)
        losses = self.model(batch)
        loss = self.combine(losses, self._step_scale(batch))
        if isinstance(self.trainer.strategy, DeepSpeedStrategy):
            # DeepSpeed's engine divides by the accumulation steps on top of Lightning: every term, not only CE
            loss = loss * self.trainer.accumulate_grad_batches
        scored = self._log_terms(losses, batch.input_ids.shape[0])
        if "train" not in self._said:
            self._scored = (self.global_step, scored)
        return loss

    def on_train_batch_start(self, batch: PackedBatch, batch_idx: int) -> None:
        # throughput over the whole previous step: data wait, forward, backward and optimizer
        # (the count is read one step later, when the GPU has long computed it: no sync now)
        now = time.perf_counter()
        self._warn_if_unscored()
        if self._last_batch is not None:
            started, tokens = self._last_batch
            self.log("train/tokens_per_s", int(tokens) / max(now - started, 1e-9), prog_bar=True, batch_size=1)
        self._last_batch = (now, (batch.doc_ids > 0).sum())

    def on_train_end(self) -> None:
        self._warn_if_unscored()
        self.bad_samples.report(self.device, self.trainer.is_global_zero)

    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}

    def validation_step(self, batch: PackedBatch, batch_idx: int) -> None:
        for name, term in self.model(batch).items():
            sums = torch.stack([term.total.detach().float(), term.count.float()])
            self._val_sums[name] = self._val_sums[name] + sums if name in self._val_sums else sums

    def on_validation_epoch_end(self) -> None:
        """Each term's mean over every target of the validation set, summed over batches and
        ranks (a mean of batch means weighs a batch with few targets like a full one, and one
        with none as a loss of 0), and ``val/loss``, their weighted sum: NaN when nothing was
        scored."""
        names = sorted(self._val_sums.keys() | {f"ce/{name}" for name in MODALITY_IDS})  # the same on every rank
        sums = torch.stack([self._val_sums.get(name, torch.zeros(2, device=self.device)) for name in names])
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        means = {name: total / count for name, (total, count) in zip(names, sums) if count > 0}
        # the means are already over every rank: sync_dist averages equal values, and tells Lightning so
        # (which asks for it wherever a process group exists, a one-process FSDP2 or DeepSpeed run too)
        synced = dist.is_available() and dist.is_initialized()
        for name, mean in means.items():
            self.log(f"val/{name}", mean, sync_dist=synced)
        if not means and "val" not in self._said:
            self._said.add("val")
            log.warning("the validation set has no target to score, so val/loss is NaN; %s", self._why_no_target())
        total = sum(self.loss_weights.get(name, 1.0) * mean for name, mean in means.items())
        self.log("val/loss", total if means else torch.tensor(float("nan"), device=self.device), prog_bar=True, sync_dist=synced)

    def configure_optimizers(self) -> dict:
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        return build_optimizer(self.model, self.optimizer_config, int(total))
