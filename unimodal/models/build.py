"""``build_model``: a UnifiedModel from its spec, the one way training, export and loading build it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from unimodal.modalities.vocab import VocabLayout
from unimodal.models.backbone import BackboneConfig, load_backbone
from unimodal.models.routing import add_modality_experts
from unimodal.models.unified import ContinuousModality, UnifiedModel


def backbone_spec(backbone: BackboneConfig, backbone_path: str | None = None) -> BackboneConfig:
    """The backbone :func:`build_model` builds: a previous stage's export (``backbone_path``)
    replaces the spec's own path or config."""
    return backbone if backbone_path is None else replace(backbone, path=backbone_path, config={})


def build_model(
    backbone: BackboneConfig,
    layout: VocabLayout,
    continuous: dict[str, Callable[[int], ContinuousModality]] | None = None,
    routing: list[str] | None = None,
    backbone_path: str | None = None,
) -> UnifiedModel:
    """The backbone (from ``backbone_path`` when given: a previous stage's export), the continuous
    modalities built for its hidden size, and modality experts for ``routing``; in train mode
    (``from_pretrained`` returns eval mode, and Lightning keeps the mode it finds)."""
    backbone = backbone_spec(backbone, backbone_path)
    decoder = load_backbone(backbone, layout.size)
    hidden = decoder.config.hidden_size
    modules = {name: build(hidden) for name, build in (continuous or {}).items()}
    router = add_modality_experts(decoder, list(routing)) if routing else None
    return UnifiedModel(decoder, layout, continuous=modules, routing=router, ce_chunk=backbone.ce_chunk).train()
