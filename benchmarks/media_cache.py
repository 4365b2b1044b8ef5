"""The processor's media cache: encoding the same documents epoch after epoch, with and without it.

A training run reads each picture and clip once per epoch; ``Processor.encoded_media`` keeps the
arrays its codecs made, by content, so a medium seen before costs a hash instead of a codec pass
(docs/vocabulary.md). Both sides encode the same documents of ``recipes/digits/pretrain.yaml``
(the digits world's pixel-patch and speech codecs), read and decoded once beforehand and encoded
once uncounted, for ``--epochs`` epochs; the baseline is the same processor with a cache of 0 bytes, which keeps
nothing. Both must give the same ids and features. Reported: seconds per epoch and the ratio of
the totals.

    python benchmarks/media_cache.py [--documents 1000] [--epochs 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from data_pipeline import data_module  # noqa: E402

from unimodal.data.processor import EncodedMedia  # noqa: E402

RECIPE = "recipes/digits/pretrain.yaml"


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    if min(args.documents, args.epochs) < 1:
        parser.error("--documents and --epochs must be >= 1")
    with tempfile.TemporaryDirectory() as root:
        dm = data_module(RECIPE, root, None)
        docs = list(islice(dm.train_stream().documents(), args.documents))
    media = sum(part.type != "text" for doc in docs for part in doc.parts)
    for doc in docs:  # a pass that neither side counts: the codecs' first-call costs
        dataclasses.replace(dm.processor, encoded_media=EncodedMedia(max_bytes=0)).encode(doc)
    sides = {"without the cache": EncodedMedia(max_bytes=0), "with the cache": EncodedMedia()}
    seconds, outputs = {}, {}
    for name, cache in sides.items():
        processor = dataclasses.replace(dm.processor, encoded_media=cache)
        epochs = []
        for _ in range(args.epochs):
            start = time.perf_counter()
            encoded = [processor.encode(doc) for doc in docs]
            epochs.append(time.perf_counter() - start)
        seconds[name], outputs[name] = epochs, encoded
    same = all(np.array_equal(a.ids, b.ids) and np.array_equal(a.features, b.features) for a, b in zip(*outputs.values()))
    print(f"{len(docs)} documents of {RECIPE} ({media} media parts), {args.epochs} epochs")
    for name, epochs in seconds.items():
        print(f"  {name:17s}: " + ", ".join(f"{s:.2f}" for s in epochs) + f" s per epoch, {sum(epochs):.2f} s in all")
    ratio = sum(seconds["without the cache"]) / sum(seconds["with the cache"])
    print(f"  without/with over {args.epochs} epochs: {ratio:.2f}x; the same ids and features: {same}")
    return ratio


if __name__ == "__main__":
    main()
