"""The interface every media codec implements (image VAEs, VQ tokenizers, RVQ audio codecs...).

The data pipeline calls ``encode`` on decoded parts (uint8 pixels, waveforms) to get the array
the model consumes: float features ``[n, d]`` for continuous modalities, integer codes for
discrete ones. ``fingerprint`` identifies the codec so that data encoded by one codec is never
trained with another. What a codec can do beyond that is declared here, with defaults, rather
than probed by callers: ``sample_rate`` (audio codecs: the rate ``decode`` returns),
``max_seconds`` (the longest clip ``encode`` takes) and ``encode_batch``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unimodal.schema import Part, read_json_object


class MediaCodec:
    modality: str = ""
    sample_rate: int | None = None
    max_seconds: float | None = None

    def encode(self, part: Part) -> np.ndarray:
        raise NotImplementedError

    def encode_batch(self, parts: list[Part]) -> Sequence[np.ndarray]:
        """One array per part; codecs that batch on an accelerator (image tokenizers) override it."""
        return [self.encode(part) for part in parts]

    def decode(self, array: np.ndarray) -> Any:
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        return {"name": type(self).__name__}


def describe_fingerprint(fingerprint: dict[str, Any]) -> str:
    """A fingerprint on one line (``name=digit-audio, ..., checksum=...``), for refusals that name both codecs."""
    return ", ".join(f"{k}={v}" for k, v in fingerprint.items())


def weights_checksum(state: dict[str, torch.Tensor]) -> str:
    """sha256 (16 hex digits) over tensors in name order: same name, other weights, other codes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()[:16]


CODEC_FILE = "codec.json"


def save_codec_files(directory: str | Path, config: dict[str, Any], arrays: dict[str, torch.Tensor]) -> Path:
    """A fitted codec as plain files: ``codec.json`` and one ``.npy`` per array (never a pickle)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        np.save(out / name, array.detach().cpu().numpy(), allow_pickle=False)
    (out / CODEC_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def model_config(path: str | Path, what: str) -> dict[str, Any]:
    """``config.json`` of a local model directory (pretrained pieces load from local paths only),
    or one line saying what ``path`` lacks."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{what} {path} is not a model directory (no config.json); models load from local directories only")
    return read_json_object(file, "copy the model directory again")


def read_codec_files(directory: Path, kind: str, arrays: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """What :func:`save_codec_files` wrote; a directory of another kind is one clear error."""
    needed = (CODEC_FILE, *arrays)
    if not all((directory / name).is_file() for name in needed):
        raise FileNotFoundError(f"{directory}: not a {kind} directory (needs {' and '.join(needed)})")
    config = read_json_object(directory / CODEC_FILE, "copy the codec directory again")
    tensors = {}
    for name in arrays:
        try:
            tensors[name] = torch.as_tensor(np.load(directory / name, allow_pickle=False))
        except (ValueError, OSError, EOFError) as err:  # cut short, not .npy, or an object array (a pickle)
            raise ValueError(f"{directory / name} cannot be read as a plain .npy array ({err}); copy the codec directory again") from None
    return config, tensors

