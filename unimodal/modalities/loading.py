"""Loading a pretrained media tokenizer from a local directory, by modality."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from unimodal.errors import UserError
from unimodal.modalities.audio import load_audio_codec
from unimodal.modalities.base import CODEC_FILE, MediaCodec
from unimodal.modalities.digit_audio import DigitAudioCodec
from unimodal.modalities.image_discrete import ChameleonImageTokenizer, PatchVQCodec
from unimodal.modalities.seed_tokenizer import CONFIG_FILE, SeedTokenizer
from unimodal.schema import read_json_object

# the codecs the framework fits itself (k-means codebooks), by the name their fingerprint gives
FITTED_CODECS: dict[str, type[MediaCodec]] = {"digit-audio": DigitAudioCodec, "patch-vq": PatchVQCodec}


def resolve_device(device: str) -> str:
    """``device`` checked (``auto``: CUDA where there is one), refused in one line where it names
    no device or one this machine lacks."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name; use auto, cpu or cuda[:N]") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: models run on cpu or cuda[:N]")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this machine has no CUDA device (or this torch is a CPU build); use cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= (count := torch.cuda.device_count()):
        raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def fitted_kind(path: Path) -> str:
    """Which of :data:`FITTED_CODECS` a ``codec.json`` directory holds."""
    fingerprint = read_json_object(path / CODEC_FILE, "fit the codec again, or copy it again").get("fingerprint")
    name = fingerprint.get("name") if isinstance(fingerprint, dict) else None
    if name not in FITTED_CODECS:
        raise ValueError(f"{path / CODEC_FILE}: codec {name!r} is none of {', '.join(FITTED_CODECS)}")
    return name


def load_codec(modality: str, path: str | Path, device: str = "cpu", **options: Any) -> MediaCodec:
    """The tokenizer in a local directory: a SEED tokenizer or Chameleon VQ-VAE for images, an RVQ
    codec for audio (``options``: ``layers``, ``max_seconds``), or a codec the framework fitted
    (``codec.json``: the digits speech codec, the patch VQ, or one refit by ``unimodal data fit-codec``)."""
    path = Path(path)
    device = resolve_device(device)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist or is not a directory; give the directory of the {modality} codec")
    from safetensors import SafetensorError

    try:
        return _load(modality, path, device, **options)
    except FileNotFoundError:
        raise
    # what a damaged or foreign directory raises in the libraries that read it; a missing package,
    # a device out of memory or a file one may not read say what they are themselves
    except (ValueError, TypeError, KeyError, AttributeError, NameError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
        reason = (str(err).strip().splitlines() or [""])[0]
        if str(path) in reason:  # already names the file and what to do
            raise UserError(reason) from err
        raise UserError(f"cannot load the {modality} codec in {path} ({type(err).__name__}: {reason[:300]}); "
                        "fit it again or copy it again") from err


def _load(modality: str, path: Path, device: str, **options: Any) -> MediaCodec:
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
