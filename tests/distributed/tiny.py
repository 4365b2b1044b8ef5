"""Tiny model and synthetic packed data shared by the strategy tests and their launch scripts.

Imported by ``tests/test_strategies.py`` and by ``train.py`` in this folder (which torchrun starts
once per rank), so both sides build exactly the same model and batches.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from unimodal.data.processor import EncodedDocument
from unimodal.batch import PackedBatch
from unimodal.data.packing import Packer, collate
from unimodal.modalities.vocab import VocabLayout
from unimodal.models.backbone import BackboneConfig
from unimodal.training.module import UnimodalModule

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")

TEXT_SIZE = 90
SEQ_LEN = 24
LAYOUT = VocabLayout(text_size=TEXT_SIZE)
BACKBONE = BackboneConfig(
    config={
        "model_type": "llama",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    },
    attention="sdpa",
)


def make_module(**kwargs) -> UnimodalModule:
    return UnimodalModule(backbone=BACKBONE, vocab=LAYOUT.to_dict(), **kwargs)


class SGDModule(UnimodalModule):
    """UnimodalModule with plain SGD (no momentum, no decay): one step moves weights by -lr * grad,
    so a wrong loss scale shows up in the update (Adam's first step would hide it)."""

    def __init__(self, *args, lr: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.sgd_lr = lr

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=self.sgd_lr)


def make_sgd_module(lr: float = 1.0) -> SGDModule:
    return SGDModule(backbone=BACKBONE, vocab=LAYOUT.to_dict(), lr=lr)


def random_document(rng: np.random.Generator, length: int, key: str) -> EncodedDocument:
    ids = rng.integers(0, TEXT_SIZE, size=length).astype(np.int64)
    target = np.ones(length, bool)
    target[0] = False  # the first token is never predicted
    return EncodedDocument(
        ids=ids,
        modality=np.zeros(length, np.int8),
        target=target,
        block=np.full(length, -1, np.int32),
        continuous=np.zeros(length, bool),
        features=np.zeros((0, 0), np.float32),
        key=key,
    )


def packed_sequences(seed: int, count: int) -> list[dict[str, np.ndarray]]:
    """``count`` packed sequences of random text documents of uneven lengths (so the number of
    label tokens differs between sequences, which makes per-token normalisation observable)."""
    rng = np.random.default_rng(seed)
    packer = Packer(seq_len=SEQ_LEN, pad_id=0, open_sequences=1)
    out: list[dict[str, np.ndarray]] = []
    n = 0
    while len(out) < count:
        # one or two documents per sequence, some padding left over
        docs = [random_document(rng, int(rng.integers(4, SEQ_LEN // 2)), f"d{n}-{i}") for i in range(int(rng.integers(1, 3)))]
        n += 1
        out.extend(packer.pack(docs))
    return out[:count]


def with_window(batch: PackedBatch, tokens: int) -> PackedBatch:
    return replace(batch, window_label_tokens=torch.tensor(tokens, dtype=torch.long))


def windowed_batches(sequences: list[dict], batch_size: int, accumulate: int, world: int, rank: int) -> list[PackedBatch]:
    """This rank's micro-batches, in order, each told the label tokens of its rank's share of the
    optimizer step (``window_label_tokens``; the module sums it over ranks).

    Micro-batch ``m`` of optimizer step ``s`` on rank ``r`` holds sequences
    ``[(s * accumulate * world + m * world + r) * batch_size, ... + batch_size)``.
    """
    per_step = batch_size * accumulate * world
    steps = len(sequences) // per_step
    out = []
    for step in range(steps):
        micro = []
        for m in range(accumulate):
            start = (step * accumulate * world + m * world + rank) * batch_size
            micro.append(collate(sequences[start : start + batch_size]))
        window = sum(b.num_label_tokens for b in micro)
        out.extend(with_window(b, window) for b in micro)
    return out


class ListDataset(Dataset):
    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


class WindowedData(L.LightningDataModule):
    """Pre-batched PackedBatches for this rank (``batch_size=None``: the loader passes them on)."""

    def __init__(self, sequences: list[dict], batch_size: int, accumulate: int):
        super().__init__()
        self.sequences = sequences
        self.batch_size = batch_size
        self.accumulate = accumulate

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        batches = windowed_batches(self.sequences, self.batch_size, self.accumulate, world, rank)
        return DataLoader(ListDataset(batches), batch_size=None, shuffle=False)


def reference_sgd_update(initial: dict[str, torch.Tensor], sequences: list[dict], lr: float) -> dict[str, torch.Tensor]:
    """Weights after one plain-PyTorch SGD step on sum(CE) / label tokens over all ``sequences``."""
    module = make_module()
    module.configure_model()
    module.model.load_state_dict(initial)
    batch = collate(sequences)
    losses = module.model(batch)
    ce = sum(term.total for name, term in losses.items() if name.startswith("ce/"))
    (ce / batch.num_label_tokens).backward()
    with torch.no_grad():
        return {n: (p - lr * p.grad if p.grad is not None else p).detach().clone() for n, p in module.model.named_parameters()}


def trainer_kwargs(root: Path, **overrides) -> dict:
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(root),
    )
    kwargs.update(overrides)
    return kwargs


def full_weights(module: L.LightningModule) -> dict[str, torch.Tensor]:
    """Every parameter of ``module.model`` in full, on every rank (a collective under ZeRO-3 and
    FSDP2)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, param in module.model.named_parameters():
        if isinstance(param, DTensor):  # sharded by FSDP2
            out[name] = param.full_tensor().detach().clone().cpu()
        elif hasattr(param, "ds_id"):  # partitioned by ZeRO-3
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                out[name] = param.detach().clone().cpu()
        else:
            out[name] = param.detach().clone().cpu()
    return out


class Snapshot(L.Callback):
    """Full weights when training starts and when it ends."""

    def __init__(self):
        self.initial: dict | None = None
        self.final: dict | None = None

    def on_train_start(self, trainer, module):
        self.initial = full_weights(module)

    def on_train_end(self, trainer, module):
        self.final = full_weights(module)


class LossRecorder(L.Callback):
    """Keeps the logged ``train/loss`` of every micro-batch (rank-local)."""

    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        value = trainer.callback_metrics.get("train/loss")
        if value is not None:
            self.losses.append(float(value))
