"""The Processor: documents to token streams, and the settings that make it, saved with every model.

Text goes through the text tokenizer; media parts become a span wrapped in begin/end tokens:
pre-encoded float arrays ``[n, d]`` become ``n`` continuous slots (the model embeds them through
an input adapter), integer arrays become discrete codes spliced in as ids (never tokenised as
strings; RVQ codes ``[layers, frames]`` are flattened layer-major, see ``docs/audio-tokens.md``).
Raw pixels and waveforms need a modality codec (``codecs``).

A :class:`Processor` is built by the data module from a recipe, written into every export as
``processor.json`` (settings, the vocabulary layout, codec specs) beside the tokenizer file and
codec directories (never a pickle), and read back by ``unimodal.load``; a later pipeline stage
inherits its media settings from it (:func:`media_settings`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from unimodal.data.templates import ChatTemplate, EosToken, get_template, render
from unimodal.data.tokenizer import TextTokenizer, load_tokenizer
from unimodal.modalities.base import MediaCodec, describe_fingerprint
from unimodal.modalities.vocab import SPAN_MARKERS, VocabLayout
from unimodal.schema import MODALITY_IDS, Document, DocumentError, Part
from unimodal.specs import instantiate

PROCESSOR_FILE = "processor.json"


@dataclass
class EncodedDocument:
    """Flat per-position arrays of one document, ready for the packer.

    ``target`` marks positions whose content is predicted (from the position before);
    ``block`` groups positions that attend to each other bidirectionally (-1: causal only);
    ``continuous`` marks slots whose embedding comes from ``features`` (in order);
    ``span_start`` marks the first position of each media span, so that the packer can cut a long
    document between two adjacent media spans (None: a media span wherever the modality is not text).
    """

    ids: np.ndarray
    modality: np.ndarray
    target: np.ndarray
    block: np.ndarray
    continuous: np.ndarray
    features: np.ndarray
    key: str = ""
    span_start: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def extended(self, ids: list[int], modality: str = "text") -> EncodedDocument:
        """This document followed by ``ids`` as prompt positions (no target, causal, no features)
        of ``modality``: text, or a media span's begin token, which opens that span."""
        n, opens = len(ids), modality != "text"
        return EncodedDocument(
            ids=np.concatenate([self.ids, np.asarray(ids, self.ids.dtype)]),
            modality=np.concatenate([self.modality, np.full(n, MODALITY_IDS[modality], self.modality.dtype)]),
            target=np.concatenate([self.target, np.zeros(n, bool)]),
            block=np.concatenate([self.block, np.full(n, -1, self.block.dtype)]),
            continuous=np.concatenate([self.continuous, np.zeros(n, bool)]),
            features=self.features,
            key=self.key,
            span_start=None if self.span_start is None else np.concatenate([self.span_start, (np.arange(n) == 0) & opens]),
        )


class Span(NamedTuple):
    """A run of positions alike in every field, as :meth:`Processor.encode` collects them."""

    ids: np.ndarray
    modality: int
    loss: bool
    continuous: bool
    features: np.ndarray | None
    starts_media: bool  # the first position of a media span (its begin token)


class EncodedMedia:
    """The arrays the codecs made, by the content of the media they were made from, up to
    ``max_bytes`` (least recently used go first).

    Why: a training run reads each picture and clip once per epoch, and on-the-fly tokenizers
    cost far more than a hash (benchmarks/media_cache.py). Codecs are deterministic functions of
    the media, and a processor's codecs never change, so the content and the modality are the key.
    Arrays are returned read-only, since one may be handed out many times.
    """

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = max_bytes
        self._arrays: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._bytes = 0

    @staticmethod
    def _key(part: Part) -> bytes | None:
        data, rate = part.data if isinstance(part.data, tuple) and len(part.data) == 2 else (part.data, None)
        if not isinstance(data, np.ndarray):
            return None
        digest = hashlib.blake2b(f"{part.type}|{data.dtype}|{data.shape}|{rate}".encode(), digest_size=16)
        digest.update(np.ascontiguousarray(data).data)
        return digest.digest()

    def encode(self, part: Part, codec: MediaCodec) -> np.ndarray:
        key = self._key(part)
        if key is None:
            return codec.encode(part)
        if key in self._arrays:
            self._arrays.move_to_end(key)
            return self._arrays[key]
        array = np.asarray(codec.encode(part))
        array.setflags(write=False)
        self._arrays[key] = array
        self._bytes += array.nbytes
        while self._bytes > self.max_bytes:
            self._bytes -= self._arrays.popitem(last=False)[1].nbytes
        return array


