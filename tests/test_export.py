"""Export: an HF backbone, framework modules, tokenizer, peft adapter; ``unimodal.load`` restores all."""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import peft
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from unimodal.cli import main as unimodal_main
from unimodal.data.packing import Packer, collate
from unimodal.schema import Document, Part
from unimodal.training.recipes import load_recipe, run_training
from unimodal.checkpoints.load import ExportError, check_untrusted, load_exported
from unimodal.errors import UserError
from unimodal.training.exporting import _check_classes, _module_from_checkpoint, export
from unimodal.worlds import resolve

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "lora" / "chat_sft.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Two steps of the LoRA chat recipe (--tiny), with new-token rows and a LoRA'd input adapter."""
    home = tmp_path_factory.mktemp("data-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNIMODAL_DATA_HOME", str(home))
        config = load_recipe(RECIPE, tiny=True)
        model = config["model"]["init_args"]
        model["continuous"] = {"image": {"class_path": "unimodal.models.unified.LinearAdapter", "init_args": {"feature_dim": 6}}}
        model["lora"].update(target_modules=["q_proj", "v_proj", "continuous.image.proj"], train_new_tokens=True)
        config["data"]["init_args"].update(feature_dim=6, code_ranges={"image": 32}, seq_len=128, val_datasets=None)
        recipe = tmp_path_factory.mktemp("recipe") / "chat.yaml"
        recipe.write_text(yaml.safe_dump(config))
        out = tmp_path_factory.mktemp("run")
        run_training([str(recipe), f"--trainer.default_root_dir={out}", "--trainer.max_steps=2",
                      "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0"], resolve_path=resolve)
        yield out


def probe(exported) -> object:
    """A packed chat batch in the exported model's own tokenizer and template."""
    doc = Document([Part("text", text="What does json do?", role="user"), Part("text", text="It encodes.", role="assistant")])
    processor = exported.processor
    assert processor.chat_template is not None and processor.feature_dim == 6
    return collate([next(Packer(64, processor.tokenizer.pad_id, 6).pack([processor.encode(doc)]))])


def test_export_with_adapter_and_merged_restore_the_trained_model(run, tmp_path):
    checkpoint = run / "checkpoints" / "last.ckpt"
    adapter_dir = export(checkpoint, tmp_path / "adapter")
    merged_dir = export(run, tmp_path / "merged", merge_lora=True)  # a run directory: its newest checkpoint

    config = json.loads((adapter_dir / "unimodal.json").read_text())
    processor = json.loads((adapter_dir / "processor.json").read_text())
    assert config["adapter"] == "adapter" and processor["chat_template"] == "chatml"
    assert processor["layout"]["code_ranges"] == {"image": 32} and config["source"]["global_step"] == 2
    assert (adapter_dir / "tokenizer.model").is_file() and (adapter_dir / "modules.safetensors").is_file()
    assert not (merged_dir / "adapter").exists()
    # a run directory is recorded as the checkpoint file it stood for
    assert json.loads((merged_dir / "unimodal.json").read_text())["source"]["checkpoint"] == str(checkpoint.resolve())

    # the backbone is a plain HF model; the adapter is a plain peft adapter
    base, info = AutoModelForCausalLM.from_pretrained(adapter_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with_adapter = peft.PeftModel.from_pretrained(base, str(adapter_dir / "adapter")).eval()
    merged_hf = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    ids = torch.tensor([[1, 40, 41, 1030, 1031, 1040]])  # text ids and new rows (specials, image codes)
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(input_ids=ids).logits, merged_hf(input_ids=ids).logits, rtol=1e-4, atol=1e-4)

    # load_exported (under unimodal.load) restores the whole model: the same losses as the trained module
    checkpoint_data = torch.load(checkpoint, map_location="cpu", weights_only=False)
    trained = _module_from_checkpoint(checkpoint_data, checkpoint_data["hyper_parameters"]).model
    with warnings.catch_warnings(record=True) as caught:  # peft's own deprecation warnings are not shown
        warnings.simplefilter("always")
        loaded = load_exported(adapter_dir)
    assert not [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))], [str(w.message) for w in caught]
    batch = probe(loaded)
    with torch.no_grad():
        expected = trained(batch)["ce/text"].total
        for directory in (adapter_dir, merged_dir):
            torch.testing.assert_close(load_exported(directory).model(batch)["ce/text"].total, expected, rtol=1e-4, atol=1e-4)
    assert not loaded.model.training and loaded.processor.codecs == {}
    # the framework module's LoRA was merged into its weights
    assert torch.equal(loaded.model.continuous["image"].proj.weight, load_exported(merged_dir).model.continuous["image"].proj.weight)
    assert not torch.equal(loaded.model.continuous["image"].proj.weight, torch.zeros(1))
    # a copy without its adapter/ (cp export/* dest) must not load as the base model
    copy = tmp_path / "copied"
    shutil.copytree(adapter_dir, copy)
    shutil.rmtree(copy / "adapter")
    with pytest.raises(ExportError, match=r"names a LoRA adapter in adapter/, and .*adapter_config.json is missing; copy the export whole"):
        load_exported(copy)


