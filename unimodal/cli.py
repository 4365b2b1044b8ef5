"""The ``unimodal`` command.

``train`` hands its arguments to LightningCLI (jsonargparse): ``unimodal train RECIPE.yaml
--trainer.max_steps=10`` and ``--print_config`` work as in any LightningCLI program. The other
verbs are small argparse front ends over library functions.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

PLANNED = {
    "pipeline": "multi-stage pipelines",
    "chat": "the terminal chat",
    "serve": "the OpenAI-compatible server",
    "eval": "evaluation suites",
    "export": "exporting checkpoints to HF-style directories",
    "bench": "benchmarks (run the scripts in benchmarks/ meanwhile)",
}


class CLIError(Exception):
    """An error the user can fix; printed as one line, no traceback."""


def _train(args: argparse.Namespace, rest: list[str]) -> None:
    from unimodal.training.cli import run_training

    run_training(([args.recipe] if args.recipe else []) + rest)


def _data_pack(args: argparse.Namespace, rest: list[str]) -> None:
    from unimodal.data.shards import pack_jsonl

    pack_jsonl(
        args.src,
        args.out,
        max_docs_per_shard=args.max_docs_per_shard,
        max_bytes_per_shard=args.max_mb_per_shard * 2**20,
        skip_bad=args.skip_bad,
    )


def _data_inspect(args: argparse.Namespace, rest: list[str]) -> None:
    from unimodal.data.shards import inspect_path

    print(inspect_path(args.path, n=args.n))


def _data_text_corpus(args: argparse.Namespace, rest: list[str]) -> None:
    from unimodal.data.sources.stdlib_text import write_corpus

    train, val = write_corpus(args.out)
    print(f"wrote {train} training and {val} validation documents to {args.out}/{{train,val}}.jsonl")


def _data_tokenizer(args: argparse.Namespace, rest: list[str]) -> None:
    from unimodal.data.sentencepiece_trainer import train_tokenizer

    out = train_tokenizer(args.src, args.out, vocab_size=args.vocab_size)
    print(f"wrote {out}")


def _convert_zero(args: argparse.Namespace, rest: list[str]) -> None:
    from unimodal.training.checkpoint import zero_to_fp32

    zero_to_fp32(args.checkpoint_dir, args.out)
    print(f"wrote {args.out}")


def _planned(verb: str) -> Callable[[argparse.Namespace, list[str]], None]:
    def run(args: argparse.Namespace, rest: list[str]) -> None:
        raise CLIError(f"'unimodal {verb}' ({PLANNED[verb]}) is not implemented in this version yet")

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unimodal", description="Any-to-any multimodal models on a decoder-only LLM.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    train = verbs.add_parser(
        "train",
        help="train one stage from a recipe (LightningCLI: --trainer.max_steps=10, --print_config, ...)",
        add_help=False,
    )
    train.add_argument("recipe", nargs="?", help="recipe YAML (--help lists every option)")
    train.set_defaults(run=_train, passthrough=True)

    data = verbs.add_parser("data", help="build, pack and inspect WebDataset shards")
    data_verbs = data.add_subparsers(dest="data_verb", metavar="ACTION", required=True)
    pack = data_verbs.add_parser("pack", help="pack a source JSONL (media parts name local files) into shards")
    pack.add_argument("src")
    pack.add_argument("--out", required=True)
    pack.add_argument("--max-docs-per-shard", type=int, default=1000)
    pack.add_argument("--max-mb-per-shard", type=int, default=256)
    pack.add_argument("--skip-bad", action="store_true", help="skip and count bad documents instead of stopping")
    pack.set_defaults(run=_data_pack)
    inspect = data_verbs.add_parser("inspect", help="summarise a shard or a shard directory")
    inspect.add_argument("path")
    inspect.add_argument("-n", type=int, default=3, help="documents to show")
    inspect.set_defaults(run=_data_inspect)
    corpus = data_verbs.add_parser("text-corpus", help="write a small English corpus (stdlib docstrings) as source JSONL")
    corpus.add_argument("--out", required=True, help="directory for train.jsonl and val.jsonl")
    corpus.set_defaults(run=_data_text_corpus)
    tok = data_verbs.add_parser("tokenizer", help="train a SentencePiece tokenizer on a source JSONL's text")
    tok.add_argument("src")
    tok.add_argument("--out", required=True, help="path ending in .model")
    tok.add_argument("--vocab-size", type=int, default=1024)
    tok.set_defaults(run=_data_tokenizer)

    convert = verbs.add_parser("convert", help="convert checkpoints")
    convert_verbs = convert.add_subparsers(dest="convert_verb", metavar="KIND", required=True)
    zero = convert_verbs.add_parser("zero-to-fp32", help="DeepSpeed ZeRO checkpoint directory -> one fp32 state dict")
    zero.add_argument("checkpoint_dir")
    zero.add_argument("out")
    zero.set_defaults(run=_convert_zero)

    for verb, what in PLANNED.items():
        planned = verbs.add_parser(verb, help=f"{what} (not implemented yet)", add_help=False)
        planned.set_defaults(run=_planned(verb), passthrough=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    try:
        args.run(args, rest)
    except (CLIError, FileNotFoundError, ValueError) as err:
        if os.environ.get("UNIMODAL_DEBUG"):
            raise
        print(f"unimodal {args.verb}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
