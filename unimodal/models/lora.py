"""LoRA through peft on the backbone and on the framework's own modules.

Why it is shaped this way:

- the backbone is wrapped with ``peft.get_peft_model``, so its adapter is a standard peft
  adapter: ``save_pretrained`` writes what ``peft.PeftModel.from_pretrained`` loads on the
  exported backbone, and ``merge_and_unload`` merges it;
- framework modules (input adapters, diffusion heads, experts outside the HF model) get LoRA
  layers injected in place (``peft.inject_adapter_in_model``); no HF tool would load a peft
  adapter for them, so exports always merge these;
- new vocabulary rows (specials, media code ranges) train through peft's trainable tokens, which
  store only those rows, not whole embedding matrices;
- parameters the trainable policy selected (norms, heads, experts) keep training next to the
  LoRA weights: peft freezes everything it wraps, so their ``requires_grad`` is restored after.
"""

from __future__ import annotations

import difflib
import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from torch import nn

from unimodal.errors import UserError
from unimodal.models.sharding import gathered

log = logging.getLogger("unimodal.train")

# SEED-LLaMA's targets (arXiv 2310.01218): every attention and MLP projection of a Llama block
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRAINABLES_FILE = "trainables.safetensors"


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` whenever it wraps a
    model; the FutureWarning is theirs to fix, so a user does not see it on every run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


@dataclass
class LoraSettings:
    """``model.init_args.lora`` in a recipe (defaults: SEED-LLaMA's r16, alpha 32, dropout 0.05).

    ``target_modules`` are module names: a plain name matches a module whose dotted name ends
    with it (``q_proj``), a pattern with ``*``/``?`` is matched against the full name inside the
    unified model (``backbone.model.layers.*.mlp.up_proj``, ``continuous.image.head.*.linear``).
    ``train_new_tokens`` trains the embedding (and untied output) rows of every id after the
    text tokenizer's: the framework's special tokens and the media code ranges.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    train_new_tokens: bool = False


class LoraTargetError(ValueError):
    pass


def _is_pattern(target: str) -> bool:
    return any(ch in target for ch in "*?[")


def _matches(name: str, target: str) -> bool:
    if _is_pattern(target):
        return fnmatchcase(name, target)
    return name == target or name.endswith("." + target)


def _supported(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D))


def match_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the modules LoRA wraps; a target that matches no supported module is an error."""
    modules = dict(model.named_modules())
    chosen: set[str] = set()
    for target in targets:
        hits = [name for name in modules if name and _matches(name, target)]
        # a target naming a container (a routed projection's experts, an MLP) wraps the layers inside
        inner = [n for hit in hits if not _supported(modules[hit]) for n in modules if n.startswith(hit + ".")]
        usable = [name for name in hits + inner if _supported(modules[name])]
        if not usable:
            if hits:
                kinds = sorted({type(modules[name]).__name__ for name in hits})
                raise LoraTargetError(f"LoRA target {target!r} matches only {', '.join(kinds)} modules; LoRA wraps Linear, Embedding and Conv layers")
            near = difflib.get_close_matches(target, [n.rsplit(".", 1)[-1] for n in modules] + list(modules), n=5, cutoff=0.5)
            hint = f"; near matches: {', '.join(dict.fromkeys(near))}" if near else ""
            raise LoraTargetError(f"LoRA target {target!r} matches no module{hint}")
        chosen.update(usable)
    return sorted(chosen)


def _module_name(root: nn.Module, module: nn.Module | None) -> str | None:
    return next((name for name, m in root.named_modules() if m is module), None)


def _token_indices(backbone: nn.Module, new_ids: list[int]) -> dict[str, list[int]]:
    """peft's ``trainable_token_indices``: the input embedding, and the output one when untied."""
    embed, head = backbone.get_input_embeddings(), backbone.get_output_embeddings()
    if hasattr(embed.weight, "ds_id") and not torch.cuda.is_available():
        raise UserError(
            "LoRA's train_new_tokens under DeepSpeed ZeRO-3 needs CUDA (peft gathers the new rows on the GPU); "
            "on a CPU train with deepspeed_stage_2, fsdp2 or ddp, or without train_new_tokens"
        )
    indices = {_module_name(backbone, embed): list(new_ids)}
    if head is not None and head.weight is not embed.weight:
        indices[_module_name(backbone, head)] = list(new_ids)
    return indices


def apply_lora(model: nn.Module, settings: LoraSettings, new_token_ids: list[int]) -> None:
    """Add LoRA to ``model`` (a UnifiedModel) in place, after the trainable policy has run.

    The backbone becomes a ``peft.PeftModel``; targets outside it get injected LoRA layers.
    """
    import peft

    keep = [p for p in model.parameters() if p.requires_grad]
    names = match_targets(model, settings.target_modules)
    inside = [n[len("backbone.") :] for n in names if n.startswith("backbone.")]
    outside = [n for n in names if not n.startswith("backbone.")]
    options = {"r": settings.r, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout, "bias": "none"}
    if outside:
        peft.inject_adapter_in_model(peft.LoraConfig(target_modules=outside, **options), model)
    tokens = _token_indices(model.backbone, new_token_ids) if settings.train_new_tokens and new_token_ids else None
    if inside:
        config = peft.LoraConfig(target_modules=inside, trainable_token_indices=tokens, **options)
        with quiet_peft():
            model.backbone = peft.get_peft_model(model.backbone, config)
    elif tokens:  # no LoRA layer in the backbone, only its new rows
        config = peft.TrainableTokensConfig(target_modules=list(tokens), token_indices=list(new_token_ids))
        with quiet_peft():
            model.backbone = peft.get_peft_model(model.backbone, config)
    for param in keep:  # peft froze what it wrapped; the policy's choices stand
        param.requires_grad_(True)
    _initialise_partitioned_lora(model)
    log.info(
        "LoRA r=%d on %d modules (%d in the backbone)%s", settings.r, len(names), len(inside),
        f", {len(new_token_ids)} new token rows trainable" if settings.train_new_tokens else "",
    )


def _initialise_partitioned_lora(model: nn.Module) -> None:
    """peft initialises LoRA's A and B as soon as it makes them, which under ZeRO-3's zero.Init is
    on empty partitions: redo it on the gathered weights, so that B is zero and the wrapped model
    starts as the model it wraps."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        params = [p for name, p in module.named_parameters() if is_lora_param(name)]
        if any(hasattr(p, "ds_id") for p in params):
            with gathered(params, modifier_rank=0):
                for adapter in module.lora_A:
                    module.reset_lora_parameters(adapter, True)


def is_lora_param(name: str) -> bool:
    return "lora_" in name or "trainable_tokens_delta" in name


def merge_injected(model: nn.Module) -> int:
    """Merge and remove the LoRA layers injected outside a PeftModel; returns how many."""
    from peft.tuners.lora import LoraLayer

    in_backbone = {id(m) for m in model.backbone.modules()} if has_backbone_adapter(model) else set()
    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer) and id(module) not in in_backbone:
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
            merged += 1
    return merged


def merge_backbone_adapter(backbone: nn.Module) -> nn.Module:
    """The peft-wrapped ``backbone`` with its adapter merged and removed. A LoRA on a routed
    projection (LlamaFusion's ``q_proj``) wraps the whole routed module, so in training its update
    reaches every modality's positions; peft merges it into the text weights only, so it is added
    to every other expert's weights too, or the merged model would differ from the trained one."""
    from peft.tuners.lora import LoraLayer

    from unimodal.models.routing import Routed

    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), Routed) and not module.merged:
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        delta = module.get_delta_weight(adapter)
                        for expert in module.get_base_layer().experts.values():
                            expert.weight += delta.to(expert.weight.dtype)
    return backbone.merge_and_unload()


def has_backbone_adapter(model: nn.Module) -> bool:
    import peft

    return isinstance(getattr(model, "backbone", None), peft.PeftModel)


def save_adapter(model: nn.Module, out_dir: str | Path) -> Path:
    """Write the backbone's peft adapter plus every other trainable parameter next to it.

    ``adapter_config.json`` + ``adapter_model.safetensors`` load with
    ``peft.PeftModel.from_pretrained(backbone, out_dir)``; ``trainables.safetensors`` holds the
    non-LoRA trainables (norms, heads, adapters, experts, framework-module LoRA) under the
    unified model's names, so adapter + trainables + the base weights give the trained model.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if has_backbone_adapter(model):
        model.backbone.save_pretrained(str(out))
    backbone_lora = {id(p) for n, p in model.backbone.named_parameters() if is_lora_param(n)} if has_backbone_adapter(model) else set()
    trainables = {
        name.replace("backbone.base_model.model.", "backbone."): param.detach().contiguous().cpu()
        for name, param in model.named_parameters()
        if param.requires_grad and id(param) not in backbone_lora
    }
    save_file(trainables, str(out / TRAINABLES_FILE))
    return out
