"""The unified model: backbone, continuous modalities, routing, LoRA, and ``build_model``."""

from unimodal.specs import lazy_exports

_EXPORTS = {
    "BackboneConfig": "unimodal.models.backbone.BackboneConfig",
    "GenerationSettings": "unimodal.models.generation.GenerationSettings",
    "LinearAdapter": "unimodal.models.unified.LinearAdapter",
    "LoraSettings": "unimodal.models.lora.LoraSettings",
    "SamplingSettings": "unimodal.models.generation.SamplingSettings",
    "TokenDiffusionImage": "unimodal.models.continuous.TokenDiffusionImage",
    "TransfusionImage": "unimodal.models.continuous.TransfusionImage",
    "UnifiedModel": "unimodal.models.unified.UnifiedModel",
    "build_model": "unimodal.models.build.build_model",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
