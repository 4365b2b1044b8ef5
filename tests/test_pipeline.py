"""Pipelines: stages in order from the previous stage's export, skip when done, resume when cut."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml

from unimodal.cli import main as unimodal_main
from unimodal.training.pipeline import PipelineError, check_stages, format_table, load_pipeline, resolve_stage, run_pipeline
from unimodal.training.module import UnimodalModule
from unimodal.training.resume import Preempted
from unimodal.worlds import resolve

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ROOT / "recipes" / "pipelines"


def test_text_pipeline_resumes_a_cut_stage_then_skips_finished_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = Path("runs")  # as a user types it: the resolved recipes keep it relative

    def preempt_lora_stage(self):  # SIGTERM during the chat stage's second step
        if self.lora is not None and self.trainer.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as patch:
        patch.setattr(UnimodalModule, "on_after_backward", preempt_lora_stage)
        with pytest.raises(Preempted, match=r"^stage 'chat_sft' stopped by SIGTERM at step 2 \(saved .*\); run the same pipeline command again"):
            run_pipeline(PIPELINES / "text.yaml", tiny=True, root=root, resolve_path=resolve)
    assert json.loads((root / "pretrain" / "stage.json").read_text())["status"] == "done"
    assert json.loads((root / "chat_sft" / "stage.json").read_text())["status"] == "interrupted"
    # the cut stage does not go on from its checkpoint under other settings
    with pytest.raises(PipelineError, match=r"stage 'chat_sft' was interrupted under another configuration \(changed: trainer\.max_steps\); "
                                            r"run the pipeline as it was to continue it, or remove .*chat_sft to start"):
        run_pipeline(changed_pipeline(tmp_path), tiny=True, root=root, resolve_path=resolve)

    results = run_pipeline(PIPELINES / "text.yaml", tiny=True, root=root, resolve_path=resolve)
    assert [(r.name, r.status, r.steps) for r in results] == [("pretrain", "skipped", 4), ("chat_sft", "done", 4)]
    chat = results[1]
    assert chat.train_loss is not None and chat.val_loss is not None and chat.wall_s > 0
    # the chat stage started from the pretrained export, with its tokenizer, and resumed its run
    resolved = yaml.safe_load((root / "chat_sft" / "recipe.yaml").read_text())
    assert resolved["model"]["init_args"]["init_from"] == str(root / "pretrain" / "export")
    assert resolved["data"]["init_args"]["tokenizer"] == str(root / "pretrain" / "export" / "tokenizer.model")
    assert len(list((root / "chat_sft").glob("logs/version_*"))) == 2
    export = json.loads((root / "chat_sft" / "export" / "unimodal.json").read_text())
    assert export["adapter"] == "adapter" and export["source"]["global_step"] == 4

    # finished stages are skipped; the command prints the table
    capsys.readouterr()
    assert unimodal_main(["pipeline", str(PIPELINES / "text.yaml"), "--tiny", "--root", str(root)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["stage", "status", "steps", "train", "loss", "val", "loss", "wall", "output"]
    assert [line.split()[:3] for line in table[2:]] == [["pretrain", "skipped", "4"], ["chat_sft", "skipped", "4"]]

    # a project copied elsewhere keeps its finished stages, whichever way its root is spelt
    shutil.copytree(root, tmp_path / "moved" / "runs")
    monkeypatch.chdir(tmp_path / "moved")
    for spelling in (root, tmp_path / "moved" / "runs"):
        assert [r.status for r in run_pipeline(PIPELINES / "text.yaml", tiny=True, root=spelling, resolve_path=resolve)] == ["skipped"] * 2
    monkeypatch.chdir(tmp_path)

    # a finished stage whose export went missing says how to get it back
    export = root / "pretrain" / "export"
    export.rename(root / "aside")
    with pytest.raises(PipelineError, match=r"stage 'pretrain' finished, but its output .*pretrain/export is missing; export it again with "
                                            r"`unimodal export .*pretrain --out .*pretrain/export`, or remove .*pretrain to run the stage again"):
        run_pipeline(PIPELINES / "text.yaml", tiny=True, root=root, resolve_path=resolve)
    (root / "aside").rename(export)

    # a finished stage whose configuration changed is not silently reused
    with pytest.raises(PipelineError, match=r"stage 'chat_sft' finished with a different configuration \(.*stage\.json; changed: trainer\.max_steps\)"):
        run_pipeline(changed_pipeline(tmp_path), tiny=True, root=root, resolve_path=resolve)

    # export.merge_lora changed after the stage finished: its export is the other form, and says so
    merged = tmp_path / "merged.yaml"
    raw = yaml.safe_load((PIPELINES / "text.yaml").read_text())
    raw["stages"][1]["export"] = {"merge_lora": True}
    for stage in raw["stages"]:
        stage["recipe"] = str(ROOT / stage["recipe"])
    merged.write_text(yaml.safe_dump(raw))
    with pytest.raises(PipelineError, match=r"stage 'chat_sft' finished, and its export .*chat_sft/export keeps its LoRA adapter apart while "
                                            r"export.merge_lora is now true: remove .* and export it again with "
                                            r"`unimodal export .*chat_sft --out .*chat_sft/export --merge_lora`"):
        run_pipeline(merged, tiny=True, root=root, resolve_path=resolve)

    # the digits suite has nothing to ask a text-only model: one line, not a scoreboard of n/a
    capsys.readouterr()
    assert unimodal_main(["eval", str(root / "chat_sft" / "export"), "--suite", "digits"]) == 2
    assert capsys.readouterr().err.endswith("every task of the digits suite is about pictures or speech: nothing in it applies to this model\n")


def changed_pipeline(tmp_path: Path) -> Path:
    """text.yaml with another max_steps for its chat stage."""
    changed = tmp_path / "changed.yaml"
    raw = yaml.safe_load((PIPELINES / "text.yaml").read_text())
    raw["tiny"]["chat_sft.trainer.max_steps"] = 5
    for stage in raw["stages"]:
        stage["recipe"] = str(ROOT / stage["recipe"])
    changed.write_text(yaml.safe_dump(raw))
    return changed


def write(tmp_path: Path, stages: list[dict], **extra) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"stages": stages, **extra}))
    return path


def test_pipeline_files_are_checked_before_anything_runs(tmp_path):
    tiny = "recipes/text/tiny.yaml"
    with pytest.raises(FileNotFoundError, match="recipes not found: b: recipes/nope.yaml"):
        load_pipeline(write(tmp_path, [{"name": "a", "recipe": tiny}, {"name": "b", "recipe": "recipes/nope.yaml"}]))
    with pytest.raises(PipelineError, match="initialises from 'z', which is not an earlier stage"):
        load_pipeline(write(tmp_path, [{"name": "a", "recipe": tiny, "init": "z"}]))
    with pytest.raises(PipelineError, match=r"stage 'a' has export: \{'mrege_lora': True\}; its one key is merge_lora \(true or false\)"):
        load_pipeline(write(tmp_path, [{"name": "a", "recipe": tiny, "export": {"mrege_lora": True}}]))
    with pytest.raises(PipelineError, match=r"stage 'a' has export.merge_lora: 'yes please'; give true or false"):
        load_pipeline(write(tmp_path, [{"name": "a", "recipe": tiny, "export": {"merge_lora": "yes please"}}]))
    with pytest.raises(PipelineError, match="two stages are named 'a'"):
        load_pipeline(write(tmp_path, [{"name": "a", "recipe": tiny}, {"name": "a", "recipe": tiny}]))
    with pytest.raises(PipelineError, match=r"refers to \{stages.b\}"):
        load_pipeline(write(tmp_path, [{"name": "a", "recipe": tiny, "overrides": {"x.y": "{stages.b}/f"}}, {"name": "b", "recipe": tiny}]))
    with pytest.raises(PipelineError, match="tiny key 'c.trainer.max_steps'"):
        load_pipeline(write(tmp_path, [{"name": "a", "recipe": tiny}], tiny={"c.trainer.max_steps": 1}), tiny=True)
    with pytest.raises(PipelineError, match=r"\(stages: pre_train, sft\); did you mean 'pre_train'\?"):
        load_pipeline(write(tmp_path, [{"name": "pre_train", "recipe": tiny}, {"name": "sft", "recipe": tiny}],
                            tiny={"pre-train.trainer.max_steps": 1}), tiny=True)
    with pytest.raises(PipelineError, match=r"stage 0 \('pre train'\) needs a 'name'"):
        load_pipeline(write(tmp_path, [{"name": "pre train", "recipe": tiny}]))
    for name in (1, "a\n"):  # not a path to build, nor a name with a line break after it
        with pytest.raises(PipelineError, match=r"stage 0 \(.*\) needs a 'name'"):
            load_pipeline(write(tmp_path, [{"name": name, "recipe": tiny}]))
    with pytest.raises(PipelineError, match=r"unknown keys \['roots'\]; the keys are root, stages, tiny and tiny_only"):
        load_pipeline(write(tmp_path, [{"name": "a", "recipe": tiny}], roots="elsewhere"))
    with pytest.raises(PipelineError, match=r"stage 'a' has overrides: \['x'\]; give a mapping"):
        load_pipeline(write(tmp_path, [{"name": "a", "recipe": tiny, "overrides": ["x"]}]))
    with pytest.raises(PipelineError, match=r"stage 'a' needs a 'recipe': a recipe file's path"):
        load_pipeline(write(tmp_path, [{"name": "a", "recipe": ["x"]}]))
    with pytest.raises(PipelineError, match=r"root: 5 should be a directory's path"):
        load_pipeline(write(tmp_path, [{"name": "a", "recipe": tiny}], root=5), tiny=True)
    with pytest.raises(PipelineError, match=r"stage 'a' has output: 5; give a directory"):
        load_pipeline(write(tmp_path, [{"name": "a", "recipe": tiny, "output": 5}]))
    with pytest.raises(PipelineError, match=r"tiny: True should map 'root' and 'STAGE.dotted.key' to values"):
        load_pipeline(write(tmp_path, [{"name": "a", "recipe": tiny}], tiny=True), tiny=True)
    with pytest.raises(PipelineError, match="sets tiny_only: .* run it with --tiny"):
        load_pipeline(write(tmp_path, [{"name": "a", "recipe": tiny}], tiny={"root": "r"}, tiny_only=True))
    pipeline = load_pipeline(write(tmp_path, [{"name": "a", "recipe": tiny}, {"name": "b", "recipe": tiny, "init": None}]))
    assert [s.init for s in pipeline.stages] == [None, None] and pipeline.root == Path("runs/pipelines/p")
    # without a tiny: section, --tiny runs the recipes' own tiny sections, beside the full run
    assert load_pipeline(pipeline.path, tiny=True).root == Path("runs/pipelines/p-tiny")


def test_a_misspelt_override_in_a_later_stage_stops_the_pipeline_before_the_first_stage_trains(tmp_path):
    stages = [{"name": "a", "recipe": "recipes/text/tiny.yaml"},
              {"name": "b", "recipe": "recipes/lora/chat_sft.yaml", "overrides": {"trainer.max_stepz": 4}}]
    with pytest.raises(PipelineError, match=r"stage 'b': Group 'trainer' does not accept option 'max_stepz' \(did you mean --trainer.max_steps"):
        run_pipeline(write(tmp_path, stages), root=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()  # stage a never started
    stages[1]["overrides"] = {"trainer.max_steps": "lots"}
    with pytest.raises(PipelineError) as caught:
        run_pipeline(write(tmp_path, stages), root=tmp_path / "runs")
    assert "stage 'b': Parser key \"trainer.max_steps\":" in str(caught.value) and "lots" in str(caught.value)
    assert "\n" not in str(caught.value)
    # the real pipelines pass the check, stages that start from an earlier one's export included
    for path in sorted(PIPELINES.glob("*.yaml")):
        check_stages(load_pipeline(path, tiny=True), tiny=True)


def test_references_to_earlier_stages_become_their_output_paths(tmp_path, monkeypatch):
    """As the root is written: an export that keeps a codec directory records it resolved."""
    monkeypatch.chdir(tmp_path)
    tiny = str(ROOT / "recipes" / "text" / "tiny.yaml")
    stages = [{"name": "a", "recipe": tiny}, {"name": "b", "recipe": tiny, "overrides": {"data.init_args.codecs": {"image": {"init_args": {"path": "{stages.a}"}}}}}]
    pipeline = load_pipeline(write(tmp_path, stages), root="runs")
    config = resolve_stage(pipeline, pipeline.stages[1], tiny=False)
    assert config["data"]["init_args"]["codecs"]["image"]["init_args"]["path"] == str(Path("runs") / "a" / "export")


def test_a_stage_may_name_an_earlier_stages_tokenizer_before_it_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stages = [{"name": "a", "recipe": str(ROOT / "recipes" / "text" / "tiny.yaml")},
              {"name": "b", "recipe": str(ROOT / "recipes" / "lora" / "chat_sft.yaml"),
               "overrides": {"data.init_args.tokenizer": "{stages.a.tokenizer}"}}]
    pipeline = load_pipeline(write(tmp_path, stages), tiny=True, root="runs")
    check_stages(pipeline, tiny=True)  # the pre-flight check, nothing written yet
    export = Path("runs") / "a" / "export"
    assert resolve_stage(pipeline, pipeline.stages[1], tiny=True)["data"]["init_args"]["tokenizer"] == str(export)
    export.mkdir(parents=True)  # once the stage has exported, the tokenizer its unimodal.json names
    (export / "unimodal.json").write_text("{}")
    monkeypatch.setattr("unimodal.training.pipeline.tokenizer_path", lambda out: out / "tokenizer.model")
    monkeypatch.setattr("unimodal.training.pipeline.inherit_from_export", lambda *args, **kwargs: None)
    assert resolve_stage(pipeline, pipeline.stages[1], tiny=True)["data"]["init_args"]["tokenizer"] == str(export / "tokenizer.model")


def test_table_lists_every_stage():
    from unimodal.training.pipeline import StageResult

    table = format_table([StageResult("a", "done", 3, 1.23456, None, 2.5, "runs/a/export")])
    assert table.splitlines()[2].split() == ["a", "done", "3", "1.2346", "-", "2.5", "s", "runs/a/export"]


FAMILIES = ["orthus", "llamafusion", "mio", "seed"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_pipeline_runs_tiny(family, tmp_path):
    path = PIPELINES / f"{family}.yaml"
    try:
        pipeline = load_pipeline(path, tiny=True)
    except FileNotFoundError as err:
        pytest.skip(f"{family}: a stage recipe is not written yet ({err})")
    results = run_pipeline(path, tiny=True, root=tmp_path / "runs", resolve_path=resolve)
    assert [r.name for r in results] == [s.name for s in pipeline.stages]
    assert all(r.status == "done" and Path(r.output).is_dir() for r in results)


@pytest.mark.parametrize(("when", "said"), [("training", "at step 2, without saving"), ("exporting", "while exporting")])
def test_a_stage_stopped_by_ctrl_c_keeps_its_time_for_the_next_attempt(tmp_path, monkeypatch, when, said):
    from unimodal.training import pipeline as pipeline_module
    from unimodal.training.resume import Interrupted

    def train(config_file):
        if when == "training":
            raise Interrupted("interrupted (Ctrl-C) at step 2, without saving")
        (config_file.parent / "checkpoints").mkdir()
        (config_file.parent / "checkpoints" / "last.ckpt").write_bytes(b"weights")
        return 3

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline_module, "_train", train)
    monkeypatch.setattr(pipeline_module, "export", ctrl_c)
    stages = [{"name": "a", "recipe": "recipes/text/tiny.yaml"}]
    # the way on under a pipeline is the same pipeline command (it refuses --resume auto)
    with pytest.raises(Interrupted, match=rf"^stage 'a' interrupted \(Ctrl-C\) {said}; run the same pipeline command again"):
        run_pipeline(write(tmp_path, stages), tiny=True, root=tmp_path / "runs")
    marker = json.loads((tmp_path / "runs" / "a" / "stage.json").read_text())
    assert marker["status"] == "interrupted" and marker["wall_s"] > 0


@pytest.mark.parametrize("fails", ["export", "summary"])
def test_a_failed_export_tells_the_waiting_ranks_instead_of_leaving_them_polling(tmp_path, monkeypatch, fails):
    from unimodal.training import pipeline as pipeline_module

    def train(config_file):
        (config_file.parent / "checkpoints").mkdir(exist_ok=True)
        (config_file.parent / "checkpoints" / "last.ckpt").write_bytes(b"weights")
        return 3

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline_module, "_train", train)
    monkeypatch.setattr(pipeline_module, "export", lambda checkpoint, out, **kwargs: Path(out).mkdir(parents=True, exist_ok=True))
    monkeypatch.setattr(pipeline_module, "export" if fails == "export" else "_last_metric", full_disk)
    path = write(tmp_path, [{"name": "a", "recipe": "recipes/text/tiny.yaml"}])
    with pytest.raises(OSError, match="No space left"):
        run_pipeline(path, tiny=True, root=tmp_path / "runs")
    marker = tmp_path / "runs" / "a" / "stage.json"
    assert json.loads(marker.read_text())["status"] == "failed"
    stage = load_pipeline(path, tiny=True, root=tmp_path / "runs").stages[0]
    with pytest.raises(PipelineError, match=r"^stage 'a' trained, but rank 0 failed while exporting it"):
        pipeline_module._wait_for_rank_zero(stage, marker, poll_s=0.01)
    # the next run trains and exports it again; a waiting rank then reads rank 0's result
    monkeypatch.setattr(pipeline_module, "export", lambda checkpoint, out, **kwargs: Path(out).mkdir(parents=True, exist_ok=True))
    monkeypatch.setattr(pipeline_module, "_last_metric", lambda run_dir, name: None)
    [result] = run_pipeline(path, tiny=True, root=tmp_path / "runs")
    waited = pipeline_module._wait_for_rank_zero(stage, marker, poll_s=0.01)
    assert result.status == waited.status == "done" and waited.output == result.output


def test_ranks_waiting_for_a_rank_0_killed_outright_stop_once_its_heartbeat_goes_silent(tmp_path):
    """kill -9 leaves stage.json saying running; the heartbeat is what tells a dead rank 0 from a slow one."""
    import threading

    from unimodal.training import pipeline as pipeline_module

    stage = pipeline_module.Stage(name="a", recipe=Path("recipes/text/tiny.yaml"))
    marker = tmp_path / "stage.json"
    marker.write_text(json.dumps({"status": "running"}))
    (tmp_path / "rank0.heartbeat").write_text("7\n")  # the last beat of a rank 0 that died
    with pytest.raises(PipelineError, match=r"^stage 'a' trained, but rank 0 has not been heard from for 0.2 s .*run the same pipeline"):
        pipeline_module._wait_for_rank_zero(stage, marker, poll_s=0.01, silent_s=0.2)

    # a live rank 0 keeps beating through an export longer than silent_s, and its result arrives
    result = {"name": "a", "status": "done", "steps": 3, "train_loss": None, "val_loss": None, "wall_s": 1.0, "output": "out"}

    def export_slowly():
        with pipeline_module._heartbeat(tmp_path / "rank0.heartbeat", every_s=0.02):
            time.sleep(1.0)
        marker.write_text(json.dumps({"status": "done", "result": result}))

    rank_zero = threading.Thread(target=export_slowly)
    rank_zero.start()
    waited = pipeline_module._wait_for_rank_zero(stage, marker, poll_s=0.01, silent_s=0.2)
    rank_zero.join()
    assert waited.status == "done" and waited.steps == 3
    assert not (tmp_path / "rank0.heartbeat").exists()  # a finished export leaves no heartbeat behind


def test_rank_0_beats_while_it_trains_too(tmp_path, monkeypatch):
    """Rank 0's training may end after the others' (a write only it makes at the end of fit): the
    ranks already waiting must hear it then, not only once it exports."""
    from unimodal.training import pipeline as pipeline_module

    heard = []

    def train(config_file):
        heard.append((config_file.parent / "rank0.heartbeat").is_file())
        (config_file.parent / "checkpoints").mkdir(exist_ok=True)
        (config_file.parent / "checkpoints" / "last.ckpt").write_bytes(b"weights")
        return 3

    monkeypatch.setattr(pipeline_module, "_train", train)
    monkeypatch.setattr(pipeline_module, "export", lambda checkpoint, out, **kwargs: Path(out).mkdir(parents=True, exist_ok=True))
    monkeypatch.setattr(pipeline_module, "_last_metric", lambda run_dir, name: None)
    run_pipeline(write(tmp_path, [{"name": "a", "recipe": "recipes/text/tiny.yaml"}]), tiny=True, root=tmp_path / "runs")
    assert heard == [True] and not (tmp_path / "runs" / "a" / "rank0.heartbeat").exists()


def test_a_moved_pipeline_roots_absolute_paths_are_the_same_files(tmp_path):
    """A finished stage's recipe holds absolute paths into the pipeline's root (the codecs an
    export passed on); the same files of a root copied elsewhere are no change."""
    from unimodal.training.pipeline import _same

    root = tmp_path / "b" / "runs"
    now = str(root / "pretrain" / "export" / "codecs" / "audio")
    assert _same("/a/x/runs/pretrain/export/codecs/audio", now, root)
    assert not _same("/a/x/other/pretrain/export/codecs/audio", now, root)  # another root's
    assert not _same("/a/x/runs/pretrain/export/codecs/image", now, root)  # another file
    assert not _same("/a/x/runs/pretrain/export/codecs/audio", "/elsewhere/codecs/audio", root)  # not under this root


def _writes_its_output(config_file: Path) -> int:
    """A stage's training, cut to what the pipeline reads: the directory its ``output:`` names."""
    (config_file.parent / "out").mkdir(exist_ok=True)
    return 1


