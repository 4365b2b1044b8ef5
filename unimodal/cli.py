"""The ``unimodal`` command: a table of verbs, each a typed function whose signature is its schema.

jsonargparse turns each function into a subcommand: its parameters are the options
(``--max_docs_per_shard``), its docstring's first paragraph the verb's help and its ``Args:``
the options' help. LightningCLI, which ``train`` hands its arguments to, is jsonargparse too, so
every verb reads ``--config FILE`` and ``--print_config`` the same way. A verb returns the text
it wants printed, or None.
"""

from __future__ import annotations

import ast
import errno
import difflib
import inspect
import logging
import math
import os
import re
import signal
import sys
import threading
from argparse import ArgumentError
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ArgumentParser, auto_cli

from unimodal.data.inspect import inspect_path
from unimodal.errors import UserError
from unimodal.launch import launched_rank
from unimodal.locks import run_lock
from unimodal.yaml_files import parse_yaml, read_yaml


def train(recipe: str, *lightning_args: str) -> None:
    """Train one stage from a recipe; what follows it (--tiny, --trainer.max_steps=10, ...) goes to LightningCLI.

    Args:
        recipe: the recipe YAML (recipes/*.yaml). Everything after it goes to LightningCLI as it
            is; `unimodal train RECIPE.yaml --help` lists those options.
        lightning_args: LightningCLI's arguments.
    """
    import torch.distributed as dist

    from unimodal.training.recipes import run_training
    from unimodal.worlds import resolve

    try:
        run_training([recipe, *lightning_args], resolve_path=resolve)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in os.environ:
        # a rank of a finished torchrun job leaves without C++ static destructors, which can abort
        # at interpreter exit ("terminate called without an active exception", a thread left
        # joinable) and fail a run that has written everything
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def pack(
    src: Path,
    *,
    out: Path,
    max_docs_per_shard: int = 1000,
    max_mb_per_shard: int = 256,
    skip_bad: bool = False,
    val_fraction: float = 0.0,
) -> str:
    """Pack a source JSONL (media parts name local files) into shards.

    Args:
        src: the source JSONL: one document or chat record per line (docs/data-format.md).
        out: the shard directory.
        max_docs_per_shard: the most documents in one shard.
        max_mb_per_shard: the largest shard size, in MiB.
        skip_bad: skip and count bad documents instead of stopping at the first.
        val_fraction: > 0: write OUT/train and OUT/val, documents split by key.
    """
    from unimodal.data.jsonl import check_source, pack_jsonl

    check_source(src)  # before the lock, whose file beside --out a misspelt source would leave
    with run_lock(Path(out).absolute(), "write to another --out"):  # two packs into one directory would mix their shards
        stats = pack_jsonl(src, out, max_docs_per_shard=max_docs_per_shard, max_bytes_per_shard=max_mb_per_shard * 2**20,
                           skip_bad=skip_bad, val_fraction=val_fraction)
    splits = stats if val_fraction else {"": stats}
    written = "; ".join(
        f"{split + ': ' if split else ''}{_counted(s['documents'], 'document')} in {_counted(len(s['shards']), 'shard')}"
        for split, s in splits.items()
    )
    source = next(iter(splits.values()))["source"]
    skipped = f", {source['skipped']} of {source['documents']} lines skipped" if source["skipped"] else ""
    return f"wrote {written} to {out}{skipped}"


