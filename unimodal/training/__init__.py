"""Training: the LightningModule, recipes, pipelines, strategies and exporting checkpoints."""

from unimodal.training.exporting import export
from unimodal.training.module import UnimodalModule
from unimodal.training.pipeline import run_pipeline
from unimodal.training.recipes import run_training
from unimodal.training.seed_tokenizer_stages import SeedTokenizerStage1, SeedTokenizerStage2
from unimodal.training.strategies import DeepSpeed

__all__ = [
    "DeepSpeed",
    "SeedTokenizerStage1",
    "SeedTokenizerStage2",
    "UnimodalModule",
    "export",
    "run_pipeline",
    "run_training",
]
