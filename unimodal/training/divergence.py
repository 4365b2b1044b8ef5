"""Stopping a run whose loss is no longer finite, before the step that would spoil its weights.

A NaN or infinite loss is caught before its backward pass, and a non-finite gradient (a finite
loss can still overflow in backward) before the optimizer applies it, on every rank at once
(any rank's stops them all), so every checkpoint on disk keeps finite weights. The run ends with :class:`Diverged` (exit status 3): a pipeline stops there, and
``--resume auto`` continues from the last good checkpoint once the cause (a learning rate, bad
data) is fixed.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from unimodal.errors import UserError


class Diverged(UserError):
    exit_code = 3


class StopOnDivergence(Callback):
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        self._check(trainer, bool(torch.isfinite(loss.detach()).all()), f"the loss is {float(loss.detach()):g}")

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer) -> None:
        # under DeepSpeed gradients live in the engine (p.grad is None) and it checks overflow itself
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        finite = not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all())
        self._check(trainer, finite, "a gradient is not finite")

    @staticmethod
    def _check(trainer: Trainer, finite: bool, what: str) -> None:
        bad = not finite
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise Diverged(
                f"{what} at step {trainer.global_step}: training stopped before that step changed any weight; "
                "lower the learning rate or check the data, then continue with --resume auto"
            )
