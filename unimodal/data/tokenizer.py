"""Text tokenizers from local files: a SentencePiece ``.model`` or a Hugging Face tokenizer directory."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class TextTokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class SentencePieceTokenizer:
    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        try:
            self.processor = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as err:  # sentencepiece's parse errors are RuntimeErrors
            raise ValueError(f"{model_file} cannot be read as a SentencePiece model ({str(err).strip().splitlines()[0]}); copy the file again") from None
        self.vocab_size = self.processor.get_piece_size()
        bos, eos, pad = self.processor.bos_id(), self.processor.eos_id(), self.processor.pad_id()
        self.bos_id = bos if bos >= 0 else None
        if eos < 0:
            raise ValueError(f"{model_file}: the SentencePiece model has no end-of-sentence id")
        self.eos_id = eos
        self.pad_id = pad if pad >= 0 else eos

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode([i for i in ids if 0 <= i < self.vocab_size])

    def pieces(self) -> list[str]:
        """The text of every id, in id order: two tokenizers of one size may still differ here."""
        return [self.processor.id_to_piece(i) for i in range(self.vocab_size)]


class HFTokenizer:
    def __init__(self, directory: str | Path):
        from transformers import AutoTokenizer

        try:
            self.inner = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
        except ValueError as err:
            if "trust_remote_code" not in str(err):
                raise
            raise ValueError(f"{directory} names tokenizer code of its own (auto_map), which unimodal never runs; "
                             "use a tokenizer transformers implements") from None
        self.vocab_size = len(self.inner)
        self.bos_id = self.inner.bos_token_id
        if self.inner.eos_token_id is None:
            raise ValueError(f"{directory}: the tokenizer defines no eos token")
        self.eos_id = self.inner.eos_token_id
        self.pad_id = self.inner.pad_token_id if self.inner.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode([i for i in ids if 0 <= i < self.vocab_size])

    def pieces(self) -> list[str]:
        """The text of every id, in id order: two tokenizers of one size may still differ here."""
        return [piece for piece, _ in sorted(self.inner.get_vocab().items(), key=lambda item: item[1])]


def load_tokenizer(path: str | Path) -> TextTokenizer:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer {path} does not exist (a SentencePiece .model file or a local tokenizer directory)"
        )
    if path.is_file():
        return SentencePieceTokenizer(path)
    return HFTokenizer(path)
