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

from unimodal.errors import UserError

def _train(args: argparse.Namespace, rest: list[str]) -> None:
    from unimodal.training.recipes import run_training
    from unimodal.worlds import resolve

    run_training(([args.recipe] if args.recipe else []) + rest, resolve_path=resolve)


def _data_pack(args: argparse.Namespace, rest: list[str]) -> None:
    from unimodal.data.jsonl import pack_jsonl

    pack_jsonl(
        args.src,
        args.out,
        max_docs_per_shard=args.max_docs_per_shard,
        max_bytes_per_shard=args.max_mb_per_shard * 2**20,
        skip_bad=args.skip_bad,
        val_fraction=args.val_fraction,
    )


def _data_encode(args: argparse.Namespace, rest: list[str]) -> None:
    from unimodal.worlds import builtin
    from unimodal.data.pre_encode import encode_shards, load_codec

    codecs = {}
    if args.image_tokenizer:
        codecs["image"] = load_codec("image", builtin.resolve(args.image_tokenizer), args.device)
    if args.audio_codec:
        codecs["audio"] = load_codec("audio", builtin.resolve(args.audio_codec), args.device, layers=args.audio_layers, max_seconds=args.max_seconds)
    stats = encode_shards(
        builtin.resolve(args.src), args.out, codecs, max_docs_per_shard=args.max_docs_per_shard, flip_pairs=args.flip_pairs
    )
    print(f"wrote {stats['documents']} documents to {args.out} (codes: {', '.join(sorted(stats['codes']))})")


def _data_inspect(args: argparse.Namespace, rest: list[str]) -> None:
    from unimodal.data.inspect import inspect_path

    print(inspect_path(args.path, n=args.n))


def _data_text_corpus(args: argparse.Namespace, rest: list[str]) -> None:
    from unimodal.worlds.stdlib_text import write_corpus

    train, val = write_corpus(args.out)
    print(f"wrote {train} training and {val} validation documents to {args.out}/{{train,val}}.jsonl")


def _data_digits(args: argparse.Namespace, rest: list[str]) -> None:
    from unimodal.worlds.digits import build_world

    summary = build_world(args.out, seed=args.seed)
    counts = ", ".join(f"{name} {n}" for name, n in summary.items() if "/" in name)
    print(f"wrote the digits world to {args.out} (documents: {counts}; see {args.out}/world.json)")


def _eval(args: argparse.Namespace, rest: list[str]) -> None:
    from unimodal.worlds.digits_suite import evaluate, summary

    report = evaluate(args.model, args.out, limit=args.limit, batch_size=args.batch_size, device=args.device, settings=_sampling(args))
    print(summary(report))
    print(f"wrote {report['report_path']}")


def _data_tokenizer(args: argparse.Namespace, rest: list[str]) -> None:
    from unimodal.data.sentencepiece_trainer import train_tokenizer

    out = train_tokenizer(args.src, args.out, vocab_size=args.vocab_size)
    print(f"wrote {out}")


def _convert_zero(args: argparse.Namespace, rest: list[str]) -> None:
    from unimodal.checkpoints.zero import zero_to_fp32

    zero_to_fp32(args.checkpoint_dir, args.out)
    print(f"wrote {args.out}")


def _convert_orthus(args: argparse.Namespace, rest: list[str]) -> None:
    from unimodal.checkpoints.convert_orthus import convert_orthus

    out = convert_orthus(args.src, args.out, head_width=args.head_width, head_depth=args.head_depth)
    print(f"wrote the Orthus-base initialisation to {out} (backbone/, vqvae/, orthus_modules.safetensors)")


def _pipeline(args: argparse.Namespace, rest: list[str]) -> None:
    from unimodal.training.pipeline import format_table, run_pipeline
    from unimodal.worlds import resolve

    print(format_table(run_pipeline(args.pipeline, tiny=args.tiny, root=args.root, resolve_path=resolve)))


