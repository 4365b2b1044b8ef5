"""How well an independent classifier reads the digit from an image codec's codes.

A family that reads pictures through discrete codes can caption no better than those codes allow.
This fits a logistic regression on one-hot codes (and, for comparison, on the pictures the codes
decode to, and a 5-nearest-neighbour reader of those) on the digits world's training pictures, and
scores them on its held-out pictures: a ceiling for the caption task that needs no language model.

    .venv/bin/python docs/tools/codec_ceiling.py                                   # the world's PatchVQCodec
    .venv/bin/python docs/tools/codec_ceiling.py --codec seed --path runs/families/seed/tokenizer_stage2/tokenizer
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from unimodal.modalities import PatchVQCodec, SeedImageCodec
from unimodal.schema import Part
from unimodal.worlds import resolve

WORDS = "zero one two three four five six seven eight nine".split()


def labelled_pictures(world: Path, split: str) -> dict[str, int]:
    """Each picture of the split's captioned documents, with the one digit its text names."""
    pictures = {}
    for line in (world / f"image-text-pretrain-{split}.jsonl").open():
        doc = json.loads(line)
        images = [p["path"] for p in doc["parts"] if p["type"] == "image"]
        text = " ".join(p.get("text") or "" for p in doc["parts"] if p["type"] == "text").lower()
        named = [i for i, word in enumerate(WORDS) if re.search(rf"\b{word}\b", text)]
        if len(images) == 1 and len(named) == 1:
            pictures[images[0]] = named[0]
    return pictures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codec", choices=["patch-vq", "seed"], default="patch-vq")
    parser.add_argument("--path", default="builtin:digits/image_codec", help="the fitted codec's directory")
    parser.add_argument("--world", default="builtin:digits/tokenizer.model", help="any file of the digits world")
    args = parser.parse_args()
    world = Path(resolve(args.world)).parent
    codec = (PatchVQCodec if args.codec == "patch-vq" else SeedImageCodec)(path=resolve(args.path))

    def read(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pictures = labelled_pictures(world, split)
        codes = [codec.encode(Part("image", data=np.asarray(Image.open(world / path).convert("RGB")))).ravel() for path in pictures]
        decoded = [np.asarray(codec.decode(c), dtype=np.float32).ravel() for c in codes]
        return np.stack(codes), np.stack(decoded), np.array(list(pictures.values()))

    (train_codes, train_pixels, train_y), (test_codes, test_pixels, test_y) = read("train"), read("test")
    size = int(max(train_codes.max(), test_codes.max())) + 1

    def one_hot(codes: np.ndarray) -> np.ndarray:
        out = np.zeros((len(codes), codes.shape[1] * size), np.float32)
        for slot in range(codes.shape[1]):
            out[np.arange(len(codes)), slot * size + codes[:, slot]] = 1
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs convergence notes on the pixel reader
        scores = {
            "logistic regression on one-hot codes": LogisticRegression(max_iter=2000).fit(one_hot(train_codes), train_y).score(one_hot(test_codes), test_y),
            "logistic regression on decoded pixels": LogisticRegression(max_iter=2000).fit(train_pixels, train_y).score(test_pixels, test_y),
            "5-nearest neighbours on decoded pixels": KNeighborsClassifier(5).fit(train_pixels, train_y).score(test_pixels, test_y),
        }
    print(f"{args.codec} codec: {train_codes.shape[1]} codes of {size} per picture; {len(train_y)} training, {len(test_y)} held-out pictures")
    for name, score in scores.items():
        print(f"  {name:40s} {score:.3f}")


if __name__ == "__main__":
    main()
