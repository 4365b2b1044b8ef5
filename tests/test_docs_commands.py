"""Every `unimodal` command the docs show parses as written: its verb, options and values exist,
and a `train` command's recipe and overrides are accepted as `unimodal train` reads them. Nothing
is run (the paths they name are a user's), so a renamed flag or recipe key cannot rot in a page."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from jsonargparse import auto_parser

from unimodal.cli import RENAMED, VERBS, Parser
from unimodal.training.recipes import make_cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
PROGRAMS = ("unimodal", ".venv/bin/unimodal")
# what is shown only to be run, not parsed: LightningCLI prints and exits on these
PRINT_AND_EXIT = {"--help", "-h", "--print_config"}


def shown_commands(page: Path) -> list[str]:
    """The command lines of a page's ```bash blocks, and its `$ `-prompted lines, continuations joined."""
    text = page.read_text()
    lines = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("$ "):
                lines.append(line[2:])
            elif lang in ("bash", "sh"):
                lines.append(line)
    return lines


def unimodal_argv(line: str) -> list[str] | None:
    """The arguments after `unimodal` (or `python -m unimodal`, under torchrun too), or None."""
    if not re.search(r"(^|[\s/])unimodal(\s|$)", line):
        return None  # other lines (a curl body over several lines) need not split as words
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";|&")
    lexer.whitespace_split, lexer.commenters = True, "#"
    words = list(lexer)
    while (end := next((i for i, w in enumerate(words) if w in ("|", ";", "&&")), None)) is not None:
        words = words[:end] if "unimodal" in words[:end] or PROGRAMS[1] in words[:end] else words[end + 1:]
    for i, word in enumerate(words):
        if word in PROGRAMS:
            return words[i + 1:]
        if word == "-m" and i + 1 < len(words) and words[i + 1] == "unimodal":
            return words[i + 2:]
    return None


COMMANDS = [
    pytest.param(argv, id=f"{page.name}:{' '.join(argv)[:60]}")
    for page in PAGES for line in shown_commands(page)
    if (argv := unimodal_argv(line)) is not None
]


def test_the_docs_show_commands_of_every_kind():
    verbs = {argv[0] for argv in (c.values[0] for c in COMMANDS)}
    assert {"train", "data", "pipeline", "export", "chat", "serve", "eval", "convert"} <= verbs
    assert len(COMMANDS) > 60


@pytest.mark.parametrize("argv", COMMANDS)
def test_a_documented_command_parses(argv, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    argv = [word for word in argv if word not in PRINT_AND_EXIT]
    helped = [argv[i + 1] for i, word in enumerate(argv[:-1]) if re.fullmatch(r"--\w+\.help", word)]
    if helped:  # `--model.help CLASS` prints that class's options: the class must exist
        import importlib

        for path in helped:
            module, _, name = path.rpartition(".")
            assert hasattr(importlib.import_module(module), name), path
        return
    renamed = [word.split("=")[0] for word in argv if word.split("=")[0] in RENAMED]
    assert not renamed, f"{renamed[0]} is now {RENAMED[renamed[0]]}"
    if argv[0] == "train":
        make_cli(argv[1:], parse_only=True)  # builtin: names stay names; nothing is built
        return
    auto_parser(VERBS, parser_class=Parser, exit_on_error=False).parse_args(argv)


def test_a_wrong_option_fails_the_check():
    """The check can fail: a misspelt override of a train command and an unknown flag of a verb."""
    with pytest.raises(Exception, match="max_stepz"):
        make_cli(["recipes/text/tiny.yaml", "--trainer.max_stepz=3"], parse_only=True)
    with pytest.raises(Exception, match="max_new_tokenz"):
        auto_parser(VERBS, parser_class=Parser, exit_on_error=False).parse_args(["chat", "DIR", "--max_new_tokenz", "3"])
