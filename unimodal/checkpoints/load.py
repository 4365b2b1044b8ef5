"""Reading an export directory back: the model (no LightningModule needed), tokenizer, codecs.

An export directory (written by ``unimodal.checkpoints.export``)::

    config.json, model.safetensors   the backbone as transformers saves it: AutoModelForCausalLM
                                     .from_pretrained(DIR) loads it as it is
    modules.safetensors              every other weight of the unified model (input adapters,
                                     heads, experts), under the unified model's names
    tokenizer.model | tokenizer*     the text tokenizer (SentencePiece file or HF tokenizer files)
    adapter/                         only for LoRA runs exported without --merge_lora: a peft
                                     adapter (PeftModel.from_pretrained(backbone, DIR/adapter))
                                     and trainables.safetensors beside it
    codecs/MODALITY/                 a copy of each small codec directory the run named by path
    processor.json                   the Processor (``unimodal.data.processor``): tokenizer file,
                                     vocabulary layout, chat template, media settings, codec specs
    unimodal.json                    the model spec (backbone, continuous modalities, routing),
                                     the adapter, generation defaults and where it came from

Why: the backbone stays usable by any HF tool, while the framework's own modules and the
vocabulary layout travel with it. ``models.build_model`` rebuilds the model from the spec, so
loading needs no training code. Exports of format 1 are upgraded on read: their model spec was
the training module's arguments, their processor settings lived in ``unimodal.json``, and one
continuous class was renamed; anything else old is refused in one line that says how to re-export.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import re
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from unimodal.data.processor import PROCESSOR_FILE, Processor, check_settings, processor_config
from unimodal.data.shards import is_streamed
from unimodal.modalities.base import DECLARED_SLACK, Stored, built_within, describe_fingerprint, model_config, stored_values
from unimodal.modalities.vocab import VocabLayout
from unimodal.models.backbone import BackboneConfig, start_rows_near_mean
from unimodal.models.build import build_model
from unimodal.models.lora import merge_backbone_adapter, quiet_peft
from unimodal.models.sharding import load_safetensors
from unimodal.models.unified import ContinuousModality, UnifiedModel, check_item_slots
from unimodal.schema import read_json_object
from unimodal.specs import defined_here, instantiate, reached

log = logging.getLogger("unimodal.export")

FORMAT = "unimodal.export/2"
OLD_FORMATS = ("unimodal.export/1",)
CONFIG_FILE = "unimodal.json"
MODULES_FILE = "modules.safetensors"
ADAPTER_DIR = "adapter"
SP_TOKENIZER = "tokenizer.model"
CODECS_DIR = "codecs"
REEXPORT = "copy the export again or re-export its checkpoint"
# what ``build_model`` takes from an export's ``model`` spec
MODEL_KEYS = ("backbone", "continuous", "routing")
# in format 1 the model spec was the arguments of the training module of this name
OLD_MODEL_CLASS = "UnimodalModule"
# class paths renamed since format 1: old -> new
RENAMED_CLASSES = {
    "unimodal.models.continuous.DiffusionImage": "unimodal.models.continuous.TokenDiffusionImage",
}


# a dotted name, as jsonargparse reads a class given as a string
IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
# the parts of an export that jsonargparse instantiates: a dotted string in them may be imported
SPEC_KEYS = ("model", "codecs")


class ExportError(ValueError):
    pass


@dataclass
class Exported:
    """What :func:`load_exported` restores: everything needed to run the model."""

    model: UnifiedModel  # eval mode, on CPU
    processor: Processor
    config: dict[str, Any]  # the directory's unimodal.json, with its processor.json as "processor"
    path: Path | None = None


def _rename_classes(node: Any) -> None:
    if isinstance(node, dict):
        if node.get("class_path") in RENAMED_CLASSES:
            node["class_path"] = RENAMED_CLASSES[node["class_path"]]
        for value in node.values():
            _rename_classes(value)
    elif isinstance(node, list):
        for value in node:
            _rename_classes(value)


def export_layout(raw: Any, file: Path) -> VocabLayout:
    """The vocabulary layout an export file holds; one that is not a layout is one line naming the file."""
    try:
        return VocabLayout.from_dict(raw)
    except ValueError as err:
        raise ExportError(f"{file}: {err}; {REEXPORT}") from None


def upgrade_export_config(config: dict[str, Any], file: Path) -> dict[str, Any]:
    """The current form of an export's ``unimodal.json``; older formats are upgraded or refused."""
    fmt = config.get("format")
    if fmt == FORMAT:
        return config
    if fmt not in OLD_FORMATS:
        raise ExportError(f"{file}: format {fmt!r} is not {FORMAT!r}; re-export the checkpoint with `unimodal export CKPT --out DIR`")
    config = copy.deepcopy(config)
    spec = config.get("model") or {}
    if str(spec.get("_class_path")).rpartition(".")[2] != OLD_MODEL_CLASS:
        raise ExportError(
            f"{file}: a format-1 export of {spec.get('_class_path')!r} cannot be read; "
            "re-export its checkpoint with `unimodal export CKPT --out DIR`"
        )
    config["model"] = {key: spec[key] for key in MODEL_KEYS if spec.get(key) is not None}
    data = config.pop("data", None) or {}
    layout = export_layout(config.pop("layout"), file)
    config["processor"] = processor_config(config.pop("tokenizer"), layout, data, data.get("codecs") or {})
    _rename_classes(config)
    config["format"] = FORMAT
    return config


