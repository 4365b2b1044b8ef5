"""Media members: encoded bytes as stored in shards and sent in chat requests, and their decoding."""

from __future__ import annotations

import io
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np

from unimodal.schema import ARRAY_EXTENSIONS, AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, IMAGE_FORMATS, DocumentError

# what one image or clip may declare before it is decoded: 4096 x 4096 RGB is 48 MB; an hour of
# 48 kHz float audio 690 MB, so clips stop at ten minutes
MAX_PIXELS = 4096 * 4096
MAX_AUDIO_SECONDS = 600.0
# a file is read whole when packed: ten minutes of 48 kHz stereo float WAV is 230 MB
MAX_MEDIA_BYTES = 512 * 2**20
# samples a second of decoded audio may hold over all its channels (48 kHz stereo): a few hundred
# kilobytes of FLAC can declare eight channels at 655 kHz, gigabytes once decoded
MAX_AUDIO_SAMPLES_PER_SECOND = 96_000

MEDIA_EXTENSIONS = {"image": IMAGE_EXTENSIONS + ARRAY_EXTENSIONS, "audio": AUDIO_EXTENSIONS + ARRAY_EXTENSIONS}


# the first bytes each format starts with (RIFF containers also name their kind at byte 8), so
# that a file whose name and content disagree is refused when it is packed, not when training reads it
SIGNATURES: dict[str, tuple[bytes, ...]] = {
    "png": (b"\x89PNG\r\n\x1a\n",), "jpg": (b"\xff\xd8\xff",), "jpeg": (b"\xff\xd8\xff",), "bmp": (b"BM",),
    "webp": (b"RIFF",), "wav": (b"RIFF", b"RIFX", b"RF64"), "flac": (b"fLaC",), "ogg": (b"OggS",),
    "mp3": (b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2", b"\xff\xfa", b"\xff\xe3", b"\xff\xe2"), "npy": (b"\x93NUMPY",),
}
RIFF_KINDS = {"webp": b"WEBP", "wav": b"WAVE"}


def starts_as(ext: str, data: bytes) -> bool:
    """Whether ``data`` starts as a ``.ext`` file does."""
    starts = data.startswith(SIGNATURES.get(ext, (b"",)))
    return starts and not (ext in RIFF_KINDS and data[:4] == b"RIFF" and data[8:12] != RIFF_KINDS[ext])


def check_signature(ext: str, data: bytes, what: str) -> None:
    """Refuse ``data`` that does not start as a ``.ext`` file does (``what`` names it)."""
    if not starts_as(ext, data):
        raise DocumentError(f"{what} is not a .{ext} file (it starts with {data[:12]!r})")


class MediaTooLarge(ValueError):
    pass


@dataclass
class MediaBytes:
    """An encoded media member as stored in a shard (``ext`` without the dot, lower case)."""

    ext: str
    data: bytes


def decode_media(
    media: MediaBytes, kind: str, where: str = "", max_pixels: int = MAX_PIXELS, max_seconds: float = MAX_AUDIO_SECONDS
) -> Any:
    """Decode one member: images to HxWx3 uint8, audio to ``(float32 waveform, rate)``, npy to arrays.

    The sizes a file declares in its header are checked before it is decoded: a few kilobytes of
    PNG or FLAC can declare gigabytes of pixels or samples.
    """
    try:
        if media.ext == "npy":
            return np.load(io.BytesIO(media.data), allow_pickle=False)
        if kind == "image":
            from PIL import Image

            with warnings.catch_warnings():  # PIL's own bomb warning: the size is checked just below
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(media.data), formats=IMAGE_FORMATS)
            with image:
                if image.width * image.height > max_pixels:
                    raise MediaTooLarge(f"a {image.width}x{image.height} image is over the {max_pixels} pixels allowed; make it smaller")
                from unimodal.modalities.image_continuous import rgb_image

                return np.array(rgb_image(image), dtype=np.uint8)
        import soundfile

        info = soundfile.info(io.BytesIO(media.data))
        if info.frames > max_seconds * info.samplerate:
            raise MediaTooLarge(f"{info.frames / info.samplerate:.0f} s of audio is over the {max_seconds:g} s any clip may have "
                                 "(a codec may allow less); cut it shorter")
        if info.frames * info.channels > max_seconds * MAX_AUDIO_SAMPLES_PER_SECOND:
            raise MediaTooLarge(f"{info.frames / info.samplerate:g} s of {info.channels}-channel audio at {info.samplerate} Hz is "
                                 f"{info.frames * info.channels} samples, over the {max_seconds * MAX_AUDIO_SAMPLES_PER_SECOND:.0f} "
                                 f"a clip may hold (48 kHz stereo for {max_seconds:g} s); resample it or mix it down")
        waveform, rate = soundfile.read(io.BytesIO(media.data), dtype="float32")
        return waveform, rate
    except MediaTooLarge as err:
        raise DocumentError(f"{where}: {err}") from None
    except Exception as err:  # noqa: BLE001 - PIL, soundfile and numpy raise many kinds
        detail = "not a format it can read" if type(err).__name__ == "UnidentifiedImageError" else f"{type(err).__name__}: {err}"
        detail = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", detail)  # soundfile names its in-memory file
        named = f".{media.ext}" if media.ext else "a file without extension"
        raise DocumentError(f"{where}: unreadable {kind} ({named}: {detail})") from None


