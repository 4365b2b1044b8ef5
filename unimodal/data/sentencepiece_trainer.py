"""Training a SentencePiece text tokenizer on the text parts of a source JSONL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from unimodal.data.messages import message_content


def _texts(src_jsonl: Path) -> Iterator[str]:
    """The text of each line: its text parts, or a chat record's message contents."""
    with src_jsonl.open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            items = list(record.get("parts") or [])
            for message in record.get("messages") or []:  # the packer's own reading of a message
                items += message_content(message, f"{src_jsonl.name}:{number}")[1]
            for item in items:
                if isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str) and item["text"]:
                    yield item["text"]


def train_tokenizer(src_jsonl: str | Path, out_model: str | Path, vocab_size: int = 1024) -> Path:
    """Write ``out_model`` (a ``.model`` file) with pad=0, bos=1, eos=2, unk=3."""
    import sentencepiece as spm

    src, out = Path(src_jsonl), Path(out_model)
    if out.suffix != ".model":
        raise ValueError(f"--out must end in .model, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=_texts(src),
        model_prefix=str(out.with_suffix("")),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        minloglevel=2,
    )
    return out
