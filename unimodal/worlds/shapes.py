"""A tiny captioned image set drawn in code: coloured shapes on plain backgrounds.

Enough for the ``--tiny`` runs of the continuous-image recipes (text-to-image and captioning on a
CPU in seconds), deterministic, no download. 80% of documents put the caption first (the model
learns to draw) and 20% the image first (it learns to caption), LlamaFusion's mix.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from unimodal.data.jsonl import pack_jsonl
from unimodal.data.sentencepiece_trainer import train_tokenizer

SIZE = 16
SHAPES = ("square", "circle", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (240, 220, 40)}
BACKGROUNDS = {"black": (10, 10, 10), "white": (245, 245, 245)}
CAPTION_FIRST = 0.8


def draw(shape: str, colour: tuple[int, int, int], background: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """A ``SIZE x SIZE x 3`` uint8 image of one shape at a jittered place and size."""
    image = np.empty((SIZE, SIZE, 3), np.uint8)
    image[:] = background
    radius = int(rng.integers(4, 7))
    cy, cx = (int(v) for v in rng.integers(radius, SIZE - radius, size=2))
    y, x = np.mgrid[:SIZE, :SIZE]
    if shape == "square":
        inside = (abs(y - cy) < radius) & (abs(x - cx) < radius)
    elif shape == "circle":
        inside = (y - cy) ** 2 + (x - cx) ** 2 < radius**2
    else:  # triangle pointing up
        inside = (y >= cy - radius) & (y < cy + radius) & (abs(x - cx) <= (y - (cy - radius)) / 2)
    image[inside] = colour
    return image


def write_split(root: Path, split: str, count: int, seed: int) -> Path:
    """Write ``count`` documents as PNGs plus a source JSONL (``unimodal data pack`` input)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = root / "images" / split
    images.mkdir(parents=True, exist_ok=True)
    src = root / f"{split}.jsonl"
    with src.open("w") as f:
        for i in range(count):
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
            path = images / f"{i:05d}.png"
            Image.fromarray(draw(shape, COLOURS[colour], BACKGROUNDS[background], rng)).save(path)
            caption = {"type": "text", "text": f"a {colour} {shape} on {background}."}
            image = {"type": "image", "path": str(path.relative_to(root))}
            parts = [caption, image] if rng.random() < CAPTION_FIRST else [image, caption]
            meta = {"shape": shape, "colour": colour, "background": background}
            f.write(json.dumps({"key": f"{split}{i:05d}", "parts": parts, "meta": meta}) + "\n")
    return src


def build_shapes(root: Path) -> None:
    """``builtin:shapes/{train,val,tokenizer.model}``: 512 + 64 documents, a 300-piece tokenizer."""
    for split, count, seed in (("train", 512, 0), ("val", 64, 1)):
        src = write_split(root, split, count, seed)
        pack_jsonl(src, root / split, max_docs_per_shard=128, progress=False)
    train_tokenizer(root / "train.jsonl", root / "tokenizer.model", vocab_size=300)