def test_a_finished_stage_is_not_reused_once_the_stage_it_started_from_ran_again(tmp_path, monkeypatch):
    from unimodal.training import pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "_train", _writes_its_output)
    tiny = "recipes/text/tiny.yaml"
    path = write(tmp_path, [{"name": "a", "recipe": tiny, "output": "out"}, {"name": "b", "recipe": tiny, "output": "out"}])
    root = tmp_path / "runs"
    assert [r.status for r in run_pipeline(path, tiny=True, root=root)] == ["done", "done"]
    assert [r.status for r in run_pipeline(path, tiny=True, root=root)] == ["skipped", "skipped"]
    shutil.rmtree(root / "a")  # as the refusal of a changed stage says; its config is the same paths
    with pytest.raises(PipelineError, match=r"^stage 'b' finished from an earlier run of stage 'a', which has run again since; "
                                            r"remove .*runs/b to run it from the new one$"):
        run_pipeline(path, tiny=True, root=root)
    shutil.rmtree(root / "b")
    assert [r.status for r in run_pipeline(path, tiny=True, root=root)] == ["skipped", "done"]


@pytest.mark.parametrize("how", ["ctrl-c", "killed"])
def test_an_interrupted_stage_does_not_resume_once_the_stage_it_started_from_ran_again(tmp_path, monkeypatch, how):
    """Its checkpoint was trained from the old outputs: ``--resume auto`` would go on from them.
    A stage killed outright (no ``interrupted`` marker) says what it trains from when it starts."""
    from unimodal.training import pipeline as pipeline_module
    from unimodal.training.resume import Interrupted

    def b_stops(config_file: Path) -> int:
        if config_file.parent.name == "a":
            return _writes_its_output(config_file)
        (config_file.parent / "checkpoints").mkdir(exist_ok=True)
        (config_file.parent / "checkpoints" / "last.ckpt").write_bytes(b"weights trained from the first a")
        if how == "killed":
            raise SystemExit(137)  # as far as stage.json goes, kill -9 leaves what was written before training
        raise Interrupted("interrupted (Ctrl-C) at step 2")

    monkeypatch.setattr(pipeline_module, "_train", b_stops)
    tiny = "recipes/text/tiny.yaml"
    path = write(tmp_path, [{"name": "a", "recipe": tiny, "output": "out"}, {"name": "b", "recipe": tiny, "output": "out"}])
    root = tmp_path / "runs"
    with pytest.raises((Interrupted, SystemExit)):
        run_pipeline(path, tiny=True, root=root)
    shutil.rmtree(root / "a")
    with pytest.raises(PipelineError, match=r"^stage 'b' was interrupted while it trained from an earlier run of stage 'a', "
                                            r"which has run again since; remove .*runs/b to start it from the new one$"):
        run_pipeline(path, tiny=True, root=root)
    assert (root / "b" / "checkpoints" / "last.ckpt").is_file()  # the refusal loses nothing


