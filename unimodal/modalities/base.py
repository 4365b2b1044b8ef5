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
import os
import pickle
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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


@contextmanager
def model_files_read(path: Path) -> Iterator[None]:
    """What a Hugging Face loader raises on a damaged or foreign model directory, as one line naming
    it: weight files it cannot read (cut short, overwritten, a pickle of objects other than tensors,
    which is never unpickled), a ``config.json`` value of the wrong type, weights of other shapes than
    the ones ``config.json`` describes, and code the directory names (``auto_map``), never run."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    try:
        yield
    except FileNotFoundError:
        raise
    except (RuntimeError, ValueError) as err:
        text = str(err)
        if "ignore_mismatched_sizes" in text or "size mismatch for " in text:
            named = next((line.strip() for line in text.splitlines() if "size mismatch for " in line), None)  # torch's load_state_dict
            if named is None:  # diffusers names the first tensor; transformers has printed a report of them all
                named = text.split(" because ", 1)[1].split(". If you want")[0] if " because " in text else "the report above names them"
            raise ValueError(f"the weights in {path} do not have the shapes its config.json describes ({named}); "
                             "copy the model directory again") from None
        if "trust_remote_code" in text:
            raise ValueError(f"{path} names model code of its own (auto_map in config.json), which unimodal never runs; "
                             "use a model the library implements") from None
        if isinstance(err, json.JSONDecodeError):  # the index of the weight shards
            raise ValueError(f"the weights in {path} cannot be read (an index that is not JSON: {err}); copy the model directory again") from None
        raise
    except (SafetensorError, OSError, pickle.UnpicklingError, StrictDataclassError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, StrictDataclassError):  # the field on one line, the value's fault on the next
            detail = " ".join(line.strip() for line in str(err).splitlines())
            raise ValueError(f"{path / 'config.json'}: {detail}; copy the model directory again") from None
        if isinstance(err, pickle.UnpicklingError):  # torch's advice is to load it unsafely
            detail = "a pickle of objects other than tensors, which could run code when loaded"
        raise ValueError(f"the weights in {path} cannot be read ({detail}); copy the model directory again") from None


@contextmanager
def no_loading_bar() -> Iterator[None]:
    """transformers draws a "Loading weights" bar for every model it reads, which says nothing to
    act on and breaks into our own lines, so it is off while one is read; a user who sets
    ``HF_HUB_DISABLE_PROGRESS_BARS`` decides instead (``0`` shows it; the CLI defaults to ``1``)."""
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is not None:
        yield
        return
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def load_pretrained(cls: Any, path: str | Path, optional: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """``cls.from_pretrained`` (a transformers or diffusers model class) on the local directory
    ``path``, its errors as :func:`model_files_read` says. Weights that leave parameters of the model
    out (another architecture, more layers) are one line too, where the library would start them
    afresh with only a warning; ``optional``: name prefixes of parameters that may be absent."""
    path = Path(path)
    with model_files_read(path), no_loading_bar():
        model, info = cls.from_pretrained(path, local_files_only=True, trust_remote_code=False, output_loading_info=True, **kwargs)
    missing = sorted(key for key in info["missing_keys"] if not key.startswith(optional))
    if missing:
        raise ValueError(
            f"the weights in {path} do not fill the {type(model).__name__} its config.json describes "
            f"({len(missing)} parameters missing, e.g. {missing[0]}); copy the model directory again"
        )
    return model


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

