"""``unimodal data encode``: turn the images and audio of existing shards into integer codes, once.

Tokenizing media on the fly costs a forward pass of a vision or audio tokenizer per sample on
every epoch; pre-encoded shards store ``.npy`` codes instead, and the data pipeline splices them
into the sequence as ids. ``stats.json`` of the new shards records, under ``codes``, each
modality's tokenizer fingerprint (name, sizes, weight checksum). The data module reads it back
(:func:`code_sources`): shard sets whose codes come from different tokenizers, codes that do not
fit the vocabulary's code ranges, or a configured codec that is not the one that wrote them, are
refused, and the fingerprint becomes part of the vocabulary layout saved with checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import tarfile
from collections.abc import Callable, Collection, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from unimodal.data.media import decode_media
from unimodal.data.shards import (
    MAX_BYTES_PER_SHARD,
    STATS_FILE,
    ShardError,
    ShardStats,
    absolute_spec,
    expand_shards,
    held_out,
    is_complete_tar,
    is_streamed,
    read_documents,
    read_stats,
    save_stats,
    write_shards,
)
from unimodal.errors import UserError
from unimodal.modalities.base import MediaCodec, describe_fingerprint
from unimodal.schema import Document, DocumentError, Part, read_json_object

CODES_KEY = "codes"


def read_code_sources(spec: str | Path) -> dict[str, dict[str, Any]]:
    """modality -> fingerprint of the tokenizer that wrote the shards' codes (empty for raw media,
    and for streamed shards, which have no ``stats.json`` beside them)."""
    if is_streamed(spec):
        return {}
    # stats.json sits beside the shards of a directory, brace pattern or shard file
    stats = read_stats(Path(expand_shards(spec)[0]).parent)
    return stats.get(CODES_KEY, {}) if stats else {}


def record_code_sources(out_dir: str | Path, sources: dict[str, dict[str, Any]], **extra: Any) -> None:
    """Add the tokenizer fingerprints (and ``extra`` keys) to a shard directory's ``stats.json``."""
    stats = read_stats(out_dir) or {}
    stats[CODES_KEY] = sources
    stats.update(extra)
    save_stats(out_dir, stats)


