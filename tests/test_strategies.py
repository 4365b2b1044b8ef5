"""Strategies on CPU: DeepSpeed ZeRO-2/3, FSDP2 and DDP through Lightning, with gloo.

What is checked:
- the loss normalisation (CE over the label tokens of the whole optimizer step) gives, with
  accumulation, data parallelism, DDP and DeepSpeed ZeRO-2/3, the same SGD update as one plain
  step on the combined batch (a wrong scale moves the weights by a different amount);
- ZeRO-3 in two processes trains, saves a sharded checkpoint, resumes from it to the very same
  weights as an uninterrupted run, and ``zero_to_fp32`` turns the shards into those weights;
- strategy names, ``class_path`` configs and the converter's errors.

Two-process runs start ``tests/distributed/train.py`` under torchrun (one launch per strategy,
several tasks per launch: starting Python with Lightning costs ~10 s a process on 2 cores).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "distributed"))

from tiny import (  # noqa: E402
    BACKBONE,
    LAYOUT,
    TEXT_SIZE,
    LossRecorder,
    SGDModule,
    Snapshot,
    WindowedData,
    make_module,
    make_sgd_module,
    packed_sequences,
    reference_sgd_update,
    trainer_kwargs,
)

from unimodal.errors import UserError  # noqa: E402
from unimodal.checkpoints.fsdp import fsdp_to_file  # noqa: E402
from unimodal.checkpoints.zero import NotADeepSpeedCheckpoint, zero_to_fp32  # noqa: E402
from unimodal.modalities.vocab import VocabLayout  # noqa: E402
from unimodal.models.backbone import BackboneConfig  # noqa: E402
from unimodal.models.lora import LoraSettings  # noqa: E402
from unimodal.models.unified import LossTerm  # noqa: E402
from unimodal.training.optim import OptimizerConfig  # noqa: E402
from unimodal.training.strategies import FSDP, DeepSpeed, DeepSpeedStrategy, build_strategy, strategy_names  # noqa: E402

pytestmark = pytest.mark.distributed

SCRIPT = ROOT / "tests" / "distributed" / "train.py"


@pytest.fixture
def isolated_process_state():
    """Lightning's DeepSpeed strategy exports RANK/WORLD_SIZE/MASTER_* and leaves a process group:
    undo both so later tests in this pytest process start clean."""
    saved = dict(os.environ)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        import deepspeed.comm

        if deepspeed.comm.is_initialized():
            deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups
        else:
            torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n].float() - b[n].float()).abs().max().item() for n in a)


def torchrun(tmp_path: Path, *args: str, nproc: int = 2, timeout: int = 300) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(SCRIPT), "--out", str(tmp_path), *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")


def check_sgd_result(out: Path) -> None:
    saved = torch.load(out / "sgd.pt", weights_only=False)
    expected = reference_sgd_update(saved["initial"], packed_sequences(0, saved["sequences"]), lr=1.0)
    moved = max_diff(saved["final"], saved["initial"])
    assert moved > 1e-2, "the step did not move the weights"
    assert max_diff(saved["final"], expected) < 1e-5 * max(1.0, moved) + 1e-6


def check_resume_result(out: Path) -> dict:
    saved = torch.load(out / "resume.pt", weights_only=False)
    losses = saved["straight_losses"]
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    assert saved["global_step"] == 5
    # the resumed run starts from the checkpoint (not from a fresh init) and, with its optimizer
    # state restored, ends exactly where the uninterrupted run ends
    assert saved["resumed_losses"] == pytest.approx(losses[3:], rel=1e-5)
    assert max_diff(saved["resumed"], saved["straight"]) < 1e-6
    return saved


# --- one process, in this pytest process ------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "accumulate", "batch_size"),
    [
        ("auto", 2, 1),
        ("auto", 1, 2),
        ("deepspeed_stage_2", 2, 1),
        ("deepspeed_stage_2", 1, 2),
        ("deepspeed_stage_1", 2, 1),
        ("deepspeed_stage_2_offload", 2, 1),
        ("deepspeed_stage_3", 2, 1),
        ("deepspeed_stage_3_offload", 2, 1),
    ],
)
def test_one_step_equals_plain_step_on_the_combined_batch(strategy, accumulate, batch_size, tmp_path, isolated_process_state):
    """accumulate=2 x batch 1 and accumulate=1 x batch 2 both give the plain SGD step on the two
    sequences (which hold different numbers of label tokens). Under DeepSpeed this checks the
    extra factor in ``UnimodalModule.training_step`` (its engine divides by the accumulation steps
    on top of Lightning)."""
    sequences = packed_sequences(0, 2)
    assert sequences[0]["labels"].tolist() != sequences[1]["labels"].tolist()
    L.seed_everything(0)
    snap = Snapshot()
    trainer = L.Trainer(**trainer_kwargs(tmp_path, strategy=build_strategy(strategy), max_steps=1, accumulate_grad_batches=accumulate, callbacks=[snap]))
    trainer.fit(make_sgd_module(lr=1.0), datamodule=WindowedData(sequences, batch_size, accumulate))
    if strategy != "auto":
        assert isinstance(trainer.strategy, DeepSpeedStrategy)
    expected = reference_sgd_update(snap.initial, sequences, lr=1.0)
    assert max_diff(snap.final, snap.initial) > 1e-2
    assert max_diff(snap.final, expected) < 1e-5


class ItemMeanProbe(SGDModule):
    """SGDModule whose model adds a per-item term ``probe/x`` = sum of the final norm's weights
    (per-item mean of a sum over 3 items), so each micro-batch's gradient there is exactly 1."""

    def configure_model(self) -> None:
        super().configure_model()
        forward, weight = self.model.forward, self.model.backbone.model.norm.weight

        def with_probe(batch):
            return {**forward(batch), "probe/x": LossTerm(weight.sum() * 3, torch.tensor(3))}

        self.model.forward = with_probe


