"""The diffusion head: a per-token MLP with AdaLN, conditioned on the backbone hidden state.

Orthus and MAR put a small denoiser on top of the LLM: for each image token it takes the noised
feature ``x_t``, the timestep and the backbone's hidden state at the position before the token,
and predicts the schedule's target (noise, velocity or flow). The conditioning vector is
``time_embedding(t) + Linear(hidden)``; each residual block is LayerNorm -> shift/scale ->
Linear -> SiLU -> Linear, gated, with shift/scale/gate from the conditioning (AdaLN). The
modulations and the output layer start at zero, so the untrained head predicts 0 and every block
starts as the identity (adaLN-zero).
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn


class TimeEmbedding(nn.Module):
    """Sinusoidal timestep features followed by an MLP (float timesteps in [0, 1000])."""

    def __init__(self, width: int):
        super().__init__()
        self.features = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = TimestepEmbedding(width, width)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(t).to(self.mlp.linear_1.weight.dtype))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class AdaLNBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(c).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))


class DiffusionHead(nn.Module):
    """``head(x_t [M, D], t [M], cond [M, H]) -> [M, D]``.

    ``width`` and ``depth`` are Orthus's 1536 x 3 (about 50M parameters with a 4096-wide
    backbone) or MAR's 1024 x 3 by default.
    """

    def __init__(self, feature_dim: int, cond_dim: int, width: int = 1536, depth: int = 3):
        super().__init__()
        self.time = TimeEmbedding(width)
        self.cond = nn.Linear(cond_dim, width)
        self.input = nn.Linear(feature_dim, width)
        self.blocks = nn.ModuleList(AdaLNBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.output = nn.Linear(width, feature_dim)
        self.zero_init()

    def zero_init(self) -> None:
        """adaLN-zero: modulations and the output layer at zero (the untrained head predicts 0)."""
        zeroed = [block.modulation[-1] for block in self.blocks] + [self.final_modulation[-1], self.output]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        dtype = self.input.weight.dtype
        c = self.time(t) + self.cond(cond.to(dtype))
        h = self.input(x.to(dtype))
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_modulation(c).chunk(2, dim=-1)
        return self.output(modulate(self.final_norm(h), shift, scale))
