"""ZeRO-3 with continuous images in two processes (torchrun, gloo), for tests/test_continuous_zero3.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/distributed/continuous_zero3.py --out DIR

Rank 0 trains on documents with images, rank 1 on text only: the diffusion head, the input and
output adapters and the image experts must still run on rank 1 every step, or the ranks' ZeRO-3
collectives stop matching and the run hangs. Two runs: Orthus (soft-VQ + per-token head) and
LlamaFusion (image experts copied from partitioned text weights + U-Net adapters). Rank 0 writes
``DIR/<run>.pt``: the image-expert / head weights before and after (gathered), and the losses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from conftest import CharTokenizer  # noqa: E402
from tiny import BACKBONE, ListDataset, LossRecorder, Snapshot, trainer_kwargs  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from unimodal.data.processor import Processor  # noqa: E402
from unimodal.data.packing import Packer, collate  # noqa: E402
from unimodal.schema import Document, Part  # noqa: E402
from unimodal.modalities.image_continuous import PixelPatchCodec  # noqa: E402
from unimodal.modalities.vocab import VocabLayout  # noqa: E402
from unimodal.models.continuous import TokenDiffusionImage, TransfusionImage  # noqa: E402
from unimodal.training.module import UnimodalModule  # noqa: E402
from unimodal.training.optim import OptimizerConfig  # noqa: E402
from unimodal.training.strategies import build_strategy  # noqa: E402

STEPS = 3
TOKENIZER = CharTokenizer()


def batches(rank: int, orthus: bool) -> list:
    layout = VocabLayout(TOKENIZER.vocab_size, code_ranges={"image": 16} if orthus else {})
    encoder = Processor(TOKENIZER, layout, 48, bidirectional=() if orthus else ("image",),
                              codecs={"image": PixelPatchCodec(size=8, patch=4)})
    rng = np.random.default_rng(rank)
    out = []
    for step in range(STEPS):
        parts = [Part("text", text=f"step {step} on rank {rank}")]
        if rank == 0:
            parts.append(Part("image", media=0, data=rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)))
        out.append(collate(list(Packer(48, 0, 48).pack([encoder.encode(Document(parts, key=f"s{step}"))]))))
    return out


class RankData(L.LightningDataModule):
    def __init__(self, orthus: bool):
        super().__init__()
        self.orthus = orthus

    def train_dataloader(self) -> DataLoader:
        return DataLoader(ListDataset(batches(self.trainer.global_rank, self.orthus)), batch_size=None)


def module(orthus: bool) -> UnimodalModule:
    hidden = BACKBONE.config["hidden_size"]
    if orthus:
        def build(h):
            return TokenDiffusionImage(h, feature_dim=48, slots_per_item=4, codebook_size=16, head_width=16, head_depth=1,
                                  batch_mul=2, latent_scale=1.0)
        trainable, routing = ["continuous.*"], None
    else:
        def build(h):
            return TransfusionImage(h, feature_dim=48, slots_per_item=4, patchify="unet", patch=4,
                                    unet_channels=[4, 4, 4], norm_groups=2)
        trainable, routing = ["*.experts.image.*", "continuous.*"], ["image"]
    layout = VocabLayout(TOKENIZER.vocab_size, code_ranges={"image": 16} if orthus else {})
    assert hidden == 32
    return UnimodalModule(backbone=BACKBONE, vocab=layout.to_dict(), continuous={"image": build},
                          trainable=trainable, routing=routing,
                          optimizer=OptimizerConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", default="deepspeed_stage_3")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for name in ("orthus", "llamafusion"):
        L.seed_everything(0)
        snap, losses = Snapshot(), LossRecorder()
        trainer = L.Trainer(**trainer_kwargs(out / name, strategy=build_strategy(args.strategy), devices=2,
                                             max_steps=STEPS, callbacks=[snap, losses]))
        trainer.fit(module(name == "orthus"), datamodule=RankData(name == "orthus"))
        if trainer.is_global_zero:
            keep = lambda n: ".experts.image." in n or n.startswith("continuous.")  # noqa: E731
            torch.save({"initial": {k: v for k, v in snap.initial.items() if keep(k)},
                        "final": {k: v for k, v in snap.final.items() if keep(k)},
                        "text_q": snap.initial["backbone.model.layers.0.self_attn.q_proj.weight"],
                        "losses": losses.losses}, out / f"{name}.pt")


if __name__ == "__main__":
    main()