@pytest.mark.parametrize("strategy", ["auto", "deepspeed_stage_2"])
def test_a_per_item_term_is_a_mean_over_the_accumulated_micro_batches(strategy, tmp_path, isolated_process_state):
    """A non-CE term (a diffusion loss) weighs the same with accumulation under every strategy:
    under DeepSpeed its engine's second division by the accumulation steps is undone for it too."""
    module = ItemMeanProbe(backbone=BACKBONE, vocab=LAYOUT.to_dict(), lr=1.0, loss_weights={"ce/text": 0.0})
    snap = Snapshot()
    trainer = L.Trainer(**trainer_kwargs(tmp_path, strategy=build_strategy(strategy), max_steps=1, accumulate_grad_batches=2, callbacks=[snap]))
    trainer.fit(module, datamodule=WindowedData(packed_sequences(0, 2), 1, 2))
    name = "backbone.model.norm.weight"
    torch.testing.assert_close(snap.initial[name] - snap.final[name], torch.ones_like(snap.initial[name]))


@pytest.mark.parametrize("strategy", ["auto", "deepspeed_stage_3"])
def test_a_model_built_on_zero3_partitions_starts_where_it_would_unsharded(strategy, tmp_path, isolated_process_state):
    """ZeRO-3's zero.Init partitions each module's parameters as soon as the module exists, so
    initialisation that runs later must reach the partitions: transformers' init of a random
    backbone (untold, it kept PyTorch's defaults: a first loss of 122 instead of 6.9 on the text
    recipe), the diffusion head's adaLN-zero and LoRA's zero B."""
    from unimodal.models.continuous import TokenDiffusionImage

    layout = VocabLayout(text_size=TEXT_SIZE, code_ranges={"image": 16})

    def head(hidden: int) -> TokenDiffusionImage:
        return TokenDiffusionImage(hidden, feature_dim=8, slots_per_item=2, codebook_size=16, head_width=16, head_depth=1)

    module = SGDModule(backbone=BACKBONE, vocab=layout.to_dict(), continuous={"image": head}, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    L.seed_everything(0)
    snap = first_weights_callback()
    trainer = L.Trainer(**trainer_kwargs(tmp_path, strategy=build_strategy(strategy), max_steps=1, callbacks=[snap]))
    trainer.fit(module, datamodule=WindowedData(packed_sequences(0, 1), 1, 1))
    weights = snap.initial
    std = 0.02  # LlamaConfig's initializer_range
    base = [n for n in weights if n.endswith(("embed_tokens.weight", "lm_head.weight", "layers.0.mlp.down_proj.base_layer.weight"))]
    assert len(base) == 3, base
    for name in base:
        assert abs(float(weights[name].std()) - std) < 0.25 * std, (name, float(weights[name].std()))
    zeroed = [n for n in weights if ".modulation." in n or n.startswith("continuous.image.head.output.")]
    assert zeroed and all(not weights[n].any() for n in zeroed)
    lora_b = [n for n in weights if ".lora_B." in n]
    assert lora_b and all(not weights[n].any() for n in lora_b)


@pytest.mark.parametrize("strategy", ["auto", "deepspeed_stage_3"])
def test_a_pretrained_backbone_loads_and_resizes_on_zero3_partitions(strategy, tmp_path, isolated_process_state):
    """A backbone read from a directory, its vocabulary then grown by the media code rows: under
    ZeRO-3 transformers must load into and resize the partitions (untold, it refused the sizes)."""
    from unimodal.models.backbone import causal_lm_from_config
    from transformers import AutoConfig

    raw = dict(BACKBONE.config)
    saved = causal_lm_from_config(AutoConfig.for_model(raw.pop("model_type"), **raw, vocab_size=TEXT_SIZE))
    saved.save_pretrained(tmp_path / "backbone")
    layout = VocabLayout(text_size=TEXT_SIZE, code_ranges={"image": 16})
    backbone = BackboneConfig(path=str(tmp_path / "backbone"), attention="sdpa")
    snap = first_weights_callback()
    trainer = L.Trainer(**trainer_kwargs(tmp_path, strategy=build_strategy(strategy), max_steps=1, callbacks=[snap]))
    trainer.fit(SGDModule(backbone=backbone, vocab=layout.to_dict()), datamodule=WindowedData(packed_sequences(0, 1), 1, 1))
    weights = snap.initial
    assert weights["backbone.model.embed_tokens.weight"].shape[0] == layout.size > TEXT_SIZE
    torch.testing.assert_close(weights["backbone.model.embed_tokens.weight"][:TEXT_SIZE], saved.model.embed_tokens.weight.detach())
    torch.testing.assert_close(weights["backbone.model.layers.1.mlp.up_proj.weight"], saved.model.layers[1].mlp.up_proj.weight.detach())
    for name, table in (("backbone.model.embed_tokens.weight", saved.model.embed_tokens), ("backbone.lm_head.weight", saved.lm_head)):
        added, mean = weights[name][TEXT_SIZE:], table.weight.detach().mean(0)
        assert (added - mean).abs().max() < 1e-3 and not torch.equal(added[0], added[1])  # near the mean, apart


CUDA_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("strategy, accelerator", [("auto", "cpu"), pytest.param("deepspeed_stage_3", "cuda", marks=CUDA_ONLY)])
def test_lora_new_token_rows_start_as_the_embedding_rows(strategy, accelerator, tmp_path, isolated_process_state):
    """train_new_tokens: peft's trainable rows of both tables start as the resized tables' rows,
    under ZeRO-3 too, where peft gathers them from the partitions itself (on CUDA only)."""
    layout = VocabLayout(text_size=TEXT_SIZE, code_ranges={"image": 16})
    module = SGDModule(backbone=BACKBONE, vocab=layout.to_dict(), lora=LoraSettings(r=4, alpha=8, dropout=0.0, train_new_tokens=True))
    snap = first_weights_callback()
    trainer = L.Trainer(**trainer_kwargs(tmp_path, accelerator=accelerator, strategy=build_strategy(strategy), max_steps=1, callbacks=[snap]))
    trainer.fit(module, datamodule=WindowedData(packed_sequences(0, 1), 1, 1))
    new = list(range(layout.text_size, layout.used_size))
    for table in ("model.embed_tokens", "lm_head"):
        adapter = f"backbone.base_model.model.{table}.token_adapter."
        rows, table_rows = snap.initial[adapter + "trainable_tokens_delta.default"], snap.initial[adapter + "base_layer.weight"][new]
        assert rows.shape == (len(new), 32) and torch.equal(rows.cpu(), table_rows.cpu())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_lora_new_token_rows_under_zero3_without_cuda_are_refused_in_one_line(tmp_path, isolated_process_state):
    """peft gathers the new rows under ZeRO-3 on CUDA only; elsewhere it died on
    ``torch.cuda.current_device()``."""
    layout = VocabLayout(text_size=TEXT_SIZE, code_ranges={"image": 16})
    module = SGDModule(backbone=BACKBONE, vocab=layout.to_dict(), lora=LoraSettings(r=4, train_new_tokens=True))
    trainer = L.Trainer(**trainer_kwargs(tmp_path, strategy=build_strategy("deepspeed_stage_3"), max_steps=1))
    with pytest.raises(UserError, match="train_new_tokens under DeepSpeed ZeRO-3 needs CUDA"):
        trainer.fit(module, datamodule=WindowedData(packed_sequences(0, 1), 1, 1))


def first_weights_callback() -> Snapshot:
    """A callback that keeps the full weights training starts from, then stops before any step."""

    class FirstWeights(Snapshot):
        def on_train_start(self, trainer, module):
            super().on_train_start(trainer, module)
            trainer.should_stop = True

    return FirstWeights()


def test_zero2_single_process_trains_saves_and_converts(tmp_path, isolated_process_state):
    sequences = packed_sequences(2, 2)
    L.seed_everything(0)
    snap, losses = Snapshot(), LossRecorder()
    trainer = L.Trainer(
        **trainer_kwargs(tmp_path, strategy=DeepSpeed(stage=2), max_steps=6, callbacks=[snap, losses])
    )
    module = make_module(optimizer=OptimizerConfig(lr=1e-2, warmup_steps=0))
    trainer.fit(module, datamodule=WindowedData(sequences, 1, 1))
    assert trainer.global_step == 6
    assert trainer.strategy.root_device == torch.device("cpu", 0)
    assert trainer.strategy.config["zero_optimization"]["stage"] == 2
    assert len(losses.losses) == 6 and all(torch.isfinite(torch.tensor(losses.losses)))
    # two batches alternate: compare each with its own first value
    assert losses.losses[-2] < losses.losses[0] and losses.losses[-1] < losses.losses[1], losses.losses

    trainer.save_checkpoint(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "latest").is_file() and not list(tmp_path.glob(".tmp-*"))
    saved = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}

    def killed_midway(save_dir, **kwargs):  # the engine's first file written, then the process dies
        (Path(save_dir) / "checkpoint").mkdir(parents=True)
        (Path(save_dir) / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"cut short")
        raise KeyboardInterrupt

    trainer.strategy.deepspeed_engine.save_checkpoint = killed_midway
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(tmp_path / "ckpt")
    assert {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()} == saved
    with pytest.raises(UserError, match="--trust_checkpoint"):  # DeepSpeed's files are read with pickle
        zero_to_fp32(tmp_path / "ckpt", tmp_path / "fp32" / "model.ckpt")
    out = zero_to_fp32(tmp_path / "ckpt", tmp_path / "fp32" / "model.ckpt", trust=True)
    converted = torch.load(out, weights_only=False)
    assert converted["global_step"] == 6
    assert "hyper_parameters" in converted and "frozen_param_fragments" not in converted
    state = {k.removeprefix("model."): v for k, v in converted["state_dict"].items()}
    assert all(v.dtype == torch.float32 for v in state.values())
    assert max_diff(state, snap.final) == 0.0


