"""A tiny world of text, image-code and speech-code documents for the discrete recipes' ``--tiny`` runs.

No tokenizer runs: each (colour, shape) has a fixed 8-code "image" (a code changed now and then),
and each word a fixed 3-frame "speech" clip of 2 RVQ layers, layer 0 the word's content, layer 1
a speaker's timbre. The documents follow MIO's pretraining templates (arXiv 2409.17692) and chat
turns, so the MIO and SEED recipes run on CPU in seconds and their loss visibly falls. The shards'
``stats.json`` name the synthetic tokenizer like ``unimodal data encode`` names a real one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from unimodal.data.pre_encode import record_code_sources
from unimodal.data.sentencepiece_trainer import train_tokenizer
from unimodal.data.shards import write_documents
from unimodal.schema import Document, Part

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
IMAGE_TOKENS, IMAGE_CODEBOOK = 8, 64
AUDIO_LAYERS, AUDIO_CODEBOOK, FRAMES_PER_WORD, SPEAKERS = 2, 32, 3, 4
WORDS = ("the", "a", *COLOURS, *SHAPES, "is", "next", "to")
SOURCES = {
    "image": {"name": "builtin-codes-image", "codebook_size": IMAGE_CODEBOOK, "layers": 1, "tokens_per_item": IMAGE_TOKENS, "checksum": "synthetic-1"},
    "audio": {"name": "builtin-codes-speech", "codebook_size": AUDIO_CODEBOOK, "layers": AUDIO_LAYERS, "frame_rate": 50.0, "checksum": "synthetic-1"},
}
SYSTEM = "You are a helpful assistant."


class World:
    """The fixed code tables and a generator of documents of each kind."""

    def __init__(self, seed: int):
        table = np.random.default_rng(1234)  # the same "tokenizer" for every split
        self.images = {(c, s): table.integers(IMAGE_CODEBOOK, size=IMAGE_TOKENS) for c in COLOURS for s in SHAPES}
        self.words = {w: table.integers(AUDIO_CODEBOOK, size=FRAMES_PER_WORD) for w in WORDS}
        self.rng = np.random.default_rng(seed)

    def pick(self, items: tuple[str, ...]) -> str:
        return items[int(self.rng.integers(len(items)))]

    def thing(self) -> tuple[str, np.ndarray]:
        colour, shape = self.pick(COLOURS), self.pick(SHAPES)
        codes = self.images[(colour, shape)].copy()
        if self.rng.random() < 0.2:
            codes[int(self.rng.integers(IMAGE_TOKENS))] = self.rng.integers(IMAGE_CODEBOOK)
        return f"a {colour} {shape}", codes.astype(np.int32)

    def speech(self, text: str) -> np.ndarray:
        content = np.concatenate([self.words[w] for w in text.split()])
        speaker = int(self.rng.integers(SPEAKERS))
        timbre = (speaker * 7 + np.arange(len(content)) * 3 + content) % AUDIO_CODEBOOK
        return np.stack([content, timbre]).astype(np.int32)

    def sentence(self) -> str:
        return f"{self.thing()[0]} is next to {self.thing()[0]}"

    # -- document kinds: parts as (type, text or codes, loss, role) -------------------------------

    def image_text(self) -> list:
        caption, codes = self.thing()
        if self.rng.random() < 0.5:
            return [("image", codes), ("text", f" The caption of this image is: {caption}.")]
        return [("text", f'Please generate an image of "{caption}": '), ("image", codes)]

    def text(self) -> list:
        return [("text", f"the {self.sentence()}. the {self.sentence()}.")]

    def interleaved(self) -> list:
        parts: list = []
        for word in ("first", "then", "last")[: int(self.rng.integers(2, 4))]:
            caption, codes = self.thing()
            parts += [("text", f"{word} {caption} "), ("image", codes)]
        return parts

    def speech_text(self) -> list:
        text = self.sentence()
        if self.rng.random() < 0.5:  # the speech is the input: unsupervised, content layer only
            return [("audio", self.speech(text), False), ("text", f" Transcribe this speech: {text}")]
        return [("text", f'Please generate a speech of "{text}": '), ("audio", self.speech(text))]

    def chat(self, kinds: tuple[str, ...] = ("describe", "draw", "transcribe", "say")) -> list:
        caption, codes = self.thing()
        kind = self.pick(kinds)
        user: list
        if kind == "describe":
            user, answer = [("text", "Describe this image. "), ("image", codes)], [("text", f"{caption}.")]
        elif kind == "draw":
            user, answer = [("text", f"Draw {caption}.")], [("image", codes)]
        elif kind == "transcribe":
            text = self.sentence()
            user, answer = [("text", "What does this say? "), ("audio", self.speech(text))], [("text", text)]
        else:
            text = self.sentence()
            user, answer = [("text", f"Say: {text}")], [("audio", self.speech(text))]
        turns = [("text", SYSTEM, False, "system")]
        turns += [(*p[:2], False, "user") for p in user]
        turns += [(*p[:2], True, "assistant") for p in answer]
        return turns


def _document(parts: list, key: str) -> Document:
    out, media = [], 0
    for spec in parts:
        kind, value = spec[0], spec[1]
        loss = spec[2] if len(spec) > 2 else True
        role = spec[3] if len(spec) > 3 else None
        if kind == "text":
            out.append(Part("text", text=value, loss=loss, role=role))
        else:
            out.append(Part(kind, media=media, data=value, loss=loss, role=role))
            media += 1
    return Document(out, key=key)


SETS: dict[str, tuple[Callable[[World], list], int, tuple[str, ...]]] = {
    "image_text": (World.image_text, 256, ("image",)),
    "text": (World.text, 128, ()),
    "interleaved": (World.interleaved, 128, ("image",)),
    "speech": (World.speech_text, 256, ("audio",)),
    "sft": (World.chat, 256, ("image", "audio")),
    "sft_image": (lambda world: world.chat(("describe", "draw")), 128, ("image",)),
}


def build_codes(root: Path) -> None:
    """``builtin:codes/{image_text,text,interleaved,speech,sft,sft_image,val}`` and ``tokenizer.model``."""
    texts = []
    for index, (name, (make, count, modalities)) in enumerate(SETS.items()):
        world = World(seed=index)
        docs = [_document(make(world), f"{name}{i:05d}") for i in range(count)]
        texts += [p.text for d in docs for p in d.parts if p.type == "text"]
        write_documents(docs, root / name, max_docs_per_shard=64)
        record_code_sources(root / name, {m: SOURCES[m] for m in modalities})
    world = World(seed=99)
    kinds = [make for make, _, _ in list(SETS.values())[:5]]
    docs = [_document(kinds[i % len(kinds)](world), f"val{i:05d}") for i in range(40)]
    write_documents(docs, root / "val", max_docs_per_shard=64)
    record_code_sources(root / "val", {m: SOURCES[m] for m in ("image", "audio")})
    with (root / "text.jsonl").open("w") as f:
        for text in texts:
            f.write(json.dumps({"parts": [{"type": "text", "text": text}]}) + "\n")
    train_tokenizer(root / "text.jsonl", root / "tokenizer.model", vocab_size=320)
