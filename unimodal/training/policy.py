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
        if not any(matches(name, [pattern]) for name in names):
            near = difflib.get_close_matches(pattern, candidates, n=5, cutoff=0.4)
            hint = f"; near matches: {', '.join(near)}" if near else ""
            raise PatternMatchError(f"{what} pattern {pattern!r} matches no parameter{hint}")


def matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(name, p) or fnmatchcase(name, p + ".*") for p in patterns)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters at their full size: ZeRO-3 shards leave ``numel() == 0`` and
    keep the full size in ``ds_numel``."""
    n_train = n_total = 0
    for param in model.parameters():
        size = getattr(param, "ds_numel", param.numel())
        n_total += size
        n_train += size * param.requires_grad
    return n_train, n_total


def apply_trainable_policy(model: nn.Module, trainable: list[str] | None, frozen: list[str]) -> None:
    """Set ``requires_grad``: everything when ``trainable`` is None, else only the matches; then
    freeze ``frozen``. A pattern that matches nothing is an error (a typo would silently freeze or
    train the wrong thing), and so is a policy that leaves nothing to train."""
    names = [name for name, _ in model.named_parameters()]
    _check(trainable or [], names, "trainable")
    _check(frozen, names, "frozen")
    for name, param in model.named_parameters():
        param.requires_grad_((trainable is None or matches(name, trainable)) and not matches(name, frozen))
    if parameter_counts(model)[0] == 0:
        raise PatternMatchError("the trainable-parameter policy leaves nothing to train")
