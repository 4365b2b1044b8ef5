"""``unimodal data fit-codec``: refit a trainable codec's codebooks on the user's own media.

Why: the framework's own codecs (the digits speech codec ``digit-audio`` and the patch VQ
``patch-vq``) were fitted by k-means on the digits world's synthetic voices and digits. On other
media most frames fall to a few centroids (the built-in audio codec used 20 of its 256 first-layer
codes on new voices), and a model cannot tell apart what the codes do not. The refit runs the
codec's own ``fit`` (the same seeded k-means) on the user's media and keeps its settings (codebook
size, layers, features), so the vocabulary's code ranges keep their size; but every code now means
other media, so the refit codec has a new fingerprint (its weight checksum) and the checks that
compare fingerprints (``code_sources`` for shards, ``check_extends`` for a fine-tune,
``Processor.from_json`` for an export) refuse what the old codec made. ``docs/refit-codec.md``.

The SEED tokenizer's codebook is trained together with its decoder, so it is refused here with a
pointer to tokenizer stage 2; pretrained neural codecs (EnCodec, Mimi, DAC, ...) are not refit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from unimodal.data.media import MAX_AUDIO_SECONDS, MediaBytes, decode_media, source_media
from unimodal.data.shards import is_streamed, read_documents
from unimodal.errors import refuse_nonempty
from unimodal.modalities.base import CODEC_FILE
from unimodal.modalities.digit_audio import DigitAudioCodec
from unimodal.modalities.image_continuous import center_crop
from unimodal.modalities.image_discrete import PatchVQCodec
from unimodal.modalities.loading import FITTED_CODECS, fitted_kind, load_codec
from unimodal.modalities.seed_tokenizer import CONFIG_FILE as SEED_CONFIG_FILE
from unimodal.schema import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, Part

FittedCodec = DigitAudioCodec | PatchVQCodec
FILE_EXTENSIONS = {"audio": AUDIO_EXTENSIONS, "image": IMAGE_EXTENSIONS}
UNITS = {"audio": "clips", "image": "images"}


@dataclass
class FitResult:
    kind: str
    src: str
    items: int
    modality: str
    codebook_size: int
    used_before: int | None  # None: a new codec, nothing to compare with
    used_after: int
    old: dict[str, Any] | None
    new: dict[str, Any]
    out: Path

    def summary(self) -> str:
        """One line: what was fitted and how many first-layer codes the media uses, before and after."""
        media = f"{self.items} {UNITS[self.modality]} of {self.src}"
        if self.old is None:
            return (f"fitted a new {self.kind} codec on {media}: first-layer codes used {self.used_after} of "
                    f"{self.codebook_size}; checksum {self.new['checksum']}; wrote {self.out}")
        change = (f"checksum {self.old['checksum']} -> {self.new['checksum']}: codes, shards and models made with the old "
                  "codec are refused (docs/refit-codec.md)") if self.new != self.old else "codebooks unchanged (same fingerprint)"
        return (f"refit the {self.kind} codec on {media}: first-layer codes used {self.used_before} -> {self.used_after} "
                f"of {self.codebook_size}; {change}; wrote {self.out}")


def trainable_codec(spec: str) -> tuple[FittedCodec, dict[str, Any] | None]:
    """The codec to fit and its fingerprint before: a fitted codec directory (an export's
    ``codecs/audio``, ``builtin:digits/audio_codec``), or a kind of :data:`FITTED_CODECS` for a new
    one (default settings, no fingerprint before)."""
    if spec in FITTED_CODECS:
        return (DigitAudioCodec(max_seconds=MAX_AUDIO_SECONDS) if spec == "digit-audio" else PatchVQCodec()), None
    path = Path(spec)
    if (path / SEED_CONFIG_FILE).is_file():
        raise ValueError(
            f"{spec} is a SEED tokenizer: its codebook trains with its decoder, not by k-means; refit it on shards of your "
            f"images with tokenizer stage 2: unimodal train recipes/seed/tokenizer_stage2.yaml "
            f"--model.init_args.init_from={spec} --data.init_args.datasets=[SHARDS] (docs/refit-codec.md)"
        )
    if not (path / CODEC_FILE).is_file():
        raise ValueError(
            f"{spec}: neither a fitted codec directory (with {CODEC_FILE}, e.g. an export's codecs/audio) nor a kind "
            f"({', '.join(FITTED_CODECS)}); pretrained neural codecs (EnCodec, Mimi, DAC, SpeechTokenizer, Chameleon) are not refit"
        )
    kind = fitted_kind(path)
    codec = load_codec(FITTED_CODECS[kind].modality, path, max_seconds=MAX_AUDIO_SECONDS)
    return codec, codec.fingerprint()


def _media(src: str, modality: str) -> Iterator[tuple[str, MediaBytes]]:
    """``(where, encoded file)`` of each raw ``modality`` item: the files of a directory of media
    (searched recursively), or the parts of shards (a directory of .tar, a pattern, a shard)."""
    path = Path(src)
    if path.is_dir() and not any(path.glob("*.tar")):
        for file in sorted(p for p in path.rglob("*") if p.suffix.lower().lstrip(".") in FILE_EXTENSIONS[modality] and p.is_file()):
            yield str(file), source_media({"type": modality, "path": str(file)}, path, src, 0)  # limits as when packed
        return
    for doc in read_documents(src, decode=False):
        for part in doc.parts:
            if part.type == modality and part.data.ext != "npy":  # pre-encoded codes are no media to fit on
                yield f"{doc.where()}, {modality} part {part.media}", part.data


def read_media(src: str, codec: FittedCodec, limit: int | None = None, progress: bool = True) -> list[Any]:
    """The decoded items, each reduced to what the codec reads (mono audio at its rate, an image
    cropped to its size) so that many fit in memory."""
    modality, items = codec.modality, []
    if not (Path(src).exists() or is_streamed(src) or "{" in src):  # a local path, no brace pattern, that is not there
        raise FileNotFoundError(f"{src} does not exist (a folder of {modality} files, or shards)")
    found = islice(_media(src, modality), limit)
    # gone once closed, before an error is printed (the summary line counts what was read)
    with tqdm(found, desc=f"reading {src}", unit=UNITS[modality][:-1], disable=not progress, leave=False) as bar:
        for where, media in bar:
            data = decode_media(media, modality, where)
            if modality == "audio":
                items.append((codec.prepare(*data), codec.sample_rate))
            else:
                items.append(center_crop(data, codec.pixels.transform.size))
    if not items:
        raise ValueError(f"{src}: no {modality} media to fit the {modality} codec on "
                         f"(files ending in {', '.join(FILE_EXTENSIONS[modality])}, or shards with raw {modality} parts)")
    return items


def first_layer_usage(codec: FittedCodec, items: list[Any], progress: bool = True) -> int:
    """How many of the first layer's codes the items use: codes the media never hits are rows the
    model cannot learn anything about, and frames that share a code are one sound to it."""
    layers, used = codec.fingerprint()["layers"], np.zeros(codec.codebook_size, dtype=bool)
    with tqdm(items, desc="counting codes", unit=UNITS[codec.modality][:-1], disable=not progress, leave=False) as bar:
        for item in bar:
            used[np.asarray(codec.encode(Part(codec.modality, data=item))).reshape(layers, -1)[0]] = True
    return int(used.sum())


@contextmanager
def one_thread() -> Iterator[None]:
    """k-means and nearest-centroid lookups are many small matmuls: on a busy 2-core machine torch's
    thread pool made a 256-code k-means of 1,785 frames take 12 s, against 0.1 s on one thread
    (an hour of audio, 112k frames: 14 s a layer on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit_codec(
    src: str, codec: str, out: str | Path, *, seed: int = 0, limit: int | None = None, progress: bool = True
) -> FitResult:
    """Fit ``codec`` (a fitted codec directory, or a kind for a new one) on the media of ``src``
    and save it to ``out``, a directory that loads like the original."""
    out = Path(out)
    refuse_nonempty(out, "write the refit codec to a new directory")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1 (clips or images to fit on), got {limit}")
    fitted, old = trainable_codec(codec)
    items = read_media(src, fitted, limit, progress)
    with one_thread():
        before = first_layer_usage(fitted, items, progress) if old is not None else None
        fitted.fit(items, seed=seed, progress=progress)
        after = first_layer_usage(fitted, items, progress)
    fitted.save(out)
    new = fitted.fingerprint()
    return FitResult(new["name"], src, len(items), fitted.modality, fitted.codebook_size, before, after, old, new, out)
