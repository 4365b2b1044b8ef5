"""Training strategies: Lightning's DDP, DeepSpeed ZeRO and FSDP2, all usable on CPU too.

A recipe picks a strategy with ``trainer.strategy``, either by name::

    trainer:
      strategy: deepspeed_stage_3          # auto | ddp | deepspeed | deepspeed_stage_1 | ...

or as a class with its options::

    trainer:
      strategy:
        class_path: unimodal.training.strategies.DeepSpeedStrategy
        init_args: {stage: 3, offload_optimizer: true}

Why :class:`DeepSpeedStrategy` exists: Lightning's own ``DeepSpeedStrategy`` refuses every
accelerator but CUDA, although DeepSpeed itself trains ZeRO-1/2/3 on CPU with the gloo backend.
Running the real ZeRO code path (sharded construction in ``configure_model``, partitioned
optimizer states, sharded checkpoints, resuming) on a CPU-only machine is what lets the tests
cover it. With the CPU accelerator the subclass changes three things:

1. ``setup_environment`` skips the "only supported on CUDA GPUs" check;
2. ``setup_distributed`` skips the check that device indices equal local ranks (CPU devices
   have no index);
3. ``root_device`` is ``cpu:<local_rank>``: DeepSpeed reads the index as its device rank;

and the process group backend defaults to gloo. On CUDA it is Lightning's strategy, with one
addition on every device: under ZeRO-Offload with an optimizer other than DeepSpeedCPUAdam
(the module's AdamW) it sets ``zero_force_ds_cpu_optimizer: false`` unless the config says
otherwise, where DeepSpeed would refuse to start; and it accepts loaders without a batch sampler
(``batch_size=None``) where Lightning's batch-size probe would fail.
:func:`register_strategies` (called by ``unimodal train`` and :func:`build_strategy`) re-registers
Lightning's DeepSpeed strategy names (``deepspeed``, ``deepspeed_stage_1``, ...,
``deepspeed_stage_3_offload``) to this class, so plain names work on CPU as well.

:class:`FSDP` is FSDP2 (``torch.distributed.fsdp.fully_shard``: every parameter sharded across
the data-parallel ranks) through Lightning's ``ModelParallelStrategy``, which runs on CPU with
gloo as it is; Lightning's ``FSDPStrategy`` (FSDP1) refuses every accelerator but CUDA. The
module shards itself in ``configure_model`` (:func:`unimodal.models.sharding.fully_shard_model`).
Its checkpoints are ``torch.distributed.checkpoint`` directories, whose ``.metadata`` is read with
pickle: they are trusted input (docs/checkpoints.md).

DeepSpeed JIT-compiles C++ ops with ninja on first use; :func:`ensure_ninja_on_path` puts the
``ninja`` of the running environment on ``PATH`` so that works without an activated virtual
environment. On CPU the one op DeepSpeed builds at start-up (a shared-memory all-reduce used only
by tensor-parallel inference) takes minutes to compile on a small machine and is skipped unless
``UNIMODAL_DEEPSPEED_SHM_OP=1``; compiled ops are cached under ``~/.cache/torch_extensions``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeedStrategy
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy, StrategyRegistry
from lightning.pytorch.strategies.ddp import DDPStrategy

from unimodal.checkpoints.files import TEMP_PREFIX, prune_checkpoints, replace_directory
from unimodal.checkpoints.zero import zero_ranks
from unimodal.errors import UserError

log = logging.getLogger("unimodal.train")


def world_size() -> int:
    """The ranks of the initialised process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# names a recipe may give as ``trainer.strategy``; the DeepSpeed ones map to DeepSpeedStrategy
DEEPSPEED_PRESETS: dict[str, dict[str, Any]] = {
    "deepspeed": {},
    "deepspeed_stage_1": {"stage": 1},
    "deepspeed_stage_2": {"stage": 2},
    "deepspeed_stage_2_offload": {"stage": 2, "offload_optimizer": True},
    "deepspeed_stage_3": {"stage": 3},
    "deepspeed_stage_3_offload": {"stage": 3, "offload_optimizer": True, "offload_parameters": True},
    "deepspeed_stage_3_offload_nvme": {
        "stage": 3,
        "offload_optimizer": True,
        "offload_parameters": True,
        "remote_device": "nvme",
        "offload_params_device": "nvme",
        "offload_optimizer_device": "nvme",
    },
}
# set to 1 to let DeepSpeed JIT-build its CPU shared-memory communication op anyway
SHM_OP_ENV = "UNIMODAL_DEEPSPEED_SHM_OP"
LIGHTNING_NAMES = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "single_device", "fsdp")