def encode(
    src: str,
    *,
    out: Path,
    image_tokenizer: str | None = None,
    audio_codec: str | None = None,
    audio_layers: int | None = None,
    max_seconds: float = 30.0,
    flip_pairs: float = 0.0,
    max_docs_per_shard: int = 1000,
    device: str = "cpu",
    resume: bool = False,
) -> str:
    """Pre-encode the images and audio of shards into codes once (docs/vocabulary.md).

    Args:
        src: a shard directory, brace pattern or shard; or a builtin: name.
        out: the directory for the encoded shards (new or empty).
        image_tokenizer: a SEED tokenizer or Chameleon (VQ-VAE) directory, or a builtin: name.
        audio_codec: an EnCodec/Mimi/DAC or SpeechTokenizer directory, or a builtin: name.
        audio_layers: RVQ layers to keep (default: all of the codec's).
        max_seconds: longer audio is an error.
        flip_pairs: probability of swapping the parts of image-text pairs (SEED-LLaMA: 0.5).
        max_docs_per_shard: documents per output shard.
        device: where the codecs run: cpu or cuda[:N].
        resume: go on after the complete shards of an interrupted encode into --out (same command).
    """
    from unimodal.data.pre_encode import check_encode, encode_shards
    from unimodal.modalities.loading import load_codec
    from unimodal.worlds import resolve

    modalities = [m for m, given in (("image", image_tokenizer), ("audio", audio_codec)) if given]
    with run_lock(Path(out).absolute(), "write to another --out"):
        source = resolve(src)
        check_encode(source, modalities, max_docs_per_shard=max_docs_per_shard, flip_pairs=flip_pairs)
        codecs = {}
        if image_tokenizer:
            codecs["image"] = load_codec("image", resolve(image_tokenizer), device)
        if audio_codec:
            codecs["audio"] = load_codec("audio", resolve(audio_codec), device, layers=audio_layers, max_seconds=max_seconds)
        stats = encode_shards(source, out, codecs, max_docs_per_shard=max_docs_per_shard, flip_pairs=flip_pairs, resume=resume)
    return f"wrote {stats['documents']} documents to {out} (codes: {', '.join(sorted(stats['codes']))})"


def inspect_shards(path: str, n: int = 3) -> str:
    """Summarise a shard or a shard directory and show its first documents.

    Args:
        path: a shard directory, brace pattern or shard; a builtin: name (builtin:shapes/train).
        n: documents to show.
    """
    from unimodal.worlds import resolve

    return inspect_path(resolve(path), n)


def fit_codec(src: str, *, codec: str, out: Path, limit: int | None = None, seed: int = 0) -> str:
    """Refit a trainable codec's codebooks on your own media (docs/refit-codec.md).

    Args:
        src: a directory of media files (WAV/FLAC/... or PNG/JPEG/..., searched recursively), or
            shards (a directory, brace pattern or shard; a builtin: name).
        codec: the codec to refit: a digit-audio or patch-vq directory (an export's codecs/audio,
            builtin:digits/audio_codec, builtin:digits/image_codec), or digit-audio / patch-vq for
            a new one. A SEED tokenizer is refit by its stage-2 recipe instead.
        out: the directory for the refit codec (new or empty).
        limit: fit on at most this many clips or images.
        seed: the seed of the k-means.
    """
    from unimodal.data.fit_codec import fit_codec as fit
    from unimodal.worlds import resolve

    return fit(resolve(src), resolve(codec), out, seed=seed, limit=limit).summary()


def text_corpus(*, out: Path) -> str:
    """Write a small English corpus (stdlib docstrings) as source JSONL.

    Args:
        out: the directory for train.jsonl and val.jsonl (neither may be there yet).
    """
    from unimodal.worlds.stdlib_text import write_corpus

    train_docs, val_docs = write_corpus(out)
    return f"wrote {train_docs} training and {val_docs} validation documents to {out}/{{train,val}}.jsonl"


def digits(*, out: Path, seed: int = 0) -> str:
    """Build the digits world: images, speech, text, tokenizers (docs/digits-world.md).

    Args:
        out: the directory for the world (new or empty).
        seed: the seed every random choice of the world derives from.
    """
    from unimodal.worlds.digits import build_world

    summary = build_world(out, seed=seed)
    counts = ", ".join(f"{name} {n}" for name, n in summary.items() if "/" in name)
    return f"wrote the digits world to {out} (documents: {counts}; see {out}/world.json)"


