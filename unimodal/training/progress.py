"""What a run shows of itself: the progress bar of step-based runs and the model summary.

Recipes stop at ``trainer.max_steps`` with ``max_epochs=-1``, and Lightning's rich bar then reads
"Epoch 0/-2", counts batches of the epoch against the steps left (a resumed run at step 16 of 21
reads "21/5") and, with gradient accumulation, counts micro-batches. This one counts optimizer
steps against ``max_steps``; epoch-based runs keep Lightning's bar.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.callbacks import ModelSummary, RichProgressBar
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count

log = logging.getLogger("unimodal.train")


class StepProgressBar(RichProgressBar):
    def _step_based(self) -> bool:
        return self.trainer.max_epochs in (None, -1) and self.trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._step_based() else super().total_train_batches

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # the bar shows batch_idx + 1: here the optimizer steps taken so far
        super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1 if self._step_based() else batch_idx)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if not self._step_based() or self.is_disabled or self.progress is None or self.train_progress_bar_id is None or self._leave:
            return super().on_train_epoch_start(trainer, pl_module)
        # one task for the whole run: Lightning resets it at each epoch, which would restart its
        # clock (a 352 s run would end on "1100/1100 0:00:31", its last epoch's time)
        self.progress.update(self.train_progress_bar_id, description=self._get_train_description(trainer.current_epoch))
        self.refresh()

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._step_based():
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch} (to step {self.trainer.max_steps})"
        return f"{description:{len(self.validation_description)}}"


class ParameterSummary(ModelSummary):
    """Lightning's model summary less its FLOPs, which Lightning counts only in a forward of the
    module's ``example_input_array``: a model fed packed batches by its data module has none, so
    every module and the total read "0 FLOPs"."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        columns = [(name, [str(value) for value in values]) for name, values in summary_data if name != "FLOPs"]
        widths = [max([len(name), *map(len, values)]) for name, values in columns]
        rule = "-" * (sum(widths) + 3 * (len(widths) - 1))
        rows = zip(*(values for _, values in columns))
        table = [" | ".join(f"{name:<{w}}" for (name, _), w in zip(columns, widths)), rule]
        table += [" | ".join(f"{value:<{w}}" for value, w in zip(row, widths)) for row in rows]
        totals = [
            (get_human_readable_count(trainable_parameters), "Trainable params"),
            (get_human_readable_count(total_parameters - trainable_parameters), "Non-trainable params"),
            (get_human_readable_count(total_parameters), "Total params"),
            (get_formatted_model_size(model_size), "Total estimated model params size (MB)"),
            (str(total_training_modes["train"]), "Modules in train mode"),
            (str(total_training_modes["eval"]), "Modules in eval mode"),
        ]
        table += [rule, *(f"{value:<10}{what}" for value, what in totals)]
        log.info("\n%s", "\n".join(table))
