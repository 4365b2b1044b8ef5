"""Packing a source JSONL (documents with media by path, or OpenAI-style chat records) into shards."""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from tqdm import tqdm

from unimodal.data.media import MediaBytes, source_media
from unimodal.data.messages import messages_to_parts
from unimodal.data.shards import MAX_BYTES_PER_SHARD, STATS_FILE, held_out, save_stats, write_shards
from unimodal.schema import (
    MODALITIES,
    Document,
    DocumentError,
    check_fields,
    check_key,
    document_meta,
    json_object,
    parse_part,
)

LINE_FIELDS = ("key", "parts", "messages", "meta", "schema")
# a source line past this is refused without being read whole: media go by path (or a data URL of a picture)
MAX_LINE_BYTES = 256 * 2**20


class EmptyOutput(ValueError):
    """Packing would write no documents: an empty source, every line bad, or an empty split
    (``elsewhere``: the good documents that went to the other split)."""

    def __init__(self, message: str, elsewhere: int = 0):
        super().__init__(message)
        self.elsewhere = elsewhere


def bounded_lines(file: BinaryIO, limit: int) -> Iterator[tuple[bytes | None, int]]:
    """``(line, bytes read)`` for each line of ``file``; a line longer than ``limit`` bytes is
    None, read past in pieces and never held whole (a file with no newline in gigabytes)."""
    while line := file.readline(limit + 1):
        if len(line) <= limit:
            yield line, len(line)
            continue
        size = len(line)
        while not line.endswith(b"\n") and (line := file.readline(2**20)):
            size += len(line)
        yield None, size


def line_kind(raw: dict[str, Any], where: str) -> str:
    """``messages`` (a chat) or ``parts`` (a document): what a line of a source JSONL holds."""
    given = [name for name in ("messages", "parts") if raw.get(name) is not None]
    if len(given) == 2:
        raise DocumentError(f"{where}: a line has both 'messages' (a chat) and 'parts' (a document); give one of them")
    if given == ["messages"]:
        return "messages"
    if "parts" not in raw:
        raise DocumentError(f"{where}: a line needs 'messages' (a chat) or 'parts' (a document); it has {sorted(raw) or 'no keys'}")
    if not isinstance(raw["parts"], list) or not raw["parts"]:
        raise DocumentError(f"{where}: 'parts' must be a non-empty list")
    return "parts"


def _source_document(raw_line: bytes, src: Path, line: int) -> Document:
    where = f"{src.name}:{line}"
    raw = json_object(raw_line, where)
    check_fields(raw, LINE_FIELDS, where, strict=False)
    meta = document_meta(raw, where)
    key = raw.get("key", f"{line:08d}")
    if not isinstance(key, str):
        raise DocumentError(f"{where}: 'key' must be a string, got {key!r}")
    try:
        check_key(key)
    except DocumentError as err:
        raise DocumentError(f"{where}: {err}") from None
    raw_parts = raw.get("parts")
    if line_kind(raw, where) == "messages":  # an OpenAI-style chat record
        return Document(messages_to_parts(raw["messages"], src.parent, where), meta, key, source=where)
    parts, next_media = [], 0
    for index, raw_part in enumerate(raw_parts):
        media: MediaBytes | None = None
        if isinstance(raw_part, dict) and raw_part.get("type") in MODALITIES[1:]:
            media = source_media(raw_part, src.parent, where, index)
            raw_part = {k: v for k, v in raw_part.items() if k != "path"} | {"media": next_media}
            next_media += 1
        part = parse_part(raw_part, where, index)
        part.data = media
        parts.append(part)
    return Document(parts, meta, key, source=where)


def check_source(src: str | Path) -> None:
    """A source JSONL that is not there, or a directory given for one, in one line."""
    if Path(src).is_dir():
        raise ValueError(f"source {src} is a directory; give a JSONL file of documents or chats")
    if not Path(src).exists():
        raise FileNotFoundError(f"source {src} does not exist (a JSONL of documents or chats)")
    if not Path(src).is_file():
        raise ValueError(f"source {src} is not a regular file; give a JSONL file of documents or chats")


