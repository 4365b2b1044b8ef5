"""Attention masks for packed multimodal sequences, and the attention backends.

The mask is the single place where the packing contract is enforced: a position attends to
earlier positions of its own document, and to every position of its own bidirectional block
(a Transfusion-style image). Every backend gets that one rule in the form it runs fastest:

- ``sdpa``: a dense boolean ``[B, 1, L, L]`` mask (CPU and GPU); ``eager``, which adds its
  mask to the scores, the same mask as ``0`` / ``-inf``-like floats (:func:`for_backend`);
- ``flex``: a FlexAttention ``BlockMask`` built from the same ids, never materialised as
  ``L x L``; one per batch, shared by every layer (``auto`` on CUDA);
- ``xformers``: a block-diagonal causal bias from document lengths (CUDA only); a batch with a
  bidirectional block or a document split in runs (:func:`split_documents`), which that bias
  cannot express, runs on SDPA with the dense mask.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from unimodal.errors import UserError

BACKENDS = ("auto", "flex", "sdpa", "xformers", "eager")
FLEX_IMPLEMENTATION = "unimodal_flex"
XFORMERS_IMPLEMENTATION = "unimodal_xformers"
# keyword the decoder passes through to the xformers attention function (transformers hands
# unknown decoder kwargs down to every layer's attention call)
XFORMERS_SEGMENTS = "unimodal_segments"


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


def build_block_mask(doc_ids: torch.Tensor, block_ids: torch.Tensor) -> BlockMask:
    """The same rule as :func:`build_attention_mask`, as a FlexAttention ``BlockMask``.

    On CUDA the mask construction is compiled (training batches all have ``seq_len``: one compile
    per run); on CPU it is evaluated eagerly.
    """

    def allowed(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        doc_q, doc_k = doc_ids[b, q], doc_ids[b, k]
        block_q, block_k = block_ids[b, q], block_ids[b, k]
        same_doc = (doc_q == doc_k) & (doc_q > 0)
        same_block = (block_q == block_k) & (block_q >= 0)
        return (same_doc & ((q >= k) | same_block)) | (q == k)

    batch, length = doc_ids.shape
    return create_block_mask(
        allowed, batch, None, length, length, device=doc_ids.device, _compile=doc_ids.device.type == "cuda"
    )


def _runs(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The document id and length of each run of equal ids, row after row (a new row always starts
    a run, even when it opens with the id the last row ended on)."""
    flat = doc_ids.flatten()
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[:: doc_ids.shape[1]] = True
    first = starts.nonzero()[:, 0]
    edges = torch.cat([first, torch.tensor([len(flat)], device=flat.device)])
    return flat[first], edges[1:] - edges[:-1]


def document_lengths(doc_ids: torch.Tensor) -> list[int]:
    """Lengths of the runs of equal document id, row after row: the segments of a block-diagonal
    mask over the batch flattened to one row (a padding run is one segment; its outputs are never
    scored)."""
    return _runs(doc_ids)[1].tolist()


def split_documents(doc_ids: torch.Tensor) -> bool:
    """Whether a row holds a document in more than one run: conditioning dropout gives a dropped
    image span an id of its own inside its document, whose later text still sees its earlier text."""
    ids, lengths = _runs(doc_ids)
    rows = (torch.cumsum(lengths, 0) - lengths) // doc_ids.shape[1]
    keys = rows * (int(doc_ids.max()) + 1) + ids
    return len(keys.unique()) < len(keys)


def longest_document(doc_ids: torch.Tensor) -> int:
    """The most positions one document holds in a row of ``doc_ids`` (padding, id 0, is none)."""
    ids, lengths = _runs(doc_ids)
    real = lengths[ids > 0]
    return int(real.max()) if len(real) else 0


def for_backend(implementation: str, mask: torch.Tensor | None) -> torch.Tensor | None:
    """A boolean mask in the form ``implementation`` reads: eager attention adds its mask to the
    scores (a boolean one would add 1 and 0 and mask nothing), so it gets 0 where allowed and the
    float minimum elsewhere; every other backend takes the booleans."""
    if mask is None or implementation != "eager" or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, torch.finfo(torch.float32).min)


def decoder_mask(implementation: str, doc_ids: torch.Tensor, block_ids: torch.Tensor) -> dict[str, Any]:
    """The decoder keyword arguments that carry the packed mask for ``implementation``."""
    if implementation == FLEX_IMPLEMENTATION:
        return {"attention_mask": build_block_mask(doc_ids, block_ids)}
    if implementation == XFORMERS_IMPLEMENTATION and not bool((block_ids >= 0).any()) and not split_documents(doc_ids):
        return {"attention_mask": None, XFORMERS_SEGMENTS: document_lengths(doc_ids)}
    if implementation == XFORMERS_IMPLEMENTATION:
        # Python shows a warning once per call site
        warnings.warn(
            "xformers cannot express bidirectional image blocks, nor documents split by conditioning "
            "dropout; batches that hold them run on PyTorch SDPA with the dense mask (use attention: "
            "flex for block-sparse attention)",
            stacklevel=2,
        )
    return {"attention_mask": for_backend(implementation, build_attention_mask(doc_ids, block_ids))}


