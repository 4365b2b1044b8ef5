"""``unimodal train``: LightningCLI over UnimodalModule-like modules and data modules.

The vocabulary layout and the continuous feature width are linked from the data module to the
model, so a recipe states the tokenizer once.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback


class UnimodalCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None, help="checkpoint to resume from ('last' or a path)"
        )
        parser.link_arguments("data.init_args.feature_dim", "model.init_args.feature_dim")
        parser.link_arguments(
            "data", "model.init_args.vocab", compute_fn=lambda data: data.layout.to_dict(), apply_on="instantiate"
        )


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
