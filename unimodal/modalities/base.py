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
import inspect
import json
import math
import os
import pickle
import sys
import threading
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from unimodal.schema import Part, read_json_object


class AudioTooLong(ValueError):
    pass


class MediaCodec:
    modality: str = ""
    sample_rate: int | None = None
    max_seconds: float | None = None

    def check_seconds(self, seconds: float) -> None:
        """Refuse a clip longer than ``max_seconds``: before it is decoded, where its file header
        says how long it is, and again before it is encoded."""
        if self.max_seconds is not None and seconds > self.max_seconds:
            raise AudioTooLong(
                f"audio of {seconds:.1f} s is longer than the {getattr(self, 'name', self.modality)} codec's "
                f"max_seconds={self.max_seconds:g}; cut it into shorter clips or raise the limit (max_audio_seconds at load, "
                "chat and serve; the codec config's max_seconds in a recipe)"
            )

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
    or one line saying what ``path`` lacks or what of it is not a dtype."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{what} {path} is not a model directory (no config.json); models load from local directories only")
    config = read_json_object(file, "copy the model directory again")
    _check_dtypes(config, file)
    return config


def _check_dtypes(config: dict[str, Any], file: Path) -> None:
    """transformers turns a ``dtype`` (``torch_dtype``) name into ``getattr(torch, name)``: a name
    that is not a torch dtype is one line naming the key, at any depth (a sub-model's config)."""
    for key, value in config.items():
        if isinstance(value, dict):
            _check_dtypes(value, file)
        elif key in ("dtype", "torch_dtype") and value not in (None, "auto"):
            if not (isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype)):
                raise ValueError(f"{file}: {key} is {value!r}, not a torch dtype such as 'float32' or 'bfloat16'; "
                                 "copy the model directory again")


# exceptions a model's constructor raises on a value it cannot build from (a string for a size, an
# unknown activation name, a negative width)
CONFIG_FAULTS = (TypeError, ValueError, AttributeError, KeyError, IndexError, ArithmeticError, RuntimeError)


@contextmanager
def model_files_read(path: Path, building: bool = False) -> Iterator[None]:
    """What a Hugging Face loader raises on a damaged or foreign model directory, as one line naming
    it: weight files it cannot read (cut short, overwritten, a pickle of objects other than tensors,
    which is never unpickled), a ``config.json`` value of the wrong type, weights of other shapes than
    the ones ``config.json`` describes, and code the directory names (``auto_map``), never run.
    ``building``: the code inside reads ``config.json`` alone (it builds the model that file
    describes), so whatever of :data:`CONFIG_FAULTS` it raises is a value of that file."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    try:
        yield
    except FileNotFoundError:
        raise
    except StrictDataclassError as err:  # the field on one line, the value's fault on the next
        detail = " ".join(line.strip() for line in str(err).splitlines())
        raise ValueError(f"{path / 'config.json'}: {detail}; copy the model directory again") from None
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
        if building:
            raise _config_fault(path, err) from None
        raise
    except (SafetensorError, OSError, pickle.UnpicklingError) as err:
        if building:  # config.json unreadable to the library
            raise _config_fault(path, err) from None
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, pickle.UnpicklingError):  # torch's advice is to load it unsafely
            detail = "a pickle of objects other than tensors, which could run code when loaded"
        raise ValueError(f"the weights in {path} cannot be read ({detail}); copy the model directory again") from None
    except CONFIG_FAULTS as err:
        if building:
            raise _config_fault(path, err) from None
        raise


def _config_fault(path: Path, err: Exception) -> ValueError:
    detail = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return ValueError(f"{path / 'config.json'}: a value the model cannot be built from ({type(err).__name__}: {detail}); "
                      "copy the model directory again")


# the weight files transformers and diffusers read, safetensors before a pickle; each may instead be
# sharded, with ``NAME.index.json`` beside the shards
WEIGHT_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin", "diffusion_pytorch_model.bin")
# how much more than its weights hold a model may declare: tied weights are built twice, weight
# normalisation builds its g and v beside the weight, and a loader may leave a submodule out
# (Chameleon's VQ-VAE); a config.json of 10**6 layers declares thousands of times more
DECLARED_SLACK = 4


class Stored(NamedTuple):
    values: int
    tensors: int


def stored_values(files: list[Path]) -> Stored | None:
    """The values and tensors the weight ``files`` hold, read from safetensors headers, or from a
    pickle's tensor records onto the meta device (no data read, nothing but tensors unpickled);
    None where one cannot be read: the loader names it in one line."""
    from safetensors import SafetensorError, safe_open

    values = tensors = 0
    for file in files:
        try:
            if file.suffix == ".safetensors":
                with safe_open(file, framework="pt") as handle:
                    shapes = [handle.get_slice(key).get_shape() for key in handle.keys()]
            else:
                state = torch.load(file, map_location="meta", weights_only=True, mmap=True)
                shapes = [list(t.shape) for t in state.values() if isinstance(t, torch.Tensor)] if isinstance(state, dict) else []
        except (SafetensorError, OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError):
            return None
        values += sum(math.prod(shape) for shape in shapes)
        tensors += len(shapes)
    return Stored(values, tensors)


def weight_file(path: Path) -> Path | None:
    """The file a Hugging Face loader reads the weights of the directory ``path`` from: the first of
    :data:`WEIGHT_NAMES` there, or the index of its shards; None where there is none."""
    for name in WEIGHT_NAMES:
        for file in (path / name, path / f"{name}.index.json"):
            if file.is_file():
                return file
    return None


def stored_weights(path: Path) -> Stored | None:
    """What the weights a Hugging Face loader reads from the directory ``path`` hold (safetensors
    before a pickle, one file before the shards an index names); other files beside them (an
    adapter) are not the model's. None where there are none or they cannot be read."""
    file = weight_file(path)
    if file is None:
        return None
    if not file.name.endswith(".index.json"):
        return stored_values([file])
    try:
        shards = json.loads(file.read_text())["weight_map"].values()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return stored_values([path / shard for shard in sorted(set(shards))])


