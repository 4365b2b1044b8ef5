"""The vocabulary layout: where text ids, framework special tokens and media code ranges live.

Ids are laid out as ``[text tokenizer ids | special tokens | code ranges ...]`` and the embedding
table is padded to a multiple of ``pad_to`` so that matmuls stay aligned; padding rows are never
valid targets. The layout is saved with every checkpoint and compared with the data's layout.

A code range may hold several RVQ layers of one codebook size, laid out layer after layer:
``id = range_offset + layer * codebook_size + code``. ``code_sources`` records the fingerprint of
the tokenizer that produced each range's codes, so codes of another tokenizer never meet a model
trained on these; ``feature_sources`` does the same for continuous codecs (a VAE's latents), whose
features the model reads and writes without ids. ``docs/vocabulary.md`` is the user-facing description.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SPECIAL_TOKENS = ("<|boi|>", "<|eoi|>", "<|boa|>", "<|eoa|>", "<|media|>")
# the special tokens that open and close a media span of each modality
SPAN_MARKERS = {"image": ("<|boi|>", "<|eoi|>"), "audio": ("<|boa|>", "<|eoa|>")}


@dataclass
class VocabLayout:
    text_size: int
    specials: tuple[str, ...] = SPECIAL_TOKENS
    # name -> size of a media code range, appended after the specials in insertion order
    code_ranges: dict[str, int] = field(default_factory=dict)
    pad_to: int = 64
    # name -> RVQ layers sharing that code range (1 when absent)
    code_layers: dict[str, int] = field(default_factory=dict)
    # name -> fingerprint of the tokenizer whose codes fill the range (name, sizes, checksum)
    code_sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    # name -> fingerprint of the codec whose continuous features the model was trained on, for a
    # modality without a code range (a codec that fills one is in code_sources)
    feature_sources: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        """Refuse layouts whose names or ranges are ambiguous, with one clear line each."""
        if self.text_size < 1 or self.pad_to < 1:
            raise ValueError(f"vocabulary layout: text_size and pad_to must be >= 1, got {self.text_size}, {self.pad_to}")
        names = list(self.specials) + list(self.code_ranges)
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"vocabulary layout: names used twice among specials and code ranges: {repeated}")
        for name, size in self.code_ranges.items():
            layers = self.layers(name)
            if size < 1 or layers < 1 or size % layers:
                raise ValueError(f"vocabulary layout: code range {name!r} of size {size} cannot hold {layers} equal layers")
        for what, keys in (("code_layers", self.code_layers), ("code_sources", self.code_sources)):
            unknown = sorted(set(keys) - set(self.code_ranges))
            if unknown:
                raise ValueError(f"vocabulary layout: {what} names {unknown}, which are not code ranges {list(self.code_ranges)}")
        for what, sources in (("code_sources", self.code_sources), ("feature_sources", self.feature_sources)):
            odd = sorted(name for name, fingerprint in sources.items() if not isinstance(fingerprint, dict))
            if odd:
                raise ValueError(f"vocabulary layout: {what} of {odd} is not a codec fingerprint (a mapping)")
        coded = sorted(set(self.feature_sources) & set(self.code_ranges))
        if coded:
            raise ValueError(f"vocabulary layout: feature_sources names {coded}, whose codecs code_sources records (they fill code ranges)")
        spans = self.spans()
        for (a, a_start, a_stop), (b, b_start, _) in zip(spans, spans[1:]):
            if b_start < a_stop:
                raise ValueError(f"vocabulary layout: {b!r} starting at {b_start} overlaps {a!r} [{a_start}, {a_stop})")

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

    def layers(self, name: str) -> int:
        return int(self.code_layers.get(name, 1))

    def codebook_size(self, name: str) -> int:
        """Codes per layer of a code range."""
        if name not in self.code_ranges:
            raise KeyError(f"no code range {name!r} in the vocabulary layout; known: {list(self.code_ranges)}")
        return self.code_ranges[name] // self.layers(name)

    def code_ids(self, name: str, codes: Any, layer: Any = 0) -> Any:
        """Vocabulary ids of ``codes`` (ints or arrays) of RVQ ``layer`` in range ``name``."""
        return self.range_offset(name) + layer * self.codebook_size(name) + codes

    def spans(self) -> list[tuple[str, int, int]]:
        """``(name, start, stop)`` of text, each special and each code range, in id order."""
        out = [("text", 0, self.text_size)]
        out += [(name, self.special_id(name), self.special_id(name) + 1) for name in self.specials]
        out += [(name, self.range_offset(name), self.range_offset(name) + size) for name, size in self.code_ranges.items()]
        return out

    def token_name(self, token: int) -> str:
        """A readable name for a non-text id: ``<|boi|>``, ``<|image_42|>``, ``<|audio_l1_7|>``, ``<|pad_3|>``."""
        if token < self.text_size:
            raise ValueError(f"id {token} is a text id; decode it with the text tokenizer")
        for name, start, stop in self.spans()[1:]:
            if start <= token < stop:
                if name in self.specials:
                    return name
                layer, code = divmod(token - start, self.codebook_size(name))
                return f"<|{name}_l{layer}_{code}|>" if self.layers(name) > 1 else f"<|{name}_{code}|>"
        if token < self.size:
            return f"<|pad_{token - self.used_size}|>"
        raise ValueError(f"id {token} is outside the vocabulary of {self.size} rows")

    def added_tokens(self) -> list[str]:
        """Names of every id after the text vocabulary, in id order (to register with a tokenizer)."""
        return [self.token_name(i) for i in range(self.text_size, self.used_size)]

    def register_added_tokens(self, tokenizer: Any) -> None:
        """Add every added id's readable name to a Hugging Face tokenizer at exactly that id, so
        that ``tokenizer.decode`` shows specials and media codes by name (for exported tokenizers)."""
        if len(tokenizer) != self.text_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the layout's text vocabulary has {self.text_size}")
        tokenizer.add_tokens(self.added_tokens(), special_tokens=True)
        last = self.used_size - 1
        if len(tokenizer) != self.used_size or tokenizer.convert_tokens_to_ids(self.token_name(last)) != last:
            raise ValueError("the tokenizer already knew some of the layout's token names: added ids do not line up with the layout")

    def render(self, ids: Any, tokenizer: Any) -> str:
        """Decode ``ids``: runs of text ids through ``tokenizer``, every other id by its readable name."""
        out, run = [], []
        for token in (int(t) for t in ids):
            if token < self.text_size:
                run.append(token)
                continue
            if run:
                out.append(tokenizer.decode(run))
                run = []
            out.append(self.token_name(token))
        if run:
            out.append(tokenizer.decode(run))
        return "".join(out)

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
        """The layout a saved file describes; one that is not a layout (a size of the wrong type, a
        key missing) is one ``ValueError``."""
        mappings = ("code_ranges", "code_layers", "code_sources", "feature_sources")
        odd = [key for key in mappings if not isinstance(raw.get(key, {}), dict)] if isinstance(raw, dict) else []
        if odd:
            raise ValueError(f"vocabulary layout: {', '.join(odd)} must be a mapping")
        try:
            return cls(
                text_size=int(raw["text_size"]),
                specials=tuple(raw.get("specials", SPECIAL_TOKENS)),
                code_ranges=dict(raw.get("code_ranges", {})),
                pad_to=int(raw.get("pad_to", 64)),
                code_layers=dict(raw.get("code_layers", {})),
                code_sources=dict(raw.get("code_sources", {})),
                feature_sources=dict(raw.get("feature_sources", {})),
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"vocabulary layout: not a layout ({type(err).__name__}: {err})") from None

    def check_compatible(self, other: VocabLayout, what: str) -> None:
        """Equal in every field, the order of the code ranges included: it sets each range's ids."""
        mine, theirs = self.to_dict(), other.to_dict()
        keys = [key for key in mine if _ordered(mine[key]) != _ordered(theirs.get(key))]
        if keys:
            reordered = " (the same ranges in another order, which gives their codes other ids)" if mine == theirs else ""
            raise ValueError(
                f"vocabulary layout mismatch with {what} in {', '.join(keys)}{reordered}: model has "
                f"{ {k: mine[k] for k in keys} }, {what} has { {k: theirs.get(k) for k in keys} }"
            )


def _ordered(value: Any) -> Any:
    return list(value.items()) if isinstance(value, dict) else value
