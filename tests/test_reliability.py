"""Expected failures end in one line on stderr and an exit status, never a traceback (issue 14)."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "text" / "tiny.yaml"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=0"]


def unimodal(*args: str) -> tuple[int, list[str]]:
    """Run the command as a user does; its exit status and its error lines (no traceback allowed)."""
    done = subprocess.run([sys.executable, "-m", "unimodal", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, [line for line in done.stderr.splitlines() if ": error: " in line]


def test_a_wrong_recipe_key_names_the_key_and_its_near_matches(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(RECIPE.read_text().replace("max_steps:", "max_stepz:"))
    code, (line,) = unimodal("train", str(recipe), "--tiny")
    assert code == 2 and "'max_stepz'" in line and "did you mean --trainer.max_steps" in line
    code, (line,) = unimodal("train", str(RECIPE), "--tiny", "--trainer.max_stepz=3")
    assert code == 2 and "did you mean --trainer.max_steps" in line


def test_a_wrong_argument_of_a_recipe_class_names_the_class_and_its_near_matches(tmp_path):
    """Inside model and data, where jsonargparse's own message drops the suggestion or the key."""
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(RECIPE.read_text().replace("seq_len:", "seq_lenn:"))
    code, (line,) = unimodal("train", str(recipe), "--tiny")
    assert code == 2 and line.endswith(f"recipe {recipe}: data.init_args.seq_lenn: UnimodalDataModule takes no argument 'seq_lenn' "
                                       "(did you mean 'seq_len'?)")
    code, (line,) = unimodal("train", str(RECIPE), "--tiny", "--model.init_args.optimizer.lrr=1")
    assert code == 2 and line.endswith("--model.init_args.optimizer.lrr: OptimizerConfig takes no argument 'lrr' (did you mean 'lr'?)")
    orthus = ROOT / "recipes" / "orthus" / "base.yaml"  # a class in a mapping of classes
    code, (line,) = unimodal("train", str(orthus), "--tiny", "--model.init_args.continuous.image.init_args.head_widht=8")
    assert code == 2 and "TokenDiffusionImage takes no argument 'head_widht' (did you mean 'head_width'" in line


