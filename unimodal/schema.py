"""The unimodal document format (version 1).

A *document* is the unit of training data: an ordered list of parts (text, image, audio), each
with an optional chat role and a loss flag, plus free metadata. On disk one document is one
WebDataset sample: ``KEY.json`` holds the parts, and each media part points at a member of the
same sample by index (``KEY.0.png``, ``KEY.1.flac``, or pre-encoded ``KEY.2.npy``).

``docs/data-format.md`` is the user-facing description; keep the two in step.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from unimodal.errors import UserError

SCHEMA = "unimodal.document/1"
Modality = Literal["text", "image", "audio"]
MODALITIES: tuple[str, ...] = get_args(Modality)
# the modality id of each position in a packed sequence
MODALITY_IDS = {name: index for index, name in enumerate(MODALITIES)}
ROLES = ("system", "user", "assistant")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp")
# the Pillow decoders of those, the only ones images are opened with: Pillow would otherwise try
# every plugin it has on any bytes, EPS among them, which runs Ghostscript
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
AUDIO_EXTENSIONS = ("flac", "wav", "ogg", "mp3")
ARRAY_EXTENSIONS = ("npy",)


class DocumentError(ValueError):
    """A document that cannot be read; the message says which document and what is wrong."""


@dataclass
class Part:
    """One part of a document.

    ``text`` is set for text parts. Media parts carry ``media``, the member index inside the
    sample, and after decoding ``data``: an ``np.ndarray`` (HxWxC uint8 image, pre-encoded
    features or codes) or a ``(waveform, sample_rate)`` pair for audio.
    """

    type: Modality
    text: str | None = None
    media: int | None = None
    role: str | None = None
    loss: bool = True
    data: Any = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "loss": self.loss}
        if self.role is not None:
            out["role"] = self.role
        if self.type == "text":
            out["text"] = self.text
        else:
            out["media"] = self.media
        return out


def sample_where(key: str, source: str = "") -> str:
    """How error lines name a document: its key, and the shard or file it came from."""
    return f"sample {key!r} in {source}" if source else f"sample {key!r}"


@dataclass
class Document:
    parts: list[Part]
    meta: dict[str, Any] = field(default_factory=dict)
    key: str = ""
    source: str = ""  # shard URL or file the document came from, for error messages

    def where(self) -> str:
        return sample_where(self.key, self.source)

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "parts": [p.to_json() for p in self.parts], "meta": self.meta}


def check_key(key: str) -> str:
    """WebDataset splits member names at the first dot, so a dotted key would corrupt the sample."""
    if not key or "." in key or "/" in key:
        raise DocumentError(
            f"invalid sample key {key!r}: keys must be non-empty and contain no '.' or '/' "
            "(WebDataset splits member names at the first dot)"
        )
    if any(unicodedata.category(c) == "Cc" for c in key):  # a tar member name ends at a NUL; a newline splits every listing
        raise DocumentError(f"invalid sample key {key!r}: keys hold no control characters")
    return key


PART_FIELDS = {"text": ("type", "text", "role", "loss"), "media": ("type", "media", "role", "loss")}


def check_fields(raw: dict[str, Any], known: tuple[str, ...], where: str, strict: bool = True) -> None:
    """Refuse a field a reader would silently ignore: any unknown one when ``strict``, else only a
    near miss of a known one (``"weigth"``, ``"lossy"``), which is a typo far more often than an
    extra field of someone else's format. Another case (``"Key"``) or two letters swapped
    (``"kye"``) is a near miss too, which the ratio alone misses in a short name."""
    for name in raw:
        if name in known:
            continue
        folded = str(name).lower()
        close = [k for k in known if folded == k or _swapped(folded, k)] or difflib.get_close_matches(folded, known, n=1, cutoff=0.75)
        if strict or close:
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
            raise DocumentError(f"{where}: unknown field {name!r} ({hint})")


def _swapped(a: str, b: str) -> bool:
    """Whether ``a`` is ``b`` with two neighbouring letters swapped (``kye``, ``key``)."""
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y] if len(a) == len(b) else []
    return len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]


def parse_part(raw: Any, where: str, index: int) -> Part:
    if not isinstance(raw, dict):
        raise DocumentError(f"{where}: part {index} is {type(raw).__name__}, expected an object")
    kind = raw.get("type")
    if kind not in MODALITIES:
        raise DocumentError(f"{where}: part {index} has type {kind!r}, expected one of {MODALITIES}")
    check_fields(raw, PART_FIELDS["text" if kind == "text" else "media"], f"{where}: part {index}")
    role = raw.get("role")
    if role is not None and role not in ROLES:
        raise DocumentError(f"{where}: part {index} has role {role!r}, expected one of {ROLES}")
    loss = raw.get("loss", True)
    if not isinstance(loss, bool):
        raise DocumentError(f"{where}: part {index} has loss={loss!r}, expected true or false")
    if kind == "text":
        text = raw.get("text")
        if not isinstance(text, str):
            raise DocumentError(f"{where}: text part {index} has no string 'text'")
        return Part("text", text=text, role=role, loss=loss)
    media = raw.get("media")
    if not isinstance(media, int) or media < 0:
        raise DocumentError(f"{where}: {kind} part {index} needs a non-negative integer 'media'")
    return Part(kind, media=media, role=role, loss=loss)


class NotJSON(ValueError):
    """Text that is not JSON as RFC 8259 defines it; the message says why and where."""


def _constant(name: str) -> None:
    raise NotJSON(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise NotJSON(f"{text} is beyond the range of a number")
    return value


LONE_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def read_json(text: str, unique_keys: bool = True) -> Any:
    """JSON from text that anyone may have written, refusing in one ``NotJSON`` line what
    Python's parser lets through or fails on in its own way: NaN and Infinity, numbers past a
    float's range or Python's integer digit limit, nesting past the recursion limit, and escaped
    lone surrogates, which no UTF-8 writer or tokenizer downstream can encode; and, with
    ``unique_keys``, a key given twice in one object, where the parser would keep the last one
    without a word."""
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_finite, object_pairs_hook=_unique_keys if unique_keys else None)
    except json.JSONDecodeError as err:  # the column alone on a one-line text (a line of JSONL, its newline kept)
        at = f"line {err.lineno} column {err.colno}" if "\n" in text.rstrip("\r\n") else f"column {err.pos + 1}"
        raise NotJSON(f"{err.msg} at {at}") from None
    except RecursionError:
        raise NotJSON("arrays or objects nested too deeply") from None
    except NotJSON:
        raise
    except ValueError:  # an integer past sys.get_int_max_str_digits()
        raise NotJSON(f"an integer has more than {sys.get_int_max_str_digits()} digits") from None
    if LONE_SURROGATE_ESCAPE.search(text):  # only an escape can make one: the text itself is UTF-8
        _refuse_lone_surrogates(value)
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) < len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise NotJSON(f"the key {twice!r} is given twice in one object")
    return value


def read_json_object(file: str | Path, fix: str) -> dict[str, Any]:
    """A JSON object file that may be damaged (a copy cut short, an edit gone wrong), refused in
    one line that names it and says ``fix``. A key given twice keeps its last value, as
    transformers reads the configs it writes."""
    try:
        value = read_json(Path(file).read_text(encoding="utf-8"), unique_keys=False)
    except (NotJSON, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); {fix}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file} holds a JSON {type(value).__name__}, not an object; {fix}")
    return value


def write_whole(file: str | Path, text: str) -> None:
    """Write ``file`` whole or not at all (a temporary file renamed over it): files that mark work
    as finished are read by other processes and by the next run, which must never see half of one.
    The temporary name holds the process id, so ranks writing the same file do not collide. Its
    bytes reach the disk before the rename, so a power cut leaves the old file or the new one,
    never an empty one."""
    path = Path(file)
    temp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(temp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _refuse_lone_surrogates(value: Any) -> None:
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as err:
                raise NotJSON(f"a string holds a lone surrogate (\\u{ord(item[err.start]):04x}), which is not valid Unicode") from None
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)


def json_object(payload: bytes | str | dict[str, Any], where: str) -> dict[str, Any]:
    """A JSON object from text (or as it is), or a DocumentError saying where it went wrong."""
    if isinstance(payload, (bytes, str)):
        try:  # JSON text is UTF-8 (RFC 8259); json.loads would also guess UTF-16 and UTF-32
            payload = read_json(payload.decode("utf-8-sig") if isinstance(payload, bytes) else payload)
        except UnicodeDecodeError as err:
            raise DocumentError(f"{where}: not UTF-8 (byte {err.object[err.start]:#04x} at column {err.start + 1}); save the file as UTF-8") from None
        except NotJSON as err:
            raise DocumentError(f"{where}: malformed JSON ({err})") from None
    if not isinstance(payload, dict):
        raise DocumentError(f"{where}: expected a JSON object, got {type(payload).__name__}")
    return payload


def parse_document(payload: bytes | str | dict[str, Any], key: str = "", source: str = "") -> Document:
    """Parse a sample's JSON member into a Document (media not yet attached)."""
    where = sample_where(key, source)
    payload = json_object(payload, where)
    meta = document_meta(payload, where)
    parts = payload.get("parts")
    if not isinstance(parts, list) or not parts:
        raise DocumentError(f"{where}: 'parts' must be a non-empty list")
    return Document([parse_part(p, where, i) for i, p in enumerate(parts)], meta, key, source)


def document_meta(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """The ``meta`` of a document's JSON object, whose ``schema`` must be this version's."""
    schema = raw.get("schema", SCHEMA)
    if schema != SCHEMA:
        raise DocumentError(f"{where}: schema {schema!r} is not supported (this version handles {SCHEMA!r})")
    meta = raw.get("meta", {})
    if not isinstance(meta, dict):
        raise DocumentError(f"{where}: 'meta' must be an object")
    return meta


BUILTIN_PREFIX = "builtin:"


def local_path(path: str) -> str:
    """``path`` as given, refusing a ``builtin:`` name: those are resolved once, where recipes and
    command lines are read (``unimodal.worlds.resolve``), never by the code that opens files."""
    if str(path).startswith(BUILTIN_PREFIX):
        raise UserError(
            f"{path}: built-in names are resolved by the unimodal command line and recipes; "
            "in Python, pass unimodal.worlds.resolve(path)"
        )
    return str(path)