def test_a_zero_checkpoint_without_its_frozen_weights_resumes(tmp_path, isolated_process_state):
    """exclude_frozen_parameters (docs/training.md): DeepSpeed's strict load refused its own
    checkpoint for the frozen weights it had left out. The resumed run starts from the weights the
    first one ended with: the trained ones from the checkpoint, the frozen ones from the build."""
    sequences = packed_sequences(2, 2)

    def fit(max_steps: int, ckpt_path: Path | None = None) -> tuple[L.Trainer, Snapshot]:
        L.seed_everything(0)
        snap = Snapshot()
        strategy = DeepSpeed(stage=2, exclude_frozen_parameters=True)
        trainer = L.Trainer(**trainer_kwargs(tmp_path, strategy=strategy, max_steps=max_steps, callbacks=[snap]))
        module = make_module(optimizer=OptimizerConfig(lr=1e-2, warmup_steps=0), lora=LoraSettings(r=4, alpha=8, dropout=0.0))
        trainer.fit(module, datamodule=WindowedData(sequences, 1, 1), ckpt_path=ckpt_path)
        return trainer, snap

    trainer, first = fit(2)
    trainer.save_checkpoint(tmp_path / "ckpt")
    trainer, resumed = fit(4, tmp_path / "ckpt")
    assert trainer.global_step == 4
    assert max_diff(first.final, first.initial) > 0  # the adapters trained
    assert max_diff(resumed.initial, first.final) == 0.0