def test_a_class_path_typo_says_what_does_not_import(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(RECIPE.read_text().replace("unimodal.data.UnimodalDataModule", "unimodal.data.UnimodalDataModul"))
    code, (line,) = unimodal("train", str(recipe), "--tiny")
    assert code == 2 and "has no attribute 'UnimodalDataModul' (did you mean UnimodalDataModule?)" in line


def test_a_recipe_or_pipeline_that_is_not_yaml_is_one_line_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text(f'seed_everything: !!python/object/apply:os.system ["touch {marker}"]\n')
    code, (line,) = unimodal("train", str(tagged))
    assert code == 2 and f"recipe {tagged}:1:18: not valid YAML (could not determine a constructor" in line and not marker.exists()
    broken = tmp_path / "broken.yaml"
    broken.write_text("stages:\n  - name: [a,\n")
    code, (line,) = unimodal("pipeline", str(broken))
    assert code == 2 and line.startswith(f"unimodal pipeline: error: pipeline {broken}:3:1: not valid YAML (")
    code, (line,) = unimodal("train", str(ROOT / "recipes" / "orthus"))
    assert code == 2 and line.endswith("recipes/orthus is a directory; give a YAML file in it")


def test_a_recipe_whose_aliases_expand_without_bound_or_nested_too_deep_is_one_line(tmp_path):
    """Ten aliases of ten aliases, eight times over, are 10**9 values from ten lines: copied, dumped
    and parsed again after loading, they took hours and all memory. 50,000 nested brackets ended
    in PyYAML's RecursionError traceback."""
    deep = tmp_path / "deep.yaml"
    deep.write_text("model: " + "[" * 50_000 + "]" * 50_000 + "\n")
    code, (line,) = unimodal("train", str(deep))
    assert code == 2 and line.endswith(f"recipe {deep}: nested too deeply to read as YAML")
    anchors = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    anchors += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(RECIPE.read_text() + "laughs:\n  " + "\n  ".join(anchors) + "\n")
    for verb, what in (("train", "recipe"), ("pipeline", "pipeline")):
        code, (line,) = unimodal(verb, str(bomb), "--tiny")
        assert code == 2 and line.endswith(f"{what} {bomb}: holds more than 100,000 values, its aliases (*name) counted as they "
                                           "expand, which every later step would copy; a recipe holds a few hundred")
    config = tmp_path / "extra.yaml"
    config.write_text("laughs:\n  " + "\n  ".join(anchors) + "\ntrainer:\n  plugins: *a8\n")
    code, (line,) = unimodal("train", str(RECIPE), "--tiny", f"--config={config}", "--print_config")
    assert code == 2 and f"--config {config}: holds more than 100,000 values" in line
    # every verb reads --config, as a file or as YAML text
    inline = "{" + ", ".join(anchors) + ", max_batch: *a8}"
    for argv in (["serve", "--config", str(config)], ["data", "pack", f"--config={config}"], ["chat", "--config", inline]):
        code, (line,) = unimodal(*argv)
        assert code == 2 and "holds more than 100,000 values" in line, (argv, line)


def test_a_loss_weight_for_a_term_that_does_not_exist_is_refused_naming_the_terms(tmp_path):
    """A misspelt term weighed nothing, and the term it meant stayed at 1, without a word."""
    code, (line,) = unimodal("train", str(RECIPE), "--tiny", f"--trainer.default_root_dir={tmp_path}",
                             "--model.init_args.loss_weights={ce/txet: 2}", *QUIET)
    assert code == 2 and line.endswith("loss_weights: 'ce/txet' is not a loss term (did you mean 'ce/text'?); "
                                       "terms are KIND/MODALITY: ce/text, ce/image, ce/audio")
    from unimodal.training.module import _check_loss_weights

    for name in ("diffuson/image", "diffusion/image"):  # a misspelt kind, and a head the model does not have
        with pytest.raises(ValueError, match=f"loss_weights: '{name}' is not a loss term"):
            _check_loss_weights({name: 2.0}, continuous={})
    _check_loss_weights({"diffusion/image": 2.0, "ce/text": 1.0}, continuous={"image": object()})


def test_a_backend_this_machine_lacks_is_one_line(tmp_path):
    from unimodal.models.attention import xformers_available

    if xformers_available():
        pytest.skip("this machine has xformers on CUDA")
    code, (line,) = unimodal("train", str(RECIPE), "--tiny", f"--trainer.default_root_dir={tmp_path}",
                             "--model.init_args.backbone.attention=xformers", *QUIET)
    assert code == 2 and line.endswith("needs CUDA and the xformers package (pip install 'unimodal[gpu]'); use attention: auto or sdpa")


def test_a_misspelt_strategy_gets_its_near_matches(tmp_path):
    code, (line,) = unimodal("train", str(RECIPE), "--tiny", f"--trainer.default_root_dir={tmp_path}",
                             "--trainer.strategy=deepspeed_stage3", *QUIET)
    assert code == 2 and line.endswith("--trainer.strategy: 'deepspeed_stage3' is not a strategy "
                                       "(did you mean 'deepspeed_stage_3' or 'deepspeed_stage_2'?); docs/training.md lists them")


def test_a_second_run_in_the_same_directory_is_refused_while_the_first_runs(tmp_path):
    """Both would write last.ckpt, and the steps of one would be lost."""
    from unimodal.locks import run_lock

    with run_lock(tmp_path / "checkpoints"):
        code, (line,) = unimodal("train", str(RECIPE), "--tiny", f"--trainer.default_root_dir={tmp_path}", *QUIET)
    assert code == 2 and line.endswith(f"{tmp_path / 'checkpoints'} is in use by another run (pid {os.getpid()} on {os.uname().nodename}); "
                                       "wait for it to end, or give this one another --trainer.default_root_dir")
    assert not (tmp_path / "checkpoints").exists()
    code, _ = unimodal("train", str(RECIPE), "--tiny", "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path}", *QUIET)
    assert code == 0  # the lock ends with its holder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    code, _ = unimodal("train", str(RECIPE), "--tiny", "--trainer.max_steps=2", f"--trainer.default_root_dir={run}", *QUIET)
    assert code == 0
    return run / "checkpoints" / "last.ckpt"


def test_a_truncated_checkpoint_is_one_line(checkpoint, tmp_path):
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(checkpoint.read_bytes()[:50_000])
    code, (line,) = unimodal("export", str(cut), "--out", str(tmp_path / "export"))
    assert code == 2 and "truncated or not a checkpoint" in line and not (tmp_path / "export").exists()


def test_a_checkpoint_of_another_model_is_one_line(checkpoint, tmp_path):
    other = ["--model.init_args.backbone.config.num_hidden_layers=3", f"--ckpt_path={checkpoint}"]
    code, (line,) = unimodal("train", str(RECIPE), "--tiny", f"--trainer.default_root_dir={tmp_path}", *other, *QUIET)
    assert code == 2 and "does not fit this recipe's model: Missing key(s) in state_dict: " in line
    assert line.endswith("and 6 more")  # the third layer's 9 tensors: three named, the rest counted


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_fifo_or_a_device_given_as_a_checkpoint_is_named_as_such(tmp_path):
    """They were called a directory that is not a checkpoint (``--ckpt_path``), or missing (export)."""
    from unimodal.checkpoints.export import checkpoint_file
    from unimodal.errors import UserError
    from unimodal.training.recipes import check_given_checkpoint

    os.mkfifo(tmp_path / "pipe.ckpt")
    for path in (tmp_path / "pipe.ckpt", Path("/dev/zero")):
        with pytest.raises(UserError, match="is not a regular file; --ckpt_path takes a .ckpt file or a sharded checkpoint directory"):
            check_given_checkpoint(path, trust=False)
        with pytest.raises(UserError, match="is not a regular file; give a .ckpt file, a checkpoint directory or a run directory"):
            checkpoint_file(path, tmp_path)


def test_a_checkpoint_given_to_ckpt_path_runs_no_code(checkpoint, tmp_path):
    """``--ckpt_path`` may name anyone's file: a pickle payload is refused in one line before it
    runs, and a sharded directory (whose files DeepSpeed and torch.distributed.checkpoint read
    with pickle) needs ``--trust_checkpoint``."""
    import torch

    marker = tmp_path / "ran"
    state = torch.load(checkpoint, weights_only=True)
    state["payload"] = _Payload(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(state, evil)
    run = f"--trainer.default_root_dir={tmp_path / 'run'}"
    code, (line,) = unimodal("train", str(RECIPE), "--tiny", "--trainer.max_steps=3", run, f"--ckpt_path={evil}", *QUIET)
    assert code == 2 and "holds objects other than tensors and plain values" in line and "GLOBAL" in line
    assert not marker.exists()

    sharded = tmp_path / "sharded.ckpt"
    (sharded / "checkpoint").mkdir(parents=True)
    (sharded / "latest").write_text("checkpoint")
    torch.save({"payload": _Payload(marker)}, sharded / "checkpoint" / "mp_rank_00_model_states.pt")
    code, (line,) = unimodal("train", str(RECIPE), "--tiny", "--trainer.max_steps=3", run, f"--ckpt_path={sharded}", *QUIET)
    assert code == 2 and "is a sharded checkpoint directory" in line and "--trust_checkpoint" in line
    assert not marker.exists()


def test_data_that_yields_nothing_is_one_line(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "shard-000000.tar").write_bytes(b"")
    data = [f"--data.init_args.datasets=[{tmp_path / 'shards'}]", "--data.init_args.val_datasets=null"]
    code, (line,) = unimodal("train", str(RECIPE), "--tiny", f"--trainer.default_root_dir={tmp_path / 'run'}", *data, *QUIET)
    assert code == 2 and "yields no samples" in line and "unimodal data inspect" in line


def test_batches_with_nothing_to_score_are_not_a_loss_of_zero(tmp_path):
    """Chat records cut into 8-token pieces leave pieces without an assistant turn: such a batch
    logged train/loss 0 and the validation set val/loss 0, which read as perfect scores. Its loss
    is NaN, not missing: Lightning would log the last step's value again."""
    import csv

    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "unimodal", "train", str(ROOT / "recipes" / "lora" / "chat_sft.yaml"), "--tiny", "--trainer.max_steps=3",
         "--data.init_args.seq_len=8", f"--trainer.default_root_dir={run}", "--trainer.enable_progress_bar=false"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("has no target to score") == 2  # once for training, once for validation
    assert '"loss": false' in done.stderr and "seq_len=8 leave pieces without an assistant turn (raise seq_len)" in done.stderr
    with next(run.glob("logs/version_*/metrics.csv")).open() as f:
        rows = list(csv.DictReader(f))
    train = [float(row["train/loss"]) for row in rows if row.get("train/loss")]
    assert len(train) == 3 and any(math.isnan(v) for v in train) and all(v > 0 for v in train if not math.isnan(v))
    assert [row["val/loss"] for row in rows if row.get("val/loss")] == ["nan"]


def test_a_missing_dataset_path_is_its_own_one_line(tmp_path):
    """The data module is built for the link that sizes the model's vocabulary: its error came
    wrapped in the link's name and the data module's four-line repr."""
    missing = tmp_path / "nothing-here"
    code, (line,) = unimodal("train", str(RECIPE), "--tiny", f"--trainer.default_root_dir={tmp_path / 'run'}",
                             f"--data.init_args.val_datasets=[{{path: {missing}}}]", *QUIET)
    assert code == 2 and line == f"unimodal train: error: {missing} does not exist (a folder of .tar shards, a shard or a brace pattern)"
    source = tmp_path / "mine.jsonl"  # a source file given where shards go: said before any step or validation
    source.write_text('{"parts": [{"type": "text", "text": "hi"}]}\n')
    code, (line,) = unimodal("train", str(RECIPE), "--tiny", f"--trainer.default_root_dir={tmp_path / 'run2'}",
                             f"--data.init_args.datasets=[{source}]", *QUIET)
    assert code == 2 and line == (f"unimodal train: error: {source} is a source JSONL, not shards: pack it first "
                                  f"(unimodal data pack {source} --out DIR) and give DIR")


def test_a_worker_reading_nothing_but_bad_samples_stops_the_run_in_one_line(tmp_path):
    """Every sample is broken and a DataLoader worker reads them: the worker stops after
    ``STALLED`` in a row (it never yields a batch that could report them), and the error raised
    again in the training process is still one line."""
    import io
    import tarfile

    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "shard-000000.tar", "w") as tar:
        for i in range(50):
            info = tarfile.TarInfo(f"doc{i:04d}.json")
            info.size = 9
            tar.addfile(info, io.BytesIO(b"{not json"))
    data = [f"--data.init_args.datasets=[{tmp_path / 'shards'}]", "--data.init_args.val_datasets=null", "--data.init_args.num_workers=1"]
    code, (line,) = unimodal("train", str(RECIPE), "--tiny", f"--trainer.default_root_dir={tmp_path / 'run'}", *data, *QUIET)
    assert code == 2 and "1000 bad samples in a row, the last in " in line and "shard-000000.tar" in line


def test_hostile_media_is_refused_from_its_header(tmp_path):
    """A 140 KB PNG declaring 12000x12000 pixels, a 33 KB FLAC declaring 700 s and one declaring
    eight channels at 655 kHz are refused before they are decoded; a 2 KB PNG of 2,000,000 x 1
    pixels is encoded in the memory of its central square."""
    import io

    import numpy as np
    import soundfile
    from PIL import Image

    from unimodal.data.media import MediaBytes, decode_media
    from unimodal.schema import DocumentError

    png = io.BytesIO()
    Image.new("L", (12000, 12000)).save(png, format="PNG")
    with pytest.raises(DocumentError, match="12000x12000 image is over the 16777216 pixels allowed"):
        decode_media(MediaBytes("png", png.getvalue()), "image", "request")
    flac = io.BytesIO()
    soundfile.write(flac, np.zeros(16000 * 700, np.float32), 16000, format="FLAC")
    with pytest.raises(DocumentError, match="700 s of audio is over the 600 s any clip may have"):
        decode_media(MediaBytes("flac", flac.getvalue()), "audio", "request")
    flac = io.BytesIO()
    with soundfile.SoundFile(flac, "w", samplerate=655350, channels=8, format="FLAC", subtype="PCM_16") as file:
        for _ in range(12):
            file.write(np.zeros((655350, 8), np.int16))
    with pytest.raises(DocumentError, match="12 s of 8-channel audio at 655350 Hz is 62913600 samples, over the 57600000 a clip may hold"):
        decode_media(MediaBytes("flac", flac.getvalue()), "audio", "request")
    assert len(flac.getvalue()) < 200_000


def test_a_tiny_png_of_extreme_shape_is_encoded_in_the_memory_of_its_central_square():
    """A 2 KB PNG of 2,000,000 x 1 pixels, within the pixel limit: resized whole to a 256-pixel
    short side it took gigabytes (a 500 from the server, a traceback from training)."""
    code = ("import io\nfrom PIL import Image\nfrom unimodal.data.media import MediaBytes, decode_media\n"
            "from unimodal.modalities.image_continuous import ImageTransform\n"
            "wide = io.BytesIO()\nImage.new('L', (2_000_000, 1), 255).save(wide, format='PNG')\nassert len(wide.getvalue()) < 5000\n")
    baseline = peak_rss_mb(code + "pixels = decode_media(MediaBytes('png', wide.getvalue()), 'image', 'request')")
    used = peak_rss_mb(code + "pixels = ImageTransform(256)(decode_media(MediaBytes('png', wide.getvalue()), 'image', 'request'))\n"
                              "assert pixels.shape == (3, 256, 256) and bool((pixels == 1.0).all())")
    assert used - baseline < 100, (baseline, used)


def peak_rss_mb(code: str) -> float:
    script = f"import resource\nimport numpy as np\nfrom unimodal.modalities.audio import resample\n{code}\n" \
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300, check=True)
    return float(done.stdout.split()[-1])


