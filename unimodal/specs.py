"""Objects named as ``{class_path, init_args}``: how recipes, exports and processors name codecs
and model parts. Built with jsonargparse, as LightningCLI builds a recipe's classes, so a spec
means the same in a recipe and in an export."""

from __future__ import annotations

from typing import Any


def instantiate(spec: dict[str, Any], kind: Any) -> Any:
    """Build ``spec`` checked against ``kind`` (a base class, or ``Callable[..., Base]`` for a factory)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--value", type=kind)
    return parser.instantiate_classes(parser.parse_object({"value": spec})).value
