"""Training a SentencePiece text tokenizer on the text parts of a source JSONL."""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from unimodal.data.jsonl import MAX_LINE_BYTES, bounded_lines, line_kind
from unimodal.data.messages import message_content
from unimodal.schema import DocumentError, json_object

SMALLEST_VOCAB = 260  # byte_fallback's 256 pieces, then pad, bos, eos and unk
# SentencePiece skips a longer sentence without a word (its own default is 4192 bytes, less than
# most documents); a longer text is given line by line, a longer line in pieces
LONGEST_SENTENCE = 1 << 16

log = logging.getLogger("unimodal.data")


def _sentences(text: str) -> Iterator[str]:
    if len(text.encode()) <= LONGEST_SENTENCE:
        yield text
        return
    for line in text.splitlines(keepends=True):
        for start in range(0, len(line), LONGEST_SENTENCE // 4):  # at most 4 bytes a character
            yield line[start : start + LONGEST_SENTENCE // 4]


def _texts(src_jsonl: Path, progress: bool) -> Iterator[str]:
    """The text of each line: its text parts, or a chat record's message contents."""
    with src_jsonl.open("rb") as f, tqdm(total=src_jsonl.stat().st_size, unit="B", unit_scale=True,
                                         desc=f"reading {src_jsonl.name}", disable=not progress, leave=False) as bar:
        for number, (line, size) in enumerate(bounded_lines(f, MAX_LINE_BYTES), start=1):
            bar.update(size)
            where = f"{src_jsonl.name}:{number}"
            if line is None:
                raise DocumentError(f"{where}: the line is longer than {MAX_LINE_BYTES >> 20} MiB; give a long text as several documents")
            if not line.strip():
                continue
            record = json_object(line, where)
            if line_kind(record, where) == "parts":  # a line the packer refuses would train the tokenizer unsaid
                items = list(record["parts"])
            else:
                items = [item for message in record["messages"] for item in message_content(message, where)[1]]
            for item in items:
                if isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str) and item["text"]:
                    yield from _sentences(item["text"])


def train_tokenizer(src_jsonl: str | Path, out_model: str | Path, vocab_size: int = 1024, progress: bool = False) -> Path:
    """Write ``out_model`` (a ``.model`` file, and its ``.vocab`` beside it) with pad=0, bos=1,
    eos=2, unk=3; whole or not at all, so that an interrupted run leaves the old one as it was."""
    src, out = Path(src_jsonl), Path(out_model)
    if out.suffix != ".model":
        raise ValueError(f"--out must end in .model, got {out}")
    if vocab_size < SMALLEST_VOCAB:
        raise ValueError(f"--vocab_size {vocab_size} is too small: the 256 byte pieces and 4 special tokens need {SMALLEST_VOCAB}")
    texts = list(_texts(src, progress))  # read whole first, so that a bad line is its own one-line error
    if not texts:
        raise ValueError(f"{src} holds no text to train a tokenizer on")
    out.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        log.info("training a %d-piece tokenizer on %d texts (%.1f MB)", vocab_size, len(texts), sum(map(len, texts)) / 1e6)
    temp = out.with_name(f".{out.stem}.{os.getpid()}.partial")  # SentencePiece adds .model and .vocab
    try:
        _train_apart(texts, temp, vocab_size, progress)
        os.replace(f"{temp}.vocab", out.with_suffix(".vocab"))
        os.replace(f"{temp}.model", out)
    except RuntimeError as err:  # SentencePiece's own checks ("Vocabulary size too high (...)")
        reason = re.sub(r"^(INTERNAL: )?\S+\.cc\(\d+\) \[.*?\]\s*", "", str(err).strip().splitlines()[-1])  # the C++ check's place
        raise ValueError(f"SentencePiece cannot train on {src}: {reason}") from None
    finally:
        for suffix in (".model", ".vocab"):
            Path(f"{temp}{suffix}").unlink(missing_ok=True)
    return out


def _train_apart(texts: list[str], prefix: Path, vocab_size: int, progress: bool = False) -> None:
    """:func:`_train` in a child process. SentencePiece's training keeps the interpreter from
    handling Ctrl-C until it returns, minutes on a large corpus; the parent waits in a call a
    signal interrupts, and stops the child at once. A fork hands the texts over without copying
    them; where there is none, they are pickled to a fresh interpreter. ``progress``: a bar of
    the merges, read from SentencePiece's log, which the child writes to a pipe instead of stderr."""
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    receive, send = context.Pipe(duplex=False)
    log_receive, log_send = context.Pipe(duplex=False) if progress else (None, None)
    child = context.Process(target=_train_child, args=(texts, prefix, vocab_size, send, log_send), daemon=True)
    child.start()
    for end in (send, log_send):
        if end is not None:
            end.close()
    try:
        if log_receive is not None:
            _follow(log_receive, vocab_size)
        child.join()
    except BaseException:
        child.terminate()
        child.join()
        raise
    with receive:
        try:
            error = receive.recv()
        except EOFError:  # the child sent nothing: it trained, or it died
            error = None
    if error is not None:
        raise RuntimeError(error)
    if child.exitcode != 0:
        raise RuntimeError(f"its training process ended with exit status {child.exitcode}")


def _train_child(texts: list[str], prefix: Path, vocab_size: int, report: Any, log: Any) -> None:
    """The child's side: Ctrl-C is the parent's to handle; SentencePiece's own checks go back as
    text, and its log (C++, on file descriptor 2) into ``log`` where the parent follows it."""
    import sentencepiece as spm

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if log is not None:
        os.dup2(log.fileno(), 2)
    try:
        _train(spm, texts, prefix, vocab_size, verbose=log is not None)
    except Exception as err:  # noqa: BLE001 - anything else would be a traceback into the log pipe, unseen
        report.send(str(err) if isinstance(err, RuntimeError) else f"{type(err).__name__}: {err}")


def _follow(log: Any, vocab_size: int) -> None:
    """A bar of BPE merges from SentencePiece's log lines ("Alphabet size=40", then "Merged: ...
    merges=100" every hundred, or "Added: ... size=20" in older releases) until the child ends."""
    bar = tqdm(total=vocab_size - SMALLEST_VOCAB, desc="training", unit=" merges", leave=False, mininterval=0)
    with log, os.fdopen(os.dup(log.fileno()), "rb") as lines, bar:
        for line in lines:
            if alphabet := re.search(rb"Alphabet size=(\d+)", line):
                bar.total = max(1, vocab_size - SMALLEST_VOCAB - int(alphabet[1]))
                bar.refresh()
            elif merged := re.search(rb"\b(?:merges|size)=(\d+)", line):
                bar.update(min(int(merged[1]), bar.total) - bar.n)
            elif b"Saving model" in line:
                bar.update(bar.total - bar.n)


def _train(spm: Any, texts: list[str], prefix: Path, vocab_size: int, verbose: bool = False) -> None:
    """Text comes back as it went in (newlines, indentation, runs of spaces), as a language model's
    tokenizer needs: SentencePiece's defaults turn them into single spaces. ``verbose``: its
    progress lines too (level 0), else warnings and errors only."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        max_sentence_length=LONGEST_SENTENCE,
        minloglevel=0 if verbose else 2,
    )