def test_resampling_memory_does_not_follow_the_ratio_of_the_rates():
    """One second at 4001 Hz (rates that share no factor) to 16 kHz: at most 200 MB more than
    the same process without it."""
    baseline = peak_rss_mb("x = np.zeros(4001, np.float32)")
    used = peak_rss_mb("x = resample(np.random.default_rng(0).standard_normal(4001).astype(np.float32), 4001, 16000)")
    assert used - baseline < 200, (baseline, used)


def test_both_resampling_paths_agree():
    import numpy as np

    from unimodal.modalities import audio

    x = np.random.default_rng(0).standard_normal(22050).astype(np.float32)
    phases = audio.resample(x, 22050, 16000)
    direct = audio._resample_direct(x, 22050, 16000, 0.5 * 16000 / 22050 * 0.97, 23)
    np.testing.assert_allclose(direct, phases, atol=1e-5)


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    import errno

    from lightning.fabric.plugins import TorchCheckpointIO

    from unimodal.cli import main

    def full(self, checkpoint, path, storage_options=None):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", full)
    run = tmp_path / "run"
    code = main(["train", str(ROOT / "recipes/text/tiny.yaml"), "--trainer.max_steps=2", "--checkpoint_every_n_steps=1",
                 "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={run}"])
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if ": error: " in line]
    assert "Traceback" not in err
    assert code == 1 and line.startswith("unimodal train: error: No space left on device: ") and "epoch=0-step=1.ckpt" in line
    assert ".tmp-" not in line and not list((run / "checkpoints").iterdir())


