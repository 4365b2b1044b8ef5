"""Constrained decoding of discrete media spans.

MIO and SEED only check generated spans afterwards, so a wrong-length image or a half-finished
speech clip is found when it is too late. Here the grammar is enforced at every step instead:

- outside a span every media code (and every end-of-span token) is forbidden;
- after begin-of-image come exactly ``length`` image codes, then end-of-image;
- after begin-of-audio come the layers of an RVQ clip, layer-major: layer-0 codes (free length in
  ``[min_length, max_length]``), then exactly as many codes of each further layer, then
  end-of-audio;
- padding rows of the vocabulary are always forbidden.

:class:`MediaSpanConstraint` is a transformers ``LogitsProcessor`` (``generate()`` greedy,
sampling and beam search): ``processor(input_ids [B, T], scores [B, V]) -> scores`` re-reads each
row's state from its ids on every call, so beam reordering needs no bookkeeping. The project's
own engine knows which span each row is in and counts its codes, and passes the states
(``apply(scores, states)``, from :meth:`~MediaSpanConstraint.counted_state`): a step then costs
the same at any context length and span length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessor

from unimodal.modalities.base import MediaCodec
from unimodal.modalities.vocab import SPAN_MARKERS, VocabLayout

OUTSIDE = ("outside",)  # the grammar state of text: no media span open


@dataclass(frozen=True)
class SpanSpec:
    """The shape of one modality's span: ``layers`` RVQ layers of ``length`` codes each, or, when
    ``length`` is None, a free length in ``[min_length, max_length]`` set by layer 0."""

    layers: int = 1
    length: int | None = None
    min_length: int = 1
    max_length: int = 4096

    def __post_init__(self) -> None:
        if self.layers < 1 or (self.length is not None and self.length < 1) or not 1 <= self.min_length <= self.max_length:
            raise ValueError(f"invalid span spec {self}: need layers >= 1, length >= 1, 1 <= min_length <= max_length")


@dataclass
class MediaSpan:
    """One complete generated span: its modality, where its begin token is, and codes ``[layers, length]``."""

    modality: str
    start: int
    codes: np.ndarray


class MalformedSpan(ValueError):
    pass


def spans_from_layout(
    layout: VocabLayout,
    codecs: dict[str, MediaCodec] | None = None,
    max_seconds: float | None = 30.0,
    skip: tuple[str, ...] = (),
) -> dict[str, SpanSpec]:
    """Span specs of the code ranges (but ``skip``), from the tokenizers recorded in the layout
    and the ``codecs`` at hand: a fixed ``tokens_per_item`` (SEED: 32, Chameleon: 1024) gives
    exact-length spans; an RVQ codec gives all its layers at a free length of at most its
    ``max_seconds`` (else ``max_seconds``) of frames; with neither, up to 4096 codes."""
    codecs = codecs or {}
    specs = {}
    for name in layout.code_ranges:
        if name in skip:
            continue
        codec = codecs.get(name)
        info = {**layout.code_sources.get(name, {}), **(codec.fingerprint() if codec is not None else {})}
        if info.get("tokens_per_item"):
            specs[name] = SpanSpec(layers=layout.layers(name), length=int(info["tokens_per_item"]))
            continue
        seconds = codec.max_seconds if codec is not None else max_seconds
        frames = int(seconds * float(info["frame_rate"])) if seconds and info.get("frame_rate") else 4096
        specs[name] = SpanSpec(layers=layout.layers(name), min_length=1, max_length=max(1, frames))
    return specs


def _spec(raw: SpanSpec | dict[str, Any]) -> SpanSpec:
    return raw if isinstance(raw, SpanSpec) else SpanSpec(**raw)


class MediaSpanConstraint(LogitsProcessor):
    """Masks logits so that every media span the model writes is well formed (see module doc).

    ``spans`` maps a modality with a code range in ``layout`` to its :class:`SpanSpec` (or a
    dict of its fields). A code range without a spec cannot be generated: its begin token is
    forbidden too.
    """

    def __init__(self, layout: VocabLayout, spans: dict[str, SpanSpec | dict[str, Any]]):
        self.layout = layout
        self.spans = {name: _spec(raw) for name, raw in spans.items()}
        for name, spec in self.spans.items():
            if name not in layout.code_ranges:
                raise ValueError(f"span spec for {name!r}, which has no code range in the vocabulary {list(layout.code_ranges)}")
            if spec.layers > layout.layers(name):
                raise ValueError(f"span spec for {name!r} asks for {spec.layers} layers; the vocabulary has {layout.layers(name)}")
        self.begin = {layout.special_id(SPAN_MARKERS[m][0]): m for m in self.spans}
        self.end = {layout.special_id(SPAN_MARKERS[m][1]): m for m in self.spans}
        self.markers = np.asarray(sorted(self.begin) + sorted(self.end), dtype=np.int64)
        self._masks, self._index = self._build_masks()
        self._device_masks: dict[torch.device, torch.Tensor] = {}

    def _build_masks(self) -> tuple[torch.Tensor, dict[tuple, int]]:
        """One allowed-token row per grammar state; a call gathers one row per sequence."""
        layout, size = self.layout, self.layout.size
        rows: list[torch.Tensor] = []
        index: dict[tuple, int] = {}

        def add(key: tuple, allowed: torch.Tensor) -> None:
            index[key] = len(rows)
            rows.append(allowed)

        def codes(name: str, layer: int) -> torch.Tensor:
            allowed = torch.zeros(size, dtype=torch.bool)
            start = layout.code_ids(name, 0, layer)
            allowed[start : start + layout.codebook_size(name)] = True
            return allowed

        def only(token: int) -> torch.Tensor:
            allowed = torch.zeros(size, dtype=torch.bool)
            allowed[token] = True
            return allowed

        outside = torch.zeros(size, dtype=torch.bool)
        outside[: layout.used_size] = True
        for name, start, stop in layout.spans():
            if name in layout.code_ranges:
                outside[start:stop] = False
        for name, (begin, end) in SPAN_MARKERS.items():
            if name in layout.code_ranges and name not in self.spans:
                outside[layout.special_id(begin)] = False
        outside[list(self.end)] = False
        if "<|media|>" in layout.specials:  # a continuous-slot placeholder is never a discrete output
            outside[layout.special_id("<|media|>")] = False
        add(OUTSIDE, outside)
        for name, spec in self.spans.items():
            end = only(layout.special_id(SPAN_MARKERS[name][1]))
            add((name, "end"), end)
            for layer in range(spec.layers):
                add((name, layer), codes(name, layer))
            following = codes(name, 1) if spec.layers > 1 else end
            add((name, 0, "or_next"), codes(name, 0) | following)
        return torch.stack(rows), index

    def state(self, ids: np.ndarray) -> tuple:
        """The grammar state after ``ids`` (one sequence): a key of the mask table."""
        at = np.flatnonzero(np.isin(ids, self.markers))
        if not len(at) or int(ids[at[-1]]) in self.end:
            return OUTSIDE
        return self.span_state(self.begin[int(ids[at[-1]])], ids[at[-1] + 1 :])

    def span_state(self, name: str, body: Sequence[int] | np.ndarray) -> tuple:
        """The grammar state inside an open ``name`` span whose ids after the begin token are
        ``body`` (what :meth:`state` asks once it has found the last marker)."""
        spec = self.spans[name]
        layer_of = (np.asarray(body, dtype=np.int64) - self.layout.range_offset(name)) // self.layout.codebook_size(name)
        if ((layer_of < 0) | (layer_of >= spec.layers)).any():
            raise MalformedSpan(f"an open {name} span holds ids that are not {name} codes of layers 0..{spec.layers - 1}")
        return self.counted_state(name, np.bincount(layer_of, minlength=spec.layers).tolist())

    def counted_state(self, name: str, counts: Sequence[int]) -> tuple:
        """The grammar state inside an open ``name`` span holding ``counts[layer]`` codes of each
        layer: a caller that counts the codes it writes (the engine) asks this at each step, at
        a cost that does not grow with the span, as reading its body would."""
        spec = self.spans[name]
        current = max((layer for layer, count in enumerate(counts) if count), default=0)  # layers come in order
        length = spec.length if spec.length is not None else (counts[0] if current > 0 else None)
        if length is None:  # layer 0 of a free-length span is still open
            if counts[0] < spec.min_length:
                return (name, 0)
            if counts[0] >= spec.max_length:
                return (name, 1) if spec.layers > 1 else (name, "end")
            return (name, 0, "or_next")
        if counts[current] < length:
            return (name, current)
        return (name, current + 1) if current + 1 < spec.layers else (name, "end")

    def layer_of(self, name: str, code: int) -> int:
        """The layer of ``name``'s code range that id ``code`` belongs to."""
        return (code - self.layout.range_offset(name)) // self.layout.codebook_size(name)

    def allowed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` bool: which ids each row may emit next."""
        return self.masks(self._states(input_ids), input_ids.device)

    def masks(self, states: Sequence[tuple], device: torch.device) -> torch.Tensor:
        """``[B, V]`` bool: which ids may come next in each of the grammar ``states``."""
        rows = torch.tensor([self._index[state] for state in states], dtype=torch.long)
        if device not in self._device_masks:
            self._device_masks[device] = self._masks.to(device)
        return self._device_masks[device][rows.to(device)]

    def apply(self, scores: torch.Tensor, states: Sequence[tuple]) -> torch.Tensor:
        """``scores`` with every id that the grammar ``states`` forbid set to -inf."""
        if scores.shape[-1] != self.layout.size:
            raise ValueError(f"scores have {scores.shape[-1]} columns; the vocabulary layout has {self.layout.size} rows")
        return scores.masked_fill(~self.masks(states, scores.device), float("-inf"))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.apply(scores, self._states(input_ids))

    def _states(self, input_ids: torch.Tensor) -> list[tuple]:
        return [self.state(row) for row in input_ids.detach().cpu().numpy()]


def extract_spans(
    ids: Any, layout: VocabLayout, spans: dict[str, SpanSpec | dict[str, Any]], partial: bool = False
) -> list[MediaSpan]:
    """The complete media spans of a generated sequence, each as codes ``[layers, length]``.

    Raises :class:`MalformedSpan` on anything the constraint forbids: a code outside a span, an
    end token without a begin, a wrong length, an unequal layer or an unterminated span. With
    ``partial`` (a generation cut off by its token budget) a last unterminated span is allowed
    when it is a valid beginning of a span; it is not returned.
    """
    specs = {name: _spec(raw) for name, raw in spans.items()}
    ids = np.asarray(ids, dtype=np.int64)
    begins = {layout.special_id(SPAN_MARKERS[m][0]): m for m in specs}
    ends = {layout.special_id(SPAN_MARKERS[m][1]): m for m in specs}
    out, open_at = [], None
    for position, token in enumerate(ids.tolist()):
        if open_at is None:
            if token in begins:
                open_at = position
            elif token in ends or any(layout.range_offset(m) <= token < layout.range_offset(m) + size for m, size in layout.code_ranges.items()):
                raise MalformedSpan(f"position {position}: {layout.token_name(token)} outside a media span")
            continue
        name = begins[int(ids[open_at])]
        if token in ends or token in begins:
            if ends.get(token) != name:
                raise MalformedSpan(f"position {position}: {layout.token_name(token)} inside an open {name} span")
            out.append(MediaSpan(name, open_at, _span_codes(ids[open_at + 1 : position], name, layout, specs[name], open_at)))
            open_at = None
    if open_at is not None:
        name = begins[int(ids[open_at])]
        if not partial:
            raise MalformedSpan(f"the {name} span opened at position {open_at} is not closed")
        _check_prefix(ids[open_at + 1 :], name, layout, specs[name], open_at)
    return out


def _check_prefix(body: np.ndarray, name: str, layout: VocabLayout, spec: SpanSpec, where: int) -> None:
    """An unterminated span must be the beginning of a well-formed one."""
    layer_of = (body - layout.range_offset(name)) // layout.codebook_size(name)
    if not len(body):
        return
    counts = np.bincount(layer_of.clip(0), minlength=spec.layers)
    length = spec.length or int(counts[0])
    last = int(layer_of[-1])
    expected = np.repeat(np.arange(last + 1), [length] * last + [int(counts[last])])
    ok = (layer_of >= 0).all() and last < spec.layers and counts[last] <= length and len(expected) == len(layer_of)
    if not ok or (expected != layer_of).any() or length > (spec.length or spec.max_length):
        raise MalformedSpan(f"unterminated {name} span at {where} is not the beginning of a well-formed span")


def _span_codes(body: np.ndarray, name: str, layout: VocabLayout, spec: SpanSpec, where: int) -> np.ndarray:
    codebook = layout.codebook_size(name)
    layer_of, codes = np.divmod(body - layout.range_offset(name), codebook)
    if not len(body) or ((layer_of < 0) | (layer_of >= spec.layers)).any():
        raise MalformedSpan(f"{name} span at {where}: empty, or holds ids that are not codes of layers 0..{spec.layers - 1}")
    length = spec.length or int((layer_of == 0).sum())
    expected = np.repeat(np.arange(spec.layers), length)
    if len(layer_of) != len(expected) or (layer_of != expected).any():
        raise MalformedSpan(f"{name} span at {where}: layers {np.bincount(layer_of).tolist()} in order {layer_of.tolist()[:12]}..., expected {spec.layers} x {length} layer-major")
    if spec.length is None and not spec.min_length <= length <= spec.max_length:
        raise MalformedSpan(f"{name} span at {where}: {length} frames, outside [{spec.min_length}, {spec.max_length}]")
    return codes.reshape(spec.layers, length)