def read_export_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"export {path} does not exist")
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a unimodal export directory (no {CONFIG_FILE}); write one with `unimodal export`")
    config = upgrade_export_config(read_json_object(file, REEXPORT), file)
    if "processor" not in config:
        processor_file = path / PROCESSOR_FILE
        if not processor_file.is_file():
            raise ExportError(f"{path} has no {PROCESSOR_FILE}; re-export its checkpoint with `unimodal export CKPT --out DIR`")
        config["processor"] = read_json_object(processor_file, REEXPORT)
    for key, where in (("model", CONFIG_FILE), ("processor", CONFIG_FILE)):
        if not isinstance(config.get(key), dict):
            raise ExportError(f"{path / where} has no '{key}' object; {REEXPORT}")
    lacking = [key for key in ("layout", "tokenizer") if key not in config["processor"]]
    if lacking:
        raise ExportError(f"{path / PROCESSOR_FILE}: no {' or '.join(repr(k) for k in lacking)}; {REEXPORT}")
    check_untrusted({key: value for key, value in config.items() if key != "processor"}, file)
    processor_file = path / PROCESSOR_FILE if (path / PROCESSOR_FILE).is_file() else file
    check_untrusted(config["processor"], processor_file)
    check_settings(config["processor"], processor_file)
    export_layout(config["processor"]["layout"], processor_file)
    without_starting_points(config["model"])  # an export names no starting point; older exports did
    for name, args in codec_dirs(config["processor"].get("codecs")):  # codecs the export carries, as the export's path is written
        if args["path"] == f"{CODECS_DIR}/{name}":
            args["path"] = str(path / args["path"])
    return config


def without_starting_points(model_spec: dict[str, Any]) -> dict[str, Any]:
    """``model_spec`` with its continuous modules' ``init_from`` dropped: an export holds their
    trained weights, so the conversion they started from (``unimodal convert orthus``) is neither
    needed nor, on another machine, there."""
    for spec in (model_spec.get("continuous") or {}).values():
        if isinstance(spec, dict) and isinstance(spec.get("init_args"), dict) and spec["init_args"].get("init_from"):
            spec["init_args"]["init_from"] = None
    return model_spec