def test_an_output_path_under_a_file_and_a_binary_recipe_are_one_line_each(tmp_path, capsys):
    from unimodal.cli import main

    afile = tmp_path / "notes.txt"
    afile.write_text("a file, not a directory")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"model:\n  \xd0\x00\xff\xfe")
    runs = [
        (["train", str(RECIPE), "--tiny", f"--trainer.default_root_dir={afile}/run"], f"Not a directory: {afile}",
         "a part of this path is a file, not a directory"),
        (["pipeline", str(ROOT / "recipes/pipelines/text.yaml"), "--tiny", "--root", f"{afile}/p"], f"Not a directory: {afile}",
         "a part of this path is a file, not a directory"),
        (["train", str(binary)], f"recipe {binary}: not a UTF-8 text file (byte 9)", "give a YAML recipe"),
        (["pipeline", str(binary)], f"pipeline {binary}: not a UTF-8 text file (byte 9)", "give a YAML recipe"),
    ]
    for argv, reason, hint in runs:
        code = main(argv)
        err = capsys.readouterr().err
        assert code in (1, 2) and "Traceback" not in err, err
        (line,) = [line for line in err.splitlines() if ": error: " in line]
        assert reason in line and hint in line, line


def _mount_tmpfs(where: Path, *options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(["size=4m", *options]), "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounts a file system and changes user: needs root")
def test_a_read_only_or_forbidden_checkpoint_directory_is_one_line(tmp_path):
    """Probed for real: a read-only file system under the checkpoints (EROFS), and a run
    directory its user may not write (EACCES, run as `nobody`). One line, exit status 1, naming
    the checkpoint rather than its temporary file."""
    checkpoints = tmp_path / "ro-run" / "checkpoints"
    if not _mount_tmpfs(checkpoints, "ro"):
        pytest.skip("mount is not permitted here")
    try:
        code, (line,) = unimodal("train", str(RECIPE), "--tiny", "--trainer.max_steps=2", "--checkpoint_every_n_steps=1",
                                 f"--trainer.default_root_dir={tmp_path / 'ro-run'}", *QUIET)
    finally:
        subprocess.run(["umount", str(checkpoints)], check=True)
    assert code == 1 and line.startswith("unimodal train: error: Read-only file system: ")
    assert line.split(": ")[3].startswith(f"{checkpoints}/epoch=0-step=1.ckpt")

    with tempfile.TemporaryDirectory(prefix="unimodal-nobody-") as where:  # pytest's own are root's alone
        home = Path(where)
        home.chmod(0o777)  # nobody may build the data here, but not write the root-owned run directory
        (home / "run").mkdir(mode=0o755)
        env = {**os.environ, "HOME": str(home), "UNIMODAL_DATA_HOME": str(home / "data")}
        done = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "unimodal", "train",
             str(RECIPE), "--tiny", "--trainer.max_steps=2", f"--trainer.default_root_dir={home / 'run'}", *QUIET],
            capture_output=True, text=True, cwd=ROOT, timeout=300, env=env,
        )
    (line,) = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert "Traceback" not in done.stderr and done.returncode == 1
    assert line.startswith("unimodal train: error: Permission denied: ") and str(home / "run") in line


