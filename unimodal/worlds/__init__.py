"""Built-in data worlds (text, chat, shapes, codes, digits), built offline on first use, and their
evaluation suites. ``resolve`` turns a ``builtin:NAME/...`` name into a path; the command line
and recipe readers call it once, nothing below this package does."""

from unimodal.worlds.builtin import resolve
from unimodal.worlds.digits import build_world
from unimodal.worlds.digits_suite import evaluate

__all__ = ["build_world", "evaluate", "resolve"]