def check_untrusted(node: Any, file: Path, what: str = "an export", code_strings: bool = False) -> None:
    """A file someone hands you may name unimodal's own classes only, and local files only (no
    ``pipe:`` command, nothing remote). Inside the specs jsonargparse instantiates (``model``,
    ``codecs``; everywhere when ``code_strings``) a plain ``module.Name`` string counts as a class
    too: jsonargparse imports its module, which runs that module's code (a ``module.py`` in the
    working directory included)."""
    if isinstance(node, dict):
        path = node.get("class_path")
        if path is not None and not (isinstance(path, str) and path.startswith("unimodal.") and _unimodal_or_nothing(path)):
            raise ExportError(f"{file} names the class {path!r}; {what} may name unimodal's own classes only")
        for key, value in node.items():
            if key == "path" and isinstance(value, str) and is_streamed(value):
                raise ExportError(f"{file} names the path {value!r}; {what} may name local files only")
            check_untrusted(value, file, what, code_strings or key in SPEC_KEYS)
    elif isinstance(node, list):
        for value in node:
            check_untrusted(value, file, what, code_strings)
    elif code_strings and isinstance(node, str) and IMPORT_PATH.fullmatch(node) and not _unimodal_or_nothing(node):
        raise ExportError(f"{file} names {node!r}, which would be imported as code; {what} may name unimodal's own classes only")


def _unimodal_or_nothing(path: str) -> bool:
    """Whether importing ``path`` as jsonargparse does finds a class of unimodal's, or nothing: a
    ``unimodal.`` path may lead out through a module's globals (:func:`specs.reached`), and any
    other path whose first name is a module runs that module when imported."""
    if path.startswith("unimodal."):
        found = reached(path)
        return found is None or defined_here(found)
    return not _finds_module(path)


def _finds_module(path: str) -> bool:
    """Whether the first name of the dotted ``path`` is a module import would find (found, not
    run): a file name such as ``head.safetensors`` names none, so nothing could be imported."""
    try:
        return importlib.util.find_spec(path.partition(".")[0]) is not None
    except (ImportError, ValueError):
        return True


