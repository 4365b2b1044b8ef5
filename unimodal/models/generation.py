"""Sampling settings per modality: the defaults a model carries in its export, and what callers override.

Each modality samples with its own settings because the papers decode them differently (MIO:
text by beam search, images with top-p 0.7, speech with top-p 0.7 and a repetition penalty of
1.15; Orthus: images by a diffusion head with guidance). :class:`GenerationSettings` groups the
three modalities with the reply-wide limits, and ``replace`` takes the flat keyword arguments of
``Assistant.chat``. They live with the model because a recipe's ``generation:`` is checked when
the model is built, long before anything generates.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from unimodal.schema import MODALITIES


# the type each setting must have: settings come from requests as JSON, where a wrong type would
# otherwise fail deep inside a sampler
NUMBER, INTEGER = "a number", "an integer"
FIELD_KINDS = {
    "temperature": NUMBER, "top_p": NUMBER, "top_k": INTEGER, "repetition_penalty": NUMBER, "num_beams": INTEGER,
    "max_tokens": INTEGER, "cfg_scale": NUMBER, "steps": INTEGER,
    "max_new_tokens": INTEGER, "max_media": INTEGER, "seed": INTEGER, "timeout_s": NUMBER,
}
OPTIONAL = {"max_tokens", "steps", "seed", "timeout_s"}


def check_types(settings: object, what: str) -> None:
    """Refuse a setting of the wrong type, or a number that is not finite, in one line."""
    for name, kind in FIELD_KINDS.items():
        if not hasattr(settings, name):
            continue
        value = getattr(settings, name)
        if value is None and name in OPTIONAL:
            continue
        allowed = numbers.Real if kind == NUMBER else numbers.Integral  # numpy scalars too
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, allowed) or (kind == NUMBER and not math.isfinite(value)):
            raise ValueError(f"{what}: {name} must be {kind}{' or null' if name in OPTIONAL else ''}, got {value!r}")
        plain = int(value) if isinstance(value, numbers.Integral) else float(value)
        if type(value) is not type(plain):  # settings are written to JSON and compared as keys
            object.__setattr__(settings, name, plain)
    stop = getattr(settings, "stop", ())
    if not isinstance(stop, tuple):
        raise ValueError(f"{what}: stop must be a list of non-empty strings, got {stop!r}")


# scores are divided by the temperature, and by or times the repetition penalty, in float32:
# beyond these bounds they overflow or vanish
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 1e4
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-4, 1e4


@dataclass(frozen=True)
class SamplingSettings:
    """How one modality is sampled.

    ``temperature`` 0 is greedy. ``top_p`` 0 keeps only the most likely token (OpenAI's API takes
    0, which some clients send for deterministic output). ``num_beams`` > 1 (text only) is
    deterministic beam search.
    ``max_tokens`` caps the positions this modality may take in one reply (text: tokens;
    media: whole spans, markers included, and 0 never opens one; None: no cap beyond the reply's). ``cfg_scale`` 1 turns
    classifier-free guidance off; ``steps`` is the diffusion sampler's step count for continuous
    modalities (None: the modality's own default).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    max_tokens: int | None = None
    cfg_scale: float = 1.0
    steps: int | None = None

    def __post_init__(self) -> None:
        check_types(self, "sampling settings")
        checks = (
            (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE,
             f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]"),
            (0 <= self.top_p <= 1, "top_p must be in [0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 keeps every token)"),
            (MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
             f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}] (1 is none)"),
            (self.num_beams >= 1, "num_beams must be >= 1"),
            (self.max_tokens is None or self.max_tokens >= 0, "max_tokens must be >= 0 (0: a medium never written)"),
            (self.cfg_scale >= 0, "cfg_scale must be >= 0 (1 is no guidance)"),
            (self.steps is None or self.steps >= 1, "steps must be >= 1"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"sampling settings: {message}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


SAMPLING_KEYS = tuple(f.name for f in dataclasses.fields(SamplingSettings))


# every step looks for each stop string at the end of the reply so far, at a cost that grows with
# the square of its length: bounds far above what a stop string needs (OpenAI's API takes 4)
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1000


@dataclass(frozen=True)
class GenerationSettings:
    """Everything one ``generate`` call needs besides the prompts.

    ``max_new_tokens`` bounds a reply in positions (text tokens, media codes or slots and span
    markers alike); ``max_media`` bounds the images and audio clips in one reply; ``stop`` lists
    strings that end a reply (the end-of-sequence token always does); ``seed`` makes sampling
    reproducible for the same prompts and settings; ``timeout_s`` stops a generation that runs
    longer (:class:`~unimodal.inference.outputs.GenerationTimeout`).
    """

    text: SamplingSettings = field(default_factory=SamplingSettings)
    image: SamplingSettings = field(default_factory=SamplingSettings)
    audio: SamplingSettings = field(default_factory=SamplingSettings)
    max_new_tokens: int = 512
    max_media: int = 4
    seed: int | None = None
    stop: tuple[str, ...] = ()
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        for name in MODALITIES:  # plain dicts are accepted for convenience
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, SamplingSettings(**value))
            elif not isinstance(value, SamplingSettings):
                raise ValueError(f"generation settings: {name} must be an object of sampling settings, got {type(value).__name__}")
        if isinstance(self.stop, (str, list, tuple)):  # one string is one stop string
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        check_types(self, "generation settings")
        if self.max_new_tokens < 1:
            raise ValueError("generation settings: max_new_tokens must be >= 1")
        if self.max_media < 0:
            raise ValueError("generation settings: max_media must be >= 0")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise ValueError("generation settings: seed must be a 64-bit integer")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError("generation settings: timeout_s must be > 0")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("generation settings: stop must be a list of non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"generation settings: stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} "
                             "characters each")
        if self.text.max_tokens == 0:
            raise ValueError("generation settings: text max_tokens must be >= 1")
        for name in ("image", "audio"):
            if self.for_modality(name).num_beams != 1:
                raise ValueError(f"generation settings: num_beams applies to text only, not {name}")

    def for_modality(self, name: str) -> SamplingSettings:
        if name not in MODALITIES:
            raise KeyError(f"no sampling settings for modality {name!r}; known: {MODALITIES}")
        return getattr(self, name)

    def replace(self, **changes: Any) -> GenerationSettings:
        """A copy with ``changes`` applied.

        Keys: the fields of this class; ``text``/``image``/``audio`` as a dict of
        :class:`SamplingSettings` fields (merged) or a ``SamplingSettings``; and any
        ``SamplingSettings`` field given flat, which applies to text.
        """
        own = {f.name for f in dataclasses.fields(self)} - set(MODALITIES)
        updates: dict[str, Any] = {}
        text_flat = {}
        for key, value in changes.items():
            if key in MODALITIES:
                current = updates.get(key, self.for_modality(key))
                if isinstance(value, SamplingSettings):
                    updates[key] = value
                elif isinstance(value, dict):
                    known = [k for k in SAMPLING_KEYS if key == "text" or k != "num_beams"]
                    unknown = sorted(set(value) - set(known) - ({"num_beams"} if key != "text" else set()))
                    if unknown:
                        raise ValueError(f"unknown {key} sampling setting(s) {unknown}; known: {known}")
                    try:
                        updates[key] = dataclasses.replace(current, **value)
                    except ValueError as err:
                        raise ValueError(f"{key}: {err}") from None
                else:
                    raise ValueError(f"setting {key!r} must be a dict of sampling settings, got {type(value).__name__}")
            elif key in own:
                updates[key] = value
            elif key in SAMPLING_KEYS:
                text_flat[key] = value
            else:
                known = sorted(own | set(MODALITIES) | set(SAMPLING_KEYS))
                raise ValueError(f"unknown generation setting {key!r}; known: {known}")
        if text_flat:
            updates["text"] = dataclasses.replace(updates.get("text", self.text), **text_flat)
        return dataclasses.replace(self, **updates)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> GenerationSettings:
        return cls().replace(**(raw or {}))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["stop"] = list(self.stop)
        return out
