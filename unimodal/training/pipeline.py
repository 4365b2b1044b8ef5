"""``unimodal pipeline``: stages of training run in order, each from the previous stage's model.

A pipeline file::

    # Command: unimodal pipeline recipes/pipelines/text.yaml
    root: runs/pipelines/text            # every stage runs in ROOT/STAGE
    stages:
      - name: pretrain
        recipe: recipes/text/tiny.yaml
        overrides: {trainer.max_steps: 200}      # dotted keys, as in a recipe's tiny: section
      - name: chat_sft
        recipe: recipes/lora/chat_sft.yaml
        init: previous                   # default after the first stage; null or a stage name
        export: {merge_lora: true}
    tiny:                                # --tiny: each recipe's own tiny: section, then these
      root: runs/pipelines/text-tiny
      pretrain.trainer.max_steps: 10
    tiny_only: false                     # true: the stages' overrides assume --tiny, which is required

``init: STAGE`` sets ``model.init_args.init_from`` to that stage's output and, when the output
is a unified-model export, ``data.init_args.tokenizer`` to its tokenizer, so model, vocabulary
and data agree. A stage's output is ``ROOT/STAGE/export`` (``unimodal export`` of its last
checkpoint), or the directory named by ``output:`` (relative to ``ROOT/STAGE``) for a stage
that writes its own (e.g. a media tokenizer). Override values may name earlier stages'
outputs: ``"{stages.NAME}"`` and ``"{stages.NAME.tokenizer}"``, as absolute paths, so that an
export naming one (a codec's directory) loads from any working directory.

Re-running skips finished stages (``ROOT/STAGE/stage.json``) and resumes an interrupted one
from its newest checkpoint (``--resume auto``). A stage on one device trains in this process;
a stage on several devices runs as its own ``unimodal train`` process, which Lightning's
launcher re-runs for the other ranks.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import json
import logging
import math
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError

from unimodal.checkpoints.files import checkpoint_step, find_latest_checkpoint
from unimodal.checkpoints.load import CONFIG_FILE, read_export_config, tokenizer_path
from unimodal.training.exporting import export
from unimodal.training.recipes import (
    check_recipe,
    fit_cli,
    inherit_from_export,
    load_recipe,
    make_cli,
    resolve_builtin,
    set_dotted,
)
from unimodal.training.recipe_keys import flat
from unimodal.locks import run_lock
from unimodal.yaml_files import read_yaml
from unimodal.training.resume import Interrupted, Preempted
from unimodal.launch import launched_rank
from unimodal.schema import read_json_object, write_whole

log = logging.getLogger("unimodal.pipeline")

STAGE_FILE = "stage.json"
STAGE_FIX = "remove its stage's directory to run that stage again"
# rank 0 rewrites it while it trains and exports; the waiting ranks give up once it stops changing
HEARTBEAT_FILE = "rank0.heartbeat"
HEARTBEAT_S = 10.0
RANK_ZERO_SILENT_S = 120.0
RESOLVED_RECIPE = "recipe.yaml"
NAME = re.compile(r"^[A-Za-z0-9_-]+$")
REFERENCE = re.compile(r"\{stages\.([A-Za-z0-9_-]+)(\.tokenizer)?\}")


class PipelineError(ValueError):
    pass


@dataclass
class Stage:
    name: str
    recipe: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    init: str | None = None  # the stage whose output initialises this one
    merge_lora: bool = False
    output: str | None = None  # a directory the stage writes itself, instead of an export


@dataclass
class Pipeline:
    path: Path
    root: Path
    stages: list[Stage]

    def stage_dir(self, stage: Stage) -> Path:
        return self.root / stage.name

    def output_dir(self, stage: Stage) -> Path:
        return self.stage_dir(stage) / (stage.output or "export")


@dataclass
class StageResult:
    name: str
    status: str  # done | skipped | interrupted
    steps: int | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    wall_s: float = 0.0
    output: str = ""


def load_pipeline(path: str | Path, tiny: bool = False, root: str | Path | None = None) -> Pipeline:
    """Read and check a pipeline file: stage names, recipes, init and output references."""
    path = Path(path)
    raw = read_yaml(path, "pipeline") or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise PipelineError(f"{path}: expected a mapping with a non-empty 'stages' list")
    unknown = set(raw) - {"root", "stages", "tiny", "tiny_only"}
    if unknown:  # a misspelt root: would send every stage to the default root
        raise PipelineError(f"{path}: unknown keys {sorted(unknown)}; the keys are root, stages, tiny and tiny_only")
    tiny_overrides = raw.get("tiny") or {}
    if not isinstance(tiny_overrides, dict):
        raise PipelineError(f"{path}: tiny: {tiny_overrides!r} should map 'root' and 'STAGE.dotted.key' to values")
    if raw.get("tiny_only") and not tiny:
        raise PipelineError(f"pipeline {path} sets tiny_only: its stages are CPU-sized variants; run it with --tiny")
    stages: list[Stage] = []
    for index, entry in enumerate(raw["stages"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not NAME.fullmatch(entry["name"]):
            given = f" ({entry['name']!r})" if isinstance(entry, dict) and "name" in entry else ""
            raise PipelineError(f"{path}: stage {index}{given} needs a 'name' of letters, digits, '_' or '-'")
        name = entry["name"]
        unknown = set(entry) - {"name", "recipe", "overrides", "init", "export", "output"}
        if unknown:
            raise PipelineError(f"{path}: stage {name!r} has unknown keys {sorted(unknown)}")
        if not isinstance(entry.get("recipe"), str) or not entry["recipe"]:
            raise PipelineError(f"{path}: stage {name!r} needs a 'recipe': a recipe file's path")
        if not isinstance(entry.get("overrides") or {}, dict):
            raise PipelineError(f"{path}: stage {name!r} has overrides: {entry['overrides']!r}; give a mapping of dotted keys to values")
        if not isinstance(entry.get("output", ""), str):
            raise PipelineError(f"{path}: stage {name!r} has output: {entry['output']!r}; give a directory relative to the stage's")
        if any(s.name == name for s in stages):
            raise PipelineError(f"{path}: two stages are named {name!r}")
        init = entry.get("init", "previous" if stages else None)
        if init == "previous":
            init = stages[-1].name if stages else None
        if init is not None and not any(s.name == init for s in stages):
            raise PipelineError(f"{path}: stage {name!r} initialises from {init!r}, which is not an earlier stage")
        exporting = entry.get("export") or {}
        if not isinstance(exporting, dict) or set(exporting) - {"merge_lora"}:
            raise PipelineError(f"{path}: stage {name!r} has export: {exporting!r}; its one key is merge_lora (true or false)")
        if not isinstance(exporting.get("merge_lora", False), bool):
            raise PipelineError(f"{path}: stage {name!r} has export.merge_lora: {exporting['merge_lora']!r}; give true or false")
        stages.append(Stage(
            name=name,
            recipe=_find_recipe(entry["recipe"], path),
            overrides=dict(entry.get("overrides") or {}),
            init=init,
            merge_lora=exporting.get("merge_lora", False),
            output=entry.get("output"),
        ))
    pipeline_root = raw.get("root", f"runs/pipelines/{path.stem}")
    if tiny:
        for dotted, value in tiny_overrides.items():
            if dotted == "root":
                pipeline_root = value
                continue
            stage_name, _, key = dotted.partition(".")
            stage = next((s for s in stages if s.name == stage_name), None)
            if stage is None or not key:
                names = [s.name for s in stages]
                near = difflib.get_close_matches(stage_name, names, n=1)
                hint = f"; did you mean {near[0]!r}?" if near and stage is None else ""
                raise PipelineError(
                    f"{path}: tiny key {dotted!r} is not 'root' or 'STAGE.dotted.key' of a stage (stages: {', '.join(names)}){hint}"
                )
            stage.overrides[key] = value
    missing = [f"{s.name}: {s.recipe}" for s in stages if not s.recipe.is_file()]
    if missing:
        raise FileNotFoundError(f"pipeline {path}: recipes not found: {'; '.join(missing)}")
    for stage in stages:
        earlier = {s.name for s in stages[: stages.index(stage)]}
        for value in _strings(stage.overrides):
            for ref in REFERENCE.findall(value):
                if ref[0] not in earlier:
                    raise PipelineError(f"{path}: stage {stage.name!r} refers to {{stages.{ref[0]}}}, not an earlier stage")
    if root is None and (not isinstance(pipeline_root, str) or not pipeline_root):
        raise PipelineError(f"{path}: root: {pipeline_root!r} should be a directory's path")
    if tiny and "root" not in tiny_overrides:  # --tiny never writes into the full run's directories
        pipeline_root = f"{pipeline_root}-tiny"
    where = Path(root) if root is not None else Path(pipeline_root)
    if where.exists() and not where.is_dir():
        raise PipelineError(f"the pipeline's root {where} is a file; give a directory for its stages (--root)")
    return Pipeline(path, where, stages)


def _find_recipe(recipe: str, pipeline: Path) -> Path:
    """A recipe path as written (from the working directory), else from a folder above the
    pipeline file: ``recipes/text/tiny.yaml`` works from the repository root and from elsewhere."""
    path = Path(recipe)
    if path.is_absolute() or path.is_file():
        return path
    for folder in pipeline.resolve().parents:
        if (folder / path).is_file():
            return folder / path
    return path


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _substitute(value: Any, pipeline: Pipeline) -> Any:
    """Replace ``{stages.NAME}`` / ``{stages.NAME.tokenizer}`` with earlier stages' outputs.
    Before that stage has written its export (the pre-flight check), the export's path stands in
    for its tokenizer, as it does for ``init_from``."""
    def one(match: re.Match) -> str:
        stage = next(s for s in pipeline.stages if s.name == match.group(1))
        out = pipeline.output_dir(stage)
        written = (out / CONFIG_FILE).is_file()
        return str(tokenizer_path(out) if match.group(2) and written else out)

    if isinstance(value, str):
        return REFERENCE.sub(one, value)
    if isinstance(value, dict):
        return {k: _substitute(v, pipeline) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, pipeline) for v in value]
    return value


def resolve_stage(
    pipeline: Pipeline, stage: Stage, tiny: bool, resolve_path: Callable[[str], str] | None = None
) -> dict[str, Any]:
    """The stage's recipe with tiny, init and override values applied, ``builtin:`` names
    resolved by ``resolve_path``: what it trains with."""
    config = load_recipe(stage.recipe, tiny)
    if stage.init is not None:
        source = pipeline.output_dir(next(s for s in pipeline.stages if s.name == stage.init))
        set_dotted(config, "model.init_args.init_from", str(source))
        inherit_from_export(config, source, tokenizer=True, replay=False)  # stages are planned: nothing replayed unless named
    for dotted, value in stage.overrides.items():
        set_dotted(config, dotted, _substitute(value, pipeline))
    set_dotted(config, "trainer.default_root_dir", str(pipeline.stage_dir(stage)))
    return resolve_builtin(config, resolve_path)


def _changes(finished_recipe: Path, config: dict[str, Any], shown: int = 3) -> str:
    """Empty when ``config`` is what a finished stage ran (its ``recipe.yaml``), else what differs:
    ``changed: KEY, ...``. A path written another way that names the same file is no change, so a
    finished stage stays finished when the pipeline is run from another spelling of its root."""
    try:
        finished = yaml.safe_load(finished_recipe.read_text())
    except (OSError, yaml.YAMLError) as err:
        return f"its recipe cannot be read: {err}"
    before, now = flat(finished), flat(config)
    root = Path(str(now.get("trainer.default_root_dir", ""))).parent
    keys = sorted(k for k in before.keys() | now.keys()
                  if k not in before or k not in now or not _same(before[k], now[k], root))
    if not keys:
        return ""
    return "changed: " + ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def _same(before: Any, now: Any, root: Path) -> bool:
    """Equal values; or paths to the same file; or the same file of a pipeline root that was moved
    or copied since (``now`` under ``root``, ``before`` under a folder of the same name)."""
    if before == now:
        return True
    if not (isinstance(before, str) and isinstance(now, str) and "/" in before and "/" in now):
        return False
    old, new = Path(before).resolve(), Path(now).resolve()
    if old == new:
        return True
    if not new.is_relative_to(root.resolve()):
        return False
    within = (root.resolve().name, *new.relative_to(root.resolve()).parts)
    return old.parts[-len(within):] == within


def _last_metric(run_dir: Path, name: str) -> float | None:
    """The last value the run measured (a step with no target for a loss logs NaN)."""
    value = None
    for metrics in sorted(run_dir.glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[-1])):
        with metrics.open() as f:
            for row in csv.DictReader(f):
                if row.get(name) and not math.isnan(float(row[name])):
                    value = float(row[name])
    return value


def _train(config_file: Path) -> int | None:
    """Fit one stage: here on one device (returns its step), else as a ``unimodal train``
    process of its own (returns None)."""
    args = [str(config_file), "--resume=auto"]
    cli = make_cli(args)
    if cli.trainer.world_size == 1:
        return fit_cli(cli).global_step
    del cli
    returncode = run_passing_sigterm([sys.executable, "-m", "unimodal", "train", *args])
    if returncode == Preempted.exit_code:
        raise Preempted(f"stopped by SIGTERM (stage process {config_file})")
    if returncode == Interrupted.exit_code:
        raise Interrupted(f"stopped by Ctrl-C (stage process {config_file})")
    if returncode != 0:
        raise PipelineError(f"the stage's training process ({config_file}) failed with exit code {returncode}; its error is above")
    return None


def run_passing_sigterm(command: list[str]) -> int:
    """Run ``command`` to its end and return its exit status. A SIGTERM sent to this process alone
    (``docker stop``, an eviction, ``kill PID``) is passed on, so the stage saves a checkpoint
    and stops as it would have (killed with it, it would train on orphaned, holding its run's
    lock). Ctrl-C reaches both through the terminal: this one waits for the stage to stop."""
    child = subprocess.Popen(command)
    main = threading.current_thread() is threading.main_thread()  # only the main thread sets handlers
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signal.SIGTERM)) if main else None
    try:
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:
                continue
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _run_stage(pipeline: Pipeline, stage: Stage, tiny: bool, resolve_path: Callable[[str], str] | None) -> StageResult:
    stage_dir = pipeline.stage_dir(stage)
    marker = stage_dir / STAGE_FILE
    config = resolve_stage(pipeline, stage, tiny, resolve_path)
    previous = read_json_object(marker, STAGE_FIX) if marker.is_file() else {}
    inputs = _inputs(pipeline, stage)
    if previous.get("status") == "done":
        changes = _changes(stage_dir / RESOLVED_RECIPE, config)
        if changes:
            raise PipelineError(
                f"stage {stage.name!r} finished with a different configuration ({marker}; {changes}); "
                f"remove {stage_dir} to run it again with the new one"
            )
        rerun = _rerun(previous, inputs)
        if rerun:  # its model was trained from outputs that are gone
            raise PipelineError(
                f"stage {stage.name!r} finished from an earlier run of stage {rerun!r}, which has run again since; "
                f"remove {stage_dir} to run it from the new one"
            )
        output = pipeline.output_dir(stage)
        if not output.is_dir():  # a later stage would start from nothing
            again = f"export it again with `unimodal export {stage_dir} --out {output}{' --merge_lora' if stage.merge_lora else ''}`, or "
            raise PipelineError(f"stage {stage.name!r} finished, but its output {output} is missing; "
                                f"{again if stage.output is None else ''}remove {stage_dir} to run the stage again")
        if stage.output is None:
            _check_merged(stage, config, stage_dir, output)
        return StageResult(**{**previous["result"], "status": "skipped"})
    config_file = stage_dir / RESOLVED_RECIPE
    if config_file.is_file() and find_latest_checkpoint(stage_dir / "checkpoints") is not None:
        changes = _changes(config_file, config)
        if changes:  # --resume auto would go on from its checkpoint under the new settings
            raise PipelineError(
                f"stage {stage.name!r} was interrupted under another configuration ({changes}); run the pipeline "
                f"as it was to continue it, or remove {stage_dir} to start the stage again with the new one"
            )
        rerun = _rerun(previous, inputs)
        if rerun:  # --resume auto would go on from weights trained on the old outputs
            raise PipelineError(
                f"stage {stage.name!r} was interrupted while it trained from an earlier run of stage {rerun!r}, which has "
                f"run again since; remove {stage_dir} to start it from the new one"
            )
    stage_dir.mkdir(parents=True, exist_ok=True)
    # every rank of a pipeline launched with torchrun writes it
    write_whole(config_file, f"# stage {stage.name} of {pipeline.path}\n" + yaml.safe_dump(config, sort_keys=False))
    started, spent = time.perf_counter(), float(previous.get("wall_s", 0.0))
    # written before training, so that a stage killed outright still says what it trained from
    write_whole(marker, json.dumps({"status": "running", "wall_s": spent, "inputs": inputs}) + "\n")
    log.info("pipeline %s: stage %s (%s)", pipeline.path.name, stage.name, stage.recipe)

    def stopped(err: Preempted | Interrupted) -> Preempted | Interrupted:
        """The attempt's time still counts in the stage's wall."""
        write_whole(marker, json.dumps({"status": "interrupted", "wall_s": spent + time.perf_counter() - started, "inputs": inputs}) + "\n")
        return type(err)(f"stage {stage.name!r} {err.what}", "run the same pipeline command again to continue it")

    rank_zero = launched_rank() == 0
    # rank 0 beats from its training on, which may end after the others' (a rank-0-only write at
    # the end of fit), to its marker: a waiting rank never mistakes a busy rank 0 for a dead one
    with _heartbeat(stage_dir / HEARTBEAT_FILE) if rank_zero else contextlib.nullcontext():
        try:
            steps = _train(config_file)
        except (Preempted, Interrupted) as err:
            raise stopped(err) from None
        checkpoint = find_latest_checkpoint(stage_dir / "checkpoints")
        if not rank_zero:  # rank 0 exports; the others wait for its marker
            return _wait_for_rank_zero(stage, marker)
        try:
            result = _finish(pipeline, stage, checkpoint, steps, spent - started)
        except KeyboardInterrupt:
            raise stopped(Interrupted("interrupted (Ctrl-C) while exporting")) from None
        except Exception:  # the other ranks stop waiting; a rerun resumes from the checkpoint
            with contextlib.suppress(OSError):  # a full disk must not hide the error that stopped the export
                write_whole(marker, json.dumps({"status": "failed", "wall_s": spent + time.perf_counter() - started, "inputs": inputs}) + "\n")
            raise
        done = {"status": "done", "run": uuid.uuid4().hex, "inputs": inputs, "result": asdict(result)}
        write_whole(marker, json.dumps(done, indent=2) + "\n")  # the other ranks poll for it
    return result


def _check_merged(stage: Stage, config: dict[str, Any], stage_dir: Path, output: Path) -> None:
    """A finished LoRA stage whose export is not what ``export.merge_lora`` now asks for: the
    recipe is unchanged, so the stage would be skipped and later stages read the other form."""
    trained_lora = bool(((config.get("model") or {}).get("init_args") or {}).get("lora"))
    apart = bool(read_export_config(output).get("adapter"))
    if trained_lora and apart == stage.merge_lora:
        raise PipelineError(
            f"stage {stage.name!r} finished, and its export {output} {'keeps its LoRA adapter apart' if apart else 'has its LoRA merged'} "
            f"while export.merge_lora is now {'true' if stage.merge_lora else 'false'}: remove {output} and export it again with "
            f"`unimodal export {stage_dir} --out {output}{' --merge_lora' if stage.merge_lora else ''}`"
        )


def _finish(pipeline: Pipeline, stage: Stage, checkpoint: Path | None, steps: int | None, wall_offset: float) -> StageResult:
    """Rank 0's work after training: export the stage (unless it wrote its own output) and sum it up;
    its wall time is ``wall_offset`` plus the clock (``time.perf_counter``) when done."""
    output = pipeline.output_dir(stage)
    if stage.output is None:
        if checkpoint is None:
            raise PipelineError(f"stage {stage.name!r} left no checkpoint in {pipeline.stage_dir(stage) / 'checkpoints'}")
        export(checkpoint, output, merge_lora=stage.merge_lora, replace=True, trust_checkpoint=True)  # this run wrote it
    elif not output.is_dir():
        raise PipelineError(f"stage {stage.name!r} should have written its output to {output}, which does not exist")
    return StageResult(
        name=stage.name,
        status="done",
        steps=steps if steps is not None else checkpoint_step(checkpoint),
        train_loss=_last_metric(pipeline.stage_dir(stage), "train/loss"),
        val_loss=_last_metric(pipeline.stage_dir(stage), "val/loss"),
        wall_s=wall_offset + time.perf_counter(),
        output=str(output),
    )


@contextlib.contextmanager
def _heartbeat(path: Path, every_s: float = HEARTBEAT_S) -> Iterator[None]:
    """Rewrite ``path`` every ``every_s`` seconds until the block ends: a rank 0 killed outright
    (``kill -9``, the OOM killer) writes no ``failed``, and only its silence tells the others."""
    stop = threading.Event()

    def write(count: int) -> None:
        with contextlib.suppress(OSError):  # a missed beat is no error; silence for minutes is
            write_whole(path, f"{count}\n")

    def beat() -> None:
        count = 1
        while not stop.wait(every_s):
            write(count)
            count += 1

    write(0)  # before the block starts: a rank that looks then finds it
    thread = threading.Thread(target=beat, name="unimodal-rank0-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def _wait_for_rank_zero(stage: Stage, marker: Path, poll_s: float = 5.0, silent_s: float = RANK_ZERO_SILENT_S) -> StageResult:
    """The stage's result once rank 0 has exported it; an error as soon as rank 0 stopped without,
    or once its heartbeat has not changed for ``silent_s`` seconds of this rank's own clock (node
    clocks and file times may disagree)."""
    heartbeat = marker.with_name(HEARTBEAT_FILE)
    last, heard = None, time.monotonic()
    while True:
        status = read_json_object(marker, STAGE_FIX) if marker.is_file() else {}
        if status.get("status") == "done":
            return StageResult(**{**status["result"], "status": "done"})
        if status.get("status") in ("failed", "interrupted"):
            raise PipelineError(f"stage {stage.name!r} trained, but rank 0 {status['status']} while exporting it (its log says why)")
        try:
            beat = heartbeat.read_text()
        except OSError:
            beat = None
        if beat != last:
            last, heard = beat, time.monotonic()
        elif time.monotonic() - heard > silent_s:
            raise PipelineError(
                f"stage {stage.name!r} trained, but rank 0 has not been heard from for {silent_s:g} s while exporting it "
                f"({heartbeat} unchanged): it was probably killed; run the same pipeline command again to export the stage "
                "from its checkpoint"
            )
        time.sleep(poll_s)


def _rerun(previous: dict[str, Any], inputs: dict[str, str]) -> str | None:
    """The first earlier stage that has run again since ``previous`` (a ``stage.json``) was written."""
    return next((name for name, run in sorted(previous.get("inputs", {}).items()) if inputs.get(name) != run), None)


def _inputs(pipeline: Pipeline, stage: Stage) -> dict[str, str]:
    """The runs of the earlier stages whose outputs this stage reads (``init``, ``{stages.NAME}``):
    stage name -> the ``run`` of its ``stage.json``. A finished stage is not reused once one of
    them has run again, as its config (the same paths) would not show it."""
    names = {stage.init, *(ref[0] for value in _strings(stage.overrides) for ref in REFERENCE.findall(value))} - {None}
    runs = {}
    for name in sorted(names):
        marker = pipeline.root / name / STAGE_FILE
        run = read_json_object(marker, STAGE_FIX).get("run") if marker.is_file() else None
        if run is not None:
            runs[name] = run
    return runs


def run_pipeline(
    path: str | Path,
    tiny: bool = False,
    root: str | Path | None = None,
    every_stage: dict[str, Any] | None = None,
    resolve_path: Callable[[str], str] | None = None,
) -> list[StageResult]:
    """Run every stage in order (skipping finished ones); returns one result per stage.

    ``every_stage``: dotted overrides applied to every stage last, e.g. ``{"trainer.max_steps": 2}``
    for a smoke run of a whole pipeline. ``resolve_path``: how ``builtin:`` names become paths
    (``unimodal.worlds.resolve``; the command line passes it)."""
    pipeline = load_pipeline(path, tiny, root)
    for stage in pipeline.stages:
        stage.overrides.update(every_stage or {})
    check_stages(pipeline, tiny)
    # two pipelines in one root would rewrite each other's recipe.yaml and export into one directory
    lock = run_lock(pipeline.root.absolute(), "give this one another --root") if launched_rank() == 0 else contextlib.nullcontext()
    with lock:
        return [_run_stage(pipeline, stage, tiny, resolve_path) for stage in pipeline.stages]


def check_stages(pipeline: Pipeline, tiny: bool) -> None:
    """Every stage's resolved config parsed before the first stage trains: a misspelt key in the
    last stage is found now, not after the others have trained. A stage whose source export is
    not written yet has no tokenizer from it: the export's path stands in."""
    for stage in pipeline.stages:
        config = resolve_stage(pipeline, stage, tiny)  # builtin: names stay names (no data is built)
        if stage.init is not None and not ((config.get("data") or {}).get("init_args") or {}).get("tokenizer"):
            set_dotted(config, "data.init_args.tokenizer", config["model"]["init_args"]["init_from"])
        try:
            check_recipe(config)
        except ArgumentError as err:
            raise PipelineError(f"{pipeline.path}: stage {stage.name!r}: {' '.join(err.message.split())}") from None  # one line


def format_table(results: list[StageResult]) -> str:
    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    rows = [("stage", "status", "steps", "train loss", "val loss", "wall", "output")]
    rows += [
        (r.name, r.status, number(r.steps, "d"), number(r.train_loss, ".4f"), number(r.val_loss, ".4f"),
         f"{r.wall_s:.1f} s", r.output)
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
