"""Multi-process training runs for tests/test_strategies.py, one process per rank (torchrun).

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/distributed/train.py --strategy deepspeed_stage_3 --task resume --out DIR

Tasks (results are written by rank 0 under ``--out``):

* ``sgd``: one optimizer step of plain SGD (lr 1) over ``world * accumulate * batch_size``
  packed sequences; saves the full weights before and after (``sgd.pt``) so the test can check
  the update against one single-process step on the combined batch.
* ``resume``: AdamW at a constant learning rate; run A trains 5 steps uninterrupted; run B trains
  3 steps, ``trainer.save_checkpoint(ckpt-3)``, then a new Trainer resumes from it
  (``ckpt_path``) to step 5 and saves ``ckpt-5``. ``resume.pt`` holds both runs' final full
  weights (gathered with ``deepspeed.zero.GatheredParameters`` under ZeRO-3) and the losses.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from tiny import (  # noqa: E402
    LossRecorder,
    Snapshot,
    WindowedData,
    make_module,
    make_sgd_module,
    packed_sequences,
    trainer_kwargs,
)
from unimodal.models.backbone import BackboneConfig  # noqa: E402
from unimodal.training.optim import OptimizerConfig  # noqa: E402
from unimodal.training.strategies import build_strategy  # noqa: E402

# Lightning restarts a map-style loader from its first batch when it resumes (and counts the
# batch index on from the checkpoint), so the resumed and the uninterrupted runs only see the same
# batches when every epoch is one optimizer step
STEPS_PER_EPOCH = 1


def make_trainer(args, root: Path, max_steps: int, accumulate: int, callbacks: list) -> L.Trainer:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return L.Trainer(
        **trainer_kwargs(
            root,
            strategy=build_strategy(args.strategy),
            devices=world,
            max_steps=max_steps,
            accumulate_grad_batches=accumulate,
            callbacks=callbacks,
        )
    )


def task_sgd(args, out: Path) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sequences = packed_sequences(0, world * args.accumulate * args.batch_size)
    L.seed_everything(0)
    snap = Snapshot()
    trainer = make_trainer(args, out / "sgd-run", 1, args.accumulate, [snap])
    trainer.fit(make_sgd_module(lr=1.0), datamodule=WindowedData(sequences, args.batch_size, args.accumulate))
    if trainer.is_global_zero:
        torch.save({"initial": snap.initial, "final": snap.final, "sequences": len(sequences)}, out / "sgd.pt")


def task_resume(args, out: Path) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sequences = packed_sequences(1, world * args.batch_size * STEPS_PER_EPOCH)
    optimizer = OptimizerConfig(lr=1e-2, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0)

    def run(max_steps: int, ckpt_path: str | None = None, save: str | None = None):
        L.seed_everything(0)
        snap, losses = Snapshot(), LossRecorder()
        trainer = make_trainer(args, out / "runs", max_steps, 1, [snap, losses])
        module = make_module(optimizer=optimizer, frozen=args.frozen or None)
        # weights_only=False: the checkpoint's hyper-parameters hold config dataclasses, which
        # torch.load refuses by default (only plain-file checkpoints go through torch.load);
        # Lightning drops that argument for strategies that restore after setup (FSDP2), hence
        # the allow-list (`unimodal train` saves plain hyper-parameters and needs neither)
        with torch.serialization.safe_globals([BackboneConfig, OptimizerConfig]):
            trainer.fit(module, datamodule=WindowedData(sequences, args.batch_size, 1), ckpt_path=ckpt_path, weights_only=False)
        if save:
            trainer.save_checkpoint(out / save)
        return trainer, snap, losses.losses

    started = time.perf_counter()
    _, straight, straight_losses = run(5)
    run(3, save="ckpt-3")
    trainer, resumed, resumed_losses = run(5, ckpt_path=str(out / "ckpt-3"), save="ckpt-5")
    if trainer.is_global_zero:
        torch.save(
            {
                "straight": straight.final,
                "resumed": resumed.final,
                "resumed_initial": resumed.initial,
                "straight_losses": straight_losses,
                "resumed_losses": resumed_losses,
                "global_step": trainer.global_step,
                "seconds": time.perf_counter() - started,
            },
            out / "resume.pt",
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--task", choices=["sgd", "resume"], nargs="+", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--frozen", nargs="*", default=[])
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for task in args.task:
        {"sgd": task_sgd, "resume": task_resume}[task](args, out)
    # leave without C++ static destructors, as `unimodal train` does under torchrun: a rank now and
    # then aborted at interpreter exit after writing everything ("terminate called without an
    # active exception")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
