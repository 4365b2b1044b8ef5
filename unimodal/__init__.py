"""unimodal: any-to-any multimodal models on a pretrained decoder-only LLM."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``unimodal.load`` (an Assistant: ``.chat(messages)``) without importing torch at ``import unimodal``
    if name == "load":
        from unimodal.inference.chat import load

        return load
    raise AttributeError(f"module 'unimodal' has no attribute {name!r}")