def code_sources(
    paths: list[str], code_ranges: dict[str, int], code_layers: dict[str, int], codecs: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The fingerprint of each code range's tokenizer, checked across shard sets, ranges and codecs.

    A range filled on the fly by a configured codec takes that codec's fingerprint.
    """
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for path in paths:
        for modality, fingerprint in read_code_sources(path).items():
            if modality in found and found[modality][1] != fingerprint:
                other, theirs = found[modality]
                raise ValueError(
                    f"{path} holds {modality} codes of tokenizer [{describe_fingerprint(fingerprint)}] but {other} holds codes of "
                    f"[{describe_fingerprint(theirs)}]; training on codes from different tokenizers is refused: re-encode one set"
                )
            found[modality] = (path, fingerprint)
    sources = {}
    for modality, (path, fingerprint) in found.items():
        _check_range(f"{path} holds", modality, fingerprint, code_ranges, code_layers)
        codec = codecs.get(modality)
        if codec is not None and codec.fingerprint() != fingerprint:
            raise ValueError(
                f"{path} holds {modality} codes of tokenizer [{describe_fingerprint(fingerprint)}] but the configured {modality} "
                f"codec is [{describe_fingerprint(codec.fingerprint())}]; codes from a different tokenizer are refused: re-encode "
                f"the raw shards with this codec (unimodal data encode) or configure the one that wrote them"
            )
        sources[modality] = fingerprint
    for modality, codec in codecs.items():
        if modality in code_ranges and modality not in sources:
            sources[modality] = codec.fingerprint()
            if "codebook_size" in sources[modality]:
                _check_range(f"the configured {modality} codec gives", modality, sources[modality], code_ranges, code_layers)
    return sources


def _check_range(
    holder: str, modality: str, fingerprint: dict[str, Any], code_ranges: dict[str, int], code_layers: dict[str, int]
) -> None:
    """The code range must be the tokenizer's codebook times its layers: ids are ``offset + layer *
    (range / layers) + code``, so another size drops codes past it or leaves rows a model can write
    but the codec cannot decode."""
    layers = int(fingerprint.get("layers", 1))
    size = int(fingerprint["codebook_size"]) * layers
    if code_ranges.get(modality) != size or code_layers.get(modality, 1) != layers:
        raise ValueError(
            f"{holder} {modality} codes of {layers} layer{'' if layers == 1 else 's'} x {fingerprint['codebook_size']} "
            f"([{describe_fingerprint(fingerprint)}]) but the data config gives "
            f"code_ranges.{modality}={code_ranges.get(modality)}, "
            f"code_layers.{modality}={code_layers.get(modality, 1)}"
        )


JOB_FILE = ".encode.json"  # what an encode in progress was asked to do, so that a resume matches it


class EncodeInterrupted(UserError):
    """Ctrl-C during ``data encode``: the complete shards stay, and ``--resume`` goes on after them."""

    exit_code = 130  # 128 + SIGINT


def _shards(count: int) -> str:
    return f"{count} complete shard{'' if count == 1 else 's'}"


def _write(documents: Callable[[], Iterator[Document]], out: Path, max_docs_per_shard: int,
           continuing: ShardStats | None) -> dict[str, Any]:
    """The shards of ``documents()``; an interruption or a bad document keeps the complete ones and
    says how to go on from them, and with none complete leaves no job record to refuse a new start."""
    try:
        with contextlib.closing(documents()) as docs:  # an error closes the progress bar before it is printed
            return write_shards(docs, out, max_docs_per_shard, MAX_BYTES_PER_SHARD, "shard",
                                continuing=continuing if continuing is not None else ShardStats())
    except BaseException as err:
        kept = len(list(out.glob("shard-*.tar")))
        if not kept:
            (out / JOB_FILE).unlink(missing_ok=True)
        if isinstance(err, KeyboardInterrupt):
            raise EncodeInterrupted(f"interrupted ({str(err) or 'Ctrl-C'}); {_shards(kept)} kept in {out}: run the same command with "
                                    "--resume to go on") from None
        if isinstance(err, DocumentError) and kept:  # a bad document or medium: what was encoded before it stays
            raise DocumentError(f"{err}; {_shards(kept)} kept in {out}: fix it and run the same command with --resume") from None
        raise


def _continued(out: Path, job: dict[str, Any], resume: bool) -> ShardStats | None:
    """The complete shards of an interrupted encode of the same job in ``out``, counted from the
    shards themselves (a shard cut off by a kill is removed); None when there is none to go on from."""
    job_file = out / JOB_FILE
    if not job_file.is_file():
        return None
    if (out / STATS_FILE).is_file():  # written, whole, once every shard was: a kill came before the job record went
        if CODES_KEY not in (read_stats(out) or {}):
            raise FileExistsError(f"{out} holds a stats.json without the codes' record and an encode's job record: "
                                  "encode again into an empty directory")
        job_file.unlink()
        raise FileExistsError(f"{out} holds a finished encode (its stats.json is written): nothing to resume; "
                              "write to an empty directory to encode again")
    shards = sorted(out.glob("shard-*.tar"))
    if not resume:
        raise FileExistsError(f"{out} holds an interrupted encode ({len(shards)} shard{'' if len(shards) == 1 else 's'}): "
                              "add --resume to go on from its complete shards, or write to an empty directory")
    recorded = read_json_object(job_file, "encode into an empty directory")
    if isinstance(recorded.get("source"), str):  # as typed, by earlier versions
        recorded["source"] = absolute_spec(recorded["source"])
    changed = [key for key in job if recorded.get(key) != job[key]]
    if changed:
        raise ValueError(f"{out} holds an encode of other settings ({', '.join(changed)} differ): resume it with the same "
                         "source, codecs and options, or encode into an empty directory")
    counted, kept = ShardStats(), 0
    for index, shard in enumerate(shards):
        # a closed shard ends with tar's end marker and was closed full, by its count or its size
        if shard.name != f"shard-{index:06d}.tar" or not is_complete_tar(shard):
            break
        try:
            docs = list(read_documents([str(shard)], decode=False))
        except (ShardError, tarfile.TarError, OSError):
            break
        if len(docs) != job["max_docs_per_shard"] and shard.stat().st_size < MAX_BYTES_PER_SHARD:
            break
        for doc in docs:
            counted.add(doc, shard.name, {p.media: len(p.data.data) for p in doc.parts if p.type != "text"})
        kept += 1
    for shard in shards[kept:]:  # cut off by a kill, or written after such a shard
        shard.unlink()
    return counted


def is_flippable_pair(doc: Document) -> bool:
    """One image and one text, neither a chat turn: a chat's order is its meaning (a prompt after
    its answer would teach replies to nothing)."""
    return sorted(p.type for p in doc.parts) == ["image", "text"] and all(p.role is None for p in doc.parts)


def flip_pair(doc: Document) -> None:
    """Swap the two parts; the loss flags stay with the positions, so an image-first pair that
    supervises its caption becomes a caption-first pair that supervises its image."""
    first, second = doc.parts
    first.loss, second.loss = second.loss, first.loss
    doc.parts.reverse()


def check_encode(
    src: str | Path, modalities: Collection[str], *, max_docs_per_shard: int = 1000, batch_size: int = 32, flip_pairs: float = 0.0
) -> dict[str, Any]:
    """What :func:`encode_shards` can refuse before a codec loads (a SEED or Chameleon load takes
    minutes): its options, and a source that must exist and hold no codes of ``modalities`` yet.
    Returns the code fingerprints the source already holds."""
    if not modalities:
        raise ValueError("nothing to encode: give an image tokenizer, an audio codec or both")
    if max_docs_per_shard < 1 or batch_size < 1:
        raise ValueError(f"--max_docs_per_shard and --batch_size must be at least 1, got {max_docs_per_shard} and {batch_size}")
    if not 0 <= flip_pairs <= 1:
        raise ValueError(f"--flip_pairs is a probability, in [0, 1]; got {flip_pairs}")
    sources = read_code_sources(src)
    again = sorted(set(sources) & set(modalities))
    if again:
        raise ValueError(
            f"{src} already holds {', '.join(again)} codes ([{describe_fingerprint(sources[again[0]])}]); encode the raw shards"
        )
    return sources


def encode_shards(
    src: str | Path,
    out_dir: str | Path,
    codecs: dict[str, MediaCodec],
    *,
    max_docs_per_shard: int = 1000,
    flip_pairs: float = 0.0,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """Write ``out_dir`` shards where every raw media part of a modality in ``codecs`` holds its
    integer codes (``.npy``); other parts are copied as they are. Returns the new stats.
    Media of ``batch_size`` documents go through a codec together where it has ``encode_batch``.

    ``flip_pairs``: the probability of swapping the two parts of a one-image-one-text document
    that is not a chat (SEED-LLaMA trains on image->text and text->image pairs half the time
    each), drawn per document key so that a resumed encode flips the same pairs.

    An interrupted encode keeps its complete shards; ``resume`` goes on after them (the source's
    documents are read in the same order, and those already written are skipped, not encoded).
    """
    sources = check_encode(src, codecs, max_docs_per_shard=max_docs_per_shard, batch_size=batch_size, flip_pairs=flip_pairs)
    fingerprints = {modality: codec.fingerprint() for modality, codec in codecs.items()}
    out = Path(out_dir)
    # the source as an absolute path, so that a resume may name it either way
    source = absolute_spec(src)
    job = {"source": source, "codes": fingerprints, "max_docs_per_shard": max_docs_per_shard, "flip_pairs": flip_pairs,
           "seed": seed}
    job = json.loads(json.dumps(job))  # as the job file reads back (tuples become lists)
    continuing = _continued(out, job, resume)
    done = continuing.documents if continuing is not None else 0

    def encoded(batch: list[Document]) -> list[Document]:
        """Encode the raw media of a batch of documents, one codec call per modality."""
        for modality, codec in codecs.items():
            parts = [(doc, part) for doc in batch for part in doc.parts if part.type == modality]
            decoded = []
            for doc, part in parts:
                where = f"{doc.where()}, {part.type} part {part.media}"
                if part.data.ext == "npy":
                    raise DocumentError(f"{where}: already pre-encoded (.npy); encode shards that hold raw media")
                decoded.append(Part(part.type, media=part.media, data=decode_media(part.data, part.type, where)))
            try:
                codes = codec.encode_batch(decoded) if decoded else []
            except ValueError as err:
                raise DocumentError(f"{batch[0].where()} (or one of the {len(batch)} documents after it): {err}") from None
            for (_, part), array in zip(parts, codes):
                part.data = np.asarray(array).astype(np.int32)
        for doc in batch:
            if is_flippable_pair(doc) and held_out(f"flip {seed} {doc.key}", flip_pairs):
                flip_pair(doc)
        return batch

    def documents() -> Iterator[Document]:
        # runs once write_shards has checked the directory, so the job file never lands in a refused one
        (out / JOB_FILE).write_text(json.dumps(job, indent=2) + "\n")
        source = read_documents(src, decode=False)
        for skipped in islice(source, done):
            if continuing is not None and skipped.key not in continuing.keys:
                raise ValueError(f"{src} changed since {out} was begun ({skipped.where()} is not among the documents "
                                 "written): encode into an empty directory")
        with tqdm(source, desc=f"encoding {src}", unit="doc", initial=done, disable=not progress) as bar:
            docs = iter(bar)
            while batch := list(islice(docs, batch_size)):
                yield from encoded(batch)

    stats = _write(documents, out, max_docs_per_shard, continuing)
    # one write with the codes' record: a stats.json marks a finished encode
    save_stats(out, stats | {CODES_KEY: {**sources, **fingerprints}, "encoded_from": source})
    (out / JOB_FILE).unlink()
    return stats | {CODES_KEY: {**sources, **fingerprints}}