def test_a_pipe_shard_url_runs_nothing_unless_the_recipe_opts_in(tmp_path):
    """A `pipe:` URL is a shell command to WebDataset: refused by default, for a recipe, a data
    verb or a path read from anywhere else."""
    from unimodal.data.datamodule import UnimodalDataModule
    from unimodal.data.shards import expand_shards, read_documents

    marker = tmp_path / "ran"
    url = f"pipe:touch {marker}; cat /dev/null"
    with pytest.raises(ValueError, match="runs a shell command; refused unless the recipe sets data.init_args.allow_pipe_urls"):
        list(read_documents(url))
    data = UnimodalDataModule([url], tokenizer="unused.model")
    with pytest.raises(ValueError, match="allow_pipe_urls"):
        data.setup("fit")
    # hidden behind a shard, in a brace pattern or after "::", which WebDataset splits
    from unimodal.data.shards import write_documents
    from unimodal.schema import Document, Part

    write_documents([Document([Part("text", text="x")], key="k")], tmp_path / "shards")
    shard = tmp_path / "shards" / "shard-000000.tar"
    for spec in (f"{shard}::{url}", f"{{{shard},{url}}}"):
        with pytest.raises(ValueError, match="runs a shell command"):
            list(read_documents(spec))
    code, (line,) = unimodal("data", "fit-codec", f"{{{shard},{url}}}", "--codec", "patch-vq", "--out", str(tmp_path / "codec"))
    assert code == 2 and "runs a shell command" in line
    assert not marker.exists()
    assert expand_shards(url, allow_pipe=True) == [url]  # opted in: handed to WebDataset as it is
    # a FIFO named like a shard would block its reader for ever
    os.mkfifo(tmp_path / "shards" / "z.tar")
    with pytest.raises(ValueError, match="z.tar is not a regular file"):
        expand_shards(tmp_path / "shards")
    os.unlink(tmp_path / "shards" / "z.tar")
    os.symlink(tmp_path / "gone.tar", tmp_path / "shards" / "y.tar")
    with pytest.raises(FileNotFoundError, match="y.tar is a link to nothing"):
        expand_shards(tmp_path / "shards")


