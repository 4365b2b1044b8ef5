"""Media members: encoded bytes as stored in shards and sent in chat requests, and their decoding."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unimodal.schema import ARRAY_EXTENSIONS, AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, DocumentError

MEDIA_EXTENSIONS = {"image": IMAGE_EXTENSIONS + ARRAY_EXTENSIONS, "audio": AUDIO_EXTENSIONS + ARRAY_EXTENSIONS}


@dataclass
class MediaBytes:
    """An encoded media member as stored in a shard (``ext`` without the dot, lower case)."""

    ext: str
    data: bytes


def decode_media(media: MediaBytes, kind: str, where: str = "") -> Any:
    """Decode one member: images to HxWx3 uint8, audio to ``(float32 waveform, rate)``, npy to arrays."""
    try:
        if media.ext == "npy":
            return np.load(io.BytesIO(media.data), allow_pickle=False)
        if kind == "image":
            from PIL import Image

            with Image.open(io.BytesIO(media.data)) as image:
                return np.array(image.convert("RGB"), dtype=np.uint8)
        import soundfile

        waveform, rate = soundfile.read(io.BytesIO(media.data), dtype="float32")
        return waveform, rate
    except Exception as err:  # noqa: BLE001 - PIL, soundfile and numpy raise many kinds
        raise DocumentError(f"{where}: unreadable {kind} member .{media.ext} ({type(err).__name__}: {err})") from None


def source_media(raw_part: dict[str, Any], src: Path, where: str, index: int) -> MediaBytes:
    kind, path = raw_part["type"], raw_part.get("path")
    if not isinstance(path, str) or not path:
        raise DocumentError(f"{where}: {kind} part {index} needs a string 'path'")
    ext = Path(path).suffix.lower().lstrip(".")
    if ext not in MEDIA_EXTENSIONS[kind]:
        raise DocumentError(
            f"{where}: {kind} file {path!r} has extension {ext!r}, expected one of {', '.join(MEDIA_EXTENSIONS[kind])}"
        )
    file = src.parent / path  # an absolute path stays as it is
    if not file.is_file():
        raise DocumentError(f"{where}: {kind} file {path!r} not found (looked at {file})")
    return MediaBytes(ext, file.read_bytes())
