"""AdamW with linear warmup and cosine decay, stepped per optimizer step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    # warmup_steps wins when set; otherwise warmup_ratio of the total optimizer steps
    warmup_steps: int | None = None
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        """Values that would train backwards (a negative floor of the schedule) or not at all."""
        rules = {
            "lr": (self.lr > 0, "> 0"), "eps": (self.eps > 0, "> 0"), "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "betas": (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two values in [0, 1)"),
            "warmup_steps": (self.warmup_steps is None or self.warmup_steps >= 0, ">= 0 or null"),
            "warmup_ratio": (0 <= self.warmup_ratio < 1, "in [0, 1)"),
            "min_lr_ratio": (0 <= self.min_lr_ratio <= 1, "in [0, 1] (the floor of the schedule, a fraction of lr)"),
        }
        for name, (ok, wanted) in rules.items():
            if not ok:
                raise ValueError(f"optimizer.{name} must be {wanted}, got {getattr(self, name)}")


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, total_steps: int) -> dict:
    """Lightning ``configure_optimizers`` output; no weight decay on biases, norms and 1-D params.
    A parameter built under ZeRO-3's ``zero.Init`` holds an empty 1-D placeholder and its real
    shape in ``ds_shape``."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if len(getattr(param, "ds_shape", param.shape)) >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel (one launch for all parameters) where every parameter is on a GPU
    fused = bool(decay + no_decay) and all(p.is_cuda for p in decay + no_decay)
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None
    )
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup, total_steps, cfg.min_lr_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "name": "lr"}}