def test_export_logs_what_it_wrote_not_the_training_build(run, tmp_path, caplog, capfd, monkeypatch):
    """One line for what was written; neither the training build's lines nor transformers'
    "Writing model shards" bar, in Python as in the CLI."""
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    hf_logging.enable_progress_bar()
    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        export(run / "checkpoints" / "last.ckpt", tmp_path / "export")
    assert "Writing model shards" not in capfd.readouterr().err and hf_logging.is_progress_bar_enabled()
    lines = [record.getMessage() for record in caplog.records if record.name.startswith("unimodal")]
    assert any(line.startswith("exported ") for line in lines)
    assert not [line for line in lines if line.startswith(("model:", "LoRA r=", "initialised from"))], lines
    assert logging.getLogger("unimodal.train").level == logging.NOTSET  # the levels are put back


class Payload:
    """Unpickling this writes a file: what a hostile checkpoint could do instead."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_export_command_and_its_errors(run, tmp_path, capsys):
    assert unimodal_main(["export", str(run / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "x"), "--merge_lora"]) == 0
    assert unimodal_main(["export", str(run / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "x")]) == 2  # not empty
    # an occupied --out is refused before the checkpoint is read (here: before it is found missing)
    with pytest.raises(FileExistsError, match="x exists and is not empty; export to a new directory"):
        export(tmp_path / "missing.ckpt", tmp_path / "x")
    assert unimodal_main(["export", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "y")]) == 2
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, bare)
    with pytest.raises(ExportError, match="written by `unimodal train`"):
        export(bare, tmp_path / "z")
    # a checkpoint carrying a pickle payload is refused before anything in it runs
    marker = tmp_path / "ran"
    torch.save({"state_dict": {}, "payload": Payload(str(marker))}, tmp_path / "evil.ckpt")
    assert unimodal_main(["export", str(tmp_path / "evil.ckpt"), "--out", str(tmp_path / "v")]) == 2
    assert not marker.exists() and not (tmp_path / "v").exists()
    # a checkpoint written before a class moved names it; export says the new spelling
    old = tmp_path / "old.ckpt"
    spec = {"image": {"class_path": "unimodal.models.continuous.DiffusionImage", "init_args": {}}}
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "x.Module", "continuous": spec}, "unimodal_run_config": {}}, old)
    with pytest.raises(UserError, match="DiffusionImage is now unimodal.models.continuous.TokenDiffusionImage"):
        export(old, tmp_path / "w")


@pytest.mark.slow
def test_export_reads_deepspeed_checkpoint_directories(tmp_path, monkeypatch):
    import subprocess
    import sys

    from safetensors.torch import load_file

    from unimodal.checkpoints.zero import zero_to_fp32

    monkeypatch.setenv("UNIMODAL_DATA_HOME", str(tmp_path / "data"))
    run = tmp_path / "zero2"
    result = subprocess.run(
        [sys.executable, "-m", "unimodal.cli", "train", str(ROOT / "recipes" / "text" / "tiny.yaml"), "--tiny",
         "--trainer.strategy=deepspeed_stage_2", "--trainer.max_steps=2", f"--trainer.default_root_dir={run}"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert (checkpoint / "latest").is_file()
    with pytest.raises(UserError, match="--trust_checkpoint"):
        export(checkpoint, tmp_path / "refused")
    out = export(checkpoint, tmp_path / "export", trust_checkpoint=True)
    merged = torch.load(zero_to_fp32(checkpoint, tmp_path / "fp32.ckpt", trust=True), weights_only=False)["state_dict"]
    weights = load_file(str(out / "model.safetensors"))
    assert weights and all(torch.equal(v, merged[f"model.backbone.{k}"]) for k, v in weights.items())
    AutoModelForCausalLM.from_pretrained(out)

    def crash(obj, f, *args, **kwargs):  # a write cut short: a full disk, a killed process
        if isinstance(f, (str, Path)):
            Path(f).write_bytes(b"half a checkpoint")
        else:
            f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="No space left"):
        zero_to_fp32(checkpoint, tmp_path / "cut" / "fp32.ckpt", trust=True)
    assert list((tmp_path / "cut").iterdir()) == []  # no half file that a rerun would refuse to write over


def test_codec_directories_travel_inside_the_export_unless_large(tmp_path, monkeypatch):
    from unimodal.checkpoints import export as export_module

    small = tmp_path / "codec"
    small.mkdir()
    (small / "codec.json").write_text("{}")
    specs = {
        "audio": {"class_path": "x.Audio", "init_args": {"path": str(small), "max_seconds": 2.0}},
        "image": {"class_path": "x.Pixels", "init_args": {"size": 16}},
    }
    out = tmp_path / "export"
    out.mkdir()
    written = export_module._export_codecs(specs, out)
    assert written["audio"]["init_args"] == {"path": "codecs/audio", "max_seconds": 2.0}
    assert (out / "codecs" / "audio" / "codec.json").is_file() and written["image"] == specs["image"]
    assert specs["audio"]["init_args"]["path"] == str(small)  # the run's config is not changed

    monkeypatch.setattr(export_module, "COPY_CODEC_MB", 0)
    relative = tmp_path / "run"
    relative.mkdir()
    monkeypatch.chdir(tmp_path)
    big = export_module._export_codecs({"audio": {"class_path": "x.Audio", "init_args": {"path": "codec"}}}, relative)
    assert big["audio"]["init_args"]["path"] == str(small)  # too large to copy: named absolutely
    assert not (relative / "codecs").exists()


OLD_EXPORT = ROOT / "tests" / "fixtures" / "demo-export-a96b9df"


def test_an_export_written_before_the_restructuring_loads_and_draws():
    """The a96b9df demo export (format 1: training-module spec, old class names) loads without
    training code and answers as a model: a draw request gets a picture."""
    from unimodal.checkpoints.load import FORMAT, read_export_config
    from unimodal.inference.chat import load

    config = read_export_config(OLD_EXPORT)
    assert config["format"] == FORMAT and "_class_path" not in config["model"]
    assert config["model"]["continuous"]["image"]["class_path"] == "unimodal.models.continuous.TokenDiffusionImage"
    assistant = load(OLD_EXPORT, device="cpu")
    reply = assistant.chat([{"role": "user", "content": "Draw the digit seven."}], seed=0)
    assert [part.type for part in reply.parts] == ["image"]


def test_the_served_id_is_the_directory_as_typed(tmp_path):
    from unimodal.inference.chat import load

    link = tmp_path / "model"
    link.symlink_to(OLD_EXPORT.resolve())
    assert load(link, device="cpu").name == "model"  # not the directory the link points to
    assert load(f"{link}/", device="cpu", name="mine").name == "mine"


def test_an_old_export_of_another_module_is_refused_in_one_line(tmp_path):
    from unimodal.checkpoints.load import read_export_config

    config = json.loads((OLD_EXPORT / "unimodal.json").read_text())
    config["model"]["_class_path"] = "unimodal.training.seed_stages.SeedTokenizerStage2"
    (tmp_path / "unimodal.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"re-export its checkpoint with `unimodal export CKPT --out DIR`"):
        read_export_config(tmp_path)


def test_the_export_carries_the_processor_training_encoded_with(run, tmp_path):
    """processor.json restores the data module's Processor: the same ids, targets and features
    for a document with a role-tagged chat and an image, and no pickle anywhere in the export."""
    import numpy as np

    from unimodal.checkpoints.load import read_export_config
    from unimodal.data.datamodule import UnimodalDataModule

    out = export(run / "checkpoints" / "last.ckpt", tmp_path / "export")
    data = read_export_config(out)["processor"]
    assert data["feature_dim"] == 6 and data["seq_len"] == 128 and data["layout"]["code_ranges"] == {"image": 32}
    config = yaml.safe_load(next(run.glob("logs/version_*/config.yaml")).read_text())["data"]["init_args"]
    trained = UnimodalDataModule(**config).processor
    loaded = load_exported(out).processor
    doc = Document([
        Part("text", text="What is this?", role="user"),
        Part("image", media=0, data=np.ones((3, 6), np.float32), role="user"),
        Part("text", text="A square.", role="assistant"),
    ])
    a, b = trained.encode(doc), loaded.encode(doc)
    for field in ("ids", "modality", "target", "block", "continuous", "features"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not [f for f in out.rglob("*") if f.suffix in (".pkl", ".pickle", ".bin", ".pt")]


@pytest.mark.parametrize(
    ("codec", "needle"),
    [
        ({"class_path": "subprocess.Popen", "init_args": {"args": ["touch", "x"]}}, "unimodal's own classes only"),
        ({"class_path": "unimodal.modalities.DigitAudioCodec", "init_args": {"path": "pipe:curl http://x"}}, "local files only"),
        ({"class_path": "unimodal.modalities.DigitAudioCodec", "init_args": {"path": "https://example.com/c"}}, "local files only"),
    ],
)
def test_an_export_names_unimodal_classes_and_local_paths_only(tmp_path, codec, needle):
    from unimodal.checkpoints.load import read_export_config

    config = json.loads((OLD_EXPORT / "unimodal.json").read_text())
    config["data"]["codecs"]["audio"] = codec
    (tmp_path / "unimodal.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=needle):
        read_export_config(tmp_path)


def test_the_audio_limit_of_an_export_can_be_raised_at_load(tmp_path):
    from unimodal.inference.chat import ChatError, load

    assert load(OLD_EXPORT, device="cpu").codecs["audio"].max_seconds == 2.0  # what the export fixes
    assert load(OLD_EXPORT, device="cpu", max_audio_seconds=8).codecs["audio"].max_seconds == 8.0
    with pytest.raises(ChatError, match=r"max_audio_seconds must be in \(0, 600\]"):
        load(OLD_EXPORT, device="cpu", max_audio_seconds=10_000)


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda d: (d / "unimodal.json").write_text("{\n"), r"unimodal.json is not valid JSON \(Expecting"),
        (lambda d: (d / "unimodal.json").write_text("[]"), r"unimodal.json holds a JSON list, not an object"),
        (lambda d: (d / "codecs" / "audio" / "codec.json").write_text("{"), r"codec.json is not valid JSON"),
        (lambda d: (d / "codecs" / "audio" / "codebooks.npy").write_bytes((d / "codecs" / "audio" / "codebooks.npy").read_bytes()[:200]),
         r"codebooks.npy cannot be read as a plain .npy array"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\0" * 4), r"the weights in .*export cannot be read"),
        (lambda d: (d / "modules.safetensors").write_bytes(b"\1" * 40), r"modules.safetensors cannot be read"),
        (lambda d: (d / "tokenizer.model").write_bytes(b"not a tokenizer"), r"tokenizer.model cannot be read"),
        # a config.json of another architecture, or weights that lack a tensor: transformers would start
        # what is missing afresh with a warning, and the model would answer with random layers
        (lambda d: _edit_json(d / "config.json", num_hidden_layers=6), r"do not fill the LlamaForCausalLM .*model.layers.4"),
        (lambda d: _edit_json(d / "config.json", model_type="gpt2", architectures=["GPT2LMHeadModel"]), r"do not fill the GPT2LMHeadModel"),
        # sizes no weights could fill: transformers would allocate them all before any check, until memory ran out
        (lambda d: _edit_json(d / "config.json", num_hidden_layers=10**6), r"config.json declares a model of at least .* but its weights hold"),
        (lambda d: _edit_json(d / "config.json", intermediate_size=10**9), r"config.json declares a model of at least 128,[\d,]+ parameters"),
        (lambda d: _edit_json(d / "config.json", intermediate_size=10**9, moe_intermediate_size=1), r"config.json declares a model of at least 128,[\d,]+ parameters"),
        (lambda d: _edit_image_module(d, slots_per_item=10**9), r"image items are 1000000000 slots .* but its image codec writes 4"),
        (lambda d: _edit_image_module(d, head_width=10**6), r"model.continuous declares modules of at least .* values but modules.safetensors holds"),
        # building stops a few blocks in: all 10**7 would take hours, even on the meta device
        (lambda d: _edit_image_module(d, head_depth=10**7), r"model.continuous declares modules of at least .* values but modules.safetensors holds"),
        (lambda d: _edit_image_module(d, schedule={"class_path": "unimodal.models.diffusion.ScheduleConfig", "init_args": {"train_steps": 10**10}}),
         r"model.continuous.image: schedule.train_steps must be at most 100,000"),
        (lambda d: _drop_tensor(d / "model.safetensors", "model.norm.weight"), r"1 parameters missing, e.g. model.norm.weight"),
        (lambda d: _drop_tensor(d / "model.safetensors", "model.norm.weight", torch.ones(7)), r"do not have the shapes its config.json describes"),
        # a layout that is not the one the weights were trained with: the backbone would be resized to fit it
        (lambda d: _edit_json(d / "config.json", vocab_size=1280), r"the backbone has 1280 vocabulary rows but its vocabulary layout .* needs 1344"),
        (lambda d: _edit_layout(d, text_size=520), r"the tokenizer has 512 ids but its vocabulary layout .* has text_size 520"),
        (lambda d: _edit_layout(d, code_ranges={"image": 10**12, "audio": 512}), r"1344 vocabulary rows but its vocabulary layout .* needs 1000000001088"),
        (lambda d: _edit_layout(d, feature_sources="x"), r"vocabulary layout: feature_sources must be a mapping"),
        (lambda d: _edit_layout(d, code_sources={"audio": 3}), r"vocabulary layout: code_sources of \['audio'\] is not a codec fingerprint"),
        # settings of the wrong type: a model would run with seq_len "x", or read no audio layer
        (lambda d: _edit_json(d / "unimodal.json", data={**_json(d / "unimodal.json")["data"], "seq_len": "x"}),
         r"unimodal.json: seq_len is 'x', not a whole number >= 1"),
        (lambda d: _edit_json(d / "unimodal.json", data={**_json(d / "unimodal.json")["data"], "input_layers": {"audio": 0}}),
         r"unimodal.json: input_layers is \{'audio': 0\}, not an object of modality -> layers >= 1"),
        (lambda d: _edit_json(d / "unimodal.json", model={**_json(d / "unimodal.json")["model"], "backbone": {"bogus": 1}}),
         r"unimodal.json: model.backbone is not a backbone spec"),
        (lambda d: (d / "adapter").mkdir() or (d / "adapter" / "adapter_config.json").write_text("{}"),
         r"adapter cannot be read as a peft adapter \(KeyError"),
    ],
)
def test_a_damaged_export_file_is_one_line_naming_it(tmp_path, damage, needle):
    """A copy cut short or a file overwritten: the line names the file and what to do, where the
    library would raise from deep inside (JSONDecodeError, SafetensorError, a sentencepiece parse error)."""
    from unimodal.inference.chat import load

    shutil.copytree(OLD_EXPORT, tmp_path / "export")
    damage(tmp_path / "export")
    with pytest.raises(ValueError, match=needle) as caught:  # ExportError, or a codec's own ValueError
        load(tmp_path / "export", device="cpu")
    assert "\n" not in str(caught.value) and "copy the" in str(caught.value)


def test_export_reads_the_runs_relative_paths_where_it_trained(tmp_path, monkeypatch):
    """A run given relative paths records its data for a fine-tune's replay as they were meant
    where it trained, whatever directory export runs in."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("UNIMODAL_DATA_HOME", str(project / "data"))
    train = resolve("builtin:text/train")
    monkeypatch.chdir(project)
    data = Path(train).parent.relative_to(project)
    assert unimodal_main(["train", str(ROOT / "recipes" / "text" / "tiny.yaml"), "--tiny", "--trainer.default_root_dir=run",
                          f"--data.init_args.datasets=[{data / 'train'}]", f"--data.init_args.val_datasets=[{data / 'val'}]",
                          "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false"]) == 0
    monkeypatch.chdir(elsewhere)
    assert unimodal_main(["export", str(project / "run"), "--out", "export"]) == 0
    record = json.loads((elsewhere / "export" / "unimodal.json").read_text())["training_data"]
    assert record == {"datasets": [{"path": str(project / data / "train"), "weight": 1.0}],
                      "val_datasets": [{"path": str(project / data / "val"), "weight": 1.0}]}


