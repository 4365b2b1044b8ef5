"""What a generation hands back (a reply as ordered segments) and the error it raises past its
time limit; shared by sampling and beam search.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


class GenerationTimeout(RuntimeError):
    """A generation ran past ``GenerationSettings.timeout_s``."""


@dataclass
class Segment:
    """One ordered piece of a reply: text, or one media item as the model wrote it.

    ``data``: discrete codes (``[n]`` for a one-layer range, ``[layers, frames]`` for RVQ) or
    continuous features ``[slots, D]`` (float32, CPU). ``ids``: a text segment's token ids (up to
    where a stop string cut it).
    """

    type: str  # "text" | "image" | "audio"
    text: str = ""
    data: np.ndarray | None = None
    ids: list[int] = field(default_factory=list)


@dataclass
class Generation:
    segments: list[Segment]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    seed: int


def check_deadline(deadline: float | None) -> None:
    """Raise :class:`GenerationTimeout` once ``deadline`` (``time.monotonic()``) has passed."""
    if deadline is not None and time.monotonic() > deadline:
        raise GenerationTimeout("generation ran past its time limit")
