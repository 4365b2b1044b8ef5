"""The vocabulary layout: where text ids, framework special tokens and media code ranges live.

Ids are laid out as ``[text tokenizer ids | special tokens | code ranges ...]`` and the embedding
table is padded to a multiple of ``pad_to`` so that matmuls stay aligned; padding rows are never
valid targets. The layout is saved with every checkpoint and compared with the data's layout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SPECIAL_TOKENS = ("<|boi|>", "<|eoi|>", "<|boa|>", "<|eoa|>", "<|media|>")
MODALITY_IDS = {"text": 0, "image": 1, "audio": 2}


@dataclass
class VocabLayout:
    text_size: int
    specials: tuple[str, ...] = SPECIAL_TOKENS
    # name -> size of a media code range, appended after the specials in insertion order
    code_ranges: dict[str, int] = field(default_factory=dict)
    pad_to: int = 64

    def special_id(self, name: str) -> int:
        try:
            return self.text_size + self.specials.index(name)
        except ValueError:
            raise KeyError(f"unknown special token {name!r}; known: {', '.join(self.specials)}") from None

    def range_offset(self, name: str) -> int:
        offset = self.text_size + len(self.specials)
        for other, size in self.code_ranges.items():
            if other == name:
                return offset
            offset += size
        raise KeyError(f"no code range {name!r} in the vocabulary layout; known: {list(self.code_ranges)}")

    @property
    def used_size(self) -> int:
        return self.text_size + len(self.specials) + sum(self.code_ranges.values())

    @property
    def size(self) -> int:
        """Embedding rows, padded up to a multiple of ``pad_to``."""
        return -(-self.used_size // self.pad_to) * self.pad_to

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["specials"] = list(self.specials)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VocabLayout:
        return cls(
            text_size=int(raw["text_size"]),
            specials=tuple(raw.get("specials", SPECIAL_TOKENS)),
            code_ranges=dict(raw.get("code_ranges", {})),
            pad_to=int(raw.get("pad_to", 64)),
        )

    def check_compatible(self, other: VocabLayout, what: str) -> None:
        if self.to_dict() != other.to_dict():
            raise ValueError(
                f"vocabulary layout mismatch with {what}: model has {self.to_dict()}, "
                f"{what} has {other.to_dict()}"
            )
