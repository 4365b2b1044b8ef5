"""Misspelt arguments of a recipe's classes, named with their near matches before jsonargparse
parses: inside a ``class_path`` its message drops the key or the suggestion ("Option 'seq_lenn'
is not accepted"), and for a class nested in a mapping it prints the whole recipe."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from typing import Any

from unimodal.errors import UserError
from unimodal.specs import unimodal_class

SECTIONS = ("model", "data")  # the recipe's class sections; trainer keys get jsonargparse's own suggestions


def check_arguments(config: dict[str, Any], overrides: list[str], where: str) -> None:
    """Every key under a ``unimodal`` class's ``init_args`` (and under a dataclass argument, such
    as ``optimizer``) in ``config`` and in the ``--key`` words of ``overrides`` must be an
    argument of that class. ``where`` names the recipe in the message."""
    for key in flat({name: config[name] for name in SECTIONS if name in config}):
        _follow(config, None, key.split("."), f"{where}: {key}")
    keys = [word[2:].partition("=")[0] for word in overrides if word.startswith("--")]
    if any(key in SECTIONS or key.endswith("class_path") for key in keys):
        return  # a class replaced on the command line: jsonargparse checks against the new one
    for key in keys:
        if key.partition(".")[0] in SECTIONS:
            _follow(config, None, key.split("."), f"--{key}")


def _follow(node: Any, cls: type | None, segments: list[str], where: str) -> None:
    if not segments:
        return
    name, rest = segments[0], segments[1:]
    child = node.get(name) if isinstance(node, dict) else None
    if cls is not None:
        names = _arguments(cls)
        if names is not None and name not in names:
            near = difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(map(repr, near))}?)" if near else f"; it takes {', '.join(sorted(names))}"
            raise UserError(f"{where}: {cls.__name__} takes no argument {name!r}{hint}")
        _follow(child, _dataclass_argument(cls, name), rest, where)
    elif name == "init_args" and isinstance(node, dict) and isinstance(node.get("class_path"), str):
        _follow(child, unimodal_class(node["class_path"]), rest, where)
    else:
        _follow(child, None, rest, where)


def flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{dotted.key: leaf}`` (an empty mapping is a leaf)."""
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def _arguments(cls: type) -> set[str] | None:
    """The names ``cls(...)`` takes, or None when it takes ``**kwargs`` (jsonargparse follows those)."""
    parameters = list(inspect.signature(cls).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL}


def _dataclass_argument(cls: type, name: str) -> type | None:
    """The dataclass an argument is typed as (``X`` or ``X | None``), whose fields are its keys."""
    try:
        hint = typing.get_type_hints(cls.__init__).get(name)
    except (NameError, TypeError):
        return None
    options = typing.get_args(hint) or (hint,)
    found = [t for t in options if t is not type(None)]
    return found[0] if len(found) == 1 and dataclasses.is_dataclass(found[0]) else None
