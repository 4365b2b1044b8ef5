"""Objects named as ``{class_path, init_args}``: how recipes, exports and processors name codecs
and model parts. Built with jsonargparse, as LightningCLI builds a recipe's classes, so a spec
means the same in a recipe and in an export."""

from __future__ import annotations

import difflib
import importlib
import typing
from collections.abc import Callable
from typing import Any


def reached(path: str) -> Any:
    """What jsonargparse finds at the dotted ``unimodal.`` ``path``, or None: it follows a path
    through a module's globals, so that ``unimodal.checkpoints.export.os.system`` is ``os.system``.
    Only unimodal's modules are imported to look."""
    if not path.startswith("unimodal."):
        return None  # imported by nothing here: importing it would run its module
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            found = getattr(found, name, None)
        return found
    return None


def unimodal_class(path: str) -> type | None:
    """The class ``path`` names when unimodal defines it, else None (not merely a path that starts
    with ``unimodal.``: :func:`reached`)."""
    found = reached(path)
    return found if defined_here(found) else None


def defined_here(found: Any) -> bool:
    """Whether ``found`` is a class unimodal defines."""
    return isinstance(found, type) and found.__module__.startswith("unimodal.")


def own_class(path: str, base: type) -> bool:
    """Whether ``path`` names a subclass of ``base`` that unimodal defines."""
    found = unimodal_class(path)
    return found is not None and issubclass(found, base)


def instantiate(spec: dict[str, Any], kind: Any, where: str) -> Any:
    """Build ``spec`` read from a file, checked against ``kind`` (a base class, or
    ``Callable[..., Base]`` for a factory). Its ``class_path`` must be a ``Base`` of unimodal's
    (:func:`own_class`): jsonargparse takes any callable for a factory, and calls it. A spec that
    does not fit is one ``ValueError`` naming ``where`` (the file and key it came from), not
    jsonargparse's message about its own ``--value`` argument."""
    from jsonargparse import ArgumentError, ArgumentParser

    base = kind if isinstance(kind, type) else typing.get_args(kind)[-1]
    path = spec.get("class_path") if isinstance(spec, dict) else spec
    if not (isinstance(path, str) and own_class(path, base)):
        raise ValueError(f"{where}: {path!r} is not a {base.__name__} of unimodal's; give {{class_path, init_args}} naming one")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--value", type=kind)
    try:
        return parser.instantiate_classes(parser.parse_object({"value": spec})).value
    except ArgumentError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip() and line.strip() != 'Parser key "value":']
        reason = " ".join(lines).split(" Got value: Namespace(")[0]  # the spec itself, repeated, follows
        raise ValueError(f"{where}: {reason[:400]}") from None


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