def _is_count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


# processor.json keys, each with what it must hold (absent or null means the default)
SETTING_RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "tokenizer": ("a file name", lambda v: isinstance(v, str) and v != ""),
    "layout": ("an object", lambda v: isinstance(v, dict)),
    "chat_template": ("a template name", lambda v: isinstance(v, str)),
    "feature_dim": ("a whole number >= 0", lambda v: _is_count(v, 0)),
    "seq_len": ("a whole number >= 1", lambda v: _is_count(v, 1)),
    "bidirectional": ("a list of modality names", lambda v: isinstance(v, list) and all(isinstance(m, str) for m in v)),
    "input_layers": ("an object of modality -> layers >= 1", lambda v: isinstance(v, dict) and all(_is_count(n, 1) for n in v.values())),
    "codecs": ("an object of modality -> codec spec", lambda v: isinstance(v, dict) and all(isinstance(c, dict) for c in v.values())),
}


def check_settings(config: dict[str, Any], file: Path) -> None:
    """A ``processor.json`` edited by hand or damaged: a setting of the wrong type is one line
    naming it, not a model that runs with ``seq_len`` "x" or ``bidirectional`` split into letters."""
    for key, (what, valid) in SETTING_RULES.items():
        value = config.get(key)
        if value is not None and not valid(value):
            raise ValueError(f"{file}: {key} is {value!r}, not {what}; copy the export again or re-export its checkpoint")


