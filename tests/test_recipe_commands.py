"""Every recipe header's command runs as written.

A user copied `unimodal train recipes/digits/chat_sft.yaml` with the overrides its header gives
and it failed, while the tests ran something else (the `tiny:` section, or other paths). Here each
`# Command:` and `# CPU smoke run:` line runs verbatim through `unimodal.cli.main` (the console
script's entry point) in an empty working directory that sees the repository's recipes/, against
exports and shards built in code at exactly the paths the command names. A command sized for
several GPUs only parses and resolves its config (`--print_config`); pipelines, which train for
minutes on a CPU, run in the slow suite. Every local path a command reads is named in its
recipe's header or written by an earlier stage.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from unimodal.checkpoints.export import write_export
from unimodal.checkpoints.files import read_checkpoint
from unimodal.cli import main as unimodal_main
from unimodal.schema import BUILTIN_PREFIX
from unimodal.training.pipeline import Pipeline, load_pipeline, resolve_stage
from unimodal.training.recipes import load_recipe, make_cli, set_dotted
from unimodal.worlds import resolve

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(path.relative_to(ROOT) for path in (ROOT / "recipes").rglob("*.yaml"))
HEADER_LINE = re.compile(r"# (Command|CPU smoke run): unimodal (.+)")
# a train command that would run longer gets --trainer.max_steps=2 appended: it bounds the run
# time and changes no path or setting the header gives
MAX_STEPS = 50
BOUND = "--trainer.max_steps=2"
# DeepSpeed logs its accelerator to stdout when first imported, which may be inside --print_config
DEEPSPEED_LOG = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,]+\] \[")

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class HeaderCommand:
    recipe: Path  # the file whose header gives the command, relative to the repository
    kind: str  # "Command" or "CPU smoke run"
    argv: tuple[str, ...]  # what follows `unimodal`

    def __str__(self) -> str:
        return shlex.join(self.argv)


def header(recipe: Path) -> list[str]:
    """The comment lines a recipe starts with."""
    return list(itertools.takewhile(lambda line: line.startswith("#"), (ROOT / recipe).read_text().splitlines()))


def header_commands(recipe: Path) -> list[HeaderCommand]:
    """The one parser of header commands: every `# Command:` and `# CPU smoke run:` line."""
    return [HeaderCommand(recipe, m[1], tuple(shlex.split(m[2]))) for line in header(recipe) if (m := HEADER_LINE.fullmatch(line))]


def train_config(argv: Sequence[str]) -> dict[str, Any]:
    """What `unimodal train RECIPE ...` trains with, builtin: names unresolved: the recipe, its
    tiny: section with --tiny, then the command's --dotted.key=value overrides."""
    config = load_recipe(ROOT / argv[1], tiny="--tiny" in argv)
    for arg in argv[2:]:
        key, eq, value = arg.removeprefix("--").partition("=")
        assert eq or arg == "--tiny", f"{arg}: header overrides are written --key=value"
        if eq:
            set_dotted(config, key, yaml.safe_load(value))
    return config


def pipeline_args(argv: Sequence[str]) -> tuple[Path, bool, str | None]:
    """`unimodal pipeline PATH [--tiny] [--root ROOT]` as (path, tiny, root)."""
    root = argv[argv.index("--root") + 1] if "--root" in argv else None
    return Path(argv[1]), "--tiny" in argv, root


def stage_configs(pipeline: Pipeline, tiny: bool) -> list[dict[str, Any]]:
    """Each stage's recipe with the pipeline's tiny: and overrides applied (paths unresolved)."""
    configs = []
    for stage in pipeline.stages:
        config = load_recipe(ROOT / stage.recipe, tiny)
        for key, value in stage.overrides.items():
            set_dotted(config, key, value)
        configs.append(config)
    return configs


def sized_for_gpus(config: dict[str, Any]) -> bool:
    return config["trainer"].get("devices", 1) not in (1, "auto")


def runs_on_a_cpu(command: HeaderCommand) -> bool:
    if command.argv[0] == "train":
        configs = [train_config(command.argv)]
    else:
        path, tiny, root = pipeline_args(command.argv)
        configs = stage_configs(load_pipeline(ROOT / path, tiny, root), tiny)
    return not any(sized_for_gpus(config) for config in configs)


