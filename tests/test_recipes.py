"""Every shipped recipe says how it runs, parses, and builds its model (its --tiny variant: the
full ones name local pretrained models that tests do not have)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unimodal.training.pipeline import load_pipeline, resolve_stage
from unimodal.training.recipes import auto_precision, make_cli
from unimodal.worlds import resolve

ROOT = Path(__file__).resolve().parents[1]
ALL = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "recipes").rglob("*.yaml"))
PIPELINES = [r for r in ALL if r.startswith("recipes/pipelines/")]
TRAINING = [r for r in ALL if r not in PIPELINES]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("recipe", TRAINING)
def test_training_recipe_parses_and_builds(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name built-in data and each other relative to the repository
    cli = make_cli([recipe, "--tiny", f"--trainer.default_root_dir={tmp_path}"], resolve_path=resolve)
    model = cli.model
    if hasattr(model, "configure_model"):
        model.configure_model()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0, recipe


def test_precision_auto_is_bf16_on_a_gpu_and_fp32_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = ["recipes/text/tiny.yaml", f"--trainer.default_root_dir={tmp_path}"]
    assert make_cli(args, resolve_path=resolve).trainer.precision == "32-true"
    assert make_cli([*args, "--trainer.precision", "auto"], resolve_path=resolve).trainer.precision == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert auto_precision() == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert auto_precision() == "32-true"


@pytest.mark.parametrize("recipe", PIPELINES)
def test_pipeline_parses_and_every_stage_resolves(recipe, tmp_path):
    pipeline = load_pipeline(ROOT / recipe, tiny=True, root=tmp_path)
    assert pipeline.stages
    for stage in pipeline.stages:
        config = resolve_stage(pipeline, stage, tiny=True, resolve_path=resolve)
        assert config["trainer"]["default_root_dir"] == str(pipeline.stage_dir(stage))
        assert Path(stage.recipe).is_file()


def test_a_moved_class_path_is_refused_naming_the_new_one(tmp_path):
    from unimodal.errors import UserError
    from unimodal.training.recipes import load_recipe

    recipe = tmp_path / "old.yaml"
    recipe.write_text((ROOT / "recipes" / "orthus" / "base.yaml").read_text().replace("unimodal.models.TokenDiffusionImage", "unimodal.models.continuous.DiffusionImage"))
    with pytest.raises(UserError, match=r"class_path unimodal.models.continuous.DiffusionImage is now unimodal.models.continuous.TokenDiffusionImage"):
        load_recipe(recipe, tiny=True)


def test_builtin_names_are_refused_below_the_command_line():
    from unimodal.data.datamodule import UnimodalDataModule
    from unimodal.errors import UserError

    with pytest.raises(UserError, match="built-in names are resolved by the unimodal command line"):
        UnimodalDataModule(["builtin:text/train"], "builtin:text/tokenizer.model")


@pytest.mark.parametrize("tiny", [True, False])
def test_a_tiny_section_that_is_not_a_mapping_is_one_line(tmp_path, tiny):
    from unimodal.training.recipes import load_recipe

    recipe = tmp_path / "flag.yaml"
    recipe.write_text((ROOT / "recipes" / "text" / "tiny.yaml").read_text().replace("tiny:\n", "tiny: true\nwas_tiny:\n"))
    with pytest.raises(ValueError, match=r"^recipe .*flag\.yaml: 'tiny:' maps dotted keys to values \(trainer\.max_steps: 20\), not a bool$"):
        load_recipe(recipe, tiny=tiny)
