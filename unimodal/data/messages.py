"""OpenAI-style chat records (``messages`` with text, image and audio content parts) as document parts."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

from unimodal.data.media import MEDIA_EXTENSIONS, MediaBytes, check_signature, source_media, starts_as
from unimodal.schema import ROLES, DocumentError, Part, check_fields

# what a message may carry here; other fields of OpenAI's format (name, tool_calls, ...) are
# ignored, but a near miss of these is refused as the typo it usually is
MESSAGE_FIELDS = ("role", "content", "weight", "loss", "name")

# ----------------------------------------------------------------------------------------------
# OpenAI-style chat records

MIME_EXTENSIONS = {
    "image/png": "png", "image/jpeg": "jpg", "image/jpg": "jpg", "image/webp": "webp", "image/bmp": "bmp",
    "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/flac": "flac", "audio/ogg": "ogg",
    "audio/mpeg": "mp3", "audio/mp3": "mp3",
}


def _decode_base64(data: str, where: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise DocumentError(f"{where}: invalid base64 media ({err})") from None


def _inline(kind: str, stated: str, data: bytes, what: str) -> MediaBytes:
    """Inline media take the format their first bytes show: clients label data URLs by habit (a
    PNG sent as image/jpeg), which decoding never needed. Bytes of no format of their kind are
    refused, as a file's are (``media.check_signature``)."""
    ext = next((e for e in MEDIA_EXTENSIONS[kind] if e != "npy" and starts_as(e, data)), None)
    if ext is None:
        check_signature(stated, data, what)
    return MediaBytes(ext or stated, data)


def _media(kind: str, ref: str, base: Path, where: str) -> Any:
    """MediaBytes for a local path, a ``file://`` URL or a ``data:`` URL (no downloads)."""
    if ref.startswith("data:"):
        header, _, payload = ref.partition(",")
        mime = header[len("data:") :].split(";")[0].lower()
        if mime not in MIME_EXTENSIONS or not mime.startswith(kind):
            known = ", ".join(m for m in MIME_EXTENSIONS if m.startswith(kind))
            raise DocumentError(f"{where}: {kind} data URL of type {mime!r} is not supported ({known})")
        return _inline(kind, MIME_EXTENSIONS[mime], _decode_base64(payload, where), f"{where}: {kind} data URL of type {mime}")
    return source_media({"type": kind, "path": ref}, base, where, 0, or_data_url=True)


def content_part(item: Any, base: Path, where: str) -> Part:
    """One content item of a message as a Part (media as undecoded bytes; local paths relative to ``base``)."""
    if not isinstance(item, dict):
        raise DocumentError(f"{where}: a content item is {type(item).__name__}, expected an object")
    kind = item.get("type")
    if kind == "text":
        if not isinstance(item.get("text"), str):
            raise DocumentError(f"{where}: text content has no string 'text'")
        try:  # a lone surrogate (JSON's "\ud800", or undecodable bytes read with surrogateescape)
            item["text"].encode("utf-8")
        except UnicodeEncodeError as err:
            raise DocumentError(f"{where}: the text holds a character that is not valid Unicode at position {err.start}") from None
        return Part("text", text=item["text"])
    if kind == "image_url":
        url = item.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise DocumentError(f"{where}: image_url content has no 'url'")
        return Part("image", data=_media("image", url, base, where))
    if kind == "input_audio":
        audio = item.get("input_audio")
        if not isinstance(audio, dict):
            raise DocumentError(f"{where}: input_audio must be an object with base64 'data' and a 'format' (wav, flac, mp3, ogg)")
        fmt = str(audio.get("format", "")).lower()
        if not isinstance(audio.get("data"), str):
            raise DocumentError(f"{where}: input_audio needs base64 'data' and a 'format' (wav, flac, mp3, ogg)")
        if f"audio/{fmt}" not in MIME_EXTENSIONS:
            raise DocumentError(f"{where}: input_audio format {audio.get('format')!r} is not one of wav, flac, mp3, ogg")
        data = _decode_base64(audio["data"], where)
        return Part("audio", data=_inline("audio", MIME_EXTENSIONS[f"audio/{fmt}"], data, f"{where}: input_audio of format {fmt}"))
    if kind in ("image", "audio"):
        if not isinstance(item.get("path"), str):
            raise DocumentError(f"{where}: {kind} content needs a string 'path'")
        return Part(kind, data=_media(kind, item["path"], base, where))
    raise DocumentError(f"{where}: content type {kind!r} is not supported (text, image_url, input_audio, image, audio)")


def message_content(message: Any, where: str) -> tuple[str, list[Any]]:
    """The role and content items of one OpenAI-style message; a string content is one text item.
    Shared by data packing and the chat API, so both accept and refuse the same messages."""
    if not isinstance(message, dict):
        raise DocumentError(f"{where} is {type(message).__name__}, expected an object with 'role' and 'content'")
    role = message.get("role")
    if role == "developer":  # OpenAI's newer name for the system message
        role = "system"
    if role not in ROLES:
        raise DocumentError(f"{where} has role {role!r}, expected one of {(*ROLES, 'developer')}")
    content = message.get("content")
    items = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if content is not None and not isinstance(items, (list, tuple)):
        raise DocumentError(f"{where} has content of type {type(content).__name__}; expected a string or a list of content parts")
    if not items:
        raise DocumentError(f"{where} has no content (a string or a list of content parts)")
    return role, list(items)


def messages_to_parts(messages: Any, base: Path, where: str) -> list[Part]:
    """Document parts of an OpenAI-style ``messages`` list; media numbered in order.

    A message may carry ``"weight": 0`` (OpenAI's fine-tuning format) or ``"loss": false`` to
    leave an assistant turn unsupervised; other roles are never supervised.
    """
    if not isinstance(messages, list) or not messages:
        raise DocumentError(f"{where}: 'messages' must be a non-empty list")
    parts: list[Part] = []
    for number, message in enumerate(messages):
        here = f"{where}: message {number}"
        role, items = message_content(message, here)
        check_fields(message, MESSAGE_FIELDS, here, strict=False)
        weight = message.get("weight", 1)
        loss = message.get("loss", weight != 0)
        if not isinstance(loss, bool) or weight not in (0, 1):
            raise DocumentError(f"{here}: 'loss' must be true/false and 'weight' 0 or 1")
        for item in items:
            part = content_part(item, base, here)
            part.role, part.loss = role, loss and role == "assistant"
            if part.type != "text":
                part.media = sum(p.type != "text" for p in parts)
            parts.append(part)
    return parts


