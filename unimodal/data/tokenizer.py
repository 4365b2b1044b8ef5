"""Text tokenizers from local files: a SentencePiece ``.model`` or a Hugging Face tokenizer directory."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

from unimodal.schema import read_json_object

# the JSON files a Hugging Face tokenizer directory is read from, the first two the ones it needs one
# of: transformers' own errors for a missing or damaged one are pages long, or say to install a package
HF_TOKENIZER_NEEDS = ("tokenizer.json", "tokenizer_config.json")
HF_TOKENIZER_JSON = (*HF_TOKENIZER_NEEDS, "special_tokens_map.json", "added_tokens.json")


class TextTokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def pieces(self) -> list[str]: ...


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

        if not any((Path(directory) / name).is_file() for name in HF_TOKENIZER_NEEDS):
            raise FileNotFoundError(f"{directory} holds no tokenizer.json nor tokenizer_config.json; give a SentencePiece "
                                    ".model file or a Hugging Face tokenizer directory")
        for name in HF_TOKENIZER_JSON:
            if (Path(directory) / name).is_file():
                read_json_object(Path(directory) / name, "copy the tokenizer directory again")
        try:
            self.inner = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
        except (ValueError, OSError) as err:
            if "trust_remote_code" not in str(err):
                first = (str(err).strip().splitlines() or [type(err).__name__])[0].strip()
                first = "transformers could not build it from the files there" if first.endswith(":") else first
                raise ValueError(f"{directory} cannot be read as a Hugging Face tokenizer ({first}); copy the tokenizer "
                                 "directory again") from None
            raise ValueError(f"{directory} names tokenizer code of its own (auto_map), which unimodal never runs; "
                             "use a tokenizer transformers implements") from None
        self.vocab_size = len(self.inner)
        self.bos_id = self.inner.bos_token_id
        if self.inner.eos_token_id is None:
            raise ValueError(f"{directory}: the tokenizer defines no eos token; set eos_token in its tokenizer_config.json")
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
    if not path.is_dir():
        raise ValueError(f"tokenizer {path} is neither a file nor a directory; give a SentencePiece .model file or a local tokenizer directory")
    return HFTokenizer(path)


def tokenizer_fingerprint(tokenizer: TextTokenizer) -> str:
    """What identifies a tokenizer: its pieces in id order, not its path (a rebuilt data set or a
    tokenizer retrained at the same path keeps the path; one of the same size passes a layout check)."""
    return hashlib.sha256("\0".join(tokenizer.pieces()).encode()).hexdigest()[:16]
