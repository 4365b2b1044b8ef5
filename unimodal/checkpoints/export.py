"""Export a training checkpoint to an HF-style directory, and load one back.

An export directory::

    config.json, model.safetensors   the backbone as transformers saves it: AutoModelForCausalLM
                                     .from_pretrained(DIR) loads it as it is
    modules.safetensors              every other weight of the unified model (input adapters,
                                     heads, experts), under the unified model's names
    tokenizer.model | tokenizer*     the text tokenizer (SentencePiece file or HF tokenizer files)
    adapter/                         only for LoRA runs exported without --merge-lora: a peft
                                     adapter (PeftModel.from_pretrained(backbone, DIR/adapter))
                                     and trainables.safetensors beside it
    codecs/MODALITY/                 a copy of each small codec directory the run named by path
    unimodal.json                    the unimodal config: the model's init arguments (modalities,
                                     heads, vocabulary layout), the data-side settings a model
                                     needs at inference (tokenizer, chat template, codecs)

Why: the backbone stays usable by any HF tool, while the framework's own modules and the
vocabulary layout travel with it so that :func:`load_exported` restores the whole model. LoRA
on framework modules is always merged (no HF tool would read such an adapter).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unimodal.modalities.vocab import VocabLayout

log = logging.getLogger("unimodal.export")

FORMAT = "unimodal.export/1"
CONFIG_FILE = "unimodal.json"
MODULES_FILE = "modules.safetensors"
ADAPTER_DIR = "adapter"
SP_TOKENIZER = "tokenizer.model"
CODECS_DIR = "codecs"
# a codec directory up to this size travels inside the export; a larger one (a VAE, a full
# Chameleon checkpoint) is named by its absolute path
COPY_CODEC_MB = 64
# the checkpoint key under which ``unimodal train`` stores the run's resolved config
RUN_CONFIG_KEY = "unimodal_run_config"
# data-module settings a model needs outside training (the rest describes training data)
DATA_KEYS = ("chat_template", "codecs", "feature_dim", "bidirectional", "code_ranges", "code_layers", "input_layers", "seq_len")


class ExportError(ValueError):
    pass


@dataclass
class Exported:
    """What :func:`load_exported` restores: everything needed to run the model."""

    model: nn.Module  # UnifiedModel, eval mode, on CPU
    tokenizer: Any  # TextTokenizer
    layout: VocabLayout
    config: dict[str, Any]  # the directory's unimodal.json
    codecs: dict[str, Any] = field(default_factory=dict)  # modality -> MediaCodec
    path: Path | None = None


# ----------------------------------------------------------------------------------------------
# reading an export


def read_export_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a unimodal export directory (no {CONFIG_FILE}); write one with `unimodal export`")
    config = json.loads(file.read_text())
    if config.get("format") != FORMAT:
        raise ExportError(f"{file}: format {config.get('format')!r} is not {FORMAT!r}")
    for name, args in _codec_dirs(config.get("data", {}).get("codecs")):  # codecs the export carries
        if args["path"] == f"{CODECS_DIR}/{name}":
            args["path"] = str((path / args["path"]).resolve())
    return config


def _codec_dirs(codecs: dict[str, Any] | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(modality, init_args)`` of every codec spec that names a directory (``init_args.path``)."""
    for name, spec in (codecs or {}).items():
        args = spec.get("init_args") if isinstance(spec, dict) else None
        if args and isinstance(args.get("path"), str):
            yield name, args


def tokenizer_path(path: str | Path) -> Path:
    """The path ``load_tokenizer`` takes for an export's tokenizer."""
    path = Path(path)
    return path / read_export_config(path)["tokenizer"]


def check_extends(old: VocabLayout, new: VocabLayout, what: str) -> None:
    """A stage may keep the vocabulary or append code ranges; anything else moves existing ids."""
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


