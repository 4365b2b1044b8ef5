"""Loading a pretrained media tokenizer from a local directory, by modality."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unimodal.modalities.audio import load_audio_codec
from unimodal.modalities.base import CODEC_FILE, MediaCodec
from unimodal.modalities.digit_audio import DigitAudioCodec
from unimodal.modalities.image_discrete import ChameleonImageTokenizer, PatchVQCodec
from unimodal.modalities.seed_tokenizer import CONFIG_FILE, SeedTokenizer

# the codecs the framework fits itself (k-means codebooks), by the name their fingerprint gives
FITTED_CODECS: dict[str, type[MediaCodec]] = {"digit-audio": DigitAudioCodec, "patch-vq": PatchVQCodec}


def fitted_kind(path: Path) -> str:
    """Which of :data:`FITTED_CODECS` a ``codec.json`` directory holds."""
    name = (json.loads((path / CODEC_FILE).read_text()).get("fingerprint") or {}).get("name")
    if name not in FITTED_CODECS:
        raise ValueError(f"{path / CODEC_FILE}: codec {name!r} is none of {', '.join(FITTED_CODECS)}")
    return name


def load_codec(modality: str, path: str | Path, device: str = "cpu", **options: Any) -> MediaCodec:
    """The tokenizer in a local directory: a SEED tokenizer or Chameleon VQ-VAE for images, an RVQ
    codec for audio (``options``: ``layers``, ``max_seconds``), or a codec the framework fitted
    (``codec.json``: the digits speech codec, the patch VQ, or one refit by ``unimodal data fit-codec``)."""
    path = Path(path)
    if (path / CODEC_FILE).is_file():
        return _fitted(modality, path, **options)
    if modality == "image":
        if (path / CONFIG_FILE).is_file():
            return SeedTokenizer.from_pretrained(path, device=device)
        tokenizer = ChameleonImageTokenizer.from_pretrained(path)
        tokenizer.model.to(device)
        return tokenizer
    if modality == "audio":
        codec = load_audio_codec(path, **options)
        codec.model.to(device)
        return codec
    raise ValueError(f"no tokenizer for modality {modality!r}")


def _fitted(modality: str, path: Path, layers: int | None = None, max_seconds: float | None = None) -> MediaCodec:
    """A fitted codec directory; it runs on the CPU (k-means lookups), so no device."""
    kind = fitted_kind(path)
    if FITTED_CODECS[kind].modality != modality:
        raise ValueError(f"{path} holds a {kind} codec ({FITTED_CODECS[kind].modality}), not an {modality} one")
    if kind == "patch-vq":
        return PatchVQCodec(str(path))
    codec = DigitAudioCodec(str(path), **({} if max_seconds is None else {"max_seconds": max_seconds}))
    if layers not in (None, codec.layers):
        raise ValueError(f"{path}: the {kind} codec has {codec.layers} RVQ layers; asked for {layers}")
    return codec
