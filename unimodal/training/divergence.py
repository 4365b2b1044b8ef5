"""Stopping a run whose loss is no longer finite, before the step that would spoil its weights.

A NaN or infinite loss, or a non-finite gradient (a finite loss can still overflow in backward),
is caught before the optimizer applies it, on every rank at once (any rank's stops them all), so
every checkpoint on disk keeps finite weights. Under fp16 loss scaling (``16-mixed``) a
non-finite gradient is the scaler's routine overflow, which skips that step itself. The run ends with :class:`Diverged` (exit status 3): a pipeline stops there, and
``--resume auto`` continues from the last good checkpoint once the cause (a learning rate, bad
data) is fixed.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.distributed.tensor import DTensor

from unimodal.errors import UserError


class Diverged(UserError):
    exit_code = 3


class StopOnDivergence(Callback):
    """One host sync per optimizer step: the losses of its micro-batches are checked on the device
    as they come, and read together with the gradients just before the step."""

    def __init__(self) -> None:
        self._losses_finite: torch.Tensor | None = None

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self._losses_finite = finite if self._losses_finite is None else self._losses_finite & finite

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer) -> None:
        losses, self._losses_finite = self._losses_finite, None
        # under DeepSpeed gradients live in the engine (p.grad is None) and it checks overflow itself;
        # so does fp16's GradScaler (16-mixed), which skips the step and lowers its scale;
        # under FSDP2 each rank checks its own shards, and the decision below is shared
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        grads = () if scaled else (p.grad for p in pl_module.parameters())
        checks = [_local(g).isfinite().all() for g in grads if g is not None]
        if losses is not None:
            checks.append(losses.to(checks[0].device) if checks else losses)
        local = bool(checks) and not bool(torch.stack(checks).all())
        bad = trainer.strategy.reduce_boolean_decision(local, all=False) if trainer.world_size > 1 else local
        if bad:
            if not local:
                what = "another rank's loss or gradient is not finite"
            else:
                what = "the loss is not finite" if losses is not None and not bool(losses) else "a gradient is not finite"
            raise Diverged(
                f"{what} at step {trainer.global_step}: training stopped before that step changed any weight. Check the "
                "data, or lower the learning rate: --resume auto would keep the checkpoint's optimizer state, its learning "
                f"rate included, so start a new run from its weights (unimodal export {trainer.default_root_dir} --out DIR, "
                "then --model.init_args.init_from=DIR)"
            )


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
