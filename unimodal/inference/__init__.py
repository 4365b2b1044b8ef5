"""Generation: the engine, the chat API (``load`` -> ``Assistant``), terminal and server."""

from unimodal.specs import lazy_exports

_EXPORTS = {
    "Assistant": "unimodal.inference.chat.Assistant",
    "Engine": "unimodal.inference.engine.Engine",
    "Reply": "unimodal.inference.chat.Reply",
    "load": "unimodal.inference.chat.load",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