def _export(args: argparse.Namespace, rest: list[str]) -> None:
    from unimodal.training.exporting import export

    from unimodal.worlds import resolve

    print(f"wrote {export(args.checkpoint, args.out, merge_lora=args.merge_lora, resolve_path=resolve)}")


def _sampling(args: argparse.Namespace) -> dict:
    """Generation settings given on the command line (unset ones keep the model's defaults)."""
    names = ("temperature", "top_p", "top_k", "max_new_tokens", "seed")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, help="text sampling temperature (0: greedy)")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--max-new-tokens", type=int, help="reply length limit in tokens")
    parser.add_argument("--seed", type=int, help="fixed seed for reproducible replies")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")


def _chat(args: argparse.Namespace, rest: list[str]) -> None:
    from unimodal.inference.chat import load
    from unimodal.inference.terminal import Terminal

    Terminal(load(args.model, device=args.device), args.out, settings=_sampling(args), system=args.system).run()


def _serve(args: argparse.Namespace, rest: list[str]) -> None:
    from unimodal.inference.chat import load
    from unimodal.inference.server import ServerLimits, serve

    limits = ServerLimits(
        max_request_bytes=int(args.max_request_mb * 2**20), max_seconds=args.max_seconds, max_new_tokens=args.max_tokens
    )
    assistant = load(args.model, device=args.device)
    if _sampling(args):
        assistant.settings = assistant.settings.replace(**_sampling(args))
    serve(assistant, args.host, args.port, api_key=args.api_key or os.environ.get("UNIMODAL_API_KEY"), limits=limits,
          model_name=args.model_name)


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
    pack.add_argument("--val-fraction", type=float, default=0.0, help="> 0: write OUT/train and OUT/val, documents split by key")
    pack.set_defaults(run=_data_pack)
    encode = data_verbs.add_parser("encode", help="pre-encode the images/audio of shards into codes once (docs/vocabulary.md)")
    encode.add_argument("src", help="shard directory, brace pattern or shard (builtin: paths work)")
    encode.add_argument("--out", required=True, help="directory for the encoded shards (new or empty)")
    encode.add_argument("--image-tokenizer", metavar="DIR", help="a SEED tokenizer or Chameleon (VQ-VAE) directory")
    encode.add_argument("--audio-codec", metavar="DIR", help="an EnCodec/Mimi/DAC or SpeechTokenizer directory")
    encode.add_argument("--audio-layers", type=int, help="RVQ layers to keep (default: all of the codec's)")
    encode.add_argument("--max-seconds", type=float, default=30.0, help="longer audio is an error")
    encode.add_argument("--flip-pairs", type=float, default=0.0, help="probability of swapping image-text pairs (SEED-LLaMA: 0.5)")
    encode.add_argument("--max-docs-per-shard", type=int, default=1000)
    encode.add_argument("--device", default="cpu")
    encode.set_defaults(run=_data_encode)
    inspect = data_verbs.add_parser("inspect", help="summarise a shard or a shard directory")
    inspect.add_argument("path")
    inspect.add_argument("-n", type=int, default=3, help="documents to show")
    inspect.set_defaults(run=_data_inspect)
    corpus = data_verbs.add_parser("text-corpus", help="write a small English corpus (stdlib docstrings) as source JSONL")
    corpus.add_argument("--out", required=True, help="directory for train.jsonl and val.jsonl")
    corpus.set_defaults(run=_data_text_corpus)
    digits = data_verbs.add_parser("digits", help="build the digits world: images, speech, text, tokenizers (docs/digits-world.md)")
    digits.add_argument("--out", required=True, help="directory for the world (new or empty)")
    digits.add_argument("--seed", type=int, default=0)
    digits.set_defaults(run=_data_digits)
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
    orthus = convert_verbs.add_parser("orthus", help="Chameleon checkpoint -> Orthus-base initialisation (docs/orthus.md)")
    orthus.add_argument("--from", dest="src", required=True, metavar="CHAMELEON_DIR")
    orthus.add_argument("--out", required=True, metavar="DIR")
    orthus.add_argument("--head-width", type=int, default=1536)
    orthus.add_argument("--head-depth", type=int, default=3)
    orthus.set_defaults(run=_convert_orthus)

    pipeline = verbs.add_parser("pipeline", help="run the stages of a pipeline file in order (docs/pipelines.md)")
    pipeline.add_argument("pipeline", help="pipeline YAML (recipes/pipelines/*.yaml)")
    pipeline.add_argument("--tiny", action="store_true", help="run every stage's CPU-sized variant")
    pipeline.add_argument("--root", help="directory for the stages' runs (default: the file's root:)")
    pipeline.set_defaults(run=_pipeline)

    export = verbs.add_parser("export", help="checkpoint -> HF-style directory (docs/checkpoints.md)")
    export.add_argument("checkpoint", help="a .ckpt file, a DeepSpeed checkpoint directory or a run directory")
    export.add_argument("--out", required=True, help="the export directory (new or empty)")
    export.add_argument("--merge-lora", action="store_true", help="merge LoRA into the backbone instead of writing an adapter")
    export.set_defaults(run=_export)

    chat = verbs.add_parser("chat", help="chat with an exported model in the terminal (docs/chat.md)")
    chat.add_argument("model", help="an export directory (unimodal export)")
    chat.add_argument("--out", default="chat-outputs", help="directory for generated images and audio")
    chat.add_argument("--system", help="a system prompt")
    _add_sampling(chat)
    chat.set_defaults(run=_chat)

    serve = verbs.add_parser("serve", help="serve an exported model over an OpenAI-compatible HTTP API (docs/serving.md)")
    serve.add_argument("model", help="an export directory (unimodal export)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $UNIMODAL_API_KEY, else none)")
    serve.add_argument("--model-name", help="the model id clients send (default: the directory name)")
    serve.add_argument("--max-request-mb", type=float, default=20.0, help="larger request bodies get 413")
    serve.add_argument("--max-seconds", type=float, default=300.0, help="longer generations get 408")
    serve.add_argument("--max-tokens", type=int, default=4096, help="the largest max_tokens a request may ask for")
    _add_sampling(serve)
    serve.set_defaults(run=_serve)

    evaluate = verbs.add_parser("eval", help="score an exported model on an evaluation suite (docs/digits-world.md)")
    evaluate.add_argument("model", help="an export directory (unimodal export)")
    evaluate.add_argument("--suite", required=True, choices=["digits"])
    evaluate.add_argument("--out", help="the JSON report (default: MODEL/eval-digits.json)")
    evaluate.add_argument("--limit", type=int, help="at most this many questions per task (a quick look)")
    evaluate.add_argument("--batch-size", type=int, default=16, help="conversations generated together")
    _add_sampling(evaluate)
    evaluate.set_defaults(run=_eval)
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
    except (UserError, FileNotFoundError, ValueError) as err:
        if os.environ.get("UNIMODAL_DEBUG"):
            raise
        print(f"unimodal {args.verb}: error: {_reason(err)}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    return 0


UNION_ERROR = "Does not validate against any of the Union subtypes"


def _reason(err: BaseException) -> str:
    """The error as the user needs it: when a recipe's class fails to build, jsonargparse reports
    every alternative of the Union it tried plus the whole config; the first real reason is kept,
    followed down the chain of causes when the Union is nested (a codec inside a data module)."""
    text = str(err)
    if not text.startswith(UNION_ERROR):
        return text
    reasons = [line.strip()[2:] for line in text.splitlines() if line.startswith("  - ") and "NoneType" not in line]
    if reasons and reasons[0].startswith(UNION_ERROR) and err.__cause__ is not None:
        return _reason(err.__cause__)
    return reasons[0] if reasons else text


if __name__ == "__main__":
    sys.exit(main())
