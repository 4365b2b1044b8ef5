"""Modality experts (LlamaFusion / Mixture-of-Transformers) on a Llama-family HF decoder.

Each decoder layer keeps its own code; only its position-wise parts become :class:`Routed`,
sending each position to the expert of its modality: ``input_layernorm``,
``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm``, ``mlp`` (and Gemma's pre/post
feed-forward norms), and the decoder's final ``norm``; per-head norms (Qwen 3's ``q_norm`` and
``k_norm``) stay shared. Attention itself (rotary, the mask, the KV cache) stays the layer's, so
it is shared over the whole sequence, as in LlamaFusion. The text expert is the original module under its
original name (``...q_proj.weight``), so the backbone still saves and loads as a plain HF model;
the other experts are copies of it under ``...q_proj.experts.<modality>``.

Which expert a position uses comes from :class:`ModalityRouter`: ``router.set(modality_ids)``
before every decoder call (``UnifiedModel`` does it from ``batch.modality_ids``; an inference
engine passes the ids of the positions it feeds). The ids stay set until the next call, so
activation checkpointing that recomputes a layer during backward routes it the same way.
Modalities without an expert go to the text expert.

Every expert runs on every call, on its (possibly empty) set of positions, so DeepSpeed ZeRO-3
ranks always gather the same parameters in the same order.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from unimodal.models.sharding import gathered
from unimodal.schema import MODALITY_IDS

ROUTED = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "post_attention_layernorm", "mlp")
# position-wise norms some Llama-like layers add (Gemma 2/3 around the MLP), routed where present
ROUTED_IF_PRESENT = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


class ModalityRouter:
    """Holds the modality id of every position of the current decoder call (not a module)."""

    def __init__(self, modalities: list[str]):
        unknown = [m for m in modalities if m not in MODALITY_IDS]
        if unknown:
            raise ValueError(f"routing: unknown modalities {unknown}; known: {list(MODALITY_IDS)}")
        self.modalities = ["text"] + [m for m in modalities if m != "text"]
        self.ids: torch.Tensor | None = None

    def set(self, modality_ids: torch.Tensor) -> None:
        self.ids = modality_ids

    def rows(self, shape: torch.Size) -> dict[str, torch.Tensor]:
        """Flat row indices of each expert for an input of leading shape ``shape``."""
        if self.ids is None or self.ids.shape != shape:
            got = None if self.ids is None else tuple(self.ids.shape)
            raise RuntimeError(
                f"modality routing: the decoder input has positions {tuple(shape)} but the router holds ids "
                f"of shape {got}; call router.set(modality_ids) before each decoder call"
            )
        flat = self.ids.reshape(-1)
        others = torch.ones_like(flat, dtype=torch.bool)
        out = {}
        for name in self.modalities[1:]:
            mask = flat == MODALITY_IDS[name]
            others &= ~mask
            out[name] = mask.nonzero()[:, 0]
        out["text"] = others.nonzero()[:, 0]
        return out


class Routed(nn.Module):
    """Mixin for a position-wise module whose positions go to their modality's expert.

    :func:`route` turns a module into an instance of a subclass of its own class with this mixin
    first, so the text weights keep their names and their forward (``super().forward``); the
    other modalities' copies live in ``experts``.
    """

    experts: nn.ModuleDict
    _router: list[ModalityRouter]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._router[0].rows(x.shape[:-1])
        flat = x.reshape(-1, x.shape[-1])
        out = None
        for name in self._router[0].modalities:
            expert = super().forward if name == "text" else self.experts[name]
            y = expert(flat[rows[name]])
            if out is None:
                out = y.new_zeros(flat.shape[0], y.shape[-1])
            out = out.index_put((rows[name],), y)
        return out.reshape(*x.shape[:-1], out.shape[-1])


_ROUTED_CLASSES: dict[type, type] = {}


def route(module: nn.Module, router: ModalityRouter) -> None:
    """Give ``module`` (in place) one expert per routed modality, each a copy of it."""
    if isinstance(module, Routed):
        raise ValueError(f"{type(module).__name__} is already routed")
    experts = nn.ModuleDict({name: _clone(module) for name in router.modalities if name != "text"})
    cls = type(module)
    if cls not in _ROUTED_CLASSES:
        _ROUTED_CLASSES[cls] = type(f"Routed{cls.__name__}", (Routed, cls), {"__module__": __name__})
    module.__class__ = _ROUTED_CLASSES[cls]
    module.experts = experts
    module._router = [router]  # a list: keeps the router out of the module tree


def _clone(module: nn.Module) -> nn.Module:
    """A copy with the same weights. Under ZeRO-3 ``zero.Init`` the weights are partitioned: they
    are gathered for the copy, whose plain parameters DeepSpeed partitions when its engine starts."""
    with gathered(module.parameters()):
        return copy.deepcopy(module)


def add_modality_experts(backbone: nn.Module, modalities: list[str]) -> ModalityRouter:
    """Route every decoder layer of ``backbone`` (in place); return the router to set ids on.

    New experts are copies of the text modules, so call this on the loaded (pretrained) backbone
    before DeepSpeed wraps it (``UnimodalModule.configure_model`` does).
    """
    router = ModalityRouter(modalities)
    decoder = backbone.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None or not hasattr(decoder, "norm"):
        raise ValueError(f"modality routing needs a Llama-family decoder with .layers and .norm, got {type(decoder).__name__}")
    for layer in layers:
        for dotted in ROUTED:
            try:
                target = layer.get_submodule(dotted)
            except AttributeError:
                raise ValueError(f"modality routing: {type(layer).__name__} has no {dotted} (not a Llama-family layer)") from None
            route(target, router)
        for dotted in ROUTED_IF_PRESENT:
            if hasattr(layer, dotted):
                route(layer.get_submodule(dotted), router)
    route(decoder.norm, router)
    return router