def _json(file: Path) -> dict:
    return json.loads(file.read_text())


def _edit_json(file: Path, **changes: object) -> None:
    file.write_text(json.dumps({**_json(file), **changes}))


def _edit_image_module(export: Path, **changes: object) -> None:
    config = _json(export / "unimodal.json")
    config["model"]["continuous"]["image"]["init_args"].update(changes)
    _edit_json(export / "unimodal.json", model=config["model"])


def _edit_layout(export: Path, **changes: object) -> None:
    config = _json(export / "unimodal.json")
    _edit_json(export / "unimodal.json", layout={**config["layout"], **changes})


def _drop_tensor(file: Path, name: str, replacement: torch.Tensor | None = None) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(file))
    del weights[name]
    if replacement is not None:
        weights[name] = replacement
    save_file(weights, str(file), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda d: _edit_json(d / "unimodal.json", data={**_json(d / "unimodal.json")["data"], "codecs": {
            "audio": {"class_path": "unimodal.modalities.DigitAudioCodec", "init_args": {"bogus": 1}}}}),
         r"export: the audio codec: .*Option 'bogus' is not accepted"),
        (lambda d: _edit_json(d / "unimodal.json", model={**_json(d / "unimodal.json")["model"], "continuous": {
            "image": {"class_path": "unimodal.models.LinearAdapter", "init_args": {"feature_dim": "wide"}}}}),
         r"unimodal.json: model.continuous.image: .*Expected a <class 'int'>. Got value: wide"),
        (lambda d: _edit_layout(d, code_ranges={"image": "256", "audio": 512}), r"vocabulary layout: not a layout \(TypeError"),
    ],
)
def test_a_spec_of_the_wrong_kind_is_one_line_naming_where(tmp_path, damage, needle):
    """Not jsonargparse's ArgumentError about its own ``--value`` argument, nor a TypeError."""
    shutil.copytree(OLD_EXPORT, tmp_path / "export")
    damage(tmp_path / "export")
    with pytest.raises(ValueError, match=needle) as caught:
        load_exported(tmp_path / "export")
    assert "\n" not in str(caught.value) and "--value" not in str(caught.value)


