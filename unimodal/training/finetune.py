"""Fine-tuning an export: what the new data leaves out, and what the run did to every task.

A fine-tune on data of one kind wears away the skills the data does not show (a LoRA SFT on
speech alone takes every digits task of the demo to 0). :class:`FineTuneReport` runs in any
``unimodal train`` that starts from an export which records its training data
(``training_data`` in ``unimodal.json``, written by ``unimodal export``):

- before the first step it compares the tasks of the new data with the export's (tasks as
  :mod:`unimodal.data.tasks` names them) and warns once, naming the missing tasks and whether
  replay (``data.init_args.replay`` / ``replay_weight``) mixes the old data back in;
- it measures the validation loss of every task, old (the export's validation sets) and new
  (the run's), before the first step and after the last, and ends the run with the table,
  also written to ``finetune_report.json`` in the run directory.

The losses are kept in the callback's checkpoint state, so a resumed run reports against the
export it started from.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from unimodal.batch import PackedBatch
from unimodal.data.shards import BadSamplePolicy, absolute_spec, present_shard_sets
from unimodal.data.tasks import document_task, documents_of, sample_tasks

log = logging.getLogger("unimodal.train")

REPORT_FILE = "finetune_report.json"


class FineTuneReport(Callback):
    """Task coverage and per-task validation loss before and after a fine-tune of ``export``
    (see the module); ``per_task`` validation documents are scored for each task."""

    def __init__(self, export: str | Path, record: dict[str, Any], per_task: int = 32):
        self.export, self.record, self.per_task = str(export), record, per_task
        self.before: dict[str, float | None] = {}
        self._batches: dict[str, list[PackedBatch]] = {}

    # -- checkpoint state: a resumed run keeps the losses measured before its first step ------

    def state_dict(self) -> dict[str, Any]:
        return {"before": dict(self.before)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.before = dict(state.get("before") or {})

    # -- hooks ------------------------------------------------------------------------------

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        data = trainer.datamodule
        if trainer.is_global_zero:
            self._warn_on_coverage(data)
        if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            log.info("fine-tune report: per-task losses are measured on single-device and DDP runs only, not with %s",
                     type(trainer.strategy).__name__)
            return
        old, missing = present_shard_sets(d["path"] for d in self.record.get("val_datasets") or [])
        if missing and trainer.is_global_zero:
            log.warning("fine-tune report: the export's validation data %s is not on this machine, so its tasks are not "
                        "in the report's old rows", ", ".join(missing))
        new = [d.path for d in data.val_datasets if absolute_spec(d.path) not in old]
        self._batches = {**self._task_batches("old", old, data), **self._task_batches("new", new, data)}
        if not self.before:
            self.before = self._losses(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._batches:
            return
        after = self._losses(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        rows = [{"task": key, "before": self.before.get(key), "after": value} for key, value in after.items()]
        path = Path(trainer.default_root_dir) / REPORT_FILE
        path.write_text(json.dumps({"export": self.export, "metric": "validation loss", "tasks": rows}, indent=2) + "\n")
        lines = [f"fine-tune report (validation loss per task, before -> after; {path}):"]
        for row in rows:
            before, after = row["before"], row["after"]
            change = "" if before is None or after is None else f"  ({after - before:+.3f})"
            lines.append(f"  {row['task']:<40} {_shown(before):>7} -> {_shown(after)}{change}")
        log.info("\n".join(lines))

    # -- pieces -----------------------------------------------------------------------------

    def _warn_on_coverage(self, data: Any) -> None:
        # the export's record names local files only (read_export_config refuses anything else)
        old = sample_tasks(present_shard_sets(d["path"] for d in self.record.get("datasets") or [])[0])
        new = sample_tasks([d.path for d in data.datasets], allow_pipe=data.allow_pipe_urls)
        missing = sorted(set(old) - set(new))
        if not old or not missing:
            return
        replayed = data.replay and data.replay_weight > 0
        keep = (f"replay mixes the export's training data back in as {data.replay_weight:.0%} of the documents "
                "(data.init_args.replay_weight)" if replayed else
                "nothing replays them (no data.init_args.replay, or replay_weight 0), so the model may forget them")
        log.warning("the new data covers %d of the %d tasks %s was trained on; not in it: %s. %s",
                    len(set(old) & set(new)), len(old), self.export, ", ".join(missing), keep)

    def _task_batches(self, group: str, paths: list[str], data: Any) -> dict[str, list[PackedBatch]]:
        """Up to ``per_task`` validation documents of each task in ``paths``, packed as training packs them."""
        by_task: dict[str, list] = {}
        for doc in documents_of(paths, limit=50 * self.per_task, decode=True, allow_pipe=data.allow_pipe_urls):
            docs = by_task.setdefault(f"{group}: {document_task(doc)}", [])
            if len(docs) < self.per_task:
                docs.append(doc)
        config, policy = data.stream_config(), BadSamplePolicy(max_bad_fraction=1.0)
        return {task: list(config.batches(docs, policy)) for task, docs in sorted(by_task.items())}

    @torch.no_grad()
    def _losses(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float | None]:
        """Mean loss per task, each rank scoring every batch (these are few)."""
        training = pl_module.training
        pl_module.eval()
        losses = {}
        try:
            with trainer.precision_plugin.forward_context():
                for task, batches in self._batches.items():
                    terms = [pl_module.model(b.to(pl_module.device)) for b in batches]
                    # a batch with no supervised token scores nothing (its loss of 0 is not a perfect score)
                    values = [float(pl_module.combine(t, None)) for t in terms if any(term.count > 0 for term in t.values())]
                    losses[task] = sum(values) / len(values) if values else None
        finally:
            pl_module.train(training)
        return losses


def _shown(loss: float | None) -> str:
    """A loss in the report; ``-`` where a task had nothing to score (no supervised token)."""
    return "-" if loss is None else f"{loss:.3f}"
