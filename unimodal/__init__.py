"""unimodal: any-to-any multimodal models on a pretrained decoder-only LLM."""

__version__ = "0.1.0"
