"""Input and output adapters between continuous image features and the backbone width.

- :class:`SoftVQ` (Orthus): each feature becomes a convex mix of the backbone's image-token
  embedding rows, weighted by ``softmax(-|v - c_j|^2 / temperature)`` over a trainable codebook
  ``c`` (initialised from the VQ codebook). No quantisation, so no information is thrown away,
  and the backbone sees inputs in the span of embeddings it was trained on.
- :class:`LinearPatchify` / :class:`LinearUnpatchify` (Transfusion): a linear map of each patch
  token plus a timestep embedding in; a linear map back out.
- :class:`UNetPatchify` / :class:`UNetUnpatchify` (Transfusion, LlamaFusion): the patch tokens of
  an image are put back on their grid and pass through timestep-conditioned ResNet blocks and
  strided downsampling to one vector per patch; the way out mirrors it with upsampling and skip
  connections from the way in.

Patchify adapters work on whole images: ``[images, slots, feature_dim]``, with the patch-token
layout of :func:`unimodal.modalities.image_continuous.patchify`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from unimodal.modalities.image_continuous import patchify, unpatchify
from unimodal.models.heads import TimeEmbedding


class SoftVQ(nn.Module):
    """``embed(v [N, D], rows [K, H]) = softmax(-d(v, codebook) / temperature) @ rows``."""

    def __init__(self, feature_dim: int, codebook_size: int, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"soft-VQ temperature must be > 0, got {temperature}")
        self.codebook = nn.Parameter(torch.randn(codebook_size, feature_dim))
        self.temperature = temperature

    def weights(self, features: torch.Tensor) -> torch.Tensor:
        """``[N, K]`` mixing weights; distances |v|^2 + |c|^2 - 2 v.c in fp32."""
        v, c = features.float(), self.codebook.float()
        distances = v.pow(2).sum(-1, keepdim=True) + c.pow(2).sum(-1) - 2 * v @ c.T
        return torch.softmax(-distances / self.temperature, dim=-1)

    def forward(self, features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.weights(features).to(rows.dtype) @ rows


class LinearPatchify(nn.Module):
    """Patch tokens ``[B, S, D]`` + timesteps ``[B]`` -> ``[B, S, H]``; no state for the way out."""

    def __init__(self, feature_dim: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(feature_dim, hidden_size)
        self.time = TimeEmbedding(hidden_size)

    def forward(self, tokens: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.proj(tokens.to(self.proj.weight.dtype)) + self.time(t)[:, None], []


class LinearUnpatchify(nn.Module):
    def __init__(self, hidden_size: int, feature_dim: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, feature_dim)

    def forward(self, hidden: torch.Tensor, t: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        return self.proj(hidden.to(self.proj.weight.dtype))


def _levels(patch: int) -> int:
    levels = int(math.log2(patch))
    if 2**levels != patch:
        raise ValueError(f"U-Net patchify needs a power-of-two patch size, got {patch}")
    return levels


class UNetPatchify(nn.Module):
    """Grid ``[B, C, side*p, side*p]`` -> ResNet blocks and log2(p) stride-2 downsamplings -> one
    ``H``-vector per patch. ``channels[i]`` is the width at level ``i`` (``len = log2(p) + 1``)."""

    def __init__(self, feature_dim: int, hidden_size: int, patch: int, channels: list[int], groups: int = 32):
        super().__init__()
        from diffusers.models.resnet import Downsample2D, ResnetBlock2D

        levels = _levels(patch)
        if len(channels) != levels + 1:
            raise ValueError(f"U-Net patchify with patch {patch} needs {levels + 1} channel widths, got {channels}")
        if feature_dim % (patch * patch):
            raise ValueError(f"feature_dim {feature_dim} is not patch*patch*channels for patch {patch}")
        self.patch, self.in_channels = patch, feature_dim // (patch * patch)
        temb = channels[-1]
        self.time = TimeEmbedding(temb)
        self.conv_in = nn.Conv2d(self.in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        for level, width in enumerate(channels):
            before = channels[max(level - 1, 0)]
            self.blocks.append(ResnetBlock2D(in_channels=before, out_channels=width, temb_channels=temb, groups=groups))
            if level < levels:
                self.downs.append(Downsample2D(width, use_conv=True, padding=1))
        self.proj = nn.Conv2d(channels[-1], hidden_size, 1)

    def forward(self, tokens: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        dtype = self.conv_in.weight.dtype
        temb = self.time(t)
        x = self.conv_in(unpatchify(tokens.to(dtype), self.patch, self.in_channels))
        skips = []
        for level, block in enumerate(self.blocks):
            x = block(x, temb)
            skips.append(x)
            if level < len(self.downs):
                x = self.downs[level](x)
        return self.proj(x).flatten(2).transpose(1, 2), skips + [temb]


class UNetUnpatchify(nn.Module):
    """Hidden states ``[B, S, H]`` -> the mirror of :class:`UNetPatchify` (upsampling, skips from
    the way in, the same timestep embedding) -> patch tokens ``[B, S, D]``."""

    def __init__(self, hidden_size: int, feature_dim: int, patch: int, channels: list[int], groups: int = 32):
        super().__init__()
        from diffusers.models.resnet import ResnetBlock2D, Upsample2D

        levels = _levels(patch)
        self.patch, self.out_channels = patch, feature_dim // (patch * patch)
        temb = channels[-1]
        self.proj = nn.Conv2d(hidden_size, channels[-1], 1)
        self.blocks = nn.ModuleList()
        self.ups = nn.ModuleList()
        for level in reversed(range(levels + 1)):
            after = channels[max(level - 1, 0)]
            width = channels[level]
            self.blocks.append(ResnetBlock2D(in_channels=2 * width, out_channels=after, temb_channels=temb, groups=groups))
            if level > 0:
                self.ups.append(Upsample2D(after, use_conv=True))
        self.norm_out = nn.GroupNorm(groups, channels[0])
        self.conv_out = nn.Conv2d(channels[0], self.out_channels, 3, padding=1)

    def forward(self, hidden: torch.Tensor, t: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        *levels, temb = skips
        b, s, h = hidden.shape
        side = int(round(s**0.5))
        x = self.proj(hidden.to(self.proj.weight.dtype).transpose(1, 2).reshape(b, h, side, side))
        for i, block in enumerate(self.blocks):
            x = block(torch.cat([x, levels[-1 - i]], dim=1), temb)
            if i < len(self.ups):
                x = self.ups[i](x)
        x = self.conv_out(nn.functional.silu(self.norm_out(x)))
        return patchify(x, self.patch)


def build_patch_adapters(
    kind: str, feature_dim: int, hidden_size: int, patch: int, channels: list[int] | None, groups: int
) -> tuple[nn.Module, nn.Module]:
    """The (in, out) adapter pair of a patchify kind: ``linear`` or ``unet``."""
    if kind == "linear":
        return LinearPatchify(feature_dim, hidden_size), LinearUnpatchify(hidden_size, feature_dim)
    if kind == "unet":
        if not channels:
            raise ValueError("patchify 'unet' needs unet_channels (one width per level)")
        return (
            UNetPatchify(feature_dim, hidden_size, patch, channels, groups),
            UNetUnpatchify(hidden_size, feature_dim, patch, channels, groups),
        )
    raise ValueError(f"patchify {kind!r} is not 'linear' or 'unet'")