def test_two_pipelines_in_one_root_are_refused(tmp_path, monkeypatch):
    from unimodal.errors import UserError
    from unimodal.training import pipeline as pipeline_module
    from unimodal.locks import run_lock

    monkeypatch.setattr(pipeline_module, "_train", _writes_its_output)
    path, root = write(tmp_path, [{"name": "a", "recipe": "recipes/text/tiny.yaml", "output": "out"}]), tmp_path / "runs"
    with run_lock(root):  # the other pipeline
        with pytest.raises(UserError, match=r"^.*runs is in use by another run \(pid \d+ on .*\); wait for it to end, or give this one another --root$"):
            run_pipeline(path, tiny=True, root=root)
    assert not (root / "a").exists()
    assert [r.status for r in run_pipeline(path, tiny=True, root=root)] == ["done"]


def test_a_sigterm_to_the_pipeline_reaches_a_stage_training_in_its_own_process(tmp_path):
    """A stage on several devices trains as a process of its own: a SIGTERM sent to the pipeline
    alone (docker stop, an eviction) must reach it, so that it saves a checkpoint and stops with
    SIGTERM's status, rather than train on orphaned while the pipeline dies."""
    import sys
    import threading
    import time

    from unimodal.training.pipeline import run_passing_sigterm

    ready, saved = tmp_path / "ready", tmp_path / "saved"
    stage = (
        "import pathlib, signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *_: (pathlib.Path({str(saved)!r}).touch(), sys.exit({Preempted.exit_code})))\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(60)\n"
    )

    def terminate_when_ready():
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # to this process, as `kill PID` does

    before = signal.getsignal(signal.SIGTERM)
    killer = threading.Thread(target=terminate_when_ready)
    killer.start()
    began = time.monotonic()
    assert run_passing_sigterm([sys.executable, "-c", stage]) == Preempted.exit_code
    killer.join()
    assert saved.exists() and time.monotonic() - began < 30
    assert signal.getsignal(signal.SIGTERM) == before  # this process's own handler is back
