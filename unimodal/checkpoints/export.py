"""Writing an export directory (layout: ``unimodal.checkpoints.load``) from a built UnifiedModel.

A directory is written under a temporary name and renamed when complete, so a crash never leaves
half an export under the final name. Checkpoints are turned into models by
``unimodal.training.exporting``, which calls :func:`write_export`.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unimodal.checkpoints.files import DEEPSPEED_TAG_FILE, newest_readable_checkpoint
from unimodal.checkpoints.fsdp import fsdp_to_file, is_fsdp_checkpoint
from unimodal.checkpoints.load import (
    ADAPTER_DIR,
    CODECS_DIR,
    CONFIG_FILE,
    FORMAT,
    MODEL_KEYS,
    MODULES_FILE,
    SP_TOKENIZER,
    ExportError,
    codec_dirs,
    read_export_config,
    without_starting_points,
)
from unimodal.checkpoints.zero import zero_to_fp32
from unimodal.data.datamodule import shard_sets, training_mixture
from unimodal.data.processor import PROCESSOR_FILE, processor_config
from unimodal.data.shards import absolute_spec, is_streamed
from unimodal.errors import UserError
from unimodal.modalities.base import no_weights_bar
from unimodal.models.backbone import causal_lm_from_config
from unimodal.models.lora import has_backbone_adapter, merge_backbone_adapter, merge_injected, save_adapter
from unimodal.models.unified import UnifiedModel
from unimodal.schema import local_path

log = logging.getLogger("unimodal.export")

# a codec directory up to this size travels inside the export; a larger one (a VAE, a full
# Chameleon checkpoint) is named by its absolute path
COPY_CODEC_MB = 64


def _safetensors_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; tensors sharing storage are cloned (safetensors refuses aliases)."""
    out, seen = {}, set()
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def _copy_tokenizer(source: str, out: Path) -> str:
    src = Path(local_path(source))
    if src.is_file():
        shutil.copyfile(src, out / SP_TOKENIZER)
        return SP_TOKENIZER
    if src.is_dir():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(src), local_files_only=True, trust_remote_code=False).save_pretrained(str(out))
        return "."
    raise FileNotFoundError(f"the run's tokenizer {source} no longer exists; export needs it")


def _export_codecs(codecs: dict[str, Any], out: Path) -> dict[str, Any]:
    """The codec specs for ``unimodal.json``. A codec named by a directory (``init_args.path``, a
    ``builtin:`` one included) is copied into ``out/codecs/MODALITY`` when it is small, so that the
    export loads from anywhere (from another working directory a ``builtin:`` path would build the
    world anew there); a larger one is named by its absolute path."""
    specs = copy.deepcopy(codecs)
    for name, args in codec_dirs(specs):
        source = Path(local_path(args["path"])).resolve()
        if source.is_dir() and sum(f.stat().st_size for f in source.rglob("*") if f.is_file()) <= COPY_CODEC_MB * 2**20:
            shutil.copytree(source, out / CODECS_DIR / name)
            args["path"] = f"{CODECS_DIR}/{name}"
        else:
            args["path"] = str(source)
    return specs


def _vanilla_keys(backbone: nn.Module) -> set[str]:
    """Parameter names of the plain HF model of this config: what ``model.safetensors`` holds."""
    with torch.device("meta"):
        plain = causal_lm_from_config(backbone.config)
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


def checkpoint_file(ckpt: Path, scratch: Path, trust: bool = False) -> Path:
    """A single-file Lightning checkpoint for ``ckpt`` (DeepSpeed and FSDP directories are merged
    first, which ``trust`` must allow: ``checkpoints.zero``, ``checkpoints.fsdp``)."""
    if ckpt.is_dir() and (ckpt / DEEPSPEED_TAG_FILE).is_file():
        return zero_to_fp32(ckpt, scratch / "merged.ckpt", trust=trust)
    if is_fsdp_checkpoint(ckpt):
        return fsdp_to_file(ckpt, scratch / "merged.ckpt", trust=trust)
    if (ckpt / CONFIG_FILE).is_file():
        raise UserError(f"{ckpt} is already an export ({CONFIG_FILE}); export takes the run directory or checkpoint it came from")
    if ckpt.is_dir():
        found = newest_readable_checkpoint(ckpt / "checkpoints", "export") or newest_readable_checkpoint(ckpt, "export")
        if found is None:
            raise FileNotFoundError(f"{ckpt} holds no checkpoint (a .ckpt file, a DeepSpeed or FSDP checkpoint directory, or a run directory)")
        return checkpoint_file(found, scratch, trust)
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    if not ckpt.is_file():  # a FIFO, a device, a socket
        raise UserError(f"checkpoint {ckpt} is not a regular file; give a .ckpt file, a checkpoint directory or a run directory")
    return ckpt


