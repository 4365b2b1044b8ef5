"""Built-in datasets, built offline on first use and addressed as ``builtin:NAME/REST``.

A recipe (or its ``--tiny`` variant) can name ``builtin:text/train`` or
``builtin:text/tokenizer.model`` and the data is built once under ``$UNIMODAL_DATA_HOME``
(default ``data/generated``); ``BUILDERS`` names each world's builder.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from unimodal.data.jsonl import pack_jsonl
from unimodal.data.sentencepiece_trainer import train_tokenizer
from unimodal.locks import build_lock
from unimodal.modalities.seed_tokenizer import tiny_tokenizer
from unimodal.schema import BUILTIN_PREFIX
from unimodal.worlds.chat import build_chat
from unimodal.worlds.codes import build_codes
from unimodal.worlds.digits import build_world
from unimodal.worlds.shapes import build_shapes
from unimodal.worlds.stdlib_text import write_corpus

log = logging.getLogger("unimodal.data")


def build_text(root: Path) -> None:
    """The standard-library docstring corpus: train/val shards and a 1024-piece tokenizer."""
    write_corpus(root)
    train_tokenizer(root / "train.jsonl", root / "tokenizer.model", vocab_size=1024)
    for split in ("train", "val"):
        pack_jsonl(root / f"{split}.jsonl", root / split, max_docs_per_shard=64, progress=False)


def build_seed_tokenizer(root: Path) -> None:
    """``builtin:seed_tokenizer/tiny``: a random tiny SEED tokenizer (16x16 images, 8 codes of 64)."""
    tiny_tokenizer().save_pretrained(root / "tiny")


BUILDERS: dict[str, Callable[[Path], object]] = {
    "digits": build_world,
    "chat": build_chat,
    "text": build_text,
    "shapes": build_shapes,
    "codes": build_codes,
    "seed_tokenizer": build_seed_tokenizer,
}
# Bumped when a builder's output changes, so that a data home built by another release is
# rebuilt rather than silently read.
BUILD_VERSIONS: dict[str, int] = {"digits": 9, "text": 3, "chat": 3, "shapes": 2, "codes": 2}


def data_home() -> Path:
    return Path(os.environ.get("UNIMODAL_DATA_HOME", "data/generated"))


def resolve(path: str) -> str:
    """Return a real path for ``path``, building the built-in dataset it names if needed."""
    if not path.startswith(BUILTIN_PREFIX):
        return path
    name, _, rest = path[len(BUILTIN_PREFIX) :].partition("/")
    if name not in BUILDERS:
        raise ValueError(f"unknown built-in dataset {name!r} in {path!r}; known: {', '.join(sorted(BUILDERS))}")
    root = data_home() / name
    root.parent.mkdir(parents=True, exist_ok=True)
    version = str(BUILD_VERSIONS.get(name, 1))
    building = Path(str(root) + ".building")  # there while a build runs: a folder it left is the builder's to remove
    with build_lock(root.absolute()):
        stamp = root / ".built"
        built = (stamp.read_text().strip() or "1") if stamp.exists() else None  # an empty stamp is version 1
        if built != version:
            if built is None and not building.exists() and root.is_dir() and any(root.iterdir()):
                raise FileExistsError(f"{root} holds files that no build of the built-in {name!r} data left (no {stamp.name}): "
                                      f"move them, or set UNIMODAL_DATA_HOME to another directory")
            log.info("building the built-in dataset %r (version %s) under %s (once)", name, version, root)
            building.touch()
            shutil.rmtree(root, ignore_errors=True)  # a build cut short leaves no .built: start over
            root.mkdir()
            BUILDERS[name](root)
            stamp.write_text(version + "\n")
            building.unlink()
    return str(root / rest)