@dataclass
class Processor:
    """Tokenizer, vocabulary layout, codecs, chat template and media settings: what turns a
    Document into ids and features (:meth:`encode`) and generated codes back into media (``codecs``)."""

    tokenizer: TextTokenizer
    layout: VocabLayout
    feature_dim: int = 0
    add_bos: bool = True
    add_eos: bool = True
    # modalities whose continuous spans are bidirectional blocks (Transfusion); others causal
    bidirectional: tuple[str, ...] = ()
    codecs: dict[str, MediaCodec] = field(default_factory=dict)
    # modality -> RVQ layers kept for input parts (loss false), e.g. {"audio": 1}: MIO's content layer
    input_layers: dict[str, int] = field(default_factory=dict)
    # renders documents whose parts carry roles (unimodal.data.templates); None: parts as they are
    chat_template: ChatTemplate | None = None
    # the sequence length the model was trained with: the default context of a chat
    seq_len: int | None = None
    encoded_media: EncodedMedia = field(default_factory=EncodedMedia, repr=False, compare=False)

    @classmethod
    def from_json(cls, config: dict[str, Any], directory: Path) -> Processor:
        """The processor of the export ``directory``, from its ``processor.json`` as
        ``unimodal.checkpoints.load.read_export_config`` returns it (the tokenizer is relative to
        ``directory``; the codecs' paths are already resolved). ``unimodal.load`` is the usual way in.

        A codec that is not the one the model's code rows were trained with (a refit codec put in
        an export, docs/refit-codec.md) is refused: its codes would mean other media to the model.
        So is a continuous codec other than the one its features came from (a VAE replaced at the
        path an export names)."""
        codecs = {name: instantiate(spec, MediaCodec, f"{directory}: the {name} codec") for name, spec in (config.get("codecs") or {}).items()}
        layout = VocabLayout.from_dict(config["layout"])
        for name, codec in codecs.items():
            coded, continuous = layout.code_sources.get(name), layout.feature_sources.get(name)
            if coded is None and continuous is None:
                continue  # nothing recorded to compare: no weights to checksum
            mine = codec.fingerprint()
            if coded is not None and mine != coded:
                raise ValueError(
                    f"{directory}: its {name} codec is [{describe_fingerprint(mine)}] but the model's {name} rows "
                    f"were trained on codes of [{describe_fingerprint(coded)}]; put back the codec it was exported with, or "
                    f"fine-tune with this one (--model.init_args.reinit_codes=[{name}]) and export again"
                )
            if continuous is not None and mine != continuous:
                raise ValueError(
                    f"{directory}: its {name} codec is [{describe_fingerprint(mine)}] but the model learned its "
                    f"{name} features from [{describe_fingerprint(continuous)}]; put back the codec it was exported with"
                )
        return cls(
            tokenizer=load_tokenizer(directory / config["tokenizer"]),
            layout=layout,
            feature_dim=int(config.get("feature_dim") or 0),
            bidirectional=tuple(config.get("bidirectional") or ()),
            codecs=codecs,
            input_layers=dict(config.get("input_layers") or {}),
            chat_template=get_template(config.get("chat_template")),
            seq_len=config.get("seq_len"),
        )

    def encode(self, doc: Document) -> EncodedDocument:
        spans: list[Span] = []

        def text_span(ids: list[int], loss: bool) -> None:
            spans.append(Span(np.asarray(ids, dtype=np.int64), 0, loss, False, None, False))

        if self.add_bos and self.tokenizer.bos_id is not None:
            text_span([self.tokenizer.bos_id], False)
        parts = render(doc, self.chat_template) if self.chat_template is not None else doc.parts
        for part in parts:
            if isinstance(part, EosToken):
                text_span([self.tokenizer.eos_id], part.loss)
            elif part.type == "text":
                text_span(self.tokenizer.encode(part.text or ""), part.loss)
            else:
                self._media_spans(part, doc, spans)
        if self.add_eos:
            last_loss = parts[-1].loss if parts else True
            text_span([self.tokenizer.eos_id], last_loss)
        return self._concat(spans, doc.key)

    def _media_spans(self, part: Part, doc: Document, spans: list[Span]) -> None:
        array = part.data
        if not isinstance(array, np.ndarray) or array.dtype == np.uint8:
            codec = self.codecs.get(part.type)
            if codec is None:
                raise DocumentError(
                    f"{doc.where()}: {part.type} part {part.media} holds raw media but no {part.type} "
                    "codec is configured; pre-encode it (unimodal data encode) or configure a codec"
                )
            try:
                array = self.encoded_media.encode(part, codec)
            except torch.cuda.OutOfMemoryError:  # the device's fault, not the sample's
                raise
            except (ValueError, RuntimeError) as err:  # one clip the codec refuses (too long, silent, NaN) is one bad sample
                raise DocumentError(f"{doc.where()}: {part.type} part {part.media}: the {part.type} codec cannot encode it ({err})") from None
        if array.ndim == 0:
            raise DocumentError(f"{doc.where()}: {part.type} part {part.media} is a single number, not {part.type} codes or features")
        if array.size == 0:
            raise DocumentError(f"{doc.where()}: {part.type} part {part.media} is an empty array {tuple(array.shape)}")
        begin, end = SPAN_MARKERS[part.type]
        modality = MODALITY_IDS[part.type]

        def marker(name: str, starts: bool = False) -> Span:
            return Span(np.asarray([self.layout.special_id(name)]), modality, part.loss, False, None, starts)

        spans.append(marker(begin, True))
        if np.issubdtype(array.dtype, np.floating):
            features = np.asarray(array, dtype=np.float32).reshape(-1, array.shape[-1])
            if features.shape[1] != self.feature_dim:
                raise DocumentError(
                    f"{doc.where()}: {part.type} part {part.media} has feature width {features.shape[1]}, "
                    f"the processor's feature_dim (data.init_args.feature_dim in a recipe) is {self.feature_dim}"
                )
            if not np.isfinite(features).all():
                raise DocumentError(f"{doc.where()}: {part.type} part {part.media} holds NaN or infinite features")
            ids = np.full(len(features), self.layout.special_id("<|media|>"), dtype=np.int64)
            spans.append(Span(ids, modality, part.loss, True, features, False))
        elif np.issubdtype(array.dtype, np.integer):
            spans.append(Span(self._code_ids(array, part, doc), modality, part.loss, False, None, False))
        else:
            raise DocumentError(f"{doc.where()}: {part.type} array of dtype {array.dtype} is not supported")
        spans.append(marker(end))

    def _code_ids(self, array: np.ndarray, part: Part, doc: Document) -> np.ndarray:
        """Integer codes to vocabulary ids: a one-layer range takes any shape (flattened in order),
        an RVQ range takes ``[layers, frames]`` flattened layer-major, all of layer 0 first."""
        name = part.type
        if name not in self.layout.code_ranges:
            raise DocumentError(f"{doc.where()}: {name} part {part.media} holds integer codes but the vocabulary has no {name} code range")
        layers, codebook = self.layout.layers(name), self.layout.codebook_size(name)
        codes = array.astype(np.int64)
        if layers == 1:
            codes = codes.reshape(1, -1)
        elif codes.ndim != 2 or not 1 <= len(codes) <= layers:
            raise DocumentError(f"{doc.where()}: {name} codes of shape {array.shape}; expected [layers <= {layers}, frames]")
        if not part.loss and name in self.input_layers:
            codes = codes[: self.input_layers[name]]
        if codes.min(initial=0) < 0 or codes.max(initial=0) >= codebook:
            raise DocumentError(f"{doc.where()}: {name} codes outside [0, {codebook})")
        return self.layout.code_ids(name, codes, np.arange(len(codes))[:, None]).reshape(-1)

    def _concat(self, spans: list[Span], key: str) -> EncodedDocument:
        # one repeat per field rather than one small array per span and field: a short document
        # has a dozen spans, and this runs for every document the data module reads
        span_ids, modality, loss, is_cont, feats, starts = zip(*spans)
        lengths = np.array([len(ids) for ids in span_ids])
        in_block = np.array([cont and _modality_name(mod) in self.bidirectional for mod, cont in zip(modality, is_cont)])
        block = np.where(in_block, np.cumsum(in_block) - 1, -1).astype(np.int32)
        offsets = np.cumsum(lengths) - lengths
        span_start = np.zeros(int(lengths.sum()), dtype=bool)
        span_start[offsets[np.array(starts) & (lengths > 0)]] = True
        features = [f for f in feats if f is not None]
        return EncodedDocument(
            ids=np.concatenate(span_ids),
            modality=np.repeat(np.array(modality, dtype=np.int8), lengths),
            target=np.repeat(np.array(loss, dtype=bool), lengths),
            block=np.repeat(block, lengths),
            continuous=np.repeat(np.array(is_cont, dtype=bool), lengths),
            features=np.concatenate(features) if features else np.zeros((0, self.feature_dim), np.float32),
            key=key,
            span_start=span_start,
        )


