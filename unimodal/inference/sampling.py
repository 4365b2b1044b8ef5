"""The functions that turn scores into choices, with the settings of ``unimodal.models.generation``."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from unimodal.models.generation import SamplingSettings


def make_generator(seed: int | None, device: torch.device) -> tuple[torch.Generator, int]:
    """A generator on ``device`` and the seed it was given (drawn at random when ``seed`` is None)."""
    if seed is None:
        seed = secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(int(seed)), int(seed)


def apply_repetition_penalty(scores: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as transformers'): scores of ids already in a row are divided by
    ``penalty`` when positive and multiplied when negative. ``valid`` marks the real ids of ``ids``."""
    if penalty == 1.0:
        return scores
    seen = torch.zeros_like(scores).scatter_add_(1, ids, valid.to(scores.dtype)) > 0
    penalised = torch.where(scores > 0, scores / penalty, scores * penalty)
    return torch.where(seen, penalised, scores)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top ``top_k`` and outside the nucleus of mass ``top_p``."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - top_p
        drop[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def choose(logits: torch.Tensor, settings: SamplingSettings, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One id per row of ``logits [n, V]``: argmax when greedy, else a draw after temperature,
    top-k and top-p, each row with its own generator (so a row draws the same alone as in a batch)."""
    if settings.greedy:
        return logits.argmax(dim=-1)
    probs = filter_top_k_top_p(logits / settings.temperature, settings.top_k, settings.top_p).softmax(dim=-1)
    if len(generators) != len(probs):
        raise ValueError(f"{len(probs)} rows need as many generators, got {len(generators)}")
    return torch.cat([torch.multinomial(row[None], 1, generator=g)[:, 0] for row, g in zip(probs, generators)])
