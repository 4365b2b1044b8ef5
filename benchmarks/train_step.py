"""Training-step throughput: the framework against a bare PyTorch loop, same process.

Both train the model of a recipe (default ``recipes/text/tiny.yaml``) on the same pre-packed
batches, with the same AdamW settings and schedule, from the same initial weights. The framework
side is ``Trainer.fit`` with the recipe's loggers; the bare side calls the Hugging Face model
directly. Data loading is excluded from both (the batches are materialised first), and both
clocks start after ``--warmup`` steps (so trainer start-up is not counted), so the ratio measures
what the framework adds around each step. Runs alternate bare/framework to cancel drift.

    python benchmarks/train_step.py [--recipe R] [--steps 30] [--rounds 2]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import lightning as L
import torch
import torch.nn.functional as F

from unimodal.batch import IGNORE_INDEX, PackedBatch
from unimodal.models.attention import build_attention_mask
from unimodal.training.optim import build_optimizer
from unimodal.training.recipes import UnimodalCLI, make_cli
from unimodal.worlds import resolve


def instantiate(recipe: str, root: str) -> UnimodalCLI:
    return make_cli([recipe, f"--trainer.default_root_dir={root}"], resolve_path=resolve, save_config_callback=None)


def take_batches(cli: UnimodalCLI, count: int) -> list[PackedBatch]:
    cli.datamodule.setup("fit")
    batches, loader = [], iter(cli.datamodule.train_dataloader())
    while len(batches) < count:
        batches.append(next(loader))
    return batches


def bare_loop(model: torch.nn.Module, batches: list[PackedBatch], cfg, used_vocab: int) -> list[float]:
    """The reference: HF forward with the packed mask, CE over labels, AdamW + schedule."""
    backbone = model.backbone
    opt = build_optimizer(backbone, cfg, len(batches))
    optimizer, schedule = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    stamps = []
    for batch in batches:
        mask = build_attention_mask(batch.doc_ids, batch.block_ids)
        logits = backbone(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids).logits
        loss = F.cross_entropy(logits[..., :used_vocab].flatten(0, 1).float(), batch.labels.flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return stamps


class ListLoader(torch.utils.data.Dataset):
    def __init__(self, batches: list[PackedBatch]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> PackedBatch:
        return self.batches[i]


class StepClock(L.Callback):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.stamps.append(time.perf_counter())


def framework_loop(module: L.LightningModule, batches: list[PackedBatch], root: str) -> list[float]:
    clock = StepClock()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=len(batches), logger=[
            L.pytorch.loggers.CSVLogger(root, name="bench"), L.pytorch.loggers.TensorBoardLogger(root, name="bench_tb")
        ], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=5,
        callbacks=[clock],
    )
    loader = torch.utils.data.DataLoader(ListLoader(batches), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return clock.stamps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/text/tiny.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as root:
        cli = instantiate(args.recipe, root)
        batches = take_batches(cli, args.steps)
        tokens = sum(int((b.doc_ids > 0).sum()) for b in batches[args.warmup :])
        template = cli.model
        template.configure_model()
        initial = copy.deepcopy(template)
        times = {"bare": [], "framework": []}
        for _ in range(args.rounds):
            module = copy.deepcopy(initial)
            stamps = bare_loop(module.model, batches, module.optimizer_config, module.layout.used_size)
            times["bare"].append(stamps[-1] - stamps[args.warmup - 1])
            module = copy.deepcopy(initial)
            stamps = framework_loop(module, batches, root)
            times["framework"].append(stamps[-1] - stamps[args.warmup - 1])
    bare, framework = min(times["bare"]), min(times["framework"])
    timed = args.steps - args.warmup
    print(f"recipe {args.recipe}: {timed} timed steps after {args.warmup} warm-up, {tokens} tokens, best of {args.rounds}")
    print(f"  bare PyTorch loop : {bare:7.2f} s  {tokens / bare:9.0f} tokens/s")
    print(f"  unimodal Trainer  : {framework:7.2f} s  {tokens / framework:9.0f} tokens/s")
    print(f"  ratio framework/bare throughput: {bare / framework:.3f}  (goal >= 0.97)")


if __name__ == "__main__":
    main()
