"""Objects named as ``{class_path, init_args}``: how recipes, exports and processors name codecs
and model parts. Built with jsonargparse, as LightningCLI builds a recipe's classes, so a spec
means the same in a recipe and in an export."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any


def instantiate(spec: dict[str, Any], kind: Any) -> Any:
    """Build ``spec`` checked against ``kind`` (a base class, or ``Callable[..., Base]`` for a factory)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--value", type=kind)
    return parser.instantiate_classes(parser.parse_object({"value": spec})).value


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A package's ``__getattr__`` that imports an exported name's module on first use, so that
    ``unimodal.data.UnimodalDataModule`` works in a recipe while ``import unimodal.data.shards``
    (or ``unimodal --help``) does not load Lightning. ``exports``: name -> ``module.Name``."""

    def __getattr__(name: str) -> Any:
        path = exports.get(name)
        if path is None:
            near = difflib.get_close_matches(name, exports, n=1)
            raise AttributeError(f"module {package!r} has no attribute {name!r}" + (f" (did you mean {near[0]}?)" if near else ""))
        module, _, attribute = path.rpartition(".")
        return getattr(importlib.import_module(module), attribute)

    return __getattr__
