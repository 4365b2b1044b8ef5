"""WebDataset shards of documents: the format, writing, reading back, the bad-sample policy.

One document is one sample: ``KEY.json`` (``Document.to_json()``) plus one member per media index,
``KEY.{i}.{ext}``, holding the encoded file (png/jpg/flac/wav...) or a pre-encoded ``.npy`` array.
Reading is tolerant by choice: a :class:`BadSamplePolicy` skips and counts broken samples (and
broken tar files) so that one bad file does not stop a long run, but aborts when too many are bad,
since that means the data, not a file, is wrong. ``docs/data-format.md`` is the user-facing
description.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import webdataset as wds
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys

from unimodal.data.media import MAX_MEDIA_BYTES, MEDIA_EXTENSIONS, MediaBytes, decode_media
from unimodal.errors import UserError
from unimodal.schema import (
    SCHEMA,
    Document,
    DocumentError,
    Part,
    check_key,
    parse_document,
    read_json_object,
    sample_where,
    write_whole,
)

logger = logging.getLogger("unimodal.data")

STATS_FILE = "stats.json"
# there from a set's first shard until its stats.json: a set without stats.json is accepted (shards
# written elsewhere), one with this file is a write that was killed before it finished
WRITING_FILE = ".writing"
MAX_BYTES_PER_SHARD = 256 * 2**20  # a shard is closed at this size, or at its document count


class ShardError(DocumentError):
    """A shard (tar file) that cannot be read to its end."""


class TooManyBadSamples(UserError):
    """More of the data is broken than ``max_bad_fraction`` allows: the run stops."""


# ----------------------------------------------------------------------------------------------
# bad samples


@dataclass
class SkippedSample:
    key: str
    shard: str
    reason: str


@dataclass
class BadSamplePolicy:
    """Skip broken samples, but stop when more than ``max_bad_fraction`` of them are broken.

    ``min_samples`` keeps a few bad samples at the start of a stream from aborting a run; a
    fraction of 0 aborts on the first bad sample. A training stream only counts
    (``enforce=False``): its batches carry the counts to the training process, which applies
    the limit to their sum over every DataLoader worker and rank
    (:class:`unimodal.training.bad_samples.BadSampleTally`). Such a stream still stops by itself
    after ``STALLED`` bad samples in a row, since it then yields no batch that could report them.
    """

    max_bad_fraction: float = 0.01
    min_samples: int = 100
    enforce: bool = True
    seen: int = 0
    skipped: int = 0
    in_a_row: int = 0
    last_shard: str = ""
    kinds: Counter = field(default_factory=Counter)
    examples: list[SkippedSample] = field(default_factory=list)
    max_examples: int = 20
    warned: set[tuple[str, str]] = field(default_factory=set)

    STALLED = 1000

    def ok(self) -> None:
        self.seen += 1
        self.in_a_row = 0
        self._check()

    def skip(self, error: BaseException | str, key: str = "", shard: str = "", count: int = 1) -> None:
        """Count ``count`` broken samples (a shard cut short loses several at once)."""
        reason = str(error)
        self.seen += count
        self.skipped += count
        self.in_a_row += count
        self.last_shard = shard or self.last_shard
        self.kinds[type(error).__name__ if isinstance(error, BaseException) else "skipped"] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(SkippedSample(key, shard, reason))
        where = sample_where(key, shard) if key else shard
        if (key, shard) not in self.warned:  # a stream that loops over its shards meets the same sample again
            self.warned.add((key, shard))
            logger.warning("skipping %s", reason if reason.startswith(where) else f"{where}: {reason}")
        self._check()

    def over_limit(self, skipped: int, seen: int) -> bool:
        """Whether ``skipped`` bad of ``seen`` samples is more than this policy allows."""
        if not skipped:
            return False
        return skipped / seen > self.max_bad_fraction and (self.max_bad_fraction == 0 or seen >= self.min_samples)

    def _check(self) -> None:
        if self.enforce and self.over_limit(self.skipped, self.seen):
            raise TooManyBadSamples(self.summary())
        if not self.enforce and self.in_a_row >= self.STALLED:
            raise TooManyBadSamples(f"{self.in_a_row} bad samples in a row, the last in {self.last_shard}: {self.summary()}")

    def summary(self) -> str:
        """One line: the counts, the kinds of error and the first bad samples."""
        kinds = ", ".join(f"{n} {kind}" for kind, n in self.kinds.most_common())
        first = "; ".join(f"{s.key or '-'} in {s.shard}: {s.reason}" for s in self.examples[:3])
        return (
            f"too many bad samples: {self.skipped} of {self.seen} skipped "
            f"({self.skipped / max(self.seen, 1):.1%}, max_bad_fraction={self.max_bad_fraction}); "
            f"kinds: {kinds}; first: {first}"
        )


# ----------------------------------------------------------------------------------------------
# writing


@dataclass
class ShardStats:
    """What ``stats.json`` records; the same counter serves ``inspect_path`` on unpacked shards."""

    documents: int = 0
    modalities: dict[str, dict[str, int]] = field(
        default_factory=lambda: {
            "text": {"parts": 0, "characters": 0},
            "image": {"parts": 0, "bytes": 0},
            "audio": {"parts": 0, "bytes": 0},
        }
    )
    shards: dict[str, int] = field(default_factory=dict)
    keys: set[str] = field(default_factory=set)  # not saved: a writer's check for duplicates

    def add(self, doc: Document, shard: str, member_sizes: dict[int, int]) -> None:
        self.documents += 1
        self.keys.add(doc.key)
        self.shards[shard] = self.shards.get(shard, 0) + 1
        for part in doc.parts:
            counts = self.modalities[part.type]
            counts["parts"] += 1
            if part.type == "text":
                counts["characters"] += len(part.text or "")
            else:
                counts["bytes"] += member_sizes.get(part.media, 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "documents": self.documents,
            "modalities": self.modalities,
            "shards": [{"name": name, "documents": n} for name, n in self.shards.items()],
        }


def _media_member(part: Part, where: str) -> MediaBytes:
    if isinstance(part.data, MediaBytes):
        return part.data
    if isinstance(part.data, np.ndarray):
        buffer = io.BytesIO()
        np.save(buffer, part.data, allow_pickle=False)
        return MediaBytes("npy", buffer.getvalue())
    raise DocumentError(
        f"{where}: {part.type} part {part.media} holds {type(part.data).__name__}; "
        "expected MediaBytes (an encoded file) or a numpy array"
    )


def _sample(doc: Document) -> tuple[dict[str, Any], dict[int, int]]:
    """The tar members of one document, and the byte size of each media index."""
    check_key(doc.key)
    where = doc.where()
    members: dict[int, MediaBytes] = {}
    for part in doc.parts:
        if part.type == "text":
            continue
        if part.media is None:
            raise DocumentError(f"{where}: {part.type} part has no media index")
        media = _media_member(part, where)
        if media.ext not in MEDIA_EXTENSIONS[part.type]:
            raise DocumentError(
                f"{where}: {part.type} part {part.media} has extension {media.ext!r}, "
                f"expected one of {', '.join(MEDIA_EXTENSIONS[part.type])}"
            )
        if members.setdefault(part.media, media) != media:
            raise DocumentError(f"{where}: media index {part.media} is used by two different files")
    sample: dict[str, Any] = {"__key__": doc.key, "json": json.dumps(doc.to_json(), ensure_ascii=False).encode()}
    for index, media in members.items():
        sample[f"{index}.{media.ext}"] = media.data
    return sample, {index: len(media.data) for index, media in members.items()}


def write_shards(
    docs: Iterable[Document],
    out_dir: str | Path,
    max_docs_per_shard: int,
    max_bytes_per_shard: int,
    prefix: str,
    reject: Callable[[DocumentError], None] | None = None,
    continuing: ShardStats | None = None,
) -> dict[str, Any]:
    """Write the shards; a bad document raises, or goes to ``reject`` and is left out.

    On an error the shards written so far are removed, so that a fixed source can be packed again
    into the same directory. A resumable job passes ``continuing``, the stats of the complete shards
    it already wrote (empty at its start): new shards are numbered after those, and an error removes
    only the shard being written, so that the job can go on from the complete ones.
    """
    out = Path(out_dir)
    if "%" in prefix or "/" in prefix:
        raise ValueError(f"shard prefix {prefix!r} must not contain '%' or '/'")
    out.mkdir(parents=True, exist_ok=True)
    held = sorted(out.glob(f"{prefix}-*.tar"))
    kept = continuing.shards if continuing is not None else {}
    if not kept and (held or (out / STATS_FILE).exists()):
        # another set's shards, or a stats.json that may be the user's own
        what = f"shards ({held[0].name}, ...)" if held else STATS_FILE
        unfinished = " and no stats.json (if they are left from a pack that did not finish, delete them)" if held and not (
            out / STATS_FILE).exists() else ""
        raise FileExistsError(f"{out} already holds {what}{unfinished}; write to an empty directory")
    if kept and ([p.name for p in held] != sorted(kept) or (out / STATS_FILE).exists()):
        raise FileExistsError(f"{out} holds other files than the {len(kept)} complete shards being continued")
    stats = continuing if continuing is not None else ShardStats()
    writer: wds.ShardWriter | None = None
    try:
        for doc in docs:
            try:
                sample, sizes = _sample(doc)
                if doc.key in stats.keys:
                    raise DocumentError(f"{doc.where()}: duplicate key {doc.key!r}")
            except DocumentError as err:
                if reject is None:
                    raise
                reject(err)
                continue
            if writer is None:  # opened lazily so that no input writes no empty shard
                (out / WRITING_FILE).touch()
                writer = wds.ShardWriter(
                    str(out / f"{prefix}-%06d.tar"),
                    maxcount=max_docs_per_shard,
                    maxsize=max_bytes_per_shard,
                    start_shard=len(kept),
                    verbose=0,
                    encoder=False,
                    mtime=0,  # byte-identical shards for identical input
                )
            writer.write(sample)
            stats.add(doc, Path(writer.fname).name, sizes)
    except BaseException:
        written = set() if continuing is not None else set(stats.shards)
        if writer is not None:
            written.add(Path(writer.fname).name)
            writer.close()
        for name in written:
            (out / name).unlink(missing_ok=True)
        if not kept:  # nothing of this set is left
            (out / WRITING_FILE).unlink(missing_ok=True)
        raise
    if writer is not None:
        writer.close()
    return stats.to_dict()


def save_stats(out_dir: str | Path, stats: dict[str, Any]) -> None:
    """Write ``stats.json`` whole or not at all (a temporary file renamed): it marks a finished set."""
    write_whole(Path(out_dir) / STATS_FILE, json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    (Path(out_dir) / WRITING_FILE).unlink(missing_ok=True)


def read_stats(out_dir: str | Path) -> dict[str, Any] | None:
    """A shard directory's ``stats.json``, or None where it has none; a damaged one is refused in one line."""
    path = Path(out_dir) / STATS_FILE
    if not path.is_file():
        return None
    return read_json_object(path, "write the shards again, or delete it to have them counted")


