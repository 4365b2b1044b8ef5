"""Which parameters train: glob patterns over parameter names, checked against the model."""

from __future__ import annotations

import difflib
from fnmatch import fnmatchcase

from torch import nn


class PatternMatchError(ValueError):
    pass


def _prefixes(names: list[str]) -> list[str]:
    """Every dotted prefix of every name: patterns may name a module as well as a parameter."""
    out = set()
    for name in names:
        parts = name.split(".")
        out.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return sorted(out)


def _check(patterns: list[str], names: list[str], what: str) -> None:
    candidates = _prefixes(names)
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) or fnmatchcase(name, pattern + ".*") for name in names):
            near = difflib.get_close_matches(pattern, candidates, n=5, cutoff=0.4)
            hint = f"; near matches: {', '.join(near)}" if near else ""
            raise PatternMatchError(f"{what} pattern {pattern!r} matches no parameter{hint}")


def matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(name, p) or fnmatchcase(name, p + ".*") for p in patterns)


def apply_trainable_policy(model: nn.Module, trainable: list[str] | None, frozen: list[str]) -> tuple[int, int]:
    """Set ``requires_grad``: everything when ``trainable`` is None, else only the matches; then
    freeze ``frozen``. A pattern that matches nothing is an error (a typo would silently freeze or
    train the wrong thing). Returns (trainable, total) parameter counts."""
    names = [name for name, _ in model.named_parameters()]
    _check(trainable or [], names, "trainable")
    _check(frozen, names, "frozen")
    n_train = n_total = 0
    for name, param in model.named_parameters():
        train = (trainable is None or matches(name, trainable)) and not matches(name, frozen)
        param.requires_grad_(train)
        size = getattr(param, "ds_numel", param.numel())  # ZeRO-3 shards leave numel() == 0
        n_total += size
        n_train += size * train
    if n_train == 0:
        raise PatternMatchError("the trainable-parameter policy leaves nothing to train")
    return n_train, n_total
