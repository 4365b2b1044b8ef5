"""The functions that turn scores into choices, with the settings of ``unimodal.models.generation``.

A server's batch mixes rows of different settings: every function here takes one value for all
rows or one per row and filters every row in one pass, since a pass costs about as much for one
row as for eight (benchmarks/README.md, Serving). Each row draws from its own generator, so a row
draws the same alone as in any batch.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import torch

from unimodal.models.generation import SamplingSettings


def make_generator(seed: int | None, device: torch.device) -> tuple[torch.Generator, int]:
    """A generator on ``device`` and the seed it was given (drawn at random when ``seed`` is None)."""
    if seed is None:
        seed = secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(int(seed)), int(seed)


def apply_repetition_penalty(scores: torch.Tensor, ids: torch.Tensor | None, valid: torch.Tensor | None,
                             penalty: float | Sequence[float]) -> torch.Tensor:
    """CTRL-style penalty (as transformers'): scores of ids already in a row are divided by
    ``penalty`` (one, or one per row) when positive and multiplied when negative. ``valid`` marks
    the real ids of ``ids``; both may be None when no row has a penalty (none is read then)."""
    penalties = _per_row(penalty, len(scores))
    if all(p == 1.0 for p in penalties):
        return scores
    seen = torch.zeros_like(scores).scatter_add_(1, ids, valid.to(scores.dtype)) > 0
    factor = _column(penalties, scores)
    penalised = torch.where(scores > 0, scores / factor, scores * factor)
    return torch.where(seen, penalised, scores)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int | Sequence[int], top_p: float | Sequence[float]) -> torch.Tensor:
    """Set to -inf every logit of ``logits [n, V]`` outside its row's top ``top_k`` and outside the
    nucleus of mass ``top_p`` (one value, or one per row; top_k 0 and top_p 1 keep every token)."""
    rows, vocab = logits.shape
    ks = [k if 0 < k < vocab else 0 for k in _per_row(top_k, rows)]
    if any(ks):
        kth = torch.topk(logits, max(ks), dim=-1).values.gather(1, _column([max(k, 1) - 1 for k in ks], logits, torch.long))
        if not all(ks):
            kth = kth.masked_fill(_column([k == 0 for k in ks], logits, torch.bool), float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    ps = _per_row(top_p, rows)
    nucleus = [i for i, p in enumerate(ps) if p < 1.0]
    if nucleus:
        part = logits if len(nucleus) == rows else logits[nucleus]
        sorted_logits, order = torch.sort(part, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= _column([1 - ps[i] for i in nucleus], cumulative)
        drop[..., -1] = False  # always keep the most likely token
        part = part.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        logits = part if len(nucleus) == rows else logits.index_put((torch.tensor(nucleus, device=logits.device),), part)
    return logits


def choose(logits: torch.Tensor, settings: SamplingSettings | Sequence[SamplingSettings], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One id per row of ``logits [n, V]`` with its row's settings (one for all, or one per row):
    argmax when greedy, else a draw after temperature, top-k and top-p from the row's generator
    (``generators``, one per row; greedy rows draw nothing)."""
    own = _per_row(settings, len(logits))
    sampled = [i for i, s in enumerate(own) if not s.greedy]
    if not sampled:
        return logits.argmax(dim=-1)
    if len(generators) != len(logits):
        raise ValueError(f"{len(logits)} rows need as many generators, got {len(generators)}")
    part = logits if len(sampled) == len(logits) else logits[sampled]
    temperatures = [own[i].temperature for i in sampled]
    temperature = temperatures[0] if len(set(temperatures)) == 1 else _column(temperatures, part)
    probs = filter_top_k_top_p(part / temperature, [own[i].top_k for i in sampled], [own[i].top_p for i in sampled]).softmax(dim=-1)
    draws = draw(probs, [generators[i] for i in sampled])
    if len(sampled) == len(logits):
        return draws
    return logits.argmax(dim=-1).index_put((torch.tensor(sampled, device=logits.device),), draws)


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One id per row of ``probs [n, V]``, each from its own generator: the id torch.multinomial
    draws there (for one sample it takes ``argmax(p / q)`` with ``q ~ Exp(1)`` over the row), from
    one argmax for every row instead of a call per row."""
    if bool(probs[:, 0].isnan().any()):  # a softmax over no finite score: nothing may be drawn
        raise ValueError("a row has no token left to draw: every score is -inf")
    noise = torch.stack([torch.empty_like(row).exponential_(generator=g) for row, g in zip(probs, generators)])
    return (probs / noise).argmax(dim=-1)


def _per_row(value: Any, rows: int) -> list:
    """One value for each of ``rows`` rows: ``value`` itself when it is a sequence of them."""
    if isinstance(value, (int, float, SamplingSettings)):
        return [value] * rows
    if len(value) != rows:
        raise ValueError(f"{rows} rows need one setting each, got {len(value)}")
    return list(value)


def _column(values: list, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``values`` as an ``[n, 1]`` tensor on ``like``'s device (in its dtype unless given)."""
    return torch.tensor(values, dtype=dtype or like.dtype, device=like.device)[:, None]
