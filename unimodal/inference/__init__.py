"""Generation: the engine, the chat API (``load`` -> ``Assistant``), terminal and server."""

from unimodal.inference.chat import Assistant, Reply, load
from unimodal.inference.engine import Engine

__all__ = ["Assistant", "Engine", "Reply", "load"]