def producers() -> dict[PurePosixPath, tuple[Path, dict[str, Any]]]:
    """Run directory -> (recipe, config) of the stage that writes it: each train recipe's
    default_root_dir, and ROOT/STAGE of each pipeline run at its own root (with --tiny where it
    runs only so)."""
    found = {}
    for recipe in RECIPES:
        if recipe.parts[1] == "pipelines":
            tiny = bool(yaml.safe_load((ROOT / recipe).read_text()).get("tiny_only"))
            pipeline = load_pipeline(ROOT / recipe, tiny)
            for stage, config in zip(pipeline.stages, stage_configs(pipeline, tiny)):
                found[PurePosixPath(pipeline.root, stage.name)] = (stage.recipe, config)
        else:
            config = load_recipe(ROOT / recipe, tiny=False)
            found[PurePosixPath(config["trainer"]["default_root_dir"])] = (recipe, config)
    return found


COMMANDS = [command for recipe in RECIPES for command in header_commands(recipe)]
PRODUCERS = producers()


def producer(path: str | None) -> PurePosixPath | None:
    """The run directory ``path`` lies in, if a stage writes it."""
    return next((run for run in PRODUCERS if path and PurePosixPath(path).is_relative_to(run)), None)


def local_paths(value: Any) -> set[str]:
    """The local files and directories a config reads: strings with a '/' that are not builtin:
    names (class paths have none); the run directory it writes is not read."""
    if isinstance(value, dict):
        return set().union(*(local_paths(v) for k, v in value.items() if k != "default_root_dir"))
    if isinstance(value, list):
        return set().union(*(local_paths(v) for v in value))
    return {value} if isinstance(value, str) and "/" in value and not value.startswith(BUILTIN_PREFIX) else set()


