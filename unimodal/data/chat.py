"""Chat data: templates that render role-tagged documents, and OpenAI-style ``messages`` records.

A chat document is an ordinary document whose parts carry roles (``system``, ``user``,
``assistant``); consecutive parts of one role form a turn. A template adds its markers around
each turn as text, never as new vocabulary, so any tokenizer works:

- ``chatml`` (MIO, arXiv 2409.17692): ``<|im_start|>ROLE\\n ... <|im_end|>\\n``;
- ``vicuna`` (SEED-LLaMA, arXiv 2310.01218): ``USER: ...\\nASSISTANT: ...</s>\\n``, where
  ``</s>`` is the tokenizer's end-of-sequence id.

Supervision: markers, system and user turns never are; an assistant turn's content is when its
part's loss flag says so (true by default), and so is the marker that ends it (``<|im_end|>`` or
``</s>``), so that the model learns where to stop. The opening marker ``ASSISTANT:`` /
``<|im_start|>assistant\\n`` is the generation prompt and is not supervised.

``messages_to_parts`` converts one OpenAI-style chat record (text, image and audio content
parts) into document parts; ``unimodal data pack`` calls it for lines with ``messages``.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from unimodal.data.schema import ROLES, Document, DocumentError, Part


@dataclass(frozen=True)
class EosToken:
    """The tokenizer's end-of-sequence id at this place of a rendered chat (not a text string)."""

    loss: bool


@dataclass(frozen=True)
class ChatTemplate:
    """Markers around each turn: ``begin[role]`` + content + ``end[role]`` (+ eos) + ``after[role]``."""

    name: str
    begin: dict[str, str]
    end: dict[str, str]
    after: dict[str, str]
    eos_after_assistant: bool = False
    stop: str = ""  # text that ends an assistant turn, for generation

    def generation_prompt(self) -> list[Part]:
        """What opens an assistant turn: the prompt a model continues with its reply."""
        return [Part("text", text=self.begin["assistant"], role="assistant", loss=False)]


CHATML = ChatTemplate(
    "chatml",
    begin={role: f"<|im_start|>{role}\n" for role in ROLES},
    end={role: "<|im_end|>" for role in ROLES},
    after={role: "\n" for role in ROLES},
    stop="<|im_end|>",
)
VICUNA = ChatTemplate(
    "vicuna",
    begin={"system": "", "user": "USER: ", "assistant": "ASSISTANT:"},
    end={"system": "", "user": "", "assistant": ""},
    after={"system": "\n", "user": "\n", "assistant": "\n"},
    eos_after_assistant=True,
)
TEMPLATES = {t.name: t for t in (CHATML, VICUNA)}


def get_template(name: str | None) -> ChatTemplate | None:
    if name is None:
        return None
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)} (or null for none)")
    return TEMPLATES[name]


def turns(doc: Document) -> list[tuple[str, list[Part]]]:
    """Consecutive parts of one role, as (role, parts); every part must have a role."""
    out: list[tuple[str, list[Part]]] = []
    for index, part in enumerate(doc.parts):
        if part.role is None:
            raise DocumentError(f"{doc.where()}: part {index} has no role, but other parts of this chat document do")
        if out and out[-1][0] == part.role:
            out[-1][1].append(part)
        else:
            out.append((part.role, [part]))
    return out


def render(doc: Document, template: ChatTemplate, add_generation_prompt: bool = False) -> list[Part | EosToken]:
    """The document's parts with the template's markers as unsupervised text parts.

    Documents without roles come back unchanged (plain pretraining text in a chat mixture).
    """
    if not any(part.role for part in doc.parts):
        return list(doc.parts)

    def marker(text: str, role: str, loss: bool = False) -> list[Part]:
        return [Part("text", text=text, role=role, loss=loss)] if text else []

    out: list[Part | EosToken] = []
    for role, parts in turns(doc):
        supervised = role == "assistant"
        content = [replace(p, loss=p.loss and supervised) for p in parts]
        ends = supervised and any(p.loss for p in content)
        out += marker(template.begin[role], role) + content + marker(template.end[role], role, ends)
        if supervised and template.eos_after_assistant:
            out.append(EosToken(ends))
        out += marker(template.after[role], role)
    if add_generation_prompt:
        out += template.generation_prompt()
    return out


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