# --- two processes (torchrun, gloo) -----------------------------------------------------------


def test_ddp_two_processes(tmp_path):
    """DDP: 2 ranks x accumulate 2 = the plain step on all 4 sequences; then a short run that
    checkpoints and resumes."""
    torchrun(tmp_path, "--strategy", "ddp", "--task", "sgd", "resume", "--accumulate", "2")
    check_sgd_result(tmp_path)
    check_resume_result(tmp_path)
    assert (tmp_path / "ckpt-5").is_file()  # DDP writes one ordinary file


def test_zero2_two_processes(tmp_path):
    torchrun(tmp_path, "--strategy", "deepspeed_stage_2", "--task", "sgd", "--accumulate", "2")
    check_sgd_result(tmp_path)


def sharded_sgd_and_resume(tmp_path: Path, strategy: str) -> dict:
    """Two ranks, one layer's MLP frozen: the SGD step and checkpoint + resume, checked."""
    torchrun(
        tmp_path,
        "--strategy", strategy,
        "--task", "sgd", "resume",
        "--accumulate", "2",
        "--frozen", "backbone.model.layers.0.mlp",
    )  # fmt: skip
    check_sgd_result(tmp_path)
    return check_resume_result(tmp_path)


def check_converted(converted: dict, saved: dict) -> None:
    """A merged checkpoint holds the resumed run's full weights, frozen ones included."""
    state = {k.removeprefix("model."): v for k, v in converted["state_dict"].items()}
    assert converted["global_step"] == 5
    assert "backbone.model.layers.0.mlp.up_proj.weight" in state
    assert max_diff(state, saved["resumed"]) == 0.0