class _Oversized(BaseException):
    """Raised inside a constructor to stop building a model beyond its budget; not an Exception,
    which library code building a model might catch and carry on."""


def built_within(build: Callable[[], object], budget: Stored) -> Stored | None:
    """Run ``build`` on the meta device, which allocates nothing, counting the parameters it
    registers; building stops as soon as they pass ``budget``, and what was built by then is
    returned (None: it fits). A model of 10**6 layers stops after a few of them. torch's hook is
    process-wide, so only this thread's parameters count: a model built in another thread (a
    server loading beside a check) neither counts nor stops."""
    built = [0, 0]
    builder = threading.get_ident()

    def registered(module: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
        if threading.get_ident() != builder:
            return
        built[0] += param.numel()
        built[1] += 1
        if built[0] > budget.values or built[1] > budget.tensors:
            raise _Oversized

    hook = torch.nn.modules.module.register_module_parameter_registration_hook(registered)
    try:
        with torch.device("meta"):
            build()
    except _Oversized:
        return Stored(*built)
    finally:
        hook.remove()
    return None


def check_fits_weights(build: Callable[[], object], weights: Path, config_file: Path, what: str, fix: str) -> None:
    """Build ``what`` as ``config_file`` declares it (``build``) on the meta device, and refuse it in
    one line once it passes :data:`DECLARED_SLACK` times what the weight file ``weights`` holds (or
    when that file cannot be read weights-only): for loaders that build a model before reading
    its weights, as the framework's own codec files do."""
    stored = stored_values([weights])
    if stored is None:
        raise ValueError(f"the weights in {weights.parent} cannot be read ({weights.name} is not a whole weights-only file; "
                         f"pickled code is never run); {fix}")
    over = built_within(build, Stored(*(DECLARED_SLACK * n for n in stored)))
    if over is not None:
        raise ValueError(f"{config_file} declares {what} of at least {over.values:,} parameters ({over.tensors:,} tensors) "
                         f"but {weights.name} holds {stored.values:,} ({stored.tensors:,}); {fix}")


def check_declared(path: Path, build: Callable[[], object]) -> None:
    """Build the model the directory ``path``'s ``config.json`` describes (``build``) on the meta
    device before a library loads it: a value the model cannot be built from is one line naming the
    file, where the library fails deep inside torch, and parameters beyond :data:`DECLARED_SLACK`
    times the values or tensors the weights hold are refused as they are built. The library would
    otherwise allocate every parameter the weights lack, until the machine ran out of memory, and a
    config.json of 10**6 layers would take hours to build. Where the weights cannot be counted,
    building stops at the first parameter: the loader names them."""
    stored = stored_weights(path)
    with model_files_read(path, building=True):
        over = built_within(build, Stored(*(DECLARED_SLACK * n for n in stored)) if stored is not None else Stored(0, 0))
    if over is not None and stored is not None:
        raise ValueError(
            f"{path / 'config.json'} declares a model of at least {over.values:,} parameters ({over.tensors:,} tensors) "
            f"but its weights hold {stored.values:,} ({stored.tensors:,} tensors); copy the model directory again"
        )


def _build_declared(cls: Any, path: Path) -> None:
    """The model of ``cls`` (a transformers or diffusers class) that ``config.json`` describes, built
    as ``cls.from_pretrained`` builds it but without weights."""
    if hasattr(cls, "load_config"):  # diffusers
        config = cls.load_config(path, local_files_only=True)
        _check_init_types(cls, config)
        cls.from_config(config)
        return
    from transformers import AutoConfig

    config = (getattr(cls, "config_class", None) or AutoConfig).from_pretrained(path, local_files_only=True, trust_remote_code=False)
    cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)


