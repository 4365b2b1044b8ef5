"""What a generation hands back (a reply as ordered segments) and the error it raises past its
time limit; shared by sampling and beam search.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

# why a generation ended; "cancelled": its caller gave up (a closed stream, a stopping server)
FinishReason = Literal["stop", "length", "timeout", "cancelled"]


class GenerationTimeout(RuntimeError):
    """A generation ran past ``GenerationSettings.timeout_s``."""


@dataclass
class Segment:
    """One ordered piece of a reply: text, or one media item as the model wrote it.

    ``data``: discrete codes (``[n]`` for a one-layer range, ``[layers, frames]`` for RVQ) or
    continuous features ``[slots, D]`` (float32, CPU). ``ids``: a text segment's token ids (up to
    where a stop string cut it).
    """

    type: Literal["text", "image", "audio"]
    text: str = ""
    data: np.ndarray | None = None
    ids: list[int] = field(default_factory=list)


@dataclass
class Generation:
    segments: list[Segment]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    seed: int


@dataclass(frozen=True)
class Deadline:
    """When a generation must stop: a ``time.monotonic()`` instant, and an event a caller sets to
    stop it (a server shutting down, a client gone), read at every step."""

    at: float | None = None
    cancel: threading.Event | None = None


def expiry(deadline: Deadline) -> str | None:
    """Why a generation must stop now: "cancelled", "timeout", or None to go on."""
    if deadline.cancel is not None and deadline.cancel.is_set():
        return "cancelled"
    if deadline.at is not None and time.monotonic() > deadline.at:
        return "timeout"
    return None


def expired_error(reasons: Collection[str | None]) -> GenerationTimeout:
    """The error for rows that ended by :func:`expiry`: a cancellation names itself, else the time limit."""
    return GenerationTimeout("generation cancelled" if "cancelled" in reasons else "generation ran past its time limit")
