"""Training a SentencePiece text tokenizer on the text parts of a source JSONL."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unimodal.data.messages import message_content
from unimodal.schema import json_object

SMALLEST_VOCAB = 260  # byte_fallback's 256 pieces, then pad, bos, eos and unk


def _texts(src_jsonl: Path) -> Iterator[str]:
    """The text of each line: its text parts, or a chat record's message contents."""
    with src_jsonl.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = json_object(line, f"{src_jsonl.name}:{number}")
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
    if vocab_size < SMALLEST_VOCAB:
        raise ValueError(f"--vocab_size {vocab_size} is too small: the 256 byte pieces and 4 special tokens need {SMALLEST_VOCAB}")
    texts = list(_texts(src))  # read whole first, so that a bad line is its own one-line error
    if not texts:
        raise ValueError(f"{src} holds no text to train a tokenizer on")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        _train(spm, texts, out, vocab_size)
    except RuntimeError as err:  # SentencePiece's own checks ("Vocabulary size too high (...)")
        reason = re.sub(r"^(INTERNAL: )?\S+\.cc\(\d+\) \[.*?\]\s*", "", str(err).strip().splitlines()[-1])  # the C++ check's place
        raise ValueError(f"SentencePiece cannot train on {src}: {reason}") from None
    return out


def _train(spm: Any, texts: list[str], out: Path, vocab_size: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
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
