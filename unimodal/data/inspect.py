"""``unimodal data inspect``: a readable summary of a shard or a shard directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

from unimodal.data.media import MediaBytes, decode_media
from unimodal.data.shards import STATS_FILE, BadSamplePolicy, ShardStats, expand_shards, read_documents, read_stats
from unimodal.schema import (
    Document,
    DocumentError,
    Part,
)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _describe_part(index: int, part: Part) -> str:
    head = f"    {index} {part.type}" + (f" {part.role}" if part.role else "") + f" loss={str(part.loss).lower()}"
    if part.type == "text":
        text = part.text or ""
        return f"{head} {json.dumps(text[:80] + ('...' if len(text) > 80 else ''), ensure_ascii=False)}"
    media: MediaBytes = part.data
    try:
        value = decode_media(media, part.type)
    except DocumentError as err:
        return f"{head} media={part.media} .{media.ext} {_size(len(media.data))} UNREADABLE {err}"
    if isinstance(value, tuple):
        waveform, rate = value
        channels = 1 if waveform.ndim == 1 else waveform.shape[1]
        shape = f"{len(waveform) / rate:.2f} s at {rate} Hz, {channels} ch"
    else:
        shape = f"{value.dtype} {'x'.join(map(str, value.shape))}"
    return f"{head} media={part.media} .{media.ext} {shape} ({_size(len(media.data))})"


def _summary_shaped(stats: dict) -> bool:
    modalities = stats.get("modalities")
    return isinstance(stats.get("documents"), int) and isinstance(modalities, dict) and all(
        isinstance(modalities.get(kind), dict) and all(isinstance(modalities[kind].get(key), int) for key in keys)
        for kind, keys in (("text", ("parts", "characters")), ("image", ("parts", "bytes")), ("audio", ("parts", "bytes")))
    )


def inspect_path(path: str | Path, n: int = 3) -> str:
    """Summarise a shard or a shard directory and show its first documents.

    Args:
        path: a shard directory, brace pattern or shard.
        n: documents to show.
    """
    if n < 0:
        raise ValueError(f"--n must be 0 or more (documents to show), got {n}")
    path = Path(path)
    urls = expand_shards(path)
    # a directory's stats.json; a pattern or single shard is counted, as its stats.json covers more
    stats = read_stats(path) if path.is_dir() else None
    if stats is not None and not _summary_shaped(stats):
        raise ValueError(f"{path / STATS_FILE} lacks the counts `unimodal data pack` writes (documents, modalities); "
                         "write the shards again, or delete it to have them counted")
    lines = [f"path: {path}", f"shards: {len(urls)} ({_size(sum(os.path.getsize(u) for u in urls))})"]
    first: list[Document] = []
    policy = BadSamplePolicy(max_bad_fraction=1.0)
    if stats is None:  # count by reading every sample's json (media stay undecoded)
        counted = ShardStats()
        for doc in read_documents(urls, decode=False, policy=policy):
            counted.add(doc, Path(doc.source).name, {p.media: len(p.data.data) for p in doc.parts if p.type != "text"})
            if len(first) < n:
                first.append(doc)
        stats = counted.to_dict()
        lines.append("stats.json: none (counted from the shards)")
    else:
        for doc in read_documents(urls, decode=False, policy=policy):
            if len(first) >= n:
                break
            first.append(doc)
        lines.append(f"stats.json: {path / STATS_FILE}")
    lines.append(f"schema: {stats.get('schema')}")
    lines.append(f"documents: {stats['documents']}")
    mods = stats["modalities"]
    lines.append(
        f"modalities: text {mods['text']['parts']} parts, {mods['text']['characters']} characters; "
        + "; ".join(f"{kind} {mods[kind]['parts']} parts, {_size(mods[kind]['bytes'])}" for kind in ("image", "audio"))
    )
    if policy.skipped:
        lines.append(f"bad samples: {policy.skipped} (first: {policy.examples[0].reason})")
    if n:  # --n 0 asks for the summary alone
        lines.append(f"first {len(first)} document{'' if len(first) == 1 else 's'}:")
    for doc in first:
        lines.append(f"  {doc.key} in {Path(doc.source).name}" + (f" meta={json.dumps(doc.meta)}" if doc.meta else ""))
        lines.extend(_describe_part(i, part) for i, part in enumerate(doc.parts))
    return "\n".join(lines)