def test_code_an_export_names_is_never_run_nor_offered(tmp_path, monkeypatch):
    """transformers asks on stdin whether to run the code an ``auto_map`` names; an export is data,
    so the answer is no without asking, and a pickled weight file is refused."""
    import builtins
    import subprocess
    import sys

    monkeypatch.setattr(builtins, "input", lambda *a: pytest.fail("asked whether to run an export's code"))
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').close()\nclass Evil: pass\n"

    model = tmp_path / "model"
    shutil.copytree(OLD_EXPORT, model)
    _edit_json(model / "config.json", model_type="evil", auto_map={"AutoConfig": "evil.Evil", "AutoModelForCausalLM": "evil.Evil"})
    (model / "evil.py").write_text(code)
    with pytest.raises(ValueError, match="names model code of its own"):
        load_exported(model)

    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(OLD_EXPORT, tokenizer)
    (tokenizer / "tk").mkdir()
    (tokenizer / "tk" / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.Evil", None]}}))
    (tokenizer / "tk" / "evil.py").write_text(code)
    _edit_json(tokenizer / "unimodal.json", tokenizer="tk")
    with pytest.raises(ValueError, match="names tokenizer code of its own"):
        load_exported(tokenizer)

    pickled = tmp_path / "pickled"
    shutil.copytree(OLD_EXPORT, pickled)
    (pickled / "adapter").mkdir()
    (pickled / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}))
    payload = f"import torch\nclass P:\n    def __reduce__(self): return (open, ({str(marker)!r}, 'w'))\ntorch.save({{'x': P()}}, {str(pickled / 'adapter' / 'adapter_model.bin')!r})"
    subprocess.run([sys.executable, "-c", payload], check=True)
    with pytest.raises(ExportError, match="could run code when loaded") as caught:
        load_exported(pickled)
    assert "weights_only" not in str(caught.value)
    assert not marker.exists()