def test_an_image_is_opened_with_the_image_decoders_only(tmp_path, monkeypatch):
    """Pillow tries every plugin it has on bytes it is given; its EPS plugin starts Ghostscript.
    A shard member or media file named .png that holds EPS is refused without running anything."""
    from unimodal.data.media import MediaBytes, decode_media
    from unimodal.modalities.image_continuous import load_image
    from unimodal.schema import DocumentError

    marker = tmp_path / "gs-ran"
    fake = tmp_path / "bin" / "gs"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ntouch {marker}\necho 10.0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    with pytest.raises(DocumentError, match="unreadable image"):
        decode_media(MediaBytes("png", eps), "image", "k")
    with pytest.raises(DocumentError, match="not a readable image"):
        load_image(MediaBytes("png", eps), "k")
    assert not marker.exists()


def test_a_compressed_shard_is_refused_before_it_expands(tmp_path):
    """A gzip "shard" of 1 MB can hold a member of gigabytes, read whole into memory: refused,
    as one bad shard (shards are plain tar files, as `data pack` writes them)."""
    import gzip
    import io
    import tarfile

    from unimodal.data.shards import BadSamplePolicy, ShardError, read_documents

    member = io.BytesIO()
    with tarfile.open(fileobj=member, mode="w") as tar:
        info = tarfile.TarInfo("k.json")
        info.size = 4 * 2**20
        tar.addfile(info, io.BytesIO(b"\0" * info.size))
    bomb = tmp_path / "bomb.tar"
    bomb.write_bytes(gzip.compress(member.getvalue()))
    with pytest.raises(ShardError, match="a compressed tar, whose members can expand without bound"):
        list(read_documents(str(bomb)))
    policy = BadSamplePolicy(max_bad_fraction=1.0)
    assert list(read_documents(str(bomb), policy=policy)) == [] and policy.skipped == 1
    # a plain shard whose first member's name starts as bzip2 does ("BZh...") is a tar all the same
    from unimodal.data.shards import write_documents
    from unimodal.schema import Document, Part

    write_documents([Document([Part("text", text="x")], key="BZh91AY")], tmp_path / "plain")
    assert [doc.key for doc in read_documents(str(tmp_path / "plain"))] == ["BZh91AY"]


