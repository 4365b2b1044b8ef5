"""Chat templates: how role-tagged documents are rendered as text around their turns.

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
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from unimodal.schema import ROLES, Document, DocumentError, Part


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


def render(doc: Document, template: ChatTemplate | str | None, add_generation_prompt: bool = False) -> list[Part | EosToken]:
    """The document's parts with the template's markers (``template`` or its name, e.g.
    ``"chatml"``) as unsupervised text parts.

    Documents without roles come back unchanged (plain pretraining text in a chat mixture), and
    so does every document with no template (``None``, a recipe's ``null``).
    """
    if isinstance(template, str):
        template = get_template(template)
    if template is None or not any(part.role for part in doc.parts):
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
