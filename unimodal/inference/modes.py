"""The media modes: which modalities a model can write and how (discrete codes, causal or
bidirectional continuous features), keyed by the begin token that opens a span of each, and prompts
whose reply starts inside a span.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from unimodal.data.processor import EncodedDocument
from unimodal.inference.constraints import SpanSpec
from unimodal.modalities.vocab import SPAN_MARKERS
from unimodal.models.unified import UnifiedModel


@dataclass(frozen=True)
class MediaMode:
    """A media modality the model can write, and how."""

    name: str
    kind: Literal["discrete", "causal", "bidirectional"]
    begin: int
    end: int
    # fewest positions a whole span takes after its begin token, end token included
    min_positions: int


def media_modes(model: UnifiedModel, spans: dict[str, SpanSpec]) -> dict[int, MediaMode]:
    """The modalities ``model`` can write, keyed by their begin-token id."""
    layout, modes = model.layout, {}
    for name, (begin, end) in SPAN_MARKERS.items():
        if begin not in layout.specials or end not in layout.specials:
            continue
        ids = layout.special_id(begin), layout.special_id(end)
        if name in spans and name in layout.code_ranges:
            spec = spans[name]
            modes[ids[0]] = MediaMode(name, "discrete", *ids, spec.layers * (spec.length or spec.min_length) + 1)
        elif name in model.continuous:
            modality = model.continuous[name]
            kind = getattr(modality, "attention", None)
            writes = {"causal": "sample_next", "bidirectional": "denoise_block"}.get(kind)
            if writes and callable(getattr(modality, writes, None)):
                modes[ids[0]] = MediaMode(name, kind, *ids, int(modality.slots_per_item) + 1)
    return modes


def open_span(doc: EncodedDocument, layout: Any, begin: str) -> EncodedDocument:
    """``doc`` followed by the begin token ``begin`` (``"<|boi|>"``): a prompt whose reply starts
    inside that media span, e.g. text-to-image."""
    modality = next((name for name, (b, _) in SPAN_MARKERS.items() if b == begin), None)
    if modality is None:
        raise ValueError(f"{begin!r} is not a begin token; known: {[b for b, _ in SPAN_MARKERS.values()]}")
    return doc.extended([layout.special_id(begin)], modality)
