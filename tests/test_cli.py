"""The ``unimodal`` command: verbs from typed functions, one-line errors, old flags named."""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from unimodal.cli import RENAMED, VERBS, main
from unimodal.errors import UserError


def _verbs(table: dict, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    """Every (verb words, function) of the table, nested verbs flattened."""
    found = []
    for name, entry in table.items():
        if name != "_help":
            found += _verbs(entry, (*prefix, name)) if isinstance(entry, dict) else [((*prefix, name), entry)]
    return found


VERB_FUNCTIONS = _verbs(VERBS)


def _help(words: tuple[str, ...], capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main([*words, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(("words", "function"), VERB_FUNCTIONS, ids=[" ".join(words) for words, _ in VERB_FUNCTIONS])
def test_every_verb_has_help_from_its_docstring(words, function, capsys):
    first_line = inspect.getdoc(function).splitlines()[0]
    assert "".join(first_line.split()) in "".join(_help(words, capsys).split())  # help wraps lines anywhere


def test_the_nested_verbs_keep_their_names():
    assert set(VERBS["data"]) - {"_help"} == {"pack", "encode", "fit-codec", "inspect", "text-corpus", "digits", "tokenizer"}
    assert set(VERBS["convert"]) - {"_help"} == {"zero-to-fp32", "orthus"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["data", "pack", "x.jsonl", "--out", "o", "--max-docs-per-shard", "3"],
         "unimodal data pack: error: --max-docs-per-shard is spelled --max_docs_per_shard"),
        (["data", "encode", "s", "--out", "o", "--image-tokenizer=builtin:seed_tokenizer/tiny"],
         "unimodal data encode: error: --image-tokenizer is spelled --image_tokenizer"),
        (["data", "inspect", "shards", "-n", "2"], "unimodal data inspect: error: -n is spelled --n"),
        (["convert", "orthus", "--from", "c", "--out", "o"], "unimodal convert orthus: error: --from is spelled --src"),
        (["serve", "m", "--max-request-mb", "4"], "unimodal serve: error: --max-request-mb is spelled --max_request_mb"),
        (["eval", "m", "--suite", "digits", "--top-p", "0.9"], "unimodal eval: error: --top-p is spelled --top_p"),
        (["serve", "m", "--max-audio-seconds", "4"], "unimodal serve: error: --max-audio-seconds is spelled --max_audio_seconds"),
        (["chat", "m", "--max-audio-seconds=4"], "unimodal chat: error: --max-audio-seconds is spelled --max_audio_seconds"),
    ],
)
def test_an_old_flag_fails_in_one_line_naming_the_new_one(argv, message, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err == message + "\n"


def test_every_old_flag_names_an_option_of_some_verb(capsys):
    helps = [_help(words, capsys) for words, _ in VERB_FUNCTIONS]
    assert [new for new in set(RENAMED.values()) if not any(f"{new} " in text for text in helps)] == []


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["data", "pack", "x.jsonl", "--out", "o", "--shards", "3"], "--shards"),
        (["data", "pack", "x.jsonl", "--out", "o", "--max_docs_per_shard", "many"], "--max_docs_per_shard"),
        (["eval", "m", "--suite", "digits", "--temperature", "hot"], "--temperature"),
        (["chat", "m", "--max_new_tok", "3"], "--max_new_tok"),  # the start of an option is not that option
        (["train", "recipes/text/tiny.yaml", "--trainer.max_step=3"], "did you mean --trainer.max_steps"),
        (["train", "recipes/text/tiny.yaml", "--max_steps=3"], "(did you mean --trainer.max_steps?)"),  # the group left out
        (["train", "recipes/text/tiny.yaml", "--trainer.max_steps=ten"], "--trainer.max_steps: Expected a <class 'int'>"),
        (["train", "recipes/text/tiny.yaml", "--model.init_args.lora.r=x"], "--model.init_args.lora.r: Expected a <class 'int'>"),
        (["train", "recipes/text/tiny.yaml", "--trainer.precision=bf16-mixd"], "'bf16-mixd' is not a precision (did you mean 'bf16-mixed'?)"),
        (["serve", "runs/no-such-model", "--api_key", ""], "--api_key is empty"),  # before the model loads
        (["export", "runs/x"], "required: --out"),  # as typed, not the parser's key export.out
        (["data", "pack"], "required: SRC, --out"),
        (["eval", "m", "--suite", "digit"], "--suite: 'digit' is not one of: digits"),
        (["eval", "runs/no-such-model", "--suite", "digits"], "runs/no-such-model does not exist"),
        (["chat", "runs/no-such-model", "--out", "README.md"], "--out README.md is a file"),  # before the model loads
        (["serve", "runs/no-such-model", "--port", "70000"], "--port 70000 is not a port number"),  # before the model loads
        (["serve", "runs/no-such-model", "--top_p", "2"], "top_p"),
        (["eval", "runs/no-such-model", "--suite", "digits", "--limit", "0"], "limit must be >= 1"),
        (["eval", "runs/no-such-model", "--suite", "digits", "--batch_size", "0"], "batch_size must be >= 1"),
        (["eval", "runs/no-such-model", "--suite", "digits", "--top_p", "2"], "top_p"),
        (["data", "inspect", "builtin:shapes/train", "--n", "-1"], "--n must be 0 or more"),
        (["eval", "README.md", "--suite", "digits"], "README.md is not a unimodal export directory"),  # not the report path
        (["pipeline", "recipes/pipelines/text.yaml", "--tiny", "--root", "README.md"], "root README.md is a file"),
    ],
)
def test_a_bad_option_fails_in_one_line_naming_it(argv, named, capsys, monkeypatch):
    monkeypatch.delenv("UNIMODAL_API_KEY", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"unimodal {argv[0]}") and named in err and "usage:" not in err