def flex_available() -> bool:
    return torch.cuda.is_available()


def xformers_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("xformers") is not None


def resolve_backend(name: str) -> str:
    """Map a config value to a transformers ``attn_implementation``; ``auto`` takes FlexAttention
    on CUDA and SDPA elsewhere. The two registered here have no transformers mask function on
    purpose: their masks come from :func:`decoder_mask`, and a call without one (a cached decode
    step) is causal SDPA, so transformers never builds an ``L x L`` mask for them."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {BACKENDS}")
    if name == "auto":
        name = "flex" if flex_available() else "sdpa"
    if name == "flex":
        AttentionInterface.register(FLEX_IMPLEMENTATION, flex_attention_forward)
        return FLEX_IMPLEMENTATION
    if name == "xformers":
        if not xformers_available():
            raise UserError("attention backend 'xformers' needs CUDA and the xformers package (pip install 'unimodal[gpu]'); use attention: auto or sdpa")
        AttentionInterface.register(XFORMERS_IMPLEMENTATION, xformers_attention_forward)
        return XFORMERS_IMPLEMENTATION
    return name


def check_trainable(implementation: str, device: torch.device) -> None:
    """Refuse flex training on CPU, where torch has no FlexAttention backward."""
    if implementation == FLEX_IMPLEMENTATION and device.type == "cpu":
        raise UserError("attention: flex cannot train on CPU (torch has no FlexAttention backward there); use attention: auto or sdpa")


_compiled_flex = None


def _flex_kernel():
    """``flex_attention`` compiled once per process on CUDA (eager it materialises the scores).
    Training batches all have one length; the engine's prompts vary, and after the second length
    torch compiles one kernel for any length rather than one per length."""
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def flex_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: BlockMask | torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: FlexAttention under a ``BlockMask``, with the
    attention-logit soft cap of Gemma 2 (``softcap``) as a score modification.

    Calls with a dense mask or none (the engine's cached decode steps) run on SDPA, or, with a
    soft cap, which SDPA cannot apply, on :func:`softcapped_attention`.
    """
    softcap = kwargs.get("softcap")
    if not isinstance(attention_mask, BlockMask):
        if softcap:
            return softcapped_attention(query, key, value, attention_mask, scaling, softcap), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if dropout:
        raise UserError("attention: flex does not support attention dropout; set the backbone's attention_dropout to 0")
    if query.requires_grad:
        check_trainable(FLEX_IMPLEMENTATION, query.device)

    def capped(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return torch.tanh(score / softcap) * softcap

    # inside a compiled layer (backbone.compile) dynamo compiles flex_attention into the layer's graph
    kernel = _flex_kernel() if query.is_cuda and not torch.compiler.is_compiling() else flex_attention
    out = kernel(query, key, value, score_mod=capped if softcap else None, block_mask=attention_mask, scale=scaling,
                 enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def softcapped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                         scaling: float | None, softcap: float) -> torch.Tensor:
    """Attention with capped logits (``softcap * tanh(scores / softcap)``) under a boolean or
    additive mask, or, without one, causal as SDPA is (the last queries over the whole cache);
    ``[B, L, H, D]``."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.tanh(torch.matmul(query, key.transpose(2, 3)) * scale / softcap) * softcap
    if mask is None:
        queries, keys = query.shape[2], key.shape[2]
        mask = torch.ones(queries, keys, dtype=torch.bool, device=query.device).tril(keys - queries)
    else:
        mask = mask[..., : key.shape[-2]]
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous()


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

    With document segments (``unimodal_segments``) the batch is flattened to one row under a
    block-diagonal causal bias, so no ``L x L`` tensor exists; any other call (a dense mask from
    a batch with image blocks, or the engine's cache) runs on SDPA.
    """
    segments = kwargs.pop(XFORMERS_SEGMENTS, None)
    if kwargs.get("softcap"):
        raise UserError("attention: xformers cannot cap attention logits (this backbone's attn_logit_softcapping); use "
                        "attention: flex or eager")
    if segments is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    import xformers.ops as xops
    from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask

    batch, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)

    def one_row(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(1, batch * length, heads, dim)

    out = xops.memory_efficient_attention(
        one_row(query), one_row(key), one_row(value),
        attn_bias=BlockDiagonalCausalMask.from_seqlens(segments), p=dropout, scale=scaling,
    )
    return out.reshape(batch, length, heads, dim), None