def test_a_damaged_codec_directory_or_a_missing_device_is_one_line(tmp_path):
    import json as json_module

    from unimodal.worlds import resolve

    damaged = {"list": "[]", "bad-json": "{oops"}
    for name, text in damaged.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "codec.json").write_text(text)
    unknown = tmp_path / "unknown-key"
    unknown.mkdir()
    source = Path(resolve("builtin:digits/audio_codec"))
    for file in source.iterdir():
        (unknown / file.name).write_bytes(file.read_bytes())
    spec = json_module.loads((unknown / "codec.json").read_text())
    # sizes that divide by zero, allocate without bound or never finish a decode
    hostile = {"zero-hop": {"hop": 0}, "huge-fft": {"n_fft": 2**34}, "endless": {"griffin_lim_iters": 10**9}}
    for name, config in hostile.items():
        shutil.copytree(source, tmp_path / name)
        (tmp_path / name / "codec.json").write_text(json_module.dumps({**spec, "config": {**spec["config"], **config}}))
    spec["config"] = {**spec.get("config", {}), "bogus": 1}
    (unknown / "codec.json").write_text(json_module.dumps(spec))
    shards = resolve("builtin:digits/chat/test")  # a real source: sources are checked before any codec loads
    cases = [
        (tmp_path / "list", "codec.json holds a JSON list, not an object"),
        (tmp_path / "bad-json", "codec.json is not valid JSON"),
        (unknown, f"cannot load the audio codec in {unknown} (TypeError"),
        (tmp_path / "zero-hop", "(ValueError: DigitAudioConfig: hop=0; it must be an integer in [1, 1024])"),
        (tmp_path / "huge-fft", "DigitAudioConfig: n_fft=17179869184; it must be an integer in [16, 16384]"),
        (tmp_path / "endless", "DigitAudioConfig: griffin_lim_iters=1000000000; it must be an integer in [1, 1000]"),
        (tmp_path / "missing", "does not exist or is not a directory; give the directory of the audio codec"),
    ]
    for codec, reason in cases:
        code, (line,) = unimodal("data", "encode", shards, "--out", str(tmp_path / "out"), "--audio_codec", str(codec))
        assert code == 2 and reason in line, line
    import torch

    devices = [("bogus", "is not a device name")] + ([] if torch.cuda.is_available() else [("cuda", "no CUDA device")])
    for device, reason in devices:
        code, (line,) = unimodal("data", "encode", shards, "--out", str(tmp_path / "out"), "--audio_codec",
                                 "builtin:digits/audio_codec", "--device", device)
        assert code == 2 and reason in line, line
    assert not (tmp_path / "out").exists()