def declared_pixels(media: MediaBytes) -> int | None:
    """How many pixels an image file says it has, from its header alone: None for an array, or
    for a header that does not read (decoding it then says why)."""
    if media.ext == "npy":
        return None
    from PIL import Image

    try:
        with warnings.catch_warnings():  # a bomb's size is what the caller is asking for
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(media.data), formats=IMAGE_FORMATS) as image:
                return image.width * image.height
    except Exception:  # noqa: BLE001 - PIL raises many kinds; decode_media reports them
        return None


def declared_seconds(media: MediaBytes) -> float | None:
    """How long an audio file says it is, from its header alone: None for an array, or for a
    header that does not read (decoding it then says why)."""
    if media.ext == "npy":
        return None
    import soundfile

    try:
        info = soundfile.info(io.BytesIO(media.data))
    except Exception:  # noqa: BLE001 - soundfile raises many kinds; decode_media reports them
        return None
    return info.frames / info.samplerate if info.samplerate > 0 else None


def source_media(raw_part: dict[str, Any], base: Path, where: str, index: int, or_data_url: bool = False) -> MediaBytes:
    """The bytes of a part's local file (a path or a ``file://`` URL; nothing is downloaded); a
    relative ``path`` is relative to ``base`` (the record's folder). ``or_data_url``: the caller
    also takes ``data:`` URLs, which the refusal of a remote URL then offers."""
    kind, path = raw_part["type"], raw_part.get("path")
    if not isinstance(path, str) or not path:
        raise DocumentError(f"{where}: {kind} part {index} needs a string 'path'")
    if "://" in path and not path.startswith("file://"):
        instead = "a local path or a data: URL" if or_data_url else "a local path"
        raise DocumentError(f"{where}: {kind} {path!r} is remote; give {instead} (nothing is downloaded)")
    if path.startswith("file://"):  # a URL escapes a space and other characters (Path.as_uri: my%20cat.png)
        path = unquote(path.removeprefix("file://"))
    file = base / path  # an absolute path stays as it is
    shown = repr(path) if len(path) <= 200 else f"{path[:200]!r}... ({len(path)} characters)"
    try:
        info = file.stat()
    except FileNotFoundError:
        raise DocumentError(f"{where}: {kind} file {shown} not found (looked at {file})") from None
    except (OSError, ValueError) as err:  # a name too long, a loop of links, no permission, a NUL byte
        raise DocumentError(f"{where}: {kind} file {shown} cannot be read ({getattr(err, 'strerror', None) or err})") from None
    if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block or never end
        what = "a directory" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device or socket"
        raise DocumentError(f"{where}: {kind} file {shown} is {what}, not a regular file (looked at {file})")
    ext = Path(path).suffix.lower().lstrip(".")
    if ext not in MEDIA_EXTENSIONS[kind]:
        raise DocumentError(
            f"{where}: {kind} file {shown} has extension {ext!r}, expected one of {', '.join(MEDIA_EXTENSIONS[kind])}"
        )
    if info.st_size > MAX_MEDIA_BYTES:
        raise DocumentError(f"{where}: {kind} file {shown} is {info.st_size / 2**20:.0f} MiB, over the {MAX_MEDIA_BYTES // 2**20} MiB "
                            "a media file may have")
    try:
        data = file.read_bytes()
    except OSError as err:
        raise DocumentError(f"{where}: {kind} file {shown} cannot be read ({err.strerror or err})") from None
    check_signature(ext, data, f"{where}: {kind} file {path!r}")
    return MediaBytes(ext, data)