def _safetensors_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; tensors sharing storage are cloned (safetensors refuses aliases)."""
    out, seen = {}, set()
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def load_modules(model: nn.Module, path: str | Path, strict: bool = True) -> tuple[list[str], list[str]]:
    """Load an export's ``modules.safetensors`` into ``model`` (a UnifiedModel without LoRA).

    Returns (loaded names, names this model lacks). ``strict``: a name this model lacks is an
    error (a silently dropped module is the mismatch SEED's loader hid with ``strict=False``).
    """
    from safetensors.torch import load_file

    file = Path(path) / MODULES_FILE
    if not file.is_file():
        return [], []
    state = load_file(str(file))
    with _gathered([p for n, p in model.named_parameters() if n in state]):
        own = model.state_dict()
        unexpected = [name for name in state if name not in own]
        if unexpected and strict:
            raise ExportError(f"{file} holds weights this model has no place for: {', '.join(unexpected[:5])}")
        for name, tensor in state.items():
            if name in own and own[name].shape != tensor.shape:
                raise ExportError(f"{file}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(own[name].shape)}")
        usable = {name: tensor for name, tensor in state.items() if name in own}
        model.load_state_dict(usable, strict=False)
    return sorted(usable), unexpected


def _gathered(params: list[nn.Parameter]) -> Any:
    """Under DeepSpeed ZeRO-3 (parameters partitioned at construction), gather ``params`` while
    they are loaded; rank 0's values are kept. Elsewhere a no-op."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)


def apply_adapter(backbone: nn.Module, path: str | Path, merge: bool) -> nn.Module:
    """The export's backbone adapter applied (and merged when ``merge``), or the backbone unchanged."""
    adapter = Path(path) / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        return backbone
    import peft

    wrapped = peft.PeftModel.from_pretrained(backbone, str(adapter), is_trainable=False)
    return wrapped.merge_and_unload() if merge else wrapped


def init_from_export(model: nn.Module, path: str | Path) -> None:
    """Initialise a new stage's UnifiedModel from an export whose backbone it already loaded.

    Merges the export's adapter, if any, and loads the framework modules the two stages share;
    modules new in this stage keep their initialisation, modules this stage drops are reported.
    """
    model.backbone = apply_adapter(model.backbone, path, merge=True)
    loaded, dropped = load_modules(model, path, strict=False)
    fresh = sorted({n.split(".")[1] for n, _ in model.named_parameters() if not n.startswith("backbone.")} - {n.split(".")[1] for n in loaded})
    log.info("initialised from %s: %d module tensors loaded%s%s", path, len(loaded),
             f"; new in this stage: {', '.join(fresh)}" if fresh else "",
             f"; not used by this stage: {', '.join(dropped[:5])}" if dropped else "")


def _instantiate(spec: dict[str, Any], cls: type) -> Any:
    """Build from ``{class_path, init_args}`` as LightningCLI would (jsonargparse)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--value", type=cls)
    return parser.instantiate_classes(parser.parse_object({"value": spec})).value


def load_exported(path: str | Path, merge_lora: bool = True) -> Exported:
    """Restore an export directory: the unified model (eval, CPU), tokenizer, layout, codecs.

    The model class in ``unimodal.json`` builds the model as in training (its ``configure_model``,
    with the backbone read from ``path``); the framework modules are then loaded strictly. A LoRA
    adapter is merged unless ``merge_lora`` is false (then the backbone is a ``peft.PeftModel``).
    """
    from lightning.pytorch import LightningModule
    from lightning.pytorch.cli import instantiate_module

    from unimodal.data.tokenizer import load_tokenizer
    from unimodal.modalities.base import MediaCodec

    path = Path(path).resolve()
    config = read_export_config(path)
    spec = json.loads(json.dumps(config["model"]))
    spec["backbone"] = {**spec["backbone"], "path": str(path), "config": {}}
    module = instantiate_module(LightningModule, spec)
    module.configure_model()
    model = module.model
    loaded, _ = load_modules(model, path, strict=True)
    expected = {n for n in model.state_dict() if not n.startswith("backbone.")}
    missing = sorted(expected - set(loaded))
    if missing:
        raise ExportError(f"{path / MODULES_FILE} lacks weights of this model: {', '.join(missing[:5])}")
    model.backbone = apply_adapter(model.backbone, path, merge=merge_lora)
    model.requires_grad_(False)
    model.eval()
    codecs = {name: _instantiate(codec, MediaCodec) for name, codec in (config["data"].get("codecs") or {}).items()}
    layout = VocabLayout.from_dict(config["layout"])
    return Exported(model, load_tokenizer(path / config["tokenizer"]), layout, config, codecs, path)


# ----------------------------------------------------------------------------------------------
# writing an export


def _copy_tokenizer(source: str, out: Path) -> str:
    from unimodal.worlds import builtin

    src = Path(builtin.resolve(source))
    if src.is_file():
        shutil.copyfile(src, out / SP_TOKENIZER)
        return SP_TOKENIZER
    if src.is_dir():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(src), local_files_only=True).save_pretrained(str(out))
        return "."
    raise FileNotFoundError(f"the run's tokenizer {source} no longer exists; export needs it")


def _export_codecs(codecs: dict[str, Any], out: Path) -> dict[str, Any]:
    """The codec specs for ``unimodal.json``. A codec named by a directory (``init_args.path``, a
    ``builtin:`` one included) is copied into ``out/codecs/MODALITY`` when it is small, so that the
    export loads from anywhere (from another working directory a ``builtin:`` path would build the
    world anew there); a larger one is named by its absolute path."""
    from unimodal.worlds import builtin

    specs = copy.deepcopy(codecs)
    for name, args in _codec_dirs(specs):
        source = Path(builtin.resolve(args["path"])).resolve()
        if source.is_dir() and sum(f.stat().st_size for f in source.rglob("*") if f.is_file()) <= COPY_CODEC_MB * 2**20:
            shutil.copytree(source, out / CODECS_DIR / name)
            args["path"] = f"{CODECS_DIR}/{name}"
        else:
            args["path"] = str(source)
    return specs


def _vanilla_keys(backbone: nn.Module) -> set[str]:
    """Parameter names of the plain HF model of this config: what ``model.safetensors`` holds."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(backbone.config)
    return set(plain.state_dict())


def _plain_state(state: dict[str, torch.Tensor], vanilla: set[str]) -> dict[str, torch.Tensor]:
    """The backbone's weights under the plain HF names; a routed module's text expert is the
    original module (``unimodal.models.routing``), so ``X.experts.text.Y`` is saved as ``X.Y``."""
    plain = {}
    for name, tensor in state.items():
        name = name if name in vanilla else name.replace(".experts.text.", ".")
        if name in vanilla:
            plain[name] = tensor
    missing = sorted(vanilla - set(plain))
    if missing:
        raise ExportError(f"the backbone has no weights for {', '.join(missing[:5])}: cannot write a plain HF model")
    return plain


def _plain(value: Any) -> Any:
    """JSON-ready values: LightningCLI keeps ``class_path`` specs as jsonargparse Namespaces."""
    from jsonargparse import Namespace

    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _read_checkpoint(ckpt: Path, scratch: Path) -> Path:
    """A single-file Lightning checkpoint for ``ckpt`` (DeepSpeed directories are merged first)."""
    if ckpt.is_dir() and (ckpt / "latest").is_file():
        from unimodal.checkpoints.zero import zero_to_fp32

        return zero_to_fp32(ckpt, scratch / "merged.ckpt")
    if ckpt.is_dir():
        from unimodal.training.resume import find_latest_checkpoint

        found = find_latest_checkpoint(ckpt / "checkpoints") or find_latest_checkpoint(ckpt)
        if found is None:
            raise FileNotFoundError(f"{ckpt} holds no checkpoint (a .ckpt file, a DeepSpeed checkpoint directory or a run directory)")
        return _read_checkpoint(found, scratch)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    return ckpt


def export(ckpt: str | Path, out_dir: str | Path, merge_lora: bool = False, replace: bool = False) -> Path:
    """Write the export directory of a checkpoint: a ``.ckpt`` file, a DeepSpeed checkpoint
    directory, or a run directory (its newest checkpoint). Returns ``out_dir``.

    The directory is written under a temporary name and renamed when complete; ``replace``
    allows replacing an existing one.
    """
    out = Path(out_dir)
    if not replace and out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; export to a new directory")
    with tempfile.TemporaryDirectory(prefix="unimodal-export-") as scratch:
        file = _read_checkpoint(Path(ckpt), Path(scratch))
        checkpoint = torch.load(file, map_location="cpu", weights_only=False, mmap=True)
        run_config = checkpoint.get(RUN_CONFIG_KEY)
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        if run_config is None or "_class_path" not in hparams:
            raise ExportError(f"{file} has no run config: export reads checkpoints written by `unimodal train`")
        module = _module_from_checkpoint(checkpoint, hparams)
        step = int(checkpoint.get("global_step", 0))
        del checkpoint
        staging = out.with_name(f".{out.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if hasattr(module, "export_pretrained"):  # a module with its own format (e.g. a media tokenizer)
            module.export_pretrained(staging)
        else:
            _export_unified(module, hparams, run_config, staging, merge_lora, {"checkpoint": str(ckpt), "global_step": step})
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    log.info("exported %s to %s", ckpt, out)
    return out


def _module_from_checkpoint(checkpoint: dict[str, Any], hparams: dict[str, Any]) -> Any:
    """The trained LightningModule, built as LightningCLI built it, with the checkpoint's weights."""
    from lightning.pytorch import LightningModule
    from lightning.pytorch.cli import instantiate_module

    spec = {k: v for k, v in hparams.items() if k != "_instantiator"}
    source = spec.get("init_from")
    if source and not Path(source).is_dir():  # it defines the architecture the weights fit
        raise ExportError(f"the checkpoint's model was initialised from {source}, which no longer exists; export needs it")
    module = instantiate_module(LightningModule, spec)
    if hasattr(module, "configure_model"):
        module.configure_model()
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    module.eval()
    return module


def _export_unified(module: Any, hparams: dict, run_config: dict, out: Path, merge_lora: bool, source: dict) -> None:
    from safetensors.torch import save_file

    from unimodal.models.lora import has_backbone_adapter, merge_injected, save_adapter

    model = module.model
    merge_injected(model)
    lora = hparams.get("lora")
    adapter = None
    if has_backbone_adapter(model):
        if merge_lora:
            model.backbone = model.backbone.merge_and_unload()
        else:
            adapter = ADAPTER_DIR
            save_adapter(model, out / ADAPTER_DIR)
            model.backbone = model.backbone.unload()
    backbone = model.backbone
    vanilla = _vanilla_keys(backbone)
    plain = _plain_state(backbone.state_dict(), vanilla)
    backbone.save_pretrained(str(out), state_dict=plain)
    modules = {k: v for k, v in model.state_dict().items() if not (k.startswith("backbone.") and k[len("backbone.") :] in vanilla)}
    if modules:
        save_file(_safetensors_state(modules), str(out / MODULES_FILE))
    data_args = (run_config.get("data") or {}).get("init_args") or {}
    if not data_args.get("tokenizer"):
        raise ExportError("the run's data module names no tokenizer (data.init_args.tokenizer); export needs one")
    spec = {k: _plain(v) for k, v in hparams.items() if k not in ("_instantiator",)}
    spec.update({"init_from": None, "lora": None, "trainable": None, "frozen": None})
    spec = {k: v for k, v in spec.items() if k in hparams or v is not None}
    spec["backbone"] = {**spec["backbone"], "path": ".", "config": {}}
    generation = spec.pop("generation", None)  # the Assistant's defaults, not a build argument
    config = {
        "format": FORMAT,
        "model": spec,
        "layout": module.layout.to_dict(),
        "tokenizer": _copy_tokenizer(data_args["tokenizer"], out),
        "data": {k: _plain(data_args[k]) for k in DATA_KEYS if k in data_args and k != "codecs"},
        "adapter": adapter,
        "lora": lora if adapter else None,
        "generation": generation,
        "source": source,
    }
    if data_args.get("codecs"):
        config["data"]["codecs"] = _export_codecs(_plain(data_args["codecs"]), out)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str) + "\n")