def pack_jsonl(
    src_jsonl: str | Path,
    out_dir: str | Path,
    *,
    max_docs_per_shard: int = 1000,
    max_bytes_per_shard: int = MAX_BYTES_PER_SHARD,
    skip_bad: bool = False,
    prefix: str = "shard",
    progress: bool = True,
    val_fraction: float = 0.0,
) -> dict[str, Any]:
    """Pack a source JSONL (one document per line, media by path) into shards; return the stats.

    A line is a document (``parts``) or an OpenAI-style chat record (``messages``, see
    ``unimodal.data.templates``). Any bad line stops packing with ``FILE:LINE: reason`` unless
    ``skip_bad``, which skips it, counts it in ``stats.json`` and prints a summary.
    ``val_fraction`` > 0 writes ``out_dir/train`` and ``out_dir/val``, each document going to
    ``val`` by a stable hash of its key; the stats of both are returned under those names.
    """
    check_source(src_jsonl)  # before any output folder is made
    if max_docs_per_shard < 1 or max_bytes_per_shard < 1:
        raise ValueError(f"a shard must have room for a document: max_docs_per_shard={max_docs_per_shard} and a shard "
                         f"size of {max_bytes_per_shard} bytes must both be at least 1")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise FileExistsError(f"--out {out_dir} is a file; give a directory for the shards")
    if val_fraction:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        options = dict(max_docs_per_shard=max_docs_per_shard, max_bytes_per_shard=max_bytes_per_shard,
                       skip_bad=skip_bad, prefix=prefix, progress=progress)
        written: dict[str, Any] = {}
        skipped: dict[str, list[str]] = {"train": [], "val": []}
        fresh = not Path(out_dir).exists()
        created = {split: not (Path(out_dir) / split).exists() for split in ("train", "val")}
        try:
            for split in ("train", "val"):
                written[split] = _pack_jsonl(Path(src_jsonl), Path(out_dir) / split, **options, skipped=skipped[split],
                                             select=lambda key, val=split == "val": held_out(key, val_fraction) == val)
        except BaseException as err:  # the val split failing (no document, a bad line, Ctrl-C) keeps no train split
            for split in written:  # so that the same command can run again; what was there before stays
                _remove_written(Path(out_dir) / split, created[split], prefix)
            if fresh:
                shutil.rmtree(out_dir, ignore_errors=True)
            if isinstance(err, EmptyOutput):
                hint = f"; with --val_fraction {val_fraction} no document falls in it: pack more documents or change --val_fraction"
                raise EmptyOutput(f"{err}{hint if err.elsewhere else ''}") from None
            raise
        # both passes meet the source's bad lines: each is reported once
        _report_skipped(list(dict.fromkeys(skipped["train"] + skipped["val"])), written["train"]["source"]["documents"])
        return written
    skipped_lines: list[str] = []
    stats = _pack_jsonl(Path(src_jsonl), Path(out_dir), max_docs_per_shard=max_docs_per_shard,
                        max_bytes_per_shard=max_bytes_per_shard, skip_bad=skip_bad, prefix=prefix, progress=progress,
                        skipped=skipped_lines)
    _report_skipped(skipped_lines, stats["source"]["documents"])
    return stats


def _report_skipped(skipped: list[str], total: int) -> None:
    """The lines ``--skip_bad`` left out, with their reasons, on stderr."""
    if skipped:
        shown = "\n".join(f"  {reason}" for reason in skipped[:20])
        more = f"\n  ... and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        print(f"skipped {len(skipped)} of {total} documents:\n{shown}{more}", file=sys.stderr)


def _remove_written(split_dir: Path, created: bool, prefix: str) -> None:
    """A split this command wrote: the whole folder where it made it, else its shards and
    ``stats.json`` only (``write_shards`` writes only where there were none of either)."""
    if created:
        shutil.rmtree(split_dir, ignore_errors=True)
        return
    for path in [*split_dir.glob(f"{prefix}-*.tar"), split_dir / STATS_FILE]:
        path.unlink(missing_ok=True)


def _pack_jsonl(
    src: Path,
    out_dir: Path,
    *,
    max_docs_per_shard: int,
    max_bytes_per_shard: int,
    skip_bad: bool,
    prefix: str,
    progress: bool,
    skipped: list[str],
    select: Callable[[str], bool] | None = None,
) -> dict[str, Any]:
    """One shard set of the source's documents (those ``select`` takes); the reasons of the lines
    it skips go to ``skipped``."""
    total = elsewhere = 0

    def reject(err: DocumentError) -> None:
        if not skip_bad:
            raise err
        skipped.append(str(err))

    def documents() -> Iterator[Document]:
        nonlocal total, elsewhere
        split = f" ({out_dir.name})" if select is not None else ""  # one pass over the source per split
        with open(src, "rb") as lines, tqdm(
            total=src.stat().st_size, unit="B", unit_scale=True, desc=f"packing {src.name}{split}", disable=not progress
        ) as bar:
            for line, (raw_line, size) in enumerate(bounded_lines(lines, MAX_LINE_BYTES), start=1):
                bar.update(size)
                if raw_line is not None and not raw_line.strip():
                    continue
                total += 1
                try:
                    if raw_line is None:
                        raise DocumentError(f"{src.name}:{line}: the line is longer than {MAX_LINE_BYTES >> 20} MiB; "
                                            "a document names its media by path, it does not hold them")
                    doc = _source_document(raw_line, src, line)
                except DocumentError as err:
                    reject(err)
                    continue
                if select is None or select(doc.key):
                    yield doc
                else:
                    elsewhere += 1

    fresh = not out_dir.exists()
    try:
        with contextlib.closing(documents()) as docs:  # an error closes the progress bar before it is printed
            stats = write_shards(docs, out_dir, max_docs_per_shard, max_bytes_per_shard, prefix, reject)
    except BaseException:  # a bad line or Ctrl-C: no half-written shard set is left for a run to read
        if fresh:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    if not stats["documents"]:
        if fresh:
            out_dir.rmdir()
        raise EmptyOutput(f"no documents to write to {out_dir}: {src.name} holds {total} records"
                          + (f", {len(skipped)} of them bad (first: {skipped[0]})" if skipped else ""), elsewhere)
    stats["source"] = {"path": str(src), "documents": total, "skipped": len(skipped), "skipped_examples": skipped[:20]}
    save_stats(out_dir, stats)
    return stats