def test_replacing_an_export_keeps_the_old_one_until_the_new_one_is_whole(tmp_path, monkeypatch):
    import os

    from unimodal.checkpoints.files import staged_directory

    out = tmp_path / "model"
    out.mkdir()
    (out / "unimodal.json").write_text("old")
    with pytest.raises(RuntimeError, match="killed"):  # an export that fails on the way
        with staged_directory(out, replace=True) as staging:
            (staging / "unimodal.json").write_text("new")
            raise RuntimeError("killed")
    assert (out / "unimodal.json").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    real_replace = os.replace

    def crash_moving_in(source, target):  # killed as the new export is moved into place
        if str(source).endswith(".partial"):
            raise KeyboardInterrupt
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", crash_moving_in)
    monkeypatch.setattr(Path, "rename", lambda self, target: crash_moving_in(self, target) or Path(target))
    with pytest.raises(KeyboardInterrupt):
        with staged_directory(out, replace=True) as staging:
            (staging / "unimodal.json").write_text("new")
    assert not out.exists() and (tmp_path / ".model.previous" / "unimodal.json").read_text() == "old"  # whole, set aside
    monkeypatch.undo()
    with staged_directory(out, replace=True) as staging:
        (staging / "unimodal.json").write_text("new")
    assert (out / "unimodal.json").read_text() == "new" and not (tmp_path / ".model.previous").exists()
    (tmp_path / ".model.previous").mkdir()  # left by a crash after the new one was moved in
    (tmp_path / ".model.previous" / "unimodal.json").write_text("older")
    (tmp_path / "model-previous").mkdir()  # a directory of the user's, whatever its name, is never touched
    (tmp_path / "model-previous" / "mine.txt").write_text("mine")
    with staged_directory(out, replace=True) as staging:
        (staging / "unimodal.json").write_text("newer")
    assert (out / "unimodal.json").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model-previous"]
    with staged_directory(tmp_path / "fresh", replace=False) as staging:  # nothing to set aside: nothing removed
        (staging / "unimodal.json").write_text("first")
    assert (tmp_path / "model-previous" / "mine.txt").read_text() == "mine"


