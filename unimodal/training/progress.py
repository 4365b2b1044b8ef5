"""The progress bar of step-based runs.

Recipes stop at ``trainer.max_steps`` with ``max_epochs=-1``, and Lightning's rich bar then reads
"Epoch 0/-2", counts batches of the epoch against the steps left (a resumed run at step 16 of 21
reads "21/5") and, with gradient accumulation, counts micro-batches. This one counts optimizer
steps against ``max_steps``; epoch-based runs keep Lightning's bar.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    def _step_based(self) -> bool:
        return self.trainer.max_epochs in (None, -1) and self.trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._step_based() else super().total_train_batches

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # the bar shows batch_idx + 1: here the optimizer steps taken so far
        super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1 if self._step_based() else batch_idx)

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._step_based():
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch} (to step {self.trainer.max_steps})"
        return f"{description:{len(self.validation_description)}}"
