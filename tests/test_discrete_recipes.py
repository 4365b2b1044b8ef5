"""Every MIO and SEED-LLaMA recipe trains on CPU with --tiny (builtin:codes) and its losses fall."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from unimodal.cli import main as unimodal_main
from unimodal.training.recipes import load_recipe

from conftest import logged

ROOT = Path(__file__).resolve().parents[1]
RECIPES = [
    "mio/stage1_alignment.yaml", "mio/stage2_interleaved.yaml", "mio/stage3_speech.yaml", "mio/stage4_sft.yaml",
    "seed/pretrain_lora.yaml", "seed/sft_lora.yaml",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def ce_terms(run: Path) -> dict[str, list[float]]:
    (metrics,) = run.glob("logs/version_*/metrics.csv")
    with metrics.open() as f:
        names = [n for n in next(csv.reader(f)) if n.startswith("train/ce/")]
    return {n: logged(run, n) for n in names}


def run_recipe(recipe: str, run: Path) -> dict[str, list[float]]:
    args = ["train", str(ROOT / "recipes" / recipe), "--tiny", f"--trainer.default_root_dir={run}",
            "--trainer.enable_progress_bar=false", "--trainer.max_steps=24"]
    assert unimodal_main(args) == 0
    return ce_terms(run)


def check_learns(terms: dict[str, list[float]], modalities: set[str]) -> None:
    assert {n.split("/")[-1] for n, v in terms.items() if v} == modalities
    for name, values in terms.items():
        assert np.mean(values[-5:]) < 0.95 * np.mean(values[:5]), (name, values)


def modalities(recipe: str) -> set[str]:
    ranges = load_recipe(ROOT / "recipes" / recipe, tiny=True)["data"]["init_args"]["code_ranges"]
    return {"text", *ranges}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_learns(recipe, tmp_path):
    check_learns(run_recipe(recipe, tmp_path / "run"), modalities(recipe))