def test_two_writers_of_one_export_directory_are_refused(tmp_path):
    """They would share the staging directory: one's files would land in the other's export."""
    from unimodal.checkpoints.files import staged_directory
    from unimodal.locks import run_lock

    out = tmp_path / "model"
    with run_lock(out.absolute(), "write to another directory"):  # the other export, still writing
        with pytest.raises(UserError, match="model is in use by another run .*; wait for it to end, or write to another directory"):
            with staged_directory(out, replace=False):
                pass
    assert not out.exists()


@pytest.mark.parametrize("where", ["codec", "continuous", "nested"])
def test_an_export_cannot_name_a_module_to_import_as_a_string(tmp_path, monkeypatch, where):
    """jsonargparse imports ``module.Name`` given as a string where a class is expected; from a
    working directory (a notebook beside the export) that runs any ``module.py`` there."""
    marker = tmp_path / "ran"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Thing: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    export = tmp_path / "export"
    shutil.copytree(OLD_EXPORT, export)
    config = _json(export / "unimodal.json")
    if where == "codec":
        config["data"]["codecs"]["audio"] = "evilmod.Thing"
    else:
        config["model"]["continuous"] = {"image": "evilmod.Thing" if where == "continuous" else {
            "class_path": "unimodal.models.TokenDiffusionImage", "init_args": {"feature_dim": 64, "schedule": "evilmod.Thing"}}}
    (export / "unimodal.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="names 'evilmod.Thing', which would be imported as code"):
        load_exported(export)
    assert not marker.exists()


@pytest.mark.parametrize("hparams", [{"_class_path": "evilmod.Thing"},
                                     {"_class_path": "unimodal.training.UnimodalModule", "continuous": {"image": "evilmod.Thing"}},
                                     {"_class_path": "unimodal.training.UnimodalModule", "generation": {"x": {"class_path": "evilmod.Thing"}}},
                                     {"_class_path": "unimodal.training.UnimodalModule", "vocab": {"x": {"class_path": "evilmod.Thing"}}}])
def test_a_checkpoint_cannot_name_a_module_to_import(tmp_path, monkeypatch, hparams):
    """A checkpoint is read as tensors and plain values; the classes its hyperparameters name are
    imported to rebuild the module, so they too are unimodal's own only: in an argument typed
    ``Any`` too, where jsonargparse imports and builds a ``{class_path}``."""
    marker = tmp_path / "ran"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Thing: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    checkpoint = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": hparams, "unimodal_run_config": {}}, checkpoint)
    with pytest.raises(ExportError, match="names (the class )?'evilmod.Thing'(, which would be imported as code)?; a checkpoint may"):
        export(checkpoint, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_file_name_in_a_spec_is_not_taken_for_a_module(tmp_path):
    """``init_from: orthus_modules.safetensors`` (a run started beside the file, docs/orthus.md) is
    a path: no module ``orthus_modules`` exists to import, so its checkpoint and export stay readable."""
    continuous = {"image": {"class_path": "unimodal.models.TokenDiffusionImage",
                            "init_args": {"feature_dim": 64, "init_from": "orthus_modules.safetensors"}}}
    check_untrusted({"continuous": continuous}, tmp_path / "unimodal.json", code_strings=True)
    _check_classes({"_class_path": "unimodal.training.UnimodalModule", "continuous": continuous}, tmp_path / "last.ckpt")
    with pytest.raises(ExportError, match="'os.system', which would be imported as code"):
        check_untrusted({"continuous": {"image": "os.system"}}, tmp_path / "unimodal.json", code_strings=True)


THROUGH_GLOBALS = "unimodal.checkpoints.files.os.system"  # starts with unimodal., and is os.system


@pytest.mark.parametrize("where", ["continuous", "codec", "nested"])
def test_an_export_cannot_reach_a_function_through_a_unimodal_module(tmp_path, where):
    """jsonargparse follows a class path through a module's globals and calls what it finds, a
    function for a factory type included: ``unimodal.x.os.system`` with ``init_args.command``."""
    marker = tmp_path / "ran"
    spec = {"class_path": THROUGH_GLOBALS, "init_args": {"command": f"touch {marker}"}}
    export = tmp_path / "export"
    shutil.copytree(OLD_EXPORT, export)
    config = _json(export / "unimodal.json")
    if where == "codec":
        config["data"]["codecs"]["image"] = spec
    elif where == "continuous":
        config["model"]["continuous"] = {"image": spec}
    else:  # where the top-level class is unimodal's own
        config["model"]["continuous"] = {"image": {"class_path": "unimodal.models.TokenDiffusionImage",
                                                   "init_args": {"feature_dim": 64, "schedule": spec}}}
    (export / "unimodal.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"'{THROUGH_GLOBALS}'(; an export may| is not a (ContinuousModality|MediaCodec) of unimodal's)"):
        load_exported(export)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["continuous", "generation"])
def test_a_checkpoint_cannot_reach_a_function_through_a_unimodal_module(run, tmp_path, where):
    marker = tmp_path / "ran"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    key = "image" if where == "continuous" else "x"
    checkpoint["hyper_parameters"][where] = {key: {"class_path": THROUGH_GLOBALS, "init_args": {"command": f"touch {marker}"}}}
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    assert unimodal_main(["export", str(tmp_path / "evil.ckpt"), "--out", str(tmp_path / "out")]) == 2
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_checkpoint_without_its_frozen_weights_is_refused_in_one_line(run, tmp_path, capsys):
    """What a DeepSpeed checkpoint saved with exclude_frozen_parameters merges to: the trained
    weights only. Export stopped with torch's traceback listing every missing key."""
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if "lora_" in k or "token_adapter.trainable" in k}
    torch.save(checkpoint, tmp_path / "trained-only.ckpt")
    assert unimodal_main(["export", str(tmp_path / "trained-only.ckpt"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exclude_frozen_parameters" in err and "more" in err, err
    assert not (tmp_path / "out").exists()