def _media(kind: str, ref: str, src: Path, where: str) -> Any:
    """MediaBytes for a local path, a ``file://`` URL or a ``data:`` URL (no downloads)."""
    from unimodal.data.shards import MediaBytes, _source_media

    if ref.startswith("data:"):
        header, _, payload = ref.partition(",")
        mime = header[len("data:") :].split(";")[0].lower()
        if mime not in MIME_EXTENSIONS or not mime.startswith(kind):
            known = ", ".join(m for m in MIME_EXTENSIONS if m.startswith(kind))
            raise DocumentError(f"{where}: {kind} data URL of type {mime!r} is not supported ({known})")
        return MediaBytes(MIME_EXTENSIONS[mime], _decode_base64(payload, where))
    if "://" in ref and not ref.startswith("file://"):
        raise DocumentError(f"{where}: {kind} {ref!r} is remote; give a local path or a data: URL (nothing is downloaded)")
    return _source_media({"type": kind, "path": ref.removeprefix("file://")}, src, where, 0)


def _content_part(item: Any, src: Path, where: str) -> Part:
    if not isinstance(item, dict):
        raise DocumentError(f"{where}: a content item is {type(item).__name__}, expected an object")
    kind = item.get("type")
    if kind == "text":
        if not isinstance(item.get("text"), str):
            raise DocumentError(f"{where}: text content has no string 'text'")
        return Part("text", text=item["text"])
    if kind == "image_url":
        url = item.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise DocumentError(f"{where}: image_url content has no 'url'")
        return Part("image", data=_media("image", url, src, where))
    if kind == "input_audio":
        audio = item.get("input_audio") or {}
        fmt = str(audio.get("format", "")).lower()
        if not isinstance(audio.get("data"), str) or f"audio/{fmt}" not in MIME_EXTENSIONS:
            raise DocumentError(f"{where}: input_audio needs base64 'data' and a 'format' (wav, flac, mp3, ogg)")
        from unimodal.data.shards import MediaBytes

        return Part("audio", data=MediaBytes(MIME_EXTENSIONS[f"audio/{fmt}"], _decode_base64(audio["data"], where)))
    if kind in ("image", "audio"):
        if not isinstance(item.get("path"), str):
            raise DocumentError(f"{where}: {kind} content needs a string 'path'")
        return Part(kind, data=_media(kind, item["path"], src, where))
    raise DocumentError(f"{where}: content type {kind!r} is not supported (text, image_url, input_audio, image, audio)")


def messages_to_parts(messages: Any, src: Path, where: str) -> list[Part]:
    """Document parts of an OpenAI-style ``messages`` list; media numbered in order.

    A message may carry ``"weight": 0`` (OpenAI's fine-tuning format) or ``"loss": false`` to
    leave an assistant turn unsupervised; other roles are never supervised.
    """
    if not isinstance(messages, list) or not messages:
        raise DocumentError(f"{where}: 'messages' must be a non-empty list")
    parts: list[Part] = []
    for number, message in enumerate(messages):
        here = f"{where}: message {number}"
        if not isinstance(message, dict):
            raise DocumentError(f"{here} is {type(message).__name__}, expected an object")
        role = message.get("role")
        if role not in ROLES:
            raise DocumentError(f"{here} has role {role!r}, expected one of {ROLES}")
        weight = message.get("weight", 1)
        loss = message.get("loss", weight != 0)
        if not isinstance(loss, bool) or weight not in (0, 1):
            raise DocumentError(f"{here}: 'loss' must be true/false and 'weight' 0 or 1")
        content = message.get("content")
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(items, list) or not items:
            raise DocumentError(f"{here} has no content (a string or a list of content parts)")
        for item in items:
            part = _content_part(item, src, here)
            part.role, part.loss = role, loss and role == "assistant"
            if part.type != "text":
                part.media = sum(p.type != "text" for p in parts)
            parts.append(part)
    return parts


# ----------------------------------------------------------------------------------------------
# the built-in chat set


SYSTEM = "You answer questions about the Python standard library in plain English."


def build_chat(root: Path, val_fraction: float = 0.1) -> None:
    """``builtin:chat/{train,val}``: questions about standard-library objects answered by the
    first paragraph of their docstrings, one or two turns, some with a system prompt."""
    from unimodal.data.shards import pack_jsonl
    from unimodal.data.sources.stdlib_text import _docstrings

    docs = [(name, doc.split("\n\n")[0].replace("\n", " ")[:400]) for name, doc in _docstrings(200)]
    root.mkdir(parents=True, exist_ok=True)
    with (root / "chat.jsonl").open("w") as out:
        for index, (name, answer) in enumerate(docs):
            messages = [{"role": "system", "content": SYSTEM}] if index % 3 == 0 else []
            messages += [{"role": "user", "content": f"What does {name} do?"}, {"role": "assistant", "content": answer}]
            if index % 4 == 1 and index + 1 < len(docs):
                other, other_answer = docs[index + 1]
                messages += [{"role": "user", "content": f"And {other}?"}, {"role": "assistant", "content": other_answer}]
            out.write(json.dumps({"key": f"chat{index:05d}", "messages": messages}) + "\n")
    pack_jsonl(root / "chat.jsonl", root, max_docs_per_shard=128, progress=False, val_fraction=val_fraction)
