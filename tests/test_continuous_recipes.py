"""The Orthus and LlamaFusion recipes run with --tiny and learn; `unimodal convert orthus` builds a
starting point the base recipe trains from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from test_continuous_codecs import _pickled
from unimodal.cli import main as unimodal_main
from unimodal.training.recipes import load_recipe

from conftest import logged

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["orthus/base", "orthus/interleaved", "llamafusion/pretrain", "llamafusion/interleaved"]
# the second stages run the same code as the first ones on CPU (their --tiny drops init_from)
SLOW = {"orthus/interleaved", "llamafusion/interleaved"}
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def test_recipes_say_how_they_run():
    for name in RECIPES:
        path = ROOT / "recipes" / f"{name}.yaml"
        assert path.read_text().startswith(f"# Command: unimodal train recipes/{name}.yaml")
        full, tiny = load_recipe(path, tiny=False), load_recipe(path, tiny=True)
        assert full["trainer"]["precision"] == "auto" and "deepspeed" in full["trainer"]["strategy"]
        assert tiny["data"]["init_args"]["datasets"] == [{"path": "builtin:shapes/train"}]


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in RECIPES])
def test_tiny_recipe_learns(name, tmp_path):
    steps = 10
    code = unimodal_main(["train", str(ROOT / "recipes" / f"{name}.yaml"), "--tiny", f"--trainer.max_steps={steps}",
                          "--trainer.log_every_n_steps=1", f"--trainer.default_root_dir={tmp_path}", *QUIET])
    assert code == 0
    diffusion = logged(tmp_path, "train/diffusion/image")
    assert len(diffusion) == steps
    assert np.mean(diffusion[-4:]) < 0.85 * diffusion[0], diffusion
    loss = logged(tmp_path, "train/loss")
    assert np.mean(loss[-4:]) < loss[0], loss


def tiny_chameleon(path: Path) -> dict[int, int]:
    """A random Chameleon checkpoint whose 16 image tokens are vocabulary rows 100..115."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    names = {f"IMGIMG{''.join(chr(ord('A') + int(c)) for c in str(k))}Z": 100 + k for k in range(16)}
    config = ChameleonConfig(
        vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=256, vocabulary_map={"<image>": 99, **names},
        vq_config={"embed_dim": 8, "num_embeddings": 16, "latent_channels": 8, "resolution": 16, "base_channels": 32,
                   "channel_multiplier": [1, 1], "num_res_blocks": 1},
    )
    torch.manual_seed(0)
    model = ChameleonForConditionalGeneration(config)
    model.save_pretrained(path)
    return {k: 100 + k for k in range(16)}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, dict[int, int]]:
    root = tmp_path_factory.mktemp("orthus")
    mapping = tiny_chameleon(root / "chameleon")
    out = root / "orthus-init"
    assert unimodal_main(["convert", "orthus", "--src", str(root / "chameleon"), "--out", str(out),
                          "--head_width", "32", "--head_depth", "2"]) == 0
    assert unimodal_main(["convert", "orthus", "--src", str(root / "chameleon"), "--out", str(out)]) == 2  # not empty
    return out, mapping


def test_convert_orthus_says_when_the_source_has_no_tokenizer(tmp_path, caplog):
    src = tmp_path / "chameleon"
    tiny_chameleon(src)
    with caplog.at_level("WARNING", logger="unimodal.convert"):
        assert unimodal_main(["convert", "orthus", "--src", str(src), "--out", str(tmp_path / "bare")]) == 0
    assert "holds no tokenizer files" in caplog.text
    (src / "tokenizer.json").write_text("{}")
    caplog.clear()
    assert unimodal_main(["convert", "orthus", "--src", str(src), "--out", str(tmp_path / "with")]) == 0
    assert "holds no tokenizer files" not in caplog.text and (tmp_path / "with" / "backbone" / "tokenizer.json").is_file()


def test_convert_orthus_checks_the_head_size_before_loading_chameleon(tmp_path, capsys):
    for flag, value in (("--head_depth", "0"), ("--head_width", "-1")):
        args = ["convert", "orthus", "--src", str(tmp_path / "not-loaded"), "--out", str(tmp_path / "out"), flag, value]
        assert unimodal_main(args) == 2
        assert f"{flag[2:]}={value}; it must be an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _rewrite_weights(src: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(src / "model.safetensors"))
    change(weights)
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})


def _json(file: Path) -> dict:
    return json.loads(file.read_text())