def training_record(data: dict[str, Any], init_from: str | None = None) -> dict[str, Any] | None:
    """What the model was trained on, for a fine-tune to replay (``docs/finetune.md``): the run's
    training mixture (its replayed data included, so the record covers every earlier stage) and
    its validation sets, as absolute paths, after those of the export it started from
    (``init_from``), so that the next fine-tune's report still scores the older tasks. None when
    the run read no shard sets.

    Streamed data (``pipe:`` commands, URLs) is left out, with a warning: an export names local
    files only, so that fine-tuning one never runs or fetches what its record names."""
    if not data.get("datasets"):
        return None
    mixture = training_mixture(data["datasets"], data.get("replay"), float(data.get("replay_weight") or 0.0))
    earlier = []
    if init_from and (Path(init_from) / CONFIG_FILE).is_file():
        earlier = (read_export_config(init_from).get("training_data") or {}).get("val_datasets") or []
    validation = shard_sets(data.get("val_datasets"))
    streamed = [d.path for d in [*mixture, *validation] if is_streamed(d.path)]
    if streamed:
        log.warning("the export's record of its training data leaves out the streamed shard sets %s (an export names "
                    "local files only); a fine-tune replays them only if named with --data.init_args.replay", ", ".join(streamed))
    own = [{"path": absolute_spec(d.path), "weight": d.weight} for d in validation if not is_streamed(d.path)]
    val = list({d["path"]: d for d in [*earlier, *own]}.values())
    kept = [{"path": absolute_spec(d.path), "weight": round(d.weight, 6)} for d in mixture if not is_streamed(d.path)]
    return {"datasets": kept, "val_datasets": val}


def write_export(
    model: UnifiedModel,
    out: Path,
    *,
    spec: dict[str, Any],
    data: dict[str, Any],
    merge_lora: bool,
    lora: Any = None,
    generation: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
) -> None:
    """Write ``model`` to the (empty) directory ``out``. ``spec``: the model's build arguments
    (``MODEL_KEYS``); ``data``: the run's data-module arguments, which name its ``tokenizer``."""
    from safetensors.torch import save_file

    injected = merge_injected(model)
    adapter = None
    if has_backbone_adapter(model):
        if merge_lora:
            model.backbone = merge_backbone_adapter(model.backbone)
        else:
            adapter = ADAPTER_DIR
            save_adapter(model, out / ADAPTER_DIR)
            model.backbone = model.backbone.unload()
    elif merge_lora and not injected:
        log.warning("--merge_lora: this run trained no LoRA adapter, so there is nothing to merge")
    backbone = model.backbone
    vanilla = _vanilla_keys(backbone)
    plain = _plain_state(backbone.state_dict(), vanilla)
    with no_weights_bar():
        backbone.save_pretrained(str(out), state_dict=plain)
    modules = {k: v for k, v in model.state_dict().items() if not (k.startswith("backbone.") and k[len("backbone.") :] in vanilla)}
    if modules:
        save_file(_safetensors_state(modules), str(out / MODULES_FILE))
    if not data.get("tokenizer"):
        raise ExportError("the run's data module names no tokenizer (data.init_args.tokenizer); export needs one")
    model_spec = without_starting_points({key: _plain(spec[key]) for key in MODEL_KEYS if spec.get(key) is not None})
    model_spec["backbone"] = {**model_spec["backbone"], "path": ".", "config": {}}
    codecs = _export_codecs(_plain(data["codecs"]), out) if data.get("codecs") else {}
    processor = processor_config(_copy_tokenizer(data["tokenizer"], out), model.layout, _plain(data), codecs)
    (out / PROCESSOR_FILE).write_text(json.dumps(processor, indent=2) + "\n")
    config = {
        "format": FORMAT,
        "model": model_spec,
        "adapter": adapter,
        "lora": _plain(lora) if adapter else None,
        "generation": _plain(generation),
        "source": source or {},
        "training_data": training_record(_plain(data), spec.get("init_from")),
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str) + "\n")