def tokenizer(src: Path, *, out: Path, vocab_size: int = 1024, overwrite: bool = False) -> str:
    """Train a SentencePiece tokenizer on a source JSONL's text (documents' text parts, chat
    records' messages).

    Args:
        src: the source JSONL.
        out: the tokenizer file, ending in .model.
        vocab_size: pieces in the vocabulary.
        overwrite: replace an existing --out (a trained model's tokenizer must not change under it).
    """
    from unimodal.data.jsonl import check_source
    from unimodal.data.sentencepiece_trainer import train_tokenizer

    check_source(src)
    if Path(out).is_dir():  # found only once the training is done, when the file would replace it
        raise FileExistsError(f"--out {out} is a directory; give a file name ending in .model")
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists: a run trained with it needs it as it is; give a new --out, or --overwrite")
    return f"wrote {train_tokenizer(src, out, vocab_size=vocab_size, progress=True)}"


def zero_to_fp32(checkpoint_dir: Path, out: Path, trust_checkpoint: bool = False) -> str:
    """DeepSpeed ZeRO checkpoint directory -> one fp32 state dict.

    Args:
        checkpoint_dir: the directory DeepSpeed saved (latest, checkpoint/...).
        out: the Lightning checkpoint file to write (a new file).
        trust_checkpoint: DeepSpeed reads its shard files with pickle, which can run code: say
            that you trust where this directory came from.
    """
    from unimodal.checkpoints.zero import zero_to_fp32 as convert

    if out.exists() or out.is_symlink():
        raise FileExistsError(f"{out} exists; give a new file for the converted checkpoint")
    return f"wrote {convert(checkpoint_dir, out, trust=trust_checkpoint)}"


def orthus(*, src: Path, out: Path, head_width: int = 1536, head_depth: int = 3) -> str:
    """Chameleon checkpoint -> Orthus-base initialisation (docs/orthus.md).

    Args:
        src: the Chameleon model directory.
        out: the directory for the initialisation (new or empty).
        head_width: width of the diffusion head.
        head_depth: blocks of the diffusion head.
    """
    from unimodal.checkpoints.convert_orthus import convert_orthus

    out = convert_orthus(src, out, head_width=head_width, head_depth=head_depth)
    return f"wrote the Orthus-base initialisation to {out} (backbone/, vqvae/, orthus_modules.safetensors)"


def pipeline(path: Path, *, tiny: bool = False, root: Path | None = None) -> str:
    """Run the stages of a pipeline file in order (docs/pipelines.md).

    Args:
        path: the pipeline YAML (recipes/pipelines/*.yaml).
        tiny: run every stage's CPU-sized variant.
        root: the directory for the stages' runs (default: the file's root:).
    """
    from unimodal.training.pipeline import format_table, run_pipeline
    from unimodal.worlds import resolve

    return format_table(run_pipeline(path, tiny=tiny, root=root, resolve_path=resolve))


def export(checkpoint: Path, *, out: Path, merge_lora: bool = False, trust_checkpoint: bool = False) -> str:
    """Checkpoint -> HF-style export directory (docs/checkpoints.md).

    Args:
        checkpoint: a .ckpt file, a DeepSpeed checkpoint directory or a run directory.
        out: the export directory (new or empty).
        merge_lora: merge LoRA into the backbone instead of writing an adapter.
        trust_checkpoint: needed for a DeepSpeed checkpoint directory, whose shard files DeepSpeed
            reads with pickle (a .ckpt file is read as tensors and plain values only).
    """
    from unimodal.training.exporting import export as write_export
    from unimodal.worlds import resolve

    written = write_export(checkpoint, out, merge_lora=merge_lora, resolve_path=resolve, trust_checkpoint=trust_checkpoint)
    return f"wrote {written}"


