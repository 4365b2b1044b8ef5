"""``unimodal train``: LightningCLI over UnimodalModule-like modules and data modules.

The vocabulary layout is linked from the data module to the model, so a recipe states the
tokenizer once. Every run writes under ``trainer.default_root_dir``: CSV logs in ``logs/``,
TensorBoard in ``tb/``, checkpoints in ``checkpoints/`` (``last.ckpt`` always), unless the
recipe configures its own loggers or ModelCheckpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger


class UnimodalCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None, help="checkpoint to resume from ('last' or a path)"
        )
        parser.add_argument(
            "--checkpoint_every_n_steps", type=int, default=100, help="step interval of the default checkpoint callback"
        )
        parser.link_arguments(
            "data", "model.init_args.vocab", compute_fn=lambda data: data.layout.to_dict(), apply_on="instantiate"
        )

    def instantiate_trainer(self, **kwargs) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        root = Path(config.get("default_root_dir") or "runs/default")
        if config.get("logger") in (None, True):
            kwargs["logger"] = [CSVLogger(root, name="logs"), TensorBoardLogger(root, name="tb")]
        callbacks = list(config.get("callbacks") or [])
        if config.get("enable_checkpointing") is not False and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            every = self._get(self.config_init, "checkpoint_every_n_steps")
            callbacks.append(ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=every, save_last=True))
        if kwargs.get("logger", config.get("logger")) and not any(isinstance(c, LearningRateMonitor) for c in callbacks):
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


def run_training(args: list[str]) -> None:
    """Parse ``RECIPE.yaml [overrides]`` and fit."""
    if args and not args[0].startswith("-"):
        recipe = Path(args[0])
        if not recipe.is_file():
            raise FileNotFoundError(f"recipe {recipe} not found")
        args = ["--config", str(recipe), *args[1:]]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cli = UnimodalCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=False,
        auto_configure_optimizers=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))
