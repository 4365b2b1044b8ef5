"""Loading a pretrained media tokenizer from a local directory, by modality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unimodal.modalities.audio import load_audio_codec
from unimodal.modalities.base import MediaCodec
from unimodal.modalities.image_discrete import ChameleonImageTokenizer
from unimodal.modalities.seed_tokenizer import CONFIG_FILE, SeedTokenizer


def load_codec(modality: str, path: str | Path, device: str = "cpu", **options: Any) -> MediaCodec:
    """The tokenizer in a local directory: a SEED tokenizer or Chameleon VQ-VAE for images, an RVQ
    codec for audio (``options``: ``layers``, ``max_seconds``)."""
    path = Path(path)
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