def chat(
    model: Path,
    *,
    out: Path = Path("chat-outputs"),
    system: str | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    max_new_tokens: int | None = None,
    seed: int | None = None,
    device: str = "auto",
    max_audio_seconds: float | None = None,
) -> None:
    """Chat with an exported model in the terminal (docs/chat.md).

    Args:
        model: an export directory (unimodal export).
        out: the directory for generated images and audio.
        system: a system prompt.
        temperature: text sampling temperature (0: greedy; default: the model's).
        top_p: nucleus sampling mass (default: the model's).
        top_k: sample among this many tokens (default: the model's).
        max_new_tokens: reply length limit in tokens (default: the model's).
        seed: a fixed seed for reproducible replies.
        device: auto (CUDA when present), cpu or cuda[:N].
        max_audio_seconds: the longest clip the audio codec reads and writes (default: the
            export's; at most 600).
    """
    from unimodal.inference.chat import load
    from unimodal.inference.terminal import Terminal

    if Path(out).exists() and not Path(out).is_dir():  # before the model loads, not at the first picture
        raise FileExistsError(f"--out {out} is a file; give a directory for the images and audio of replies")
    settings = _given(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, seed=seed)
    Terminal(load(model, device=device, max_audio_seconds=max_audio_seconds), out, settings=settings, system=system).run()


def serve(
    model: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    max_request_mb: float = 20.0,
    max_seconds: float = 300.0,
    max_tokens: int = 4096,
    max_batch: int = 8,
    max_waiting: int = 64,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    max_new_tokens: int | None = None,
    seed: int | None = None,
    device: str = "auto",
    max_audio_seconds: float | None = None,
    head_worker: bool | None = None,
) -> None:
    """Serve an exported model over an OpenAI-compatible HTTP API (docs/serving.md).

    Args:
        model: an export directory (unimodal export).
        host: the address to listen on.
        port: the port to listen on.
        api_key: require 'Authorization: Bearer KEY' (default: $UNIMODAL_API_KEY, else none).
        model_name: the model id clients send (default: the last component of MODEL as given).
        max_request_mb: larger request bodies get 413.
        max_seconds: longer generations get 408 (a request may ask for less with timeout_s), and
            requests that wait longer for the model get 429.
        max_tokens: the largest max_tokens a request may ask for.
        max_batch: how many replies (a request's n counts n times) are generated together;
            concurrent requests are batched up to it.
        max_waiting: how many requests may wait for the model; more get 429 at once (each
            waiting request holds its body in memory).
        temperature: default text sampling temperature (0: greedy; default: the model's).
        top_p: default nucleus sampling mass (default: the model's).
        top_k: default number of tokens sampled among (default: the model's).
        max_new_tokens: default reply length in tokens (default: the model's).
        seed: a fixed seed for reproducible replies.
        device: auto (CUDA when present), cpu or cuda[:N].
        max_audio_seconds: the longest clip the audio codec reads and writes (default: the
            export's; at most 600, the server's decoding limit).
        head_worker: draw picture slots of a per-token diffusion head (Orthus-style), and decode
            the media of replies that end first, in a second process, beside the other requests'
            steps (default: on a CPU of two cores or more, for a model with such a head).
    """
    from unimodal.inference.chat import load
    from unimodal.inference.server import ServerLimits, check_address
    from unimodal.inference.server import serve as run_server
    from unimodal.models.generation import GenerationSettings

    if api_key is not None and not api_key.strip():  # `--api_key "$KEY"` with KEY unset would serve everyone
        raise ValueError("--api_key is empty; give a key, or leave the option out to serve without one")
    api_key = api_key or os.environ.get("UNIMODAL_API_KEY")
    if api_key is not None and not api_key.strip():  # no client could send it: every request would get 401
        raise ValueError("$UNIMODAL_API_KEY is set but empty; give it a key, or unset it to serve without one")
    if not (max_request_mb > 0 and math.isfinite(max_request_mb)):  # int() of inf would be an OverflowError
        raise ValueError(f"--max_request_mb must be a positive number of MB, got {max_request_mb}")
    limits = ServerLimits(max_request_bytes=int(max_request_mb * 2**20), max_seconds=max_seconds, max_new_tokens=max_tokens,
                          max_batch=max_batch, max_waiting=max_waiting)
    settings = _given(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, seed=seed)
    GenerationSettings().replace(**settings)  # this, the address and the limits before the model loads
    check_address(host, port)
    assistant = load(model, device=device, max_audio_seconds=max_audio_seconds)
    if settings:
        assistant.settings = assistant.settings.replace(**settings)
    run_server(assistant, host, port, api_key=api_key, limits=limits, model_name=model_name, head_worker=head_worker)


