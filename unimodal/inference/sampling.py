"""The functions that turn scores into choices, with the settings of ``unimodal.models.generation``."""

from __future__ import annotations

import functools
import secrets
from collections.abc import Sequence

import torch

from unimodal.models.generation import SamplingSettings


def make_generator(seed: int | None, device: torch.device) -> tuple[torch.Generator, int]:
    """A generator on ``device`` and the seed it was given (drawn at random when ``seed`` is None)."""
    if seed is None:
        seed = secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(int(seed)), int(seed)


def apply_repetition_penalty(scores: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """CTRL-style penalty (as transformers'): scores of ids already in a row are divided by
    ``penalty`` when positive and multiplied when negative. ``valid`` marks the real ids of ``ids``;
    ``penalty`` is one number or one per row ``[n, 1]``."""
    if not isinstance(penalty, torch.Tensor) and penalty == 1.0:
        return scores
    seen = torch.zeros_like(scores).scatter_add_(1, ids, valid.to(scores.dtype)) > 0
    penalised = torch.where(scores > 0, scores / penalty, scores * penalty)
    return torch.where(seen, penalised, scores)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit outside its row's top ``top_k`` (0: no limit) and outside the
    nucleus of mass ``top_p``: one sort serves every row, whatever its own settings."""
    ranked, order = torch.sort(logits, dim=-1, descending=True)
    size = logits.shape[-1]
    limited = (top_k > 0) & (top_k < size)
    if bool(limited.any()):
        kth = ranked.gather(-1, (top_k.clamp(1, size) - 1)[:, None])
        ranked = torch.where(limited[:, None] & (ranked < kth), float("-inf"), ranked)
    if bool((top_p < 1).any()):
        mass = ranked.softmax(dim=-1)
        before = mass.cumsum(dim=-1) - mass  # the mass of the tokens ranked above each one
        drop = before >= top_p[:, None]
        drop[:, 0] = False  # always keep the most likely token
        ranked = ranked.masked_fill(drop, float("-inf"))
    return ranked.scatter(-1, order, ranked)


def choose(logits: torch.Tensor, settings: Sequence[SamplingSettings], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One id per row of ``logits [n, V]``, each row with its own settings and generator (so a row
    draws the same alone as in any batch): argmax for greedy rows, else a draw after temperature,
    top-k and top-p, made for all sampled rows at once."""
    if not len(settings) == len(generators) == len(logits):
        raise ValueError(f"{len(logits)} rows need as many settings and generators, got {len(settings)} and {len(generators)}")
    chosen = logits.argmax(dim=-1)
    sampled = [i for i, s in enumerate(settings) if not s.greedy]
    if not sampled:
        return chosen
    own = [settings[i] for i in sampled]
    column = functools.partial(torch.tensor, device=logits.device)
    scores = logits if len(sampled) == len(logits) else logits[sampled]
    scores = scores / column([s.temperature for s in own], dtype=logits.dtype)[:, None]
    if any(s.top_k or s.top_p < 1 for s in own):
        scores = filter_top_k_top_p(scores, column([s.top_k for s in own]), column([s.top_p for s in own], dtype=logits.dtype))
    probs = scores.softmax(dim=-1)
    draws = torch.cat([torch.multinomial(row[None], 1, generator=generators[i])[:, 0] for i, row in zip(sampled, probs)])
    chosen[sampled] = draws
    return chosen
