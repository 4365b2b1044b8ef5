"""Built-in data worlds (text, chat, shapes, codes, digits), built offline on first use, and their
evaluation suites. ``resolve`` turns a ``builtin:NAME/...`` name into a path; the command line
and recipe readers call it once, nothing below this package does."""

from unimodal.specs import lazy_exports

_EXPORTS = {
    "build_world": "unimodal.worlds.digits.build_world",
    "evaluate": "unimodal.worlds.digits_suite.evaluate",
    "resolve": "unimodal.worlds.builtin.resolve",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