def evaluate(
    model: Path,
    *,
    suite: Literal["digits"],
    out: Path | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    max_new_tokens: int | None = None,
    seed: int | None = None,
    device: str = "auto",
) -> str:
    """Score an exported model on an evaluation suite (docs/digits-world.md).

    Args:
        model: an export directory (unimodal export).
        suite: the suite to run.
        out: the JSON report (default: MODEL/eval-digits.json).
        limit: at most this many questions per task and phrasing set (a quick look).
        batch_size: conversations generated together.
        temperature: text sampling temperature (default: 0, greedy: answers are classifications).
        top_p: nucleus sampling mass (default: the model's).
        top_k: sample among this many tokens (default: the model's).
        max_new_tokens: reply length limit in tokens (default: the model's).
        seed: the seed of sampled pictures and speech (default: 0).
        device: auto (CUDA when present), cpu or cuda[:N].
    """
    from unimodal.worlds.digits_suite import evaluate as run_suite
    from unimodal.worlds.digits_suite import summary

    settings = _given(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, seed=seed)
    report = run_suite(model, out, limit=limit, batch_size=batch_size, device=device, settings=settings)
    return f"{summary(report)}\nwrote {report['report_path']}"


def _counted(number: int, noun: str) -> str:
    """``1 shard``, ``3 shards``."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _given(**settings: Any) -> dict[str, Any]:
    """The sampling settings given on the command line: unset ones keep the model's defaults."""
    return {name: value for name, value in settings.items() if value is not None}


# verb -> function (its signature the verb's options); a dict nests verbs, "_help" their group's help
VERBS: dict[str, Any] = {
    "train": train,
    "data": {
        "_help": "build, pack and inspect WebDataset shards",
        "pack": pack,
        "encode": encode,
        "fit-codec": fit_codec,
        "inspect": inspect_shards,
        "text-corpus": text_corpus,
        "digits": digits,
        "tokenizer": tokenizer,
    },
    "convert": {"_help": "convert checkpoints", "zero-to-fp32": zero_to_fp32, "orthus": orthus},
    "pipeline": pipeline,
    "export": export,
    "chat": chat,
    "serve": serve,
    "eval": evaluate,
}

# spellings of flags that users type out of habit (kebab case, argparse's short names), told the one to use
def _verb_functions(verbs: dict[str, Any]) -> list[Any]:
    return [f for v in verbs.values() if not isinstance(v, str) for f in (_verb_functions(v) if isinstance(v, dict) else [v])]


RENAMED = {
    "-n": "--n",
    "--from": "--src",
    # every option of every verb in kebab case, as argparse-style tools spell them
    **{f"--{name.replace('_', '-')}": f"--{name}" for verb in _verb_functions(VERBS)
       for name, parameter in inspect.signature(verb).parameters.items()
       if "_" in name and parameter.default is not inspect.Parameter.empty},  # those without a default are positional
}