def write_documents(
    docs: Iterable[Document],
    out_dir: str | Path,
    max_docs_per_shard: int = 1000,
    max_bytes_per_shard: int = MAX_BYTES_PER_SHARD,
    prefix: str = "shard",
) -> dict[str, Any]:
    """Write documents to ``out_dir/{prefix}-000000.tar ...`` plus ``stats.json``; return the stats.

    Media parts carry ``MediaBytes`` (an encoded file) or a numpy array (stored as ``.npy``). A
    shard is closed once it holds ``max_docs_per_shard`` documents or ``max_bytes_per_shard`` bytes.
    """
    stats = write_shards(docs, out_dir, max_docs_per_shard, max_bytes_per_shard, prefix)
    save_stats(out_dir, stats)
    return stats


def held_out(key: str, fraction: float) -> bool:
    """Whether a document belongs to the validation split: a stable hash of its key."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) < fraction * 2**32


# ----------------------------------------------------------------------------------------------
# reading


def is_streamed(spec: str | Path) -> bool:
    """A shard spec that is no local file: a ``pipe:`` command or a URL (``s3://``, ``https://``, ...)."""
    return str(spec).startswith("pipe:") or "://" in str(spec)


def absolute_spec(spec: str | Path) -> str:
    """``spec`` with each local path absolute (pieces joined by ``::`` each on its own); a
    ``pipe:`` command or a URL stays as written, which ``os.path.abspath`` would mangle."""
    return "::".join(piece if is_streamed(piece) else os.path.abspath(piece) for piece in str(spec).split("::"))


def expand_shards(spec: str | Path, allow_pipe: bool = False) -> list[str]:
    """Shard URLs of a directory (its ``*.tar``), a brace pattern (``a-{000..009}.tar``) or one file.

    A ``pipe:`` URL runs its text as a shell command (WebDataset's streaming form), so it is
    refused unless ``allow_pipe`` (a recipe's ``data.init_args.allow_pipe_urls: true``)."""
    spec = str(spec)
    if os.path.isdir(spec):
        urls = sorted(str(p) for p in Path(spec).glob("*.tar"))
        if not urls:
            raise FileNotFoundError(f"{spec}: directory holds no .tar shards")
        _refuse_special_files(urls)
        _refuse_incomplete(spec, urls)
        return urls
    if spec.endswith((".jsonl", ".json")) and os.path.isfile(spec):
        raise ValueError(f"{spec} is a source JSONL, not shards: pack it first (unimodal data pack {spec} --out DIR) and give DIR")
    urls = expand_urls(spec)  # braces, and "::" between specs: any of them may be a pipe:
    piped = next((u for u in urls if u.startswith("pipe:")), None)
    if piped is not None and not allow_pipe:
        raise ValueError(
            f"{piped[:80]}: a pipe: shard URL runs a shell command; refused unless the recipe sets data.init_args.allow_pipe_urls: true"
        )
    local = [u for u in urls if not is_streamed(u)]
    missing = [u for u in local if not os.path.exists(u)]
    if missing and len(urls) == 1:
        raise FileNotFoundError(f"{spec} does not exist (a folder of .tar shards, a shard or a brace pattern)")
    if missing:
        raise FileNotFoundError(f"{spec}: {len(missing)} of {len(urls)} shards do not exist (first: {missing[0]})")
    _refuse_special_files(local)
    if len(local) == 1 == len(urls) and os.path.isfile(local[0]) and os.path.getsize(local[0]) and not tarfile.is_tarfile(local[0]):
        raise ValueError(f"{spec} is not a tar shard (a folder of .tar shards, a shard or a brace pattern)")
    return urls


def _refuse_incomplete(directory: str, urls: list[str]) -> None:
    """A set read as whole must be whole: one whose writing was killed (``kill -9``, a lost
    machine: ``.writing`` and no ``stats.json``), or one missing a shard its ``stats.json`` lists,
    would train on a part of the data as if it were all."""
    stats = Path(directory) / STATS_FILE
    if not stats.is_file():
        if (Path(directory) / WRITING_FILE).is_file():
            raise FileNotFoundError(f"{directory}: the command that wrote these shards did not finish ({WRITING_FILE} and no "
                                    f"{STATS_FILE}); run it again (`unimodal data encode` goes on with --resume)")
        return
    listed = _shard_index(directory, stats.stat().st_mtime_ns)
    missing = sorted(set(listed) - {Path(url).name for url in urls})
    if missing:
        raise FileNotFoundError(f"{directory}: {len(missing)} of the {len(listed)} shards its {STATS_FILE} lists are missing "
                                f"(first: {missing[0]}); write the set again (a built-in world's: delete the world's folder to have it built again)")


def _refuse_special_files(paths: list[str]) -> None:
    """A FIFO or device named like a shard would block its reader for ever."""
    dangling = next((p for p in paths if not os.path.exists(p)), None)
    if dangling is not None:
        raise FileNotFoundError(f"{dangling} is a link to nothing; remove it or point it at a shard")
    special = next((p for p in paths if not os.path.isdir(p) and not os.path.isfile(p)), None)
    if special is not None:
        raise ValueError(f"{special} is not a regular file (a FIFO, socket or device); shards are .tar files")


def present_shard_sets(paths: Iterable[str]) -> tuple[list[str], list[str]]:
    """The shard sets of ``paths`` that exist here, and those that do not (an export's record of
    its training data may name data that stayed on another machine)."""
    present, missing = [], []
    for path in paths:
        try:
            expand_shards(path)
            present.append(path)
        except (FileNotFoundError, ValueError):
            missing.append(path)
    return present, missing


def iter_samples(urls: Iterable[str], policy: BadSamplePolicy | None = None) -> Iterator[dict[str, Any]]:
    """Raw WebDataset samples (``__key__``, ``__url__``, ``json``, ``0.png`` ...) of the shards.

    A tar that breaks mid-way (truncated, corrupt) ends its shard: the samples read so far are
    kept and the shard is counted once as a bad sample, or raises ``ShardError`` without a policy.
    A tar cut between two members reads without error, so each shard is also checked against the
    index ``data pack`` writes (``stats.json``: documents per shard), and the documents it lacks
    are counted as bad; a shard without an index must end with tar's end-of-archive marker.
    """
    for url in urls:
        read, stream = 0, None
        try:
            if not is_streamed(url) and _compressed(url):
                raise ShardError(f"{url}: a compressed tar, whose members can expand without bound when read; "
                                 "shards are plain .tar files (as `unimodal data pack` writes them): decompress it")
            # opened here and closed below, read to its end or not (webdataset's opener leaves it open)
            stream = gopen(url)
            for read, sample in enumerate(group_by_keys(_tar_members(url, stream)), start=1):
                yield sample
        except Exception as err:  # noqa: BLE001 - any failure to read the tar is the shard's fault
            reason = re.sub(r" @ <.*>$", "", str(err.args[0]) if err.args else "")  # webdataset names its file object
            error = err if isinstance(err, ShardError) else ShardError(f"{url}: unreadable tar ({type(err).__name__}: {reason})")
            if policy is None:
                raise error from (None if error is err else err)
            policy.skip(error, shard=url)
            continue
        finally:
            if stream is not None:
                with contextlib.suppress(OSError):  # a pipe: stream left early reports its broken pipe here
                    stream.close()
        expected = _indexed_documents(url)
        if expected is not None and read < expected:
            error, lost = ShardError(f"{url}: cut short: {read} of the {expected} documents its index lists"), expected - read
        elif expected is None and not is_complete_tar(url):
            error, lost = ShardError(f"{url}: no tar end-of-archive marker: the file was cut short"), 1
        else:
            continue
        if policy is None:
            raise error
        policy.skip(error, shard=url, count=lost)


def _tar_members(url: str, stream: IO[bytes]) -> Iterator[dict[str, Any]]:
    """The files of one tar stream as webdataset's ``tar_file_expander`` yields them, to group by
    key, refusing (as :class:`ShardError`) a member tarfile would expand without bound: a sparse one,
    whose holes read as zeros (10 KB of tar can declare gigabytes), or one larger than any file
    `data pack` writes. webdataset reads every member whole, whatever it declares."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if not info.isreg() or WEBDATASET_META.match(info.name):
                continue
            if info.issparse() or info.size > MAX_MEDIA_BYTES:
                what = "a sparse member" if info.issparse() else f"a member of {info.size / 2**20:.0f} MiB"
                yield {}  # the sample before it is whole: kept
                raise ShardError(f"{url}: {info.name!r} is {what}, which `unimodal data pack` never writes (at most "
                                 f"{MAX_MEDIA_BYTES // 2**20} MiB a file, no sparse files); pack the data again")
            yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
            tar.members = []  # a stream's members are read once: keep none of their headers
    yield {}  # the end of the shard, for group_by_keys


# names webdataset keeps out of samples (``__key__.json`` style metadata)
WEBDATASET_META = re.compile(r"__[^/]*__($|/)")


# gzip, bzip2, xz and zstd, which tar readers open transparently
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


def _compressed(path: str) -> bool:
    """Whether a local shard is compressed: it starts as one of those formats and not with a tar
    header (whose first bytes are a member's name, which may well be ``BZh...``)."""
    with open(path, "rb") as file:
        head = file.read(tarfile.BLOCKSIZE)
    try:
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
        return False
    except tarfile.HeaderError:
        return head.startswith(COMPRESSED_MAGIC)


def _indexed_documents(url: str) -> int | None:
    """The documents ``stats.json`` beside a local shard says it holds, if there is one."""
    path = Path(url)
    stats = path.parent / STATS_FILE
    if not stats.is_file():
        return None
    return _shard_index(str(path.parent), stats.stat().st_mtime_ns).get(path.name)


@functools.lru_cache(maxsize=64)
def _shard_index(directory: str, mtime_ns: int) -> dict[str, int]:
    """Documents per shard name from a directory's ``stats.json`` (read once per version of the
    file); a damaged one checks nothing, as if there were none."""
    try:
        shards = (read_stats(directory) or {}).get("shards")
    except (OSError, ValueError):
        return {}
    return {s["name"]: s["documents"] for s in shards if isinstance(s, dict) and isinstance(s.get("name"), str)
            and isinstance(s.get("documents"), int)} if isinstance(shards, list) else {}


def is_complete_tar(url: str) -> bool:
    """Whether a local tar ends with two zero blocks, as every complete tar file does."""
    path = Path(url)
    if not path.is_file():
        return True  # not a local file: nothing to check here
    size = path.stat().st_size
    if size % 512 or size < 1024:
        return False
    with path.open("rb") as tar:
        tar.seek(size - 1024)
        return not any(tar.read(1024))


def sample_to_document(sample: dict[str, Any], decode: bool = True) -> Document:
    """Turn a raw sample into a Document, media decoded (``decode``) or left as ``MediaBytes``."""
    key, url = sample.get("__key__", ""), sample.get("__url__", "")
    where = sample_where(key, url)
    try:  # a member named like a path (../x, /etc/x, dir/x) was not written by data pack
        check_key(key)
    except DocumentError as err:
        raise DocumentError(f"{url}: {err}") from None
    if "json" not in sample:
        members = ", ".join(k for k in sample if not k.startswith("__"))
        raise DocumentError(f"{where}: no json member (has: {members or 'nothing'})")
    doc = parse_document(sample["json"], key, url)
    for part in doc.parts:
        if part.type == "text":
            continue
        names = [name for name in sample if name.split(".", 1)[0] == str(part.media)]
        if len(names) != 1:
            problem = "no member" if not names else f"several members ({', '.join(names)})"
            raise DocumentError(f"{where}: {part.type} part refers to media {part.media} but the sample has {problem}")
        if "." not in names[0]:
            raise DocumentError(f"{where}: member {names[0]!r} has no file extension, so its {part.type} type is unknown")
        ext = names[0].split(".", 1)[1]
        if ext not in MEDIA_EXTENSIONS[part.type]:
            raise DocumentError(f"{where}: member {names[0]} is not a valid {part.type} file type")
        media = MediaBytes(ext, sample[names[0]])
        part.data = decode_media(media, part.type, f"{where}, media {part.media}") if decode else media
    return doc


def read_documents(
    urls: str | Path | Iterable[str], decode: bool = True, policy: BadSamplePolicy | None = None
) -> Iterator[Document]:
    """Documents of a shard spec (see ``expand_shards``) or a list of shard URLs, in order.

    Without a policy the first bad sample or shard raises ``DocumentError``; with one it is skipped
    and counted.
    """
    if isinstance(urls, (str, Path)):
        urls = expand_shards(urls)
    for sample in iter_samples(urls, policy):
        try:
            doc = sample_to_document(sample, decode)
        except DocumentError as err:
            if policy is None:
                raise
            policy.skip(err, sample.get("__key__", ""), sample.get("__url__", ""))
            continue
        yield doc