def _check_init_types(cls: Any, config: dict[str, Any]) -> None:
    """diffusers hands ``config.json``'s values to the model's ``__init__`` unchecked, where a string
    for a size fails deep inside torch: a value must have a type its argument's annotation names
    (``int | tuple[int]`` takes Stable Diffusion's per-block lists), or where there is none, the type
    of its default."""
    init, _, _ = cls.extract_init_dict(config)
    defaults = inspect.signature(cls.__init__).parameters
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve leaves the defaults to judge
        hints = {}
    for key, value in init.items():
        if value is None:  # diffusers' "derive it from the other settings"
            continue
        kinds = _runtime_types(hints[key]) if key in hints else None
        if kinds is None:
            default = defaults[key].default if key in defaults else None
            if default is None or default is inspect.Parameter.empty:
                continue
            kinds = (list, tuple) if isinstance(default, (list, tuple)) else (int, float) if type(default) is float else (type(default),)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            named = " or ".join("None" if kind is type(None) else kind.__name__ for kind in kinds)
            raise TypeError(f"{key} is {value!r}, where {cls.__name__} takes {named}")


def _runtime_types(hint: Any) -> tuple[type, ...] | None:
    """The types a JSON value may have for the annotation ``hint`` (tuples arrive as lists); None
    for one that says nothing checkable (``Any``, a callable)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        found = [_runtime_types(arg) for arg in typing.get_args(hint)]
        return None if any(kinds is None for kinds in found) else tuple(dict.fromkeys(kind for kinds in found for kind in kinds))
    if origin is typing.Literal:
        return tuple(dict.fromkeys(type(arg) for arg in typing.get_args(hint)))
    if hint in (tuple, list) or origin in (tuple, list, Sequence):
        return (list, tuple)
    if hint is dict or origin is dict:
        return (dict,)
    if hint is float:
        return (int, float)
    if hint is type(None) or hint in (int, str, bool):
        return (hint,)
    return None


@contextmanager
def no_weights_bar() -> Iterator[None]:
    """transformers draws a bar for every model it reads ("Loading weights") or writes ("Writing
    model shards"), and diffusers one for a pipeline's components; they say nothing to act on and
    break into our own lines, so they are off while a model is read or written. A user who sets
    ``HF_HUB_DISABLE_PROGRESS_BARS`` decides instead (``0`` shows them; the CLI defaults to ``1``)."""
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is not None:
        yield
        return
    from transformers.utils import logging as hf_logging

    switches = [hf_logging]
    if "diffusers" in sys.modules:  # imported by whoever reads a diffusers model; never imported here for nothing
        from diffusers.utils import logging as diffusers_logging

        switches.append(diffusers_logging)
    shown = [switch for switch in switches if switch.is_progress_bar_enabled()]
    for switch in shown:
        switch.disable_progress_bar()
    try:
        yield
    finally:
        for switch in shown:
            switch.enable_progress_bar()


def load_pretrained(cls: Any, path: str | Path, optional: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """``cls.from_pretrained`` (a transformers or diffusers model class) on the local directory
    ``path``, its errors as :func:`model_files_read` says, after :func:`check_declared` has built
    the model its ``config.json`` describes. Weights that leave parameters of the model out
    (another architecture, more layers) are one line too, where the library would start them
    afresh with only a warning; ``optional``: name prefixes of parameters that may be absent."""
    path = Path(path)
    check_declared(path, lambda: _build_declared(cls, path))
    with model_files_read(path), no_weights_bar():
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