class Parser(ArgumentParser):
    """jsonargparse's parser, with boolean options as flags: ``--tiny`` alone means true
    (``--tiny false`` still works), as the verbs' switches always read; and no abbreviations, so
    that a misspelt option is an error rather than the option it happens to begin."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def add_argument(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("type") is bool and args[0].startswith("--"):
            kwargs.update(nargs="?", const=True)
        return super().add_argument(*args, **kwargs)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers' own bars ("Loading weights", "Writing model shards") would interleave with ours
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _one_log_line_each()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command(argv)
    try:
        _check_config_values(argv)
        if argv[:1] == ["train"] and argv[1:2] not in ([], ["-h"], ["--help"]):
            train(*argv[1:])  # LightningCLI parses these, as in any LightningCLI program
            return 0
        renamed = next((arg.split("=")[0] for arg in argv if arg.split("=")[0] in RENAMED), None)
        if renamed:
            raise ArgumentError(None, f"{renamed} is spelled {RENAMED[renamed]}")
        with _terminate_as_interrupt(argv[:2] in (["data", "pack"], ["data", "encode"])):
            printed = auto_cli(VERBS, args=argv, prog="unimodal", description="Any-to-any multimodal models on a decoder-only LLM.",
                               parser_class=Parser, exit_on_error=False)
    except ArgumentError as err:
        print(f"{_rank_prefix()}{command}: error: {_parse_error(err.message, full_key=argv[:1] == ['train'])}", file=sys.stderr)
        return 2
    except (UserError, FileNotFoundError, FileExistsError, ValueError) as err:
        if os.environ.get("UNIMODAL_DEBUG"):
            raise
        print(f"{_rank_prefix()}{command}: error: {_reason(err)}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt as err:  # `unimodal train` says at which step and what it saved (resume.Interrupted)
        if os.environ.get("UNIMODAL_DEBUG"):
            raise
        print(f"\n{_rank_prefix()}{command}: interrupted ({str(err) or 'Ctrl-C'})", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    except OSError as err:
        if err.errno not in WRITE_ERRORS or os.environ.get("UNIMODAL_DEBUG"):
            raise
        where = err.filename2 or err.filename
        if where is not None and os.path.isfile(where) and not os.access(where, os.R_OK):
            print(f"{_rank_prefix()}{command}: error: cannot read {where}: {err.strerror} (check its permissions)", file=sys.stderr)
            return 1
        hint = WRITE_ERRORS[err.errno]
        named = f": {where}" if where is not None else ""  # a write() to an open file names none
        print(f"{_rank_prefix()}{command}: error: {err.strerror}{named} ({hint})", file=sys.stderr)
        return 1
    if printed is not None:
        try:
            print(printed, flush=True)
        except BrokenPipeError:  # `unimodal data inspect DIR | head`: the reader stopped reading, as it may
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the flush at exit fails no more
            return 1
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a job scheduler) while shards are written."""


@contextmanager
def _terminate_as_interrupt(active: bool) -> Iterator[None]:
    """SIGTERM stops a verb that writes shards as Ctrl-C does, so that its cleanup runs: the default
    action would end the process mid-shard and leave a shard set without stats.json that a run would read."""
    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_log_line_each() -> None:
    """Lightning gives its ``lightning`` logger a console handler of its own when it is imported,
    and its records would also reach the root handler, printing every line twice: the root handler
    leaves them to Lightning's (without importing Lightning, which would slow every verb). Its
    advertisement for a hosted logger at each fit is dropped. In a run of several processes, only
    rank 0 says what all ranks would say alike (the model's size, data warnings); errors come from
    every rank. DeepSpeed's notice that it found no GPU is dropped too."""
    for handler in logging.getLogger().handlers:
        for only in (_left_to_lightning, _rank_zero_unless_error):
            if only not in handler.filters:
                handler.addFilter(only)
    advertising = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _no_advertisement not in advertising.filters:
        advertising.addFilter(_no_advertisement)
    # transformers' save_pretrained imports DeepSpeed on every export, even where no run uses it;
    # in a run, Lightning's "GPU available" line already says whether there is a GPU
    deepspeed = logging.getLogger("DeepSpeed")
    if _no_cpu_accelerator_notice not in deepspeed.filters:
        deepspeed.addFilter(_no_cpu_accelerator_notice)


def _left_to_lightning(record: logging.LogRecord) -> bool:
    return not (record.name.startswith("lightning") and logging.getLogger("lightning").handlers)


def _rank_zero_unless_error(record: logging.LogRecord) -> bool:
    return launched_rank() == 0 or record.levelno >= logging.ERROR


def _rank_prefix() -> str:
    """Which process an error line comes from when every rank of a run prints its own."""
    rank = launched_rank()
    return f"[rank {rank}] " if rank else ""


