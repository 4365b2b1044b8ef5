"""Training: the LightningModule, recipes, pipelines, strategies and exporting checkpoints."""

from unimodal.specs import lazy_exports

_EXPORTS = {
    "DeepSpeed": "unimodal.training.strategies.DeepSpeed",
    "SeedTokenizerStage1": "unimodal.training.seed_tokenizer_stages.SeedTokenizerStage1",
    "SeedTokenizerStage2": "unimodal.training.seed_tokenizer_stages.SeedTokenizerStage2",
    "UnimodalModule": "unimodal.training.module.UnimodalModule",
    "export": "unimodal.training.exporting.export",
    "run_pipeline": "unimodal.training.pipeline.run_pipeline",
    "run_training": "unimodal.training.recipes.run_training",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