def _modality_name(modality_id: int) -> str:
    return next(name for name, i in MODALITY_IDS.items() if i == modality_id)


def media_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The media arguments of a data module (code ranges and layers, codecs, feature size,
    bidirectional and input layers) that a saved processor's ``config`` fixes: what a stage that
    starts from the model must encode its data with."""
    layout = config["layout"]
    values = {
        "code_ranges": layout.get("code_ranges") or None,
        "code_layers": layout.get("code_layers") or None,
        "codecs": config.get("codecs") or None,
        "feature_dim": config.get("feature_dim") or None,
        "bidirectional": config.get("bidirectional") or None,
        "input_layers": config.get("input_layers") or None,
    }
    return {key: value for key, value in values.items() if value is not None}


def processor_config(
    tokenizer_file: str, layout: VocabLayout, settings: dict[str, Any], codec_specs: dict[str, Any]
) -> dict[str, Any]:
    """``processor.json`` for a model trained with a data module's ``settings`` (its arguments):
    what :meth:`Processor.from_json` reads. The writer names the tokenizer file and codec specs,
    which it copies (``unimodal.checkpoints.export``)."""
    return {
        "tokenizer": tokenizer_file,
        "layout": layout.to_dict(),
        "chat_template": settings.get("chat_template"),
        "feature_dim": int(settings.get("feature_dim") or 0),
        "bidirectional": list(settings.get("bidirectional") or ()),
        "input_layers": dict(settings.get("input_layers") or {}),
        "seq_len": settings.get("seq_len"),
        "codecs": codec_specs,
    }