def ensure_ninja_on_path() -> str | None:
    """Make ``ninja`` findable by the subprocesses that JIT-build DeepSpeed/torch ops.

    Looks on ``PATH`` first, then beside the running interpreter (a virtual environment's
    ``bin``), then in the ``ninja`` Python package. Returns the directory put first on ``PATH``
    (None when ninja was already found or is not installed).
    """
    if shutil.which("ninja"):
        return None
    candidates = [Path(sys.executable).parent]
    try:
        import ninja  # the PyPI package ships the binary

        candidates.append(Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    for folder in candidates:
        if (folder / "ninja").is_file() or (folder / "ninja.exe").is_file():
            os.environ["PATH"] = os.pathsep.join([str(folder), os.environ.get("PATH", "")])
            return str(folder)
    log.warning("ninja not found: DeepSpeed cannot JIT-build its ops (pip install ninja)")
    return None


def _skip_shm_comm_op() -> None:
    """Tell DeepSpeed its shared-memory all-reduce op is unavailable, so it is not compiled.

    On CPU DeepSpeed JIT-builds that op (minutes on a small machine) when its communication
    backend starts, but only tensor-parallel inference (``inference_all_reduce``) uses it, and
    that falls back to the process group's all-reduce without it. DeepSpeed keeps the probed
    op table as one module-level dict meant to be edited.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def save_staged(strategy: Strategy, save: Callable[[Path], None], filepath: Any) -> None:
    """A sharded checkpoint saved as a checkpoint file is: every rank writes into a temporary
    directory (``save``) that rank 0 then renames into place, so a crash mid-save never leaves a
    half-written checkpoint under the real name for ``--resume auto`` to take; then the run's
    ``keep_last_k`` applies."""
    path = Path(strategy.broadcast(str(filepath)))
    temp = Path(strategy.broadcast(str(path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{path.name}"))))
    save(temp)
    strategy.barrier("checkpoint_written")
    if strategy.global_rank == 0:
        replace_directory(temp, path)
        keep = getattr(strategy.checkpoint_io, "keep_last_k", None)
        if keep is not None:
            prune_checkpoints(path.parent, keep)
    strategy.barrier("checkpoint_in_place")


class DeepSpeedStrategy(_LightningDeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` that also runs with the CPU accelerator (gloo).

    Same constructor arguments as :class:`lightning.pytorch.strategies.DeepSpeedStrategy`
    (``stage``, ``offload_optimizer``, ``offload_parameters``, ``config``, ...); see the module
    docstring for what differs and why.
    """

    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    @property
    def root_device(self) -> torch.device:
        device = super().root_device
        if self._on_cpu() and device.index is None:
            # DeepSpeed takes the device index as its rank's device (``device_rank``)
            return torch.device("cpu", self.local_rank)
        return device

    def setup_environment(self) -> None:
        ensure_ninja_on_path()
        if self._on_cpu():
            DDPStrategy.setup_environment(self)  # skips Lightning's CUDA-only check
        else:
            super().setup_environment()

    def setup_distributed(self) -> None:
        if not self._on_cpu():
            super().setup_distributed()
            return
        if os.environ.get(SHM_OP_ENV, "0") != "1":
            _skip_shm_comm_op()
        # as Lightning's, without the device-index check (CPU devices carry no index)
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @contextlib.contextmanager
    def model_sharded_context(self) -> Iterator[None]:
        """Lightning's ``zero.Init`` under ZeRO-3, with transformers told for as long as the model
        is built. ``zero.Init`` partitions each module's parameters as soon as that module exists,
        so what transformers does afterwards (initialising a random backbone, loading a pretrained
        one, resizing its embeddings) must run on gathered partitions, which it only does when it
        knows (``HfDeepSpeedConfig``); untold, a random backbone keeps PyTorch's default init."""
        if not self.zero_stage_3:
            with super().model_sharded_context():
                yield
            return
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        self._init_config_if_needed()
        told = HfDeepSpeedConfig(self.config)  # noqa: F841 - transformers keeps a weak reference: alive while held here
        try:
            with super().model_sharded_context():
                yield
        finally:
            unset_hf_deepspeed_config()

    @property
    def offloads_optimizer(self) -> bool:
        """Whether ZeRO keeps optimizer states on the CPU (or NVMe) and steps them there."""
        zero = (self.config or {}).get("zero_optimization") or {}
        return (zero.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme")

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        if optimizer is not None and self.offloads_optimizer and "zero_force_ds_cpu_optimizer" not in self.config:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            if not isinstance(optimizer, DeepSpeedCPUAdam):
                # DeepSpeed refuses a client optimizer with ZeRO-Offload unless told otherwise; the
                # step then runs this optimizer on the offloaded fp32 partitions (correct, slower
                # than DeepSpeedCPUAdam, which needs a C++ build)
                log.warning(
                    "ZeRO-Offload with %s: stepping it on the CPU; DeepSpeedCPUAdam is faster",
                    type(optimizer).__name__,
                )
                self.config["zero_force_ds_cpu_optimizer"] = False
        return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """DeepSpeed's engine writes every rank's files in place, so a kill mid-save would damage
        the newest checkpoint: it writes into a temporary directory instead (:func:`save_staged`)."""
        save_staged(self, lambda temp: super(DeepSpeedStrategy, self).save_checkpoint(checkpoint, temp, storage_options), filepath)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Refuses in one line a ZeRO checkpoint that another number of ranks wrote: its partitions
        fit only as many ranks, and DeepSpeed says so in a traceback after the model is built. With
        ``exclude_frozen_parameters`` the frozen weights are not loaded (its checkpoints lack them)."""
        written = zero_ranks(Path(checkpoint_path)) if not (self.load_full_weights and self.zero_stage_3) else None
        if written and written != self.world_size:
            raise UserError(
                f"{checkpoint_path} was written by {written} ranks and this run has {self.world_size}: a DeepSpeed "
                f"checkpoint resumes on as many ranks as wrote it; run on {written} (trainer.devices x trainer.num_nodes), "
                "or export it (unimodal export --trust_checkpoint) and start a new run from its weights (init_from)"
            )
        module = self.lightning_module
        strict = module.strict_loading
        if self.exclude_frozen_parameters:
            # its checkpoints hold no frozen weights: they stay as the model's build made them
            # (init_from, or the seeded random init); the trained ones RunState checks by name
            module.strict_loading = False
        try:
            return super().load_checkpoint(checkpoint_path, weights_only)
        finally:
            module.strict_loading = strict

    def _auto_select_batch_size(self) -> int:
        # Lightning reads ``loader.batch_sampler.batch_size``, which is None for loaders that pass
        # ready batches on (``batch_size=None``, e.g. an IterableDataset of packed batches); the
        # value only feeds DeepSpeed's throughput logging
        try:
            return super()._auto_select_batch_size()
        except AttributeError:
            return 1

    def _get_process_group_backend(self) -> str:
        if self._process_group_backend is None and self._on_cpu():
            return "gloo"
        return super()._get_process_group_backend()


# the name recipes and the issues use: ``class_path: unimodal.training.strategies.DeepSpeed``
DeepSpeed = DeepSpeedStrategy


class FSDP(ModelParallelStrategy):
    """FSDP2 over every process (``fsdp2``): each decoder layer is one all-gather unit, the rest
    of the model (embeddings, heads, continuous modalities) the root unit.

    ``cpu_offload`` keeps the shards and the optimizer step on the CPU;
    ``reshard_after_forward`` frees gathered layers after forward (ZeRO-3-like memory; False keeps
    them until backward, ZeRO-2-like speed). With ``bf16-mixed`` the gathered parameters are bf16
    and gradients are reduced in fp32.
    """

    def __init__(self, cpu_offload: bool = False, reshard_after_forward: bool = True, **kwargs: Any):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)
        self.cpu_offload = cpu_offload
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # every process is a data-parallel rank (ModelParallelStrategy's "auto" is one per node)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if not self._save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        save_staged(self, lambda temp: super(FSDP, self).save_checkpoint(checkpoint, temp, storage_options), filepath)



def register_strategies() -> None:
    """Point Lightning's DeepSpeed strategy names at :class:`DeepSpeedStrategy`, and ``fsdp2`` at
    :class:`FSDP` (idempotent)."""
    StrategyRegistry.register("fsdp2", FSDP, description="FSDP2 (fully_shard), CUDA or CPU (unimodal)", override=True)
    for name, params in DEEPSPEED_PRESETS.items():
        StrategyRegistry.register(
            name,
            DeepSpeedStrategy,
            description=f"DeepSpeed ({name}), CUDA or CPU (unimodal)",
            override=True,
            **params,
        )


def strategy_names() -> list[str]:
    return sorted(set(LIGHTNING_NAMES) | set(DEEPSPEED_PRESETS) | {"fsdp2"})


def build_strategy(name: str, **options: Any) -> Strategy | str:
    """The ``trainer.strategy`` value for a strategy name and extra options.

    ``auto`` and the DDP names go to Lightning unchanged (DDP on CPU uses gloo); DeepSpeed names
    give a :class:`DeepSpeedStrategy` with the preset's options updated by ``options``, e.g.
    ``build_strategy("deepspeed_stage_3", offload_optimizer=True)``.
    """
    register_strategies()
    key = name.lower()
    if key == "auto":
        if options:
            raise ValueError(f"strategy 'auto' takes no options, got {sorted(options)}")
        return key
    if key in DEEPSPEED_PRESETS:
        return DeepSpeedStrategy(**{**DEEPSPEED_PRESETS[key], **options})
    if key in StrategyRegistry:
        if not options:
            return key
        entry = StrategyRegistry[key]
        return entry["strategy"](**{**entry["init_params"], **options})
    raise ValueError(f"unknown strategy {name!r}; known: {', '.join(strategy_names())}")