def expand_braces(word: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", word)
    if match is None:
        return [word]
    return [w for alt in match[1].split(",") for w in expand_braces(word[: match.start()] + alt + word[match.end() :])]


def header_paths(recipe: Path) -> set[PurePosixPath]:
    """The paths a recipe's header names, brace patterns (data/x/{train,val}) expanded."""
    words = re.findall(r"[\w.{},/-]*/[\w.{},/-]*", "\n".join(header(recipe)))
    return {PurePosixPath(w.rstrip("/.,")) for word in words for w in expand_braces(word)}


def documented(recipe: Path, config: dict[str, Any]) -> set[PurePosixPath]:
    """The paths a recipe's header names, and those of the stage whose output it starts from:
    that stage's inputs are in place when this one runs."""
    source = producer(config["model"]["init_args"].get("init_from"))
    return header_paths(recipe) | (documented(*PRODUCERS[source]) if source else set())


def inside(path: str, directories: set[PurePosixPath]) -> bool:
    return any(PurePosixPath(path).is_relative_to(d) for d in directories)


def undocumented_inputs(recipe: Path, config: dict[str, Any]) -> list[str]:
    names = documented(recipe, config)
    return sorted(p for p in local_paths(config) if producer(p) is None and not inside(p, names))


def printed_config(argv: Sequence[str], capsys: pytest.CaptureFixture) -> dict[str, Any]:
    """What `unimodal ARGV --print_config` prints: the command parsed, its config resolved, nothing run."""
    capsys.readouterr()
    try:
        code = unimodal_main([*argv, "--print_config"])
    except SystemExit as done:
        code = done.code
    out, err = capsys.readouterr()
    assert code == 0, err
    return yaml.safe_load("\n".join(line for line in out.splitlines() if not DEEPSPEED_LOG.match(line)))


def dotted(config: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        config = config[part]
    return config


def random_export(run: PurePosixPath) -> None:
    """``run``/export as its stage writes it (architecture, tokenizer, processor, codecs), with
    the random weights the stage starts from: no training needed to fine-tune from it."""
    recipe = Path(run, "recipe.yaml")
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(yaml.safe_dump(PRODUCERS[run][1], sort_keys=False))
    cli = make_cli([str(recipe)], resolve_path=resolve)
    cli.model.configure_model()
    hparams = dict(cli.model.hparams)
    write_export(cli.model.model, Path(run, "export"), spec=hparams, data=cli.config.data.init_args.as_dict(),
                 merge_lora=False, generation=hparams.get("generation"))


def chat_shards(out: Path) -> None:
    """data/chat as recipes/lora/chat_sft.yaml's header makes it, from a chats JSONL:
    `unimodal data pack chats.jsonl --out data/chat --val_fraction 0.05`."""
    with open("chats.jsonl", "w") as f:
        for i in range(100):
            messages = [{"role": "user", "content": f"What is {i} plus {i % 7}?"}, {"role": "assistant", "content": str(i + i % 7)}]
            f.write(json.dumps({"messages": messages}) + "\n")
    assert unimodal_main(["data", "pack", "chats.jsonl", "--out", str(out), "--val_fraction", "0.05"]) == 0


# inputs no stage writes: the directory a header documents -> how it is made
DATA: dict[str, Callable[[Path], None]] = {"data/chat": chat_shards}


def build_inputs(config: dict[str, Any]) -> None:
    """Every local path the config reads, built where it names it."""
    for path in sorted(local_paths(config)):
        run = producer(path)
        data = next((d for d in DATA if PurePosixPath(path).is_relative_to(d)), None)
        if run is not None and not Path(run, "export").exists():
            random_export(run)
        elif run is None and data is not None and not Path(data).exists():
            DATA[data](Path(data))
        assert Path(path).exists(), f"{path}: no stage writes it and DATA does not build it"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory that sees the repository's recipes/, as a user's checkout does."""
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("recipe", RECIPES, ids=str)
def test_every_recipe_starts_with_its_own_command(recipe: Path):
    commands = header_commands(recipe)
    assert commands and HEADER_LINE.fullmatch(header(recipe)[0]) and commands[0].kind == "Command", (
        f"{recipe} does not start with '# Command: unimodal ...'")
    verb = "pipeline" if recipe.parts[1] == "pipelines" else "train"
    assert all(c.argv[:2] == (verb, str(recipe)) for c in commands), [str(c) for c in commands]


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_the_command_parses_and_reads_only_documented_paths(command: HeaderCommand, workdir: Path, capsys):
    """Cheap, for every command (the only check of those sized for GPUs): LightningCLI resolves
    the config; every input is in the header, written by an earlier stage, or (for a pipeline
    stage) named by the stage's recipe."""
    argv = command.argv
    if argv[0] == "train":
        config = train_config(argv)
        printed = printed_config(argv, capsys)
        for key in ("model.class_path", "data.class_path", "trainer.devices", "trainer.max_steps", "trainer.default_root_dir"):
            assert dotted(printed, key) == dotted(config, key), key
        missing = undocumented_inputs(command.recipe, config)
        assert not missing, f"{command.recipe} reads {missing}, which its header does not name and no stage writes"
        return
    path, tiny, root = pipeline_args(argv)
    assert printed_config(argv, capsys) == {"path": str(path), "tiny": tiny, "root": root}
    pipeline = load_pipeline(path, tiny, root)
    for stage in pipeline.stages:
        config = resolve_stage(pipeline, stage, tiny)
        (workdir / "stage.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        assert dotted(printed_config(["train", "stage.yaml"], capsys), "trainer.default_root_dir") == str(pipeline.stage_dir(stage))
        own = local_paths(train_config(["train", str(stage.recipe), *(["--tiny"] if tiny else [])]))
        extra = [p for p in local_paths(config) if p not in own and not inside(p, header_paths(path))
                 and not Path(p).absolute().is_relative_to(pipeline.root.absolute())]
        assert not extra, f"stage {stage.name} reads {extra}, which its recipe does not name"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.argv[0] == "train" and runs_on_a_cpu(c)], ids=str)
def test_the_train_command_runs_as_written(command: HeaderCommand, workdir: Path):
    argv = list(command.argv)
    if train_config(argv)["trainer"]["max_steps"] > MAX_STEPS:
        argv.append(BOUND)  # run time only: the one argument ever appended
    config = train_config(argv)
    build_inputs(config)
    assert unimodal_main(argv) == 0
    checkpoint = Path(config["trainer"]["default_root_dir"], "checkpoints", "last.ckpt")
    assert read_checkpoint(checkpoint)["global_step"] == config["trainer"]["max_steps"]


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in COMMANDS if c.argv[0] == "pipeline" and runs_on_a_cpu(c)], ids=str)
def test_the_pipeline_command_runs_as_written(command: HeaderCommand, workdir: Path):
    """Minutes each on a CPU: every stage trains as its recipe says and leaves its output."""
    assert unimodal_main(list(command.argv)) == 0
    pipeline = load_pipeline(*pipeline_args(command.argv))
    assert all(pipeline.output_dir(stage).is_dir() for stage in pipeline.stages)