def codec_dirs(codecs: dict[str, Any] | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(modality, init_args)`` of every codec spec that names a directory (``init_args.path``)."""
    for name, spec in (codecs or {}).items():
        args = spec.get("init_args") if isinstance(spec, dict) else None
        if args and isinstance(args.get("path"), str):
            yield name, args


def tokenizer_path(path: str | Path) -> Path:
    """The path ``load_tokenizer`` takes for an export's tokenizer."""
    path = Path(path)
    return path / read_export_config(path)["processor"]["tokenizer"]


def check_extends(old: VocabLayout, new: VocabLayout, what: str, reinit: Collection[str] = ()) -> None:
    """A stage may keep the vocabulary or append code ranges; anything else moves existing ids.

    A code range both share must be filled by the same codec (fingerprint): the rows ``what``
    learned mean its codes, and a refit codec's codes mean other media. Ranges in ``reinit`` are
    exempt, as :func:`init_from_export` restarts their rows. Continuous features both use must
    come from the same codec too: another VAE's latents are other media to the feature head."""
    same_prefix = (
        old.text_size == new.text_size
        and old.specials == new.specials
        and list(old.code_ranges.items()) == list(new.code_ranges.items())[: len(old.code_ranges)]
    )
    if not same_prefix:
        raise ExportError(
            f"vocabulary layout of {what} ({old.to_dict()}) is not a prefix of this model's ({new.to_dict()}): "
            "use the same tokenizer and code ranges (new code ranges may only be appended)"
        )
    unknown = sorted(set(reinit) - set(old.code_ranges))
    if unknown:
        raise ExportError(f"reinit_codes names {unknown}, which are not code ranges of {what} ({list(old.code_ranges)})")
    for name, trained in old.code_sources.items():
        mine = new.code_sources.get(name)
        if mine is not None and mine != trained and name not in reinit:
            raise ExportError(
                f"{what} learned its {name} rows on codes of [{describe_fingerprint(trained)}] but this run's {name} codes come "
                f"from [{describe_fingerprint(mine)}]; use the codec {what} was trained with, or restart those rows with "
                f"--model.init_args.reinit_codes=[{name}]"
            )
    for name, trained in old.feature_sources.items():
        mine = new.feature_sources.get(name)
        if mine is not None and mine != trained:
            raise ExportError(
                f"{what} learned its {name} features from [{describe_fingerprint(trained)}] but this run's {name} features come "
                f"from [{describe_fingerprint(mine)}]; use the codec {what} was trained with"
            )


def load_modules(model: nn.Module, path: str | Path, strict: bool = True) -> tuple[list[str], list[str]]:
    """Load an export's ``modules.safetensors`` into ``model`` (a UnifiedModel without LoRA).

    Returns (loaded names, names this model lacks). ``strict``: a name this model lacks is an
    error (a silently dropped module is the mismatch SEED's loader hid with ``strict=False``).
    """
    file = _modules_file(path)
    if file is None:
        return [], []
    try:
        return load_safetensors(model, file, only_module=strict)
    except ValueError as err:
        raise ExportError(f"{err}; {REEXPORT}") from None


def apply_adapter(backbone: nn.Module, path: str | Path, merge: bool) -> nn.Module:
    """The export's backbone adapter applied (and merged when ``merge``), or the backbone unchanged."""
    adapter = Path(path) / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        if read_export_config(path).get("adapter"):  # a copy without its subdirectories: the base model, silently
            raise ExportError(f"{path}: {CONFIG_FILE} names a LoRA adapter in {ADAPTER_DIR}/, and {adapter / 'adapter_config.json'} "
                              "is missing; copy the export whole (cp -r)")
        return backbone
    import pickle

    import peft
    from safetensors import SafetensorError

    try:
        with quiet_peft():
            wrapped = peft.PeftModel.from_pretrained(backbone, str(adapter), is_trainable=False)
    except (KeyError, TypeError, ValueError, pickle.UnpicklingError, SafetensorError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if isinstance(err, pickle.UnpicklingError):  # torch's advice is to load it unsafely
            reason = "a pickle of objects other than tensors, which could run code when loaded"
        raise ExportError(f"{adapter} cannot be read as a peft adapter ({type(err).__name__}: {reason[:200]}); {REEXPORT}") from None
    return merge_backbone_adapter(wrapped) if merge else wrapped


def init_from_export(model: UnifiedModel, path: str | Path, reinit: Collection[str] = ()) -> None:
    """Initialise a new stage's UnifiedModel from an export whose backbone it already loaded.

    Merges the export's adapter, if any, and loads the framework modules the two stages share;
    modules new in this stage keep their initialisation, modules this stage drops are reported.
    The rows of the code ranges in ``reinit`` restart (:func:`restart_code_rows`).
    """
    model.backbone = apply_adapter(model.backbone, path, merge=True)
    loaded, dropped = load_modules(model, path, strict=False)
    for name in reinit:
        restart_code_rows(model, name)
    fresh = sorted({n.split(".")[1] for n, _ in model.named_parameters() if not n.startswith("backbone.")} - {n.split(".")[1] for n in loaded})
    adapter = " with its adapter merged" if (Path(path) / ADAPTER_DIR / "adapter_config.json").is_file() else ""
    log.info("initialised from %s: the backbone%s%s%s%s", path, adapter,
             f" and {len(loaded)} tensors of the other modules" if loaded else "",
             f"; new in this stage: {', '.join(fresh)}" if fresh else "",
             f"; not used by this stage: {', '.join(dropped[:5])}" if dropped else "")


def restart_code_rows(model: UnifiedModel, name: str) -> None:
    """Give the input (and untied output) embedding rows of code range ``name`` a fresh start, as
    added rows start (:func:`~unimodal.models.backbone.start_rows_near_mean` of the text rows). Why:
    after a codec refit the old rows describe other media, and starting from them would teach the
    model its old sounds under new names."""
    layout = model.layout
    start = layout.range_offset(name)
    start_rows_near_mean(model.backbone, start, start + layout.code_ranges[name], reference=layout.text_size)
    log.info("restarted the %d rows of code range %r", layout.code_ranges[name], name)


def _modules_file(path: str | Path) -> Path | None:
    """The export's ``modules.safetensors``; None where its model has no weights outside the backbone."""
    file = Path(path) / MODULES_FILE
    if file.is_file():
        return file
    spec = read_export_config(path)["model"]
    held = [*(spec.get("continuous") or {}), *(["routing"] if spec.get("routing") else [])]
    if held:  # the model would keep fresh weights where the export's trained ones belong
        raise ExportError(f"{path} lacks {MODULES_FILE}, which holds its {', '.join(held)} weights; "
                          "copy the export whole, or export its checkpoint again")
    return None


def _backbone_size(path: Path, key: str) -> int | None:
    """An integer the backbone's ``config.json`` declares, at its top or in its ``text_config``."""
    config = model_config(path, "backbone.path")
    value = config.get(key, (config.get("text_config") or {}).get(key))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _check_declared_modules(path: Path, continuous: dict[str, Callable[[int], ContinuousModality]]) -> None:
    """A model spec declaring far larger modules than ``modules.safetensors`` holds (a diffusion
    head 10**6 wide) would be allocated in full before loading could find the mismatch. The
    modules are built on the meta device first (:func:`built_within`), which allocates nothing and
    stops once they pass :data:`DECLARED_SLACK` times what the file holds."""
    hidden = _backbone_size(path, "hidden_size")
    file = _modules_file(path) if continuous else None
    stored = stored_values([file]) if file is not None else None
    if hidden is None or stored is None:
        return  # nothing to build, or left to the loader, which names the problem in one line
    name = ""

    def build() -> None:
        nonlocal name
        for name, module in continuous.items():
            module(hidden)

    try:
        over = built_within(build, Stored(*(DECLARED_SLACK * n for n in stored)))
    except ValueError as err:  # a setting the module refuses (a schedule of 10**9 steps)
        raise ExportError(f"{path / CONFIG_FILE}: model.continuous.{name}: {err}; {REEXPORT}") from None
    if over is not None:
        raise ExportError(f"{path / CONFIG_FILE}: model.continuous declares modules of at least {over.values:,} values "
                          f"but {MODULES_FILE} holds {stored.values:,}; {REEXPORT}")


def load_exported(path: str | Path, merge_lora: bool = True) -> Exported:
    """Restore an export directory: the unified model (eval, CPU) and its Processor.

    ``build_model`` builds the model from the spec in ``unimodal.json`` (the backbone read from
    ``path``); the framework modules are then loaded strictly. A LoRA adapter is merged unless
    ``merge_lora`` is false (then the backbone is a ``peft.PeftModel``).
    """
    path = Path(path).resolve()
    config = read_export_config(path)
    spec = config["model"]
    processor = Processor.from_json(config["processor"], path)
    layout = processor.layout
    try:
        backbone = BackboneConfig(**{**spec["backbone"], "path": str(path), "config": {}})
    except (KeyError, TypeError) as err:
        raise ExportError(f"{path / CONFIG_FILE}: model.backbone is not a backbone spec ({err}); {REEXPORT}") from None
    rows = _backbone_size(path, "vocab_size")
    if rows is not None and rows != layout.size:  # the backbone would be resized to fit, silently other weights
        raise ExportError(f"{path}: the backbone has {rows} vocabulary rows but its vocabulary layout ({PROCESSOR_FILE}) needs {layout.size}; {REEXPORT}")
    if processor.tokenizer.vocab_size != layout.text_size:
        raise ExportError(f"{path}: the tokenizer has {processor.tokenizer.vocab_size} ids but its vocabulary layout ({PROCESSOR_FILE}) "
                          f"has text_size {layout.text_size}; {REEXPORT}")
    continuous = {
        name: instantiate(factory, Callable[[int], ContinuousModality], f"{path / CONFIG_FILE}: model.continuous.{name}")
        for name, factory in (spec.get("continuous") or {}).items()
    }
    _check_declared_modules(path, continuous)
    model = build_model(backbone, layout, continuous, spec.get("routing"))
    try:
        check_item_slots(dict(model.continuous.items()), processor.codecs)
    except ValueError as err:
        raise ExportError(f"{path}: {err}; {REEXPORT}") from None
    loaded, _ = load_modules(model, path, strict=True)
    expected = {n for n in model.state_dict() if not n.startswith("backbone.")}
    missing = sorted(expected - set(loaded))
    if missing:
        raise ExportError(f"{path / MODULES_FILE} lacks weights of this model: {', '.join(missing[:5])}")
    model.backbone = apply_adapter(model.backbone, path, merge=merge_lora)
    model.requires_grad_(False)
    model.eval()
    return Exported(model, processor, config, path)