def _edit_config(src: Path, **changes: object) -> None:
    (src / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), **changes}))


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda src, _: (src / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:5000]),
         r"the weights in .*chameleon cannot be read \(Error while deserializing header"),
        (_pickled, r"cannot be read \(a pickle of objects other than tensors, which could run code when loaded\)"),
        # transformers would start what the weights lack afresh with a warning: a random backbone layer, or a random
        # VQ codebook written into orthus_modules.safetensors
        (lambda src, _: _edit_config(src, num_hidden_layers=3), r"do not fill the ChameleonForConditionalGeneration .*model.layers.2"),
        (lambda src, _: _rewrite_weights(src, lambda w: w.pop("model.vqmodel.quantize.embedding.weight")),
         r"1 parameters missing, e.g. model.vqmodel.quantize.embedding.weight"),
        (lambda src, _: _edit_config(src, intermediate_size=256), r"do not have the shapes its config.json describes"),
        (lambda src, _: _edit_config(src, num_hidden_layers=10**6), r"config.json declares a model of at least"),
        (lambda src, _: _edit_config(src, hidden_size="64"), r"config.json: Validation error for field 'hidden_size'"),
        (lambda src, _: _edit_config(src, dtype="evil"), r"config.json: dtype is 'evil', not a torch dtype"),
        (lambda src, _: _edit_config(src, vq_config={**_json(src / "config.json")["vq_config"], "num_res_blocks": 10**6}),
         r"config.json declares a model of at least"),
        (lambda src, _: (src / "tokenizer.json").symlink_to(src / "gone.json"), r"tokenizer.json is a broken link or not a file"),
    ],
)
def test_a_damaged_chameleon_is_one_line_and_writes_nothing(tmp_path, capsys, damage, needle):
    """``convert orthus --src`` may name anyone's directory: what it cannot convert is one line,
    before anything is written, and a pickled weight file is never unpickled."""
    import re

    src, marker = tmp_path / "chameleon", tmp_path / "ran"
    tiny_chameleon(src)
    damage(src, marker)
    capsys.readouterr()
    assert unimodal_main(["convert", "orthus", "--src", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err  # transformers' load report may come first
    (line,) = [line for line in err.splitlines() if ": error: " in line]
    assert "Traceback" not in err and re.search(needle, line), line
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chameleon"]


def test_the_vq_vae_of_a_chameleon_declaring_far_more_than_its_weights_is_refused_unbuilt(tmp_path):
    """A Chameleon checkpoint's VQ-VAE is built from its vq_config, outside the libraries' loaders."""
    from unimodal.modalities.image_continuous import load_chameleon_vqvae

    tiny_chameleon(tmp_path)
    _edit_config(tmp_path, vq_config={**_json(tmp_path / "config.json")["vq_config"], "num_res_blocks": 10**6})
    with pytest.raises(ValueError, match=r"config.json declares a model of at least [\d,]+ parameters .* but its weights hold"):
        load_chameleon_vqvae(tmp_path)


def test_an_interrupted_conversion_leaves_nothing_to_refuse(tmp_path, monkeypatch):
    """Killed midway, convert leaves no partial directory, so the same command runs again."""
    from transformers import ChameleonVQVAE

    tiny_chameleon(tmp_path / "chameleon")
    args = ["convert", "orthus", "--src", str(tmp_path / "chameleon"), "--out", str(tmp_path / "out")]

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ChameleonVQVAE, "save_pretrained", killed)
        assert unimodal_main(args) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chameleon"]
    assert unimodal_main(args) == 0 and (tmp_path / "out" / "orthus.json").is_file()


def test_convert_orthus_builds_the_base_starting_point(converted):
    from transformers import ChameleonVQVAE

    from unimodal.models.backbone import BackboneConfig, load_backbone
    from unimodal.models.continuous import TokenDiffusionImage

    out, mapping = converted
    args = json.loads((out / "orthus.json").read_text())
    assert args == {"hidden_size": 64, "feature_dim": 8, "slots_per_item": 64, "codebook_size": 16,
                    "head_width": 32, "head_depth": 2}
    args.pop("hidden_size")
    modality = TokenDiffusionImage(64, init_from=str(out / "orthus_modules.safetensors"), **args)
    vq = ChameleonVQVAE.from_pretrained(out / "vqvae")
    torch.testing.assert_close(modality.soft_vq.codebook, vq.quantize.embedding.weight)
    assert modality.token_ids.tolist() == [mapping[k] for k in range(16)]
    assert modality.head(torch.randn(2, 8), torch.tensor([1.0, 500.0]), torch.randn(2, 64)).abs().max() == 0
    backbone = load_backbone(BackboneConfig(path=str(out / "backbone"), attention="sdpa"), 320)
    assert type(backbone).__name__ == "ChameleonForConditionalGeneration"


def test_the_base_recipe_trains_from_a_conversion(converted, tmp_path):
    """Chameleon backbone, VQ-encoder features through the codec, converted soft-VQ and head."""
    out, _ = converted
    args = json.loads((out / "orthus.json").read_text())
    args.pop("hidden_size")
    config = load_recipe(ROOT / "recipes" / "orthus" / "base.yaml", tiny=True)
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    model["backbone"] = {"path": str(out / "backbone"), "attention": "sdpa"}
    model["continuous"]["image"]["init_args"].update(init_from=str(out / "orthus_modules.safetensors"), latent_scale=0.1, **args)
    data.update(feature_dim=8, code_ranges={}, codecs={"image": {
        "class_path": "unimodal.modalities.image_continuous.ChameleonVQCodec",
        "init_args": {"path": str(out / "vqvae"), "size": 16}}})
    config["data"]["init_args"]["seq_len"] = 256
    recipe = tmp_path / "base-from-conversion.yaml"
    recipe.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    assert unimodal_main(["train", str(recipe), "--trainer.max_steps=3", f"--trainer.default_root_dir={run}", *QUIET]) == 0
    assert len(logged(run, "train/diffusion/image")) == 3
    # the export carries the trained head: it loads where the conversion it started from is not
    assert unimodal_main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    assert json.loads((tmp_path / "export" / "unimodal.json").read_text())["model"]["continuous"]["image"]["init_args"]["init_from"] is None
    (out / "orthus_modules.safetensors").rename(tmp_path / "elsewhere.safetensors")
    try:
        from unimodal.checkpoints.load import load_exported

        load_exported(tmp_path / "export")
        spec = json.loads((tmp_path / "export" / "unimodal.json").read_text())  # as exports were written before
        spec["model"]["continuous"]["image"]["init_args"]["init_from"] = str(out / "orthus_modules.safetensors")
        (tmp_path / "export" / "unimodal.json").write_text(json.dumps(spec))
        load_exported(tmp_path / "export")
    finally:
        (tmp_path / "elsewhere.safetensors").rename(out / "orthus_modules.safetensors")
