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

from collections import deque
from itertools import islice

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from unimodal.models.sharding import gathered


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
        return self.modulated(x, *self.modulation(c).chunk(3, dim=-1))

    def modulated(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))


def check_head_size(width: int, depth: int) -> None:
    """One line for a head of no width or no blocks (a depth of 0 would build a head without AdaLN)."""
    for name, value in (("head_width", width), ("head_depth", depth)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}; it must be an integer >= 1")


class DiffusionHead(nn.Module):
    """``head(x_t [M, D], t [M], cond [M, H]) -> [M, D]``.

    ``width`` and ``depth`` are Orthus's 1536 x 3 (about 50M parameters with a 4096-wide
    backbone) or MAR's 1024 x 3 by default.
    """

    def __init__(self, feature_dim: int, cond_dim: int, width: int = 1536, depth: int = 3):
        super().__init__()
        check_head_size(width, depth)
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
        with gathered([p for layer in zeroed for p in layer.parameters()], modifier_rank=0):  # ZeRO-3 zero.Init
            for layer in zeroed:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        c = self.time(t) + self.cond(cond.to(self.input.weight.dtype))
        h = self.input(x.to(self.input.weight.dtype))
        for block in self.blocks:
            h = block(h, c)
        return self.finish(h, *self.final_modulation(c).chunk(2, dim=-1))

    def finish(self, h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.output(modulate(self.final_norm(h), shift, scale))

    def conditioned(self, cond: torch.Tensor) -> ConditionedHead:
        """The head as a sampler calls it, ``cond`` fixed: see :class:`ConditionedHead`."""
        return ConditionedHead(self, cond)


class ConditionedHead:
    """``head(x_t, t, cond)`` for one fixed ``cond``, for inference: a sampler calls the head once
    per step on a handful of rows, so small per-call work dominates. ``cond``'s projection is made
    once, and after :meth:`plan` the modulations (which depend on the timestep and ``cond`` only)
    are made for ``PLAN_CHUNK`` steps at a time, one call per layer (benchmarks/diffusion_head.py);
    chunks keep the memory bounded for any number of steps. A ``t`` that is not the next planned
    tensor (the same object) gets its modulations as :meth:`DiffusionHead.forward` makes them."""

    PLAN_CHUNK = 32

    def __init__(self, head: DiffusionHead, cond: torch.Tensor):
        self.head = head
        self.base = head.cond(cond.to(head.input.weight.dtype))
        self.upcoming: deque[torch.Tensor] = deque()  # the planned timesteps not yet called
        self.ready: deque[tuple[torch.Tensor, ...]] = deque()  # the modulations of the first of them

    def plan(self, timesteps: list[torch.Tensor]) -> None:
        """The timestep tensors the sampler will pass, in order, one ``[M]`` tensor a step."""
        self.upcoming, self.ready = deque(timesteps), deque()

    def modulations(self, t: torch.Tensor) -> torch.Tensor:
        """Every block's shift, scale and gate, then the final shift and scale: ``[..., (3 depth + 2) width]``."""
        c = self.head.time(t.flatten()).view(*t.shape, -1) + self.base
        return torch.cat([block.modulation(c) for block in self.head.blocks] + [self.head.final_modulation(c)], dim=-1)

    def _modulations_at(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        width = self.base.shape[-1]
        if not (self.upcoming and t is self.upcoming[0]):
            return self.modulations(t).split(width, dim=-1)
        if not self.ready:
            chunk = list(islice(self.upcoming, self.PLAN_CHUNK))
            self.ready.extend(mods.split(width, dim=-1) for mods in self.modulations(torch.stack(chunk)))
        self.upcoming.popleft()
        return self.ready.popleft()

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        head, mods = self.head, self._modulations_at(t)
        h = head.input(x.to(head.input.weight.dtype))
        for i, block in enumerate(head.blocks):
            h = block.modulated(h, *mods[3 * i : 3 * i + 3])
        return head.finish(h, *mods[-2:])
