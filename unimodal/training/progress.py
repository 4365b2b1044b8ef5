"""The progress bar of step-based runs.

Recipes stop at ``trainer.max_steps`` with ``max_epochs=-1``, and Lightning's rich bar then reads
"Epoch 0/-2". This one says how far the run goes in steps instead; epoch-based runs read as before.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs not in (None, -1) or trainer.max_steps <= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch} (to step {trainer.max_steps})"
        return f"{description:{len(self.validation_description)}}"
