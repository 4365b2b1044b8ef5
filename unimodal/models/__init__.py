"""The unified model: backbone, continuous modalities, routing, LoRA, and ``build_model``."""

from unimodal.models.backbone import BackboneConfig
from unimodal.models.build import build_model
from unimodal.models.continuous import TokenDiffusionImage, TransfusionImage
from unimodal.models.generation import GenerationSettings, SamplingSettings
from unimodal.models.lora import LoraSettings
from unimodal.models.unified import LinearAdapter, UnifiedModel

__all__ = [
    "BackboneConfig",
    "GenerationSettings",
    "LinearAdapter",
    "LoraSettings",
    "SamplingSettings",
    "TokenDiffusionImage",
    "TransfusionImage",
    "UnifiedModel",
    "build_model",
]