def test_a_device_past_the_last_gpu_or_of_another_kind_is_one_line(monkeypatch):
    """``cuda:1`` on a one-GPU machine failed later, inside ``model.to``, with "invalid device ordinal"."""
    import torch

    from unimodal.modalities.loading import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert [resolve_device(d) for d in ("cuda", "cuda:0", "cpu")] == ["cuda", "cuda:0", "cpu"]
    with pytest.raises(ValueError, match=r"'cuda:1': this machine has 1 CUDA device\(s\), cuda:0 to cuda:0"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match="'meta': models run on cpu or cuda"):
        resolve_device("meta")


def test_a_marker_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """``stage.json``, ``stats.json`` and a stage's resolved recipe are polled by other ranks and
    read by the next run: a write cut short (a full disk, a kill) leaves the old file and no litter."""
    from unimodal.schema import write_whole

    marker = tmp_path / "stage.json"
    write_whole(marker, '{"status": "interrupted"}\n')
    assert marker.read_text() == '{"status": "interrupted"}\n'

    def full_disk(fd):  # the bytes written so far never reach the disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_whole(marker, '{"status": "done", "result": {}}\n')
    monkeypatch.undo()
    assert marker.read_text() == '{"status": "interrupted"}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["stage.json"]
    # the new bytes are on disk before the rename: after a power cut, the old file or the new one
    events = []
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync"))
    monkeypatch.setattr(os, "replace", lambda a, b, replace=os.replace: (events.append("rename"), replace(a, b)))
    write_whole(marker, '{"status": "done"}\n')
    assert events == ["fsync", "rename"] and marker.read_text() == '{"status": "done"}\n'
    monkeypatch.undo()
    # a stage.json that is not JSON (a power cut before this fix, an edit gone wrong) is one line naming it
    from unimodal.training.pipeline import run_pipeline

    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("stages:\n  - {name: a, recipe: recipes/text/tiny.yaml}\n")
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "stage.json").write_text("")
    with pytest.raises(ValueError, match=r"runs/a/stage.json is not valid JSON .*; remove its stage's directory to run that stage again"):
        run_pipeline(pipeline, tiny=True, root=tmp_path / "runs")