def test_zero3_two_processes_resume_and_convert(tmp_path):
    """ZeRO-3 (parameters sharded at construction in configure_model): the SGD step, checkpoint
    + resume, and the fp32 conversion of the sharded checkpoint."""
    saved = sharded_sgd_and_resume(tmp_path, "deepspeed_stage_3")
    assert not list(tmp_path.glob(".tmp-*"))  # written under a temporary name, then renamed
    shards = sorted(p.name for p in (tmp_path / "ckpt-5" / "checkpoint").iterdir())
    assert shards == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    out = zero_to_fp32(tmp_path / "ckpt-5", tmp_path / "model.ckpt", trust=True)
    check_converted(torch.load(out, weights_only=False), saved)


def test_fsdp2_two_processes_resume_and_convert(tmp_path):
    """FSDP2 (every parameter sharded): the SGD step, exact resume from the sharded checkpoint,
    and its conversion to one file for export."""
    saved = sharded_sgd_and_resume(tmp_path, "fsdp2")
    shards = sorted(p.name for p in (tmp_path / "ckpt-5").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert not list(tmp_path.glob(".tmp-*"))  # written under a temporary name, then renamed
    with pytest.raises(UserError, match="--trust_checkpoint"):  # .metadata is read with pickle
        fsdp_to_file(tmp_path / "ckpt-5", tmp_path / "model.ckpt")
    # this test's module keeps config dataclasses as hyper-parameters (`unimodal train` saves plain ones)
    with torch.serialization.safe_globals([BackboneConfig, OptimizerConfig]):
        out = fsdp_to_file(tmp_path / "ckpt-5", tmp_path / "model.ckpt", trust=True)
        check_converted(torch.load(out, weights_only=True), saved)


def test_fsdp2_trains_lora_and_leaves_the_frozen_base_alone(tmp_path, isolated_process_state):
    """LoRA under FSDP2 (one process): the adapters move, the frozen base weights do not."""
    L.seed_everything(0)
    snap = Snapshot()
    trainer = L.Trainer(**trainer_kwargs(tmp_path, strategy=build_strategy("fsdp2"), max_steps=3, callbacks=[snap]))
    module = make_module(optimizer=OptimizerConfig(lr=1e-2, warmup_steps=0), lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    trainer.fit(module, datamodule=WindowedData(packed_sequences(2, 2), 1, 1))
    adapters = [n for n in snap.final if "lora_" in n]
    assert adapters and any(max_diff({n: snap.final[n]}, {n: snap.initial[n]}) > 0 for n in adapters if "lora_B" in n)
    base = {n: v for n, v in snap.final.items() if "lora_" not in n}
    assert max_diff(base, {n: snap.initial[n] for n in base}) == 0.0


@pytest.mark.parametrize("strategy", ["fsdp2", "deepspeed_stage_2"])
def test_sharded_runs_through_unimodal_train_resume_prune_and_export(tmp_path, strategy):
    """The command a user runs: `unimodal train` under torchrun with a sharded strategy, then
    `--resume auto` from the sharded `last.ckpt`, then `unimodal export`; each directory is
    written under a temporary name and renamed, and `--keep_last_k` prunes the step ones."""
    run = tmp_path / "run"
    train = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "unimodal", "train",
        "recipes/text/tiny.yaml", f"--trainer.strategy={strategy}", "--trainer.devices=2", "--trainer.accelerator=cpu",
        "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={run}",
        "--checkpoint_every_n_steps=2", "--keep_last_k=1",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for extra in (["--trainer.max_steps=2"], ["--trainer.max_steps=4", "--resume", "auto"]):
        result = subprocess.run([*train, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
    assert "Restored all states from the checkpoint" in result.stderr
    assert "sync_dist" not in result.stderr  # val/ means are summed over ranks already, and logged as such
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["epoch=0-step=4.ckpt", "last.ckpt"]  # keep_last_k=1 pruned step 2's directory
    export = [sys.executable, "-m", "unimodal", "export", str(run), "--out", str(tmp_path / "export")]
    refused = subprocess.run(export, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "--trust_checkpoint" in refused.stderr
    exported = subprocess.run([*export, "--trust_checkpoint"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (tmp_path / "export" / "unimodal.json").is_file()


def test_a_sigterm_to_one_rank_stops_every_rank_with_a_checkpoint(tmp_path):
    """Pre-emption that reaches one rank (docs/checkpoints.md: every rank stops when any rank is
    signalled). Lightning's handler broadcast from inside the signal handler, a collective the
    other rank never entered: both hung until killed."""
    import contextlib
    import signal
    import time

    run = tmp_path / "run"
    ranks: list[int] = []
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "unimodal", "train",
        "recipes/text/tiny.yaml", "--tiny", "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
        "--trainer.max_steps=1000", "--trainer.val_check_interval=1000", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={run}", "--checkpoint_every_n_steps=2",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    launcher = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints" / "last.ckpt").is_file():
            assert launcher.poll() is None and time.monotonic() < deadline, "the run ended or stalled before its first checkpoint"
            time.sleep(0.5)
        ranks = [int(pid) for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()]
        rank1 = next(pid for pid in ranks if b"\0LOCAL_RANK=1\0" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes())
        os.kill(rank1, signal.SIGTERM)
        _, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:  # hung: its ranks first, which would outlive it
            for pid in ranks:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            launcher.kill()
            launcher.wait()
    assert "unimodal train: error: stopped by SIGTERM at step" in err and "[rank 1] unimodal train: error: stopped by SIGTERM" in err, err[-3000:]
    assert "(saved " in err
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] > 2


# --- names, configs, errors --------------------------------------------------------------------


def test_strategy_names_select_the_cpu_capable_deepspeed(isolated_process_state):
    assert {"auto", "ddp", "deepspeed_stage_1", "deepspeed_stage_2_offload", "deepspeed_stage_3_offload"} <= set(strategy_names())
    assert build_strategy("auto") == "auto" and build_strategy("ddp") == "ddp"
    strategy = build_strategy("deepspeed_stage_3_offload", pin_memory=False)
    assert isinstance(strategy, DeepSpeedStrategy)
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    with pytest.raises(ValueError, match="deepspeed_stage_2"):
        build_strategy("deepspeed_stage_4")
    # a plain name in a recipe goes through Lightning's registry, which now points at our class
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy="deepspeed_stage_1", logger=False)
    assert type(trainer.strategy) is DeepSpeedStrategy
    assert trainer.strategy.config["zero_optimization"]["stage"] == 1
    assert type(trainer.strategy).__name__.endswith("DeepSpeedStrategy")  # what training_step tests
    assert "fsdp2" in strategy_names()
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=build_strategy("fsdp2"), logger=False)
    assert type(trainer.strategy) is FSDP


def test_class_path_config_instantiates_the_strategy():
    """The YAML form a recipe uses: ``trainer.strategy: {class_path: ..., init_args: ...}``."""
    from lightning.pytorch.cli import LightningArgumentParser

    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(L.Trainer, "trainer")
    config = parser.parse_object(
        {
            "trainer": {
                "accelerator": "cpu",
                "logger": False,
                "strategy": {
                    "class_path": "unimodal.training.strategies.DeepSpeed",
                    "init_args": {"stage": 3, "offload_optimizer": True},
                },
            }
        }
    )
    strategy = parser.instantiate_classes(config).trainer.strategy
    assert isinstance(strategy, DeepSpeedStrategy)
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == 3 and "offload_optimizer" in zero and "offload_param" not in zero


def test_zero_to_fp32_refuses_what_is_not_a_deepspeed_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        zero_to_fp32(tmp_path / "missing", tmp_path / "out.ckpt")
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(NotADeepSpeedCheckpoint, match="need no conversion"):
        zero_to_fp32(plain, tmp_path / "out.ckpt")
    with pytest.raises(NotADeepSpeedCheckpoint, match="no 'latest' file"):
        zero_to_fp32(tmp_path, tmp_path / "out.ckpt")
    inner = tmp_path / "ckpt" / "checkpoint"
    inner.mkdir(parents=True)
    (tmp_path / "ckpt" / "latest").write_text("checkpoint")
    (inner / "zero_pp_rank_0_mp_rank_00_model_states.pt").touch()
    (inner / "zero_pp_rank_0_mp_rank_00_optim_states.pt").touch()
    with pytest.raises(NotADeepSpeedCheckpoint, match="pass its parent directory"):
        zero_to_fp32(inner, tmp_path / "out.ckpt")
    assert issubclass(NotADeepSpeedCheckpoint, ValueError)  # the CLI prints ValueErrors as one line


@pytest.mark.parametrize("strategy", ["fsdp2", "deepspeed_stage_3"])
def test_a_one_process_sharded_run_repeats_no_warning(strategy, tmp_path, recwarn, isolated_process_state):
    """Lightning asked for sync_dist at each validation wherever a process group exists (one
    process of FSDP2 or DeepSpeed too), and ZeRO's calls of deprecated torch collectives warned at
    every step."""
    from unimodal.cli import main

    args = ["train", str(ROOT / "recipes/text/tiny.yaml"), "--tiny", f"--trainer.strategy={strategy}", "--trainer.accelerator=cpu",
            "--trainer.max_steps=2", "--trainer.val_check_interval=2", f"--trainer.default_root_dir={tmp_path}"]  # fmt: skip
    assert main(args) == 0
    said = [str(w.message) for w in recwarn]
    assert not [m for m in said if "sync_dist" in m or "is deprecated. Please use" in m], said


def test_a_zero_checkpoint_of_another_rank_count_is_refused_in_one_line(tmp_path, isolated_process_state):
    """ZeRO partitions fit only as many ranks as wrote them; DeepSpeed said so in a traceback."""
    shards = tmp_path / "last.ckpt" / "checkpoint"
    shards.mkdir(parents=True)
    (tmp_path / "last.ckpt" / "latest").write_text("checkpoint")
    for rank in range(2):
        (shards / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").touch()
        (shards / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").touch()
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=build_strategy("deepspeed_stage_2"), logger=False)
    with pytest.raises(UserError, match="written by 2 ranks and this run has 1"):
        trainer.strategy.load_checkpoint(tmp_path / "last.ckpt")


@pytest.mark.slow
def test_deepspeed_cpu_op_builds_without_the_venv_on_path(tmp_path):
    """DeepSpeed JIT-builds its CPU shared-memory op with ninja (minutes when not cached in
    ~/.cache/torch_extensions); the strategy module finds the environment's ninja itself."""
    code = (
        "from unimodal.training.strategies import ensure_ninja_on_path\n"
        "ensure_ninja_on_path()\n"
        "from deepspeed.comm.torch import build_shm_op\n"
        "assert build_shm_op() is not None\n"
    )
    env = dict(os.environ, PATH="/usr/bin:/bin")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


def test_a_zero3_run_points_at_this_projects_converter_not_lightnings_docs(tmp_path):
    """Lightning warns at each save of a ZeRO-3 run on several devices, pointing at its own
    consolidation docs; this project's export and converter read the directory. A process of its
    own: DeepSpeed keeps process groups that earlier in-process runs leave behind."""
    script = (
        "from lightning.pytorch.strategies import DeepSpeedStrategy\n"
        "DeepSpeedStrategy._multi_device = property(lambda self: True)  # its warning's condition\n"
        "from unimodal.cli import main\n"
        f"raise SystemExit(main(['train', {str(ROOT / 'recipes/text/tiny.yaml')!r}, '--tiny', '--trainer.default_root_dir={tmp_path}', "
        "'--trainer.max_steps=1', '--trainer.strategy=deepspeed_stage_3', '--trainer.enable_progress_bar=false']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "last.ckpt" / "latest").is_file()
    assert "DeepSpeed Stage 3 checkpoint" not in done.stderr
    assert done.stderr.count("ZeRO-3 saves each checkpoint as a directory of per-rank shards: --ckpt_path reads it as it is, "
                             "`unimodal export DIR --out OUT --trust_checkpoint` exports it, `unimodal convert zero-to-fp32 DIR OUT "
                             "--trust_checkpoint` makes it one file") == 1