def test_an_empty_api_key_in_the_environment_fails_before_the_model_loads(capsys, monkeypatch):
    """A key no client can send would answer every request with 401."""
    monkeypatch.setenv("UNIMODAL_API_KEY", " ")
    assert main(["serve", "runs/no-such-model"]) == 2
    assert capsys.readouterr().err == "unimodal serve: error: $UNIMODAL_API_KEY is set but empty; give it a key, or unset it to serve without one\n"


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("[{path: builtin:text", "'[{path: builtin:text' is not a valid YAML list or mapping (expected ',' or '}'"),
        ("{path: x", "'{path: x' is not a valid YAML list or mapping"),
        ("data/generated", "takes a list, and 'data/generated' is one value (read as a YAML file holding the list, which it is not); "
                           "quote a YAML list, e.g. '[data/generated]'"),
    ],
)
def test_a_malformed_list_in_a_recipe_class_says_which_key_and_why(value, says, capsys):
    recipe = str(Path(__file__).parents[1] / "recipes/text/tiny.yaml")
    assert main(["train", recipe, f"--data.init_args.datasets={value}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"unimodal train: error: --data.init_args.datasets: {says}"), err
    assert main(["train", recipe, "--data.init_args.batch_size=many"]) == 2
    assert capsys.readouterr().err == "unimodal train: error: --data.init_args.batch_size: Expected a <class 'int'>. Got value: many\n"


def test_a_strategy_that_fails_to_build_says_why(tmp_path, capsys):
    config = tmp_path / "zero.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"strategy": {"class_path": "unimodal.training.DeepSpeed",
                                                               "init_args": {"config": "nowhere/zero3.json"}}}}))
    recipe = str(Path(__file__).parents[1] / "recipes/text/tiny.yaml")
    assert main(["train", recipe, "--config", str(config), "--trainer.max_steps=1", "--trainer.accelerator=cpu"]) == 2
    assert "the path does not exist: nowhere/zero3.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("--data.init_args.feature_dim=7", "features are 48 wide (model.init_args.continuous.image.init_args.feature_dim) but the data's are 7"),
        # it would train, and fail only when it drew
        ("--model.init_args.continuous.image.init_args.slots_per_item=8", "image items are 8 slots (continuous.image.init_args.slots_per_item) but its image codec writes 16"),
    ],
)
def test_data_items_unlike_the_models_stop_before_any_sample_is_read(tmp_path, capsys, override, needle):
    recipe = str(Path(__file__).parents[1] / "recipes/orthus/base.yaml")
    assert main(["train", recipe, "--tiny", override, f"--trainer.default_root_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after Lightning's start-up lines
    assert err.startswith("unimodal train: error: ") and needle in err


def test_an_error_during_packing_gets_a_line_of_its_own_after_the_progress_bar(tmp_path, capsys):
    src = tmp_path / "dup.jsonl"
    src.write_text("".join(json.dumps({"key": "a", "parts": [{"type": "text", "text": t}]}) + "\n" for t in "xy"))
    assert main(["data", "pack", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "packing dup.jsonl" in err  # the bar was drawn, and closed before the error line
    assert err.replace("\r", "\n").splitlines()[-1].startswith("unimodal data pack: error: sample 'a'")
    assert not (tmp_path / "out").exists()  # the shard written before the error went with it


def test_train_help_shows_the_recipe_argument(capsys):
    out = _help(("train",), capsys)
    assert "recipe" in out.split("positional arguments:")[1] and "unimodaltrainRECIPE.yaml--help" in "".join(out.split())
    recipe_help = _help(("train", "recipes/text/tiny.yaml"), capsys)  # LightningCLI's options, named as this command
    assert recipe_help.startswith("usage: unimodal train RECIPE [--tiny]") and "tiny: section" in recipe_help


def test_two_commands_writing_one_shard_directory_at_once_are_refused(tmp_path: Path, capsys):
    """Two packs (or encodes) into one --out both found it empty and wrote the same shard names:
    a set that mixed both, with the stats.json of whichever ended last."""
    from unimodal.locks import run_lock

    src = tmp_path / "src.jsonl"
    src.write_text(json.dumps({"parts": [{"type": "text", "text": "one"}]}) + "\n")
    out = tmp_path / "shards"
    with run_lock(out.absolute(), "write to another --out"):  # the other command, still writing
        for command in (["data", "pack", str(src)], ["data", "encode", str(out)]):
            assert main([*command, "--out", str(out)]) == 2
            assert capsys.readouterr().err.endswith(
                f"{out} is in use by another run (pid {os.getpid()} on {os.uname().nodename}); wait for it to end, or write to another --out\n")
    assert not out.exists()
    assert main(["data", "pack", str(src), "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards", "src.jsonl"]  # no lock file left beside it


def test_a_lock_taken_on_a_lock_file_its_holder_just_removed_is_taken_again(tmp_path: Path, monkeypatch):
    """A holder removes its lock file on the way out: a command that opened the file just before
    that holds a lock on a file nobody else can find, and must lock the one now at the path."""
    from unimodal import locks

    opened = []

    def racing_open(path, mode):  # the first open finds the old holder's file, which is then removed
        handle = open(path, mode)
        if not opened:
            Path(path).unlink()
        opened.append(path)
        return handle

    monkeypatch.setattr(locks, "open", racing_open, raising=False)
    out = tmp_path / "shards"
    with locks.run_lock(out, "write to another --out"):
        assert len(opened) == 2 and (tmp_path / ".shards.lock").read_text().startswith(f"pid {os.getpid()} ")
        monkeypatch.undo()
        with pytest.raises(UserError, match="is in use by another run"):  # and it is the lock others see
            with locks.run_lock(out, "write to another --out"):
                pass
    assert not (tmp_path / ".shards.lock").exists()


def test_a_built_in_world_is_built_once_by_processes_starting_together(tmp_path: Path, monkeypatch):
    """Ranks and dataloader workers resolve ``builtin:`` names at the same moment: one builds, the
    others wait for it and find it built, and no lock file is left in the data home."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from unimodal.worlds import builtin

    builds = []
    building = threading.Event()

    def build(root: Path) -> None:
        builds.append(root)
        building.set()
        time.sleep(0.3)
        (root / "words.txt").write_text("one")

    monkeypatch.setenv("UNIMODAL_DATA_HOME", str(tmp_path))
    monkeypatch.setitem(builtin.BUILDERS, "slow", build)
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(builtin.resolve, "builtin:slow/words.txt")
        building.wait(5)
        rest = [pool.submit(builtin.resolve, "builtin:slow/words.txt") for _ in range(2)]
        paths = [future.result() for future in (first, *rest)]
    assert len(builds) == 1 and {Path(p).read_text() for p in paths} == {"one"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slow"]


def test_data_pack_with_the_new_flags(tmp_path: Path, capsys):
    src = tmp_path / "src.jsonl"
    good = [json.dumps({"parts": [{"type": "text", "text": word}]}) for word in ("one", "two", "three")]
    src.write_text("\n".join([good[0], '{"parts": [', *good[1:]]) + "\n")
    out = tmp_path / "shards"
    assert main(["data", "pack", str(src), "--out", str(out), "--max_docs_per_shard", "1", "--max_mb_per_shard", "1", "--skip_bad"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["documents"] == 3 and len(stats["shards"]) == 3 and stats["source"]["skipped"] == 1
    assert f"wrote 3 documents in 3 shards to {out}, 1 of 4 lines skipped" in capsys.readouterr().out
    assert main(["data", "pack", str(src), "--out", str(tmp_path / "split"), "--skip_bad", "--val_fraction", "0.5"]) == 0
    assert "wrote train: " in capsys.readouterr().out
    (tmp_path / "one.jsonl").write_text(good[0] + "\n")
    assert main(["data", "pack", str(tmp_path / "one.jsonl"), "--out", str(tmp_path / "one")]) == 0
    assert f"wrote 1 document in 1 shard to {tmp_path / 'one'}" in capsys.readouterr().out
    assert main(["data", "inspect", str(out), "--n", "1"]) == 0
    assert "documents: 3" in capsys.readouterr().out
    assert main(["data", "pack", str(src), "--out", str(tmp_path / "strict"), "--skip_bad", "false"]) == 2
    assert "src.jsonl:2: malformed JSON" in capsys.readouterr().err
    # packing into a directory that already holds shards: one line, not a traceback
    assert main(["data", "pack", str(src), "--out", str(out), "--skip_bad"]) == 2
    assert capsys.readouterr().err.endswith("already holds shards (shard-000000.tar, ...); write to an empty directory\n")
    # a misspelt source: one line, and no output folder left behind
    assert main(["data", "pack", str(tmp_path / "scr.jsonl"), "--out", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.endswith(f"source {tmp_path / 'scr.jsonl'} does not exist (a JSONL of documents or chats)\n")
    assert not (tmp_path / "nothing").exists() and not (tmp_path / ".nothing.lock").exists()


def test_data_tokenizer_reads_chats_and_keeps_an_existing_tokenizer(tmp_path: Path, capsys):
    src = tmp_path / "chats.jsonl"
    words = " ".join(f"word{i}" for i in range(200))
    src.write_text(json.dumps({"messages": [{"role": "user", "content": words}, {"role": "assistant", "content": [{"type": "text", "text": words}]}]}) + "\n")
    out = tmp_path / "tok.model"
    assert main(["data", "tokenizer", str(src), "--out", str(out), "--vocab_size", "300"]) == 0
    first = out.read_bytes()
    assert main(["data", "tokenizer", str(src), "--out", str(out), "--vocab_size", "280"]) == 2
    assert "exists: a run trained with it needs it as it is" in capsys.readouterr().err and out.read_bytes() == first
    assert main(["data", "tokenizer", str(src), "--out", str(out), "--vocab_size", "280", "--overwrite"]) == 0
    assert out.read_bytes() != first
    (tmp_path / "dir.model").mkdir()
    assert main(["data", "tokenizer", str(src), "--out", str(tmp_path / "dir.model"), "--vocab_size", "280", "--overwrite"]) == 2
    assert "dir.model is a directory; give a file name ending in .model" in capsys.readouterr().err
    assert not (tmp_path / "dir.vocab").exists()


def test_data_tokenizer_gives_text_back_as_it_was(tmp_path: Path):
    """SentencePiece's defaults made every newline, tab and run of spaces one space (a model could
    never write a second line), and skipped a text over 4192 bytes, most documents, unsaid."""
    from unimodal.data.tokenizer import load_tokenizer

    code = "".join(f"def f{i}(x):\n    return  x\t+ {i}\n\n" for i in range(300))  # one document of 8 kB
    (tmp_path / "code.jsonl").write_text(json.dumps({"parts": [{"type": "text", "text": code}]}) + "\n")
    assert main(["data", "tokenizer", str(tmp_path / "code.jsonl"), "--out", str(tmp_path / "tok.model"), "--vocab_size", "300"]) == 0
    tokenizer = load_tokenizer(tmp_path / "tok.model")
    assert tokenizer.decode(tokenizer.encode(code[:200])) == code[:200]
    assert any("return" in piece for piece in tokenizer.pieces())  # learnt from the long document


def test_data_tokenizer_shows_its_merges_as_they_happen(tmp_path: Path, capsys):
    """SentencePiece said nothing while it trained (minutes on a large corpus): a bar now counts
    its BPE merges toward --vocab_size, less the 260 special and byte pieces and the alphabet."""
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7))) for _ in range(2000)]
    with (tmp_path / "src.jsonl").open("w") as f:
        for _ in range(400):
            f.write(json.dumps({"parts": [{"type": "text", "text": " ".join(rng.choice(words) for _ in range(40))}]}) + "\n")
    assert main(["data", "tokenizer", str(tmp_path / "src.jsonl"), "--out", str(tmp_path / "tok.model"), "--vocab_size", "700"]) == 0
    shown = capsys.readouterr().err.replace("\r", "\n")
    counts = [int(done) for done in re.findall(r"training: .*\| *(\d+)/429 \[", shown)]  # 700 - 260 - 11 letters (space too)
    assert counts and max(counts) >= 100, shown[-2000:]


def test_data_tokenizer_stops_at_ctrl_c_and_keeps_the_tokenizer_there(tmp_path: Path, monkeypatch, capsys):
    """SentencePiece's training keeps Python from handling Ctrl-C until it returns (minutes on a
    large corpus), and then it has written its files: --overwrite replaced the old tokenizer though
    the run said it was interrupted. Here a stand-in training that ignores Ctrl-C and would take
    half a minute: the command stops within seconds, and the old tokenizer stays."""
    import signal
    import time

    from unimodal.data import sentencepiece_trainer

    (tmp_path / "src.jsonl").write_text(json.dumps({"parts": [{"type": "text", "text": "a few words " * 50}]}) + "\n")
    out = tmp_path / "tok.model"
    assert main(["data", "tokenizer", str(tmp_path / "src.jsonl"), "--out", str(out), "--vocab_size", "270"]) == 0
    before, train = out.read_bytes(), sentencepiece_trainer._train

    parent = os.getpid()

    def deaf_to_ctrl_c(spm, texts, prefix, vocab_size, **options):
        train(spm, texts, prefix, vocab_size, **options)  # its files written, as SentencePiece writes them at the end
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            os.kill(parent, signal.SIGINT)  # Ctrl-C while it is deaf (a timer could fire before, on a busy machine)
            time.sleep(30)
        finally:
            signal.signal(signal.SIGINT, previous)

    monkeypatch.setattr(sentencepiece_trainer, "_train", deaf_to_ctrl_c)
    # Ctrl-C raises here however the tests were started: a shell's background job inherits SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    try:
        code = main(["data", "tokenizer", str(tmp_path / "src.jsonl"), "--out", str(out), "--vocab_size", "280", "--overwrite"])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 130 and time.monotonic() - started < 20
    assert "interrupted" in capsys.readouterr().err
    assert out.read_bytes() == before and sorted(f.name for f in tmp_path.iterdir()) == ["src.jsonl", "tok.model", "tok.vocab"]


def test_data_tokenizer_never_holds_a_line_past_the_limit(tmp_path: Path, monkeypatch, capsys):
    """A file without a newline in gigabytes was read as one line, whole into memory."""
    from unimodal.data import sentencepiece_trainer

    monkeypatch.setattr(sentencepiece_trainer, "MAX_LINE_BYTES", 2**20)
    (tmp_path / "src.jsonl").write_text(json.dumps({"parts": [{"type": "text", "text": "word " * 2**18}]}) + "\n")
    assert main(["data", "tokenizer", str(tmp_path / "src.jsonl"), "--out", str(tmp_path / "tok.model")]) == 2
    assert capsys.readouterr().err.endswith("src.jsonl:1: the line is longer than 1 MiB; give a long text as several documents\n")


@pytest.mark.parametrize(("make", "args", "message"), [
    (lambda d: d, [], "is a directory; give a JSONL file of documents or chats"),
    (lambda d: d / "bad.jsonl", [], "bad.jsonl:2: malformed JSON (Expecting value at column 13)"),
    (lambda d: d / "text.jsonl", [], "text.jsonl:2: a line needs 'messages' (a chat) or 'parts' (a document); it has ['text']"),
    (lambda d: d / "good.jsonl", ["--vocab_size", "0"], "--vocab_size 0 is too small: the 256 byte pieces and 4 special tokens need 260"),
    (lambda d: d / "good.jsonl", ["--vocab_size", "100000"], "good.jsonl: Vocabulary size too high (100000). Please set it to a value <= "),
])
def test_data_tokenizer_mistakes_are_one_line(tmp_path: Path, capsys, make, args, message):
    (tmp_path / "good.jsonl").write_text(json.dumps({"parts": [{"type": "text", "text": "a few words"}]}) + "\n")
    (tmp_path / "bad.jsonl").write_text((tmp_path / "good.jsonl").read_text() + '{"parts": [\n')
    (tmp_path / "text.jsonl").write_text((tmp_path / "good.jsonl").read_text() + '{"text": "a line pack refuses"}\n')
    assert main(["data", "tokenizer", str(make(tmp_path)), "--out", str(tmp_path / "tok.model"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not (tmp_path / "tok.model").exists()


def test_a_training_run_says_each_line_once(tmp_path):
    """Lightning's own console handler and the root handler both printed its records, so every
    Lightning line came twice; and Lightning advertised a hosted logger at every fit."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "unimodal", "train", str(root / "recipes/text/tiny.yaml"), "--tiny", "--trainer.max_steps=2",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path}"],
        capture_output=True, text=True, cwd=root, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    texts = [line.split(": ", 1)[-1] for line in lines]  # the message, whichever handler printed it
    assert "GPU available: False, used: False" in texts
    assert len(texts) == len(set(texts)), "\n".join(lines)
    assert not any("litlogger" in line for line in lines)


@pytest.mark.parametrize("joined", [True, False], ids=["key=value", "key value"])
def test_built_in_names_inside_a_list_on_the_command_line_are_resolved(joined, data_home, capsys):
    key, value = "--data.init_args.datasets", "[{path: builtin:shapes/train, weight: 2}]"
    words = [f"{key}={value}"] if joined else [key, value]
    with pytest.raises(SystemExit) as done:
        main(["train", str(Path(__file__).parents[1] / "recipes/orthus/base.yaml"), "--tiny", *words, "--print_config"])
    assert done.value.code == 0
    (dataset,) = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]["datasets"]
    assert Path(dataset["path"]).is_dir() and Path(dataset["path"]).is_relative_to(data_home) and dataset["weight"] == 2


def test_other_ranks_log_only_their_errors(monkeypatch):
    """Under DDP every rank ran the same code: each of the project's lines came once per rank."""
    import logging

    from unimodal.cli import _rank_zero_unless_error

    def kept(level: int) -> bool:
        return _rank_zero_unless_error(logging.LogRecord("unimodal.train", level, __file__, 1, "said", None, None))

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("RANK", "0")
    assert kept(logging.INFO) and kept(logging.WARNING)
    monkeypatch.setenv("RANK", "1")
    assert not kept(logging.INFO) and not kept(logging.WARNING) and kept(logging.ERROR)


def test_an_error_line_of_another_rank_says_which(monkeypatch, capsys):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for rank, prefix in (("0", "unimodal export"), ("3", "[rank 3] unimodal export")):
        monkeypatch.setenv("RANK", rank)
        assert main(["export", "runs/x"]) == 2
        assert capsys.readouterr().err.startswith(f"{prefix}: error:")


def test_the_rank_is_read_from_each_launcher(monkeypatch):
    """torchrun's RANK, SLURM's SLURM_PROCID in a job of several tasks, Lightning's LOCAL_RANK on
    node NODE_RANK: the log filter and the run lock read the same rank."""
    from unimodal.launch import launched_rank

    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert launched_rank() == 0
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert launched_rank() == 0  # one task: srun of a single process, Lightning's ranks count
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert launched_rank() == 2
    monkeypatch.delenv("SLURM_PROCID")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert launched_rank() == 3
    monkeypatch.setenv("RANK", "5")
    assert launched_rank() == 5


def test_deepspeeds_no_gpu_notice_is_dropped_and_its_other_warnings_kept(caplog):
    """transformers' save_pretrained imports DeepSpeed on every export, which warned each time that
    it found no GPU; the command line drops that notice and nothing else of DeepSpeed's."""
    import logging

    from unimodal.cli import _one_log_line_each

    _one_log_line_each()
    deepspeed = logging.getLogger("DeepSpeed")
    deepspeed.addHandler(caplog.handler)
    try:
        deepspeed.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        deepspeed.warning("something else")
    finally:
        deepspeed.removeHandler(caplog.handler)
    assert {r.getMessage() for r in caplog.records if r.name == "DeepSpeed"} == {"something else"}


def test_convert_zero_to_fp32_never_writes_over_a_file(tmp_path: Path, capsys):
    precious = tmp_path / "mine.ckpt"
    precious.write_bytes(b"weights")
    assert main(["convert", "zero-to-fp32", str(tmp_path / "any"), str(precious), "--trust_checkpoint"]) == 2
    assert f"{precious} exists; give a new file for the converted checkpoint" in capsys.readouterr().err
    assert precious.read_bytes() == b"weights"


def test_an_export_given_to_export_is_named_as_one(tmp_path, capsys):
    (tmp_path / "unimodal.json").write_text("{}")
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "again")]) == 2
    assert capsys.readouterr().err == (f"unimodal export: error: {tmp_path} is already an export (unimodal.json); "
                                       "export takes the run directory or checkpoint it came from\n")


