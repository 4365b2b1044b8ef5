"""Attention masks for packed multimodal sequences, and the attention backends.

The mask is the single place where the packing contract is enforced: a position attends to
earlier positions of its own document, and to every position of its own bidirectional block
(a Transfusion-style image). Backends: PyTorch SDPA with that explicit mask (CPU and GPU), and
xformers' memory-efficient kernel with the same mask as an additive bias (CUDA only).
"""

from __future__ import annotations

import importlib.util

import torch
from transformers import AttentionInterface

BACKENDS = ("auto", "sdpa", "xformers", "eager")
XFORMERS_IMPLEMENTATION = "unimodal_xformers"


def build_attention_mask(doc_ids: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, 1, L, L]`` mask, True where query ``i`` may attend to key ``j``.

    Padding (doc id 0) attends only to itself so that no row is empty (an all-masked row gives
    NaN in SDPA).
    """
    length = doc_ids.shape[1]
    idx = torch.arange(length, device=doc_ids.device)
    causal = idx[None, :, None] >= idx[None, None, :]
    same_doc = (doc_ids[:, :, None] == doc_ids[:, None, :]) & (doc_ids[:, :, None] > 0)
    same_block = (block_ids[:, :, None] == block_ids[:, None, :]) & (block_ids[:, :, None] >= 0)
    allowed = same_doc & (causal | same_block)
    allowed |= torch.eye(length, dtype=torch.bool, device=doc_ids.device)[None]
    return allowed[:, None]


def xformers_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("xformers") is not None


def resolve_backend(name: str) -> str:
    """Map a config value to a transformers ``attn_implementation``; ``auto`` takes the best available."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {BACKENDS}")
    if name == "auto":
        name = "xformers" if xformers_available() else "sdpa"
    if name == "xformers":
        if not xformers_available():
            raise RuntimeError("attention backend 'xformers' needs CUDA and the xformers package (pip install 'unimodal[gpu]')")
        AttentionInterface.register(XFORMERS_IMPLEMENTATION, xformers_attention_forward)
        return XFORMERS_IMPLEMENTATION
    return name


def xformers_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function backed by ``xformers.ops.memory_efficient_attention``.

    Inputs are ``[B, H, L, D]``; xformers wants ``[B, L, H, D]`` and an additive float bias whose
    last dimension is padded to a multiple of 8.
    """
    import xformers.ops as xops

    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    bias = None
    if attention_mask is not None:
        q_len, k_len = query.shape[2], key.shape[2]
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attention_mask, float("-inf")
            )
        padded = -(-k_len // 8) * 8
        storage = torch.zeros(
            query.shape[0], query.shape[1], q_len, padded, dtype=query.dtype, device=query.device
        )
        bias = storage[..., :k_len]
        bias.copy_(attention_mask[:, :, -q_len:, :k_len].to(query.dtype).expand_as(bias))
    out = xops.memory_efficient_attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        attn_bias=bias,
        p=dropout,
        scale=scaling,
    )
    return out, None