def _no_advertisement(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip")


def _no_cpu_accelerator_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Setting accelerator to CPU")


# errors of writing where one cannot, each with what to do
_ELSEWHERE = "use a directory you can write to"
WRITE_ERRORS = {
    errno.ENOSPC: "free space, or write elsewhere", errno.EDQUOT: "free space, or write elsewhere",
    errno.EROFS: _ELSEWHERE, errno.EACCES: _ELSEWHERE, errno.EPERM: _ELSEWHERE,
    errno.ENOTDIR: "a part of this path is a file, not a directory", errno.EISDIR: "give a file name, not a directory",
}


def _check_config_values(argv: list[str]) -> None:
    """Each ``--config`` value (a file, or YAML text) read as recipes are, before jsonargparse
    loads it with aliases and all (a few lines can expand to 10**9 values)."""
    values = [arg.partition("=")[2] for arg in argv if arg.startswith("--config=")]
    values += [value for arg, value in zip(argv, argv[1:]) if arg == "--config"]
    for value in values:
        try:
            is_file = Path(value).is_file()
        except OSError:  # a name too long: YAML text
            is_file = False
        if is_file:
            read_yaml(Path(value), "--config")
        else:
            parse_yaml(value, "text", "--config")


def _command(argv: list[str]) -> str:
    """``unimodal`` and the verb ``argv`` names (``unimodal data pack``), for error lines."""
    words = ["unimodal"]
    table: Any = VERBS
    for word in argv:
        if not isinstance(table, dict) or word not in table:
            break
        words.append(word)
        table = table[word]
    return " ".join(words)


def _parse_error(message: str, full_key: bool = False) -> str:
    """jsonargparse's parse error as one line: the option and why its value was refused (of a
    Union's alternatives, the first that is not None; inside a recipe class, its own key's reason;
    a list or mapping that is not valid YAML, the YAML error)."""
    required = re.match(r"the following arguments are required: (.*)", message)
    if required is not None:
        return f"the following arguments are required: {', '.join(map(_as_typed, required.group(1).split(', ')))}"
    match = re.match(r'Parser key "([^"]+)":\s*(.*)', message, re.S)
    if match is None:
        return " ".join(message.split())
    key, body = match.groups()
    lines = [line.strip().removeprefix("- ") for line in body.splitlines() if line.strip()]
    reason = lines[0] if lines else "invalid value"
    if "surrogates not allowed" in reason:  # a path option refuses bytes that are not UTF-8 (a name from another system)
        reason = "the path holds bytes that are not UTF-8, which a path option cannot take; rename it, or give a UTF-8 link to it"
    problem = next((i for i, line in enumerate(lines) if line.startswith("Problem with given class_path")), None)
    inner = re.search(r'Problem with given class_path [^\n]*:\s*\n\s*(Parser key "([^"]+)":.*)', body, re.S)
    if reason.startswith(UNION_ERROR) and inner is not None:  # a key of the recipe's class: its own reason
        nested = _parse_error(inner.group(1))
        typed = re.findall(r"NestedArg\(key='([^']+)'", body)  # the last is the whole dotted key under this one
        if typed:
            return f"--{key}.init_args.{typed[-1]}: {nested.split(': ', 1)[1]}"
        return f"--{key}.init_args.{nested.removeprefix('--')}"
    if reason.startswith(UNION_ERROR) and problem is not None:  # a class that does not import: say why
        reason = " ".join(lines[problem : problem + 2])
    elif reason.startswith(UNION_ERROR):
        expected = next((line for line in lines if line.startswith("Expected") and "NoneType" not in line), reason)
        reason = " ".join([expected + ".", *(line for line in lines if line.startswith("Given value:"))])
    given = re.search(r"Got value: ([\[{].*)$", body, re.M)
    if given is not None:
        reason = _yaml_problem(given.group(1)) or reason
    single = re.match(r"Expected a path but (.*) either not accessible or invalid", reason)
    if single is not None:  # a list option given one value, which jsonargparse reads as a file holding the list
        value = single.group(1)
        reason = (f"takes a list, and {value!r} is one value (read as a YAML file holding the list, which it is not); "
                  f"quote a YAML list, e.g. '[{value}]' or '[{{path: {value}}}]'")
    precision = re.search(r"Given value: (\S+)", reason) if key.endswith("trainer.precision") else None
    if precision is not None:  # jsonargparse reports the last alternative of the Union it tried (int)
        reason = _precision_problem(precision.group(1))
    choice = re.match(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", reason)
    if choice is not None:
        reason = f"{choice.group(2)!r} is not one of: {', '.join(map(str, ast.literal_eval(f'[{choice.group(1)}]')))}"
    return f"--{key if full_key else key.rsplit('.', 1)[-1]}: {reason}"


def _precision_problem(value: str) -> str:
    import typing

    from lightning.fabric.connector import _PRECISION_INPUT_STR

    known = ["auto", *typing.get_args(_PRECISION_INPUT_STR)]
    near = difflib.get_close_matches(value, known, n=1)
    return f"{value!r} is not a precision{f' (did you mean {near[0]!r}?)' if near else ''}; one of: {', '.join(known)}"


def _strategy_problem(value: str) -> str:
    from lightning.pytorch.strategies import StrategyRegistry

    near = difflib.get_close_matches(value, ["auto", *StrategyRegistry.available_strategies()], n=2)
    hint = f" (did you mean {' or '.join(map(repr, near))}?)" if near else ""
    return f"--trainer.strategy: {value!r} is not a strategy{hint}; docs/training.md lists them"


def _as_typed(key: str) -> str:
    """A verb's argument as its user types it: ``export.out`` -> ``--out``, ``export.checkpoint`` -> ``CHECKPOINT``."""
    *path, name = key.split(".")
    verb: Any = VERBS
    for word in path:
        verb = verb.get(word) if isinstance(verb, dict) else None
    parameter = inspect.signature(verb).parameters.get(name) if callable(verb) else None
    if parameter is not None and parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
        return name.upper()
    return f"--{name}"


def _yaml_problem(value: str) -> str | None:
    """Why a list or mapping typed on the command line is not YAML, or None when it is."""
    try:
        yaml.safe_load(value)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        return f"{value!r} is not a valid YAML list or mapping ({problem}); quote it whole, e.g. '[{{path: DIR}}]'"
    return None


UNION_ERROR = "Does not validate against any of the Union subtypes"


def _reason(err: BaseException) -> str:
    """The error as the user needs it: when a recipe's class fails to build, jsonargparse reports
    every alternative of the Union it tried plus the whole config; the first real reason is kept,
    followed down the chain of causes when the Union is nested (a codec inside a data module).
    An error a DataLoader worker raised arrives with the worker's traceback in its text: its last
    line is kept. A link that failed to compute (the model's vocabulary from the data module) says
    so with the data module's repr: its cause is kept."""
    text = str(err)
    if text.startswith("Call to compute_fn of link") and " failed: " in text:  # a linked value (the data's vocabulary) failed
        return _reason(err.__cause__) if err.__cause__ is not None else text.split(" failed: ", 1)[1]
    if "\nOriginal Traceback" in text:  # raised in a DataLoader worker: its last line is the error
        last = text.rstrip().splitlines()[-1]
        return last.split(": ", 1)[1] if last.startswith(f"{type(err).__module__}.{type(err).__name__}: ") else last
    strategy = re.match(r"You selected an invalid strategy name: `strategy='([^']*)'`", text)
    if strategy is not None:  # Lightning names a few choices and a web page
        return _strategy_problem(strategy.group(1))
    if not text.startswith(UNION_ERROR):
        return text
    reasons = [line.strip()[2:] for line in text.splitlines() if line.startswith("  - ") and "NoneType" not in line]
    # an alternative of another type ("Expected a <class 'str'>") says less than the one that failed to build
    reasons = [r for r in reasons if not r.startswith("Expected a ")] or reasons
    if reasons and reasons[0].startswith(UNION_ERROR) and err.__cause__ is not None:
        return _reason(err.__cause__)
    return reasons[0] if reasons else text


if __name__ == "__main__":
    sys.exit(main())
