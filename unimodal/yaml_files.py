"""YAML a user hands over (recipes, pipelines, ``--config`` files), read so that no file can run
code or expand past what any recipe holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from unimodal.errors import UserError


def read_yaml(path: Path, what: str) -> Any:
    """A recipe, pipeline or ``--config`` file, read with ``yaml.safe_load`` (so no tag can run
    code): a syntax error or a refused tag is one line with its place in the file."""
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory; give a YAML file in it")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{what} {path}: not a UTF-8 text file (byte {err.start}); give a YAML recipe") from None
    return parse_yaml(text, str(path), what)


def parse_yaml(text: str, path: str, what: str) -> Any:
    """:func:`read_yaml` for YAML text; ``path`` names it in errors."""
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        if "constructor for the tag" in problem:
            problem += "; tags that build Python objects are refused"
        raise UserError(f"{what} {where}: not valid YAML ({problem})") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise UserError(f"{what} {path}: nested too deeply to read as YAML") from None
    if _expanded_size(config, {}) > MAX_YAML_VALUES:
        raise UserError(f"{what} {path}: holds more than {MAX_YAML_VALUES:,} values, its aliases (*name) counted as they "
                        "expand, which every later step would copy; a recipe holds a few hundred")
    return config


# values a recipe or pipeline may hold, aliases expanded (the repository's hold at most a few hundred)
MAX_YAML_VALUES = 100_000


def _expanded_size(value: Any, sizes: dict[int, int]) -> int:
    """How many values ``value`` holds with every alias expanded: ``yaml.safe_load`` shares an
    aliased node, and each copy, dump and parse of the recipe after it walks the expansion (ten
    aliases of ten aliases ... are 10**9 values from a few lines). ``sizes`` memoises shared nodes,
    so this walks each node once."""
    if not isinstance(value, dict | list):
        return 1
    if id(value) not in sizes:
        children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        sizes[id(value)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(value)]
