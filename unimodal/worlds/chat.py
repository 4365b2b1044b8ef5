"""``builtin:chat``: chats about the standard library (OpenAI-style messages), split into train and val."""

from __future__ import annotations

import json
from pathlib import Path

from unimodal.data.jsonl import pack_jsonl
from unimodal.worlds.stdlib_text import _docstrings

SYSTEM = "You answer questions about the Python standard library in plain English."


def build_chat(root: Path, val_fraction: float = 0.1) -> None:
    """``builtin:chat/{train,val}``: questions about standard-library objects answered by the
    first paragraph of their docstrings, one or two turns, some with a system prompt. Each answer
    is in one chat only: a second turn's object gets no chat of its own, which the split could put
    on the other side and so train on a validation answer."""
    docs = [(name, doc.split("\n\n")[0].replace("\n", " ")[:400]) for name, doc in _docstrings(200)]
    root.mkdir(parents=True, exist_ok=True)
    asked = set()
    with (root / "chat.jsonl").open("w") as out:
        for index, (name, answer) in enumerate(docs):
            if index in asked:
                continue
            messages = [{"role": "system", "content": SYSTEM}] if index % 3 == 0 else []
            messages += [{"role": "user", "content": f"What does {name} do?"}, {"role": "assistant", "content": answer}]
            if index % 4 == 1 and index + 1 < len(docs):
                other, other_answer = docs[index + 1]
                messages += [{"role": "user", "content": f"And {other}?"}, {"role": "assistant", "content": other_answer}]
                asked.add(index + 1)
            out.write(json.dumps({"key": f"chat{index:05d}", "messages": messages}) + "\n")
    pack_jsonl(root / "chat.jsonl", root, max_docs_per_shard=128, progress=False, val_fraction=val_fraction)