@pytest.mark.parametrize("saved", [[1, 2], {"state_dict": 3}], ids=["a list", "no state dict"])
def test_a_torch_file_that_is_not_a_training_checkpoint_is_one_line(tmp_path, capsys, saved):
    import torch

    torch.save(saved, tmp_path / "w.ckpt")
    assert main(["export", str(tmp_path / "w.ckpt"), "--out", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err == (f"unimodal export: error: {tmp_path / 'w.ckpt'} is not a training checkpoint: "
                                       "export reads checkpoints written by `unimodal train`\n")
    assert not (tmp_path / "e").exists()


def test_a_data_verb_stopped_by_sigterm_leaves_no_half_written_shards(tmp_path):
    """SIGTERM (`kill`, `timeout`, a job scheduler) ended `data pack` mid-shard: its shards, without
    stats.json, were left for a run to read as the whole set."""
    import signal
    import subprocess
    import sys

    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"parts": [{"type": "text", "text": f"line {i}"}]}) + "\n" for i in range(20)))
    killed_at_line_10 = f"""
import os, signal, sys
import unimodal.data.jsonl as jsonl
from unimodal.cli import main
real = jsonl._source_document
def source_document(raw, src, line):
    if line == 10:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(raw, src, line)
jsonl._source_document = source_document
code = main(["data", "pack", {str(src)!r}, "--out", {str(tmp_path / "out")!r}, "--max_docs_per_shard", "3"])
assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the verb's handler is gone with it
sys.exit(code)
"""
    done = subprocess.run([sys.executable, "-c", killed_at_line_10], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == "unimodal data pack: interrupted (SIGTERM)"
    assert not (tmp_path / "out").exists()


def test_ctrl_c_in_a_data_verb_is_one_line(tmp_path, monkeypatch, capsys):
    import unimodal.data.jsonl as jsonl

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    (tmp_path / "src.jsonl").write_text(json.dumps({"parts": [{"type": "text", "text": "x"}]}) + "\n")
    monkeypatch.setattr(jsonl, "_source_document", interrupted)
    assert main(["data", "pack", str(tmp_path / "src.jsonl"), "--out", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "unimodal data pack: interrupted (Ctrl-C)" and not (tmp_path / "out").exists()


def test_a_path_of_bytes_that_are_not_utf8_is_named_as_such(tmp_path, capsys):
    """A name from another system (Latin-1 bytes) reached the user as a codec's complaint about surrogates."""
    src = f"{tmp_path}/caf\udce9.jsonl"  # how Python gives the byte 0xe9 of a command-line argument
    assert main(["data", "tokenizer", src, "--out", str(tmp_path / "tok.model")]) == 2
    assert capsys.readouterr().err == ("unimodal data tokenizer: error: --src: the path holds bytes that are not UTF-8, "
                                       "which a path option cannot take; rename it, or give a UTF-8 link to it\n")


def test_output_into_a_closed_pipe_is_no_traceback(tmp_path):
    """`unimodal data inspect DIR | head` ended in a BrokenPipeError traceback once head had its lines."""
    import subprocess
    import sys

    from unimodal.data.shards import write_documents
    from unimodal.schema import Document, Part

    write_documents([Document([Part("text", text="x" * 50)], key=f"k{i}") for i in range(200)], tmp_path / "set")
    reader = subprocess.Popen([sys.executable, "-m", "unimodal", "data", "inspect", str(tmp_path / "set"), "--n", "200"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    reader.stdout.close()  # the reader is gone before the first line
    err = reader.stderr.read()
    assert reader.wait(timeout=120) == 1 and err == "", err


def test_text_corpus_keeps_a_train_jsonl_that_is_there(tmp_path, capsys):
    """`data text-corpus --out DIR` wrote over the user's own DIR/train.jsonl without a word."""
    mine = json.dumps({"parts": [{"type": "text", "text": "my own data"}]}) + "\n"
    (tmp_path / "train.jsonl").write_text(mine)
    assert main(["data", "text-corpus", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"unimodal data text-corpus: error: {tmp_path / 'train.jsonl'} exists; write the corpus "
                                       "to another directory, or move it away first\n")
    assert (tmp_path / "train.jsonl").read_text() == mine and not (tmp_path / "val.jsonl").exists()


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--max_request_mb", ".inf", "--max_request_mb must be a positive number of MB, got inf"),
    ("--max_request_mb", ".nan", "--max_request_mb must be a positive number of MB, got nan"),
    ("--max_seconds", ".inf", "--max_seconds must be positive and finite, got inf"),
])
def test_a_server_limit_that_is_not_a_finite_number_is_one_line(option, value, message, capsys):
    """YAML's .inf and .nan parse as floats: int(inf * 2**20) was an OverflowError traceback.
    Checked before the model loads."""
    assert main(["serve", "no-such-model", option, value]) == 2
    assert capsys.readouterr().err == f"unimodal serve: error: {message}\n"
