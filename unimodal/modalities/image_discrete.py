"""Discrete image tokenizers other than SEED: Chameleon's VQ-VAE through transformers.

A 512x512 image becomes 32x32 = 1024 codes of an 8192-entry codebook (raster order). The model
directory is either a full Chameleon checkpoint (only ``model.vqmodel.*`` is read) or a
``ChameleonVQVAE`` saved alone. transformers ships the VQ-VAE encoder only, so codes cannot be
turned back into pixels here; SEED (``unimodal.modalities.seed_tokenizer``) can.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unimodal.data.schema import Part
from unimodal.modalities.base import MediaCodec


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """An HxWx3 uint8 image with its shortest side resized to ``size``, centre-cropped to ``size x size``."""
    from PIL import Image

    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"expected an HxWx3 uint8 image, got {getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
    h, w = image.shape[:2]
    scale = size / min(h, w)
    resized = Image.fromarray(image).resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)


def to_pixels(image: np.ndarray, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """An HxWx3 uint8 image -> ``[3, size, size]`` float: :func:`center_crop`, then normalised."""
    pixels = torch.from_numpy(center_crop(image, size).astype(np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def weights_checksum(state: dict[str, torch.Tensor]) -> str:
    """sha256 (16 hex digits) over tensors in name order: same name, other weights, other codes."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()[:16]


class ChameleonImageTokenizer(MediaCodec):
    """Chameleon's VQ-VAE as an image codec: HxWx3 uint8 -> int64 codes ``[h, w]`` (raster order)."""

    modality = "image"

    def __init__(self, vqmodel: torch.nn.Module):
        self.model = vqmodel.eval()
        config = vqmodel.config
        self.resolution = int(config.resolution)
        self.codebook_size = int(config.num_embeddings)
        self.grid = self.resolution // 2 ** (len(config.channel_multiplier) - 1)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ChameleonImageTokenizer:
        from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} is not a model directory (no config.json); tokenizers load from local paths only")
        raw = json.loads(config_file.read_text())
        if raw.get("model_type") == "chameleon_vqgan":
            return cls(ChameleonVQVAE.from_pretrained(str(path), local_files_only=True))
        if raw.get("model_type") != "chameleon":
            raise ValueError(f"{config_file}: model_type {raw.get('model_type')!r} is neither chameleon nor chameleon_vqgan")
        model = ChameleonVQVAE(ChameleonVQVAEConfig(**raw["vq_config"]))
        state = _prefixed_weights(path, "model.vqmodel.")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: VQ-VAE weights do not match (missing {missing[:5]}, unexpected {unexpected[:5]})")
        return cls(model)

    @torch.no_grad()
    def encode_images(self, images: list[np.ndarray]) -> np.ndarray:
        """uint8 images -> codes ``[n, h, w]``."""
        pixels = torch.stack([to_pixels(im, self.resolution, (0.5,) * 3, (0.5,) * 3) for im in images])
        tokens = self.model.encode(pixels.to(self.model.device), return_dict=True).image_tokens
        return tokens.view(len(images), self.grid, self.grid).cpu().numpy().astype(np.int64)

    def encode(self, part: Part) -> np.ndarray:
        return self.encode_images([part.data])[0]

    def encode_batch(self, parts: list[Part]) -> np.ndarray:
        return self.encode_images([part.data for part in parts])

    def decode(self, array: np.ndarray) -> Any:
        raise NotImplementedError(
            "transformers' Chameleon VQ-VAE has no pixel decoder; generate with the SEED tokenizer to get images back"
        )

    @cached_property
    def checksum(self) -> str:
        return weights_checksum(self.model.state_dict())

    def fingerprint(self) -> dict[str, Any]:
        return {
            "name": "chameleon_vqgan",
            "codebook_size": self.codebook_size,
            "layers": 1,
            "tokens_per_item": self.grid * self.grid,
            "resolution": self.resolution,
            "checksum": self.checksum,
        }


def _prefixed_weights(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` from a (possibly sharded) safetensors checkpoint, prefix removed."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors weights")
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    state[key[len(prefix) :]] = f.get_tensor(key)
    if not state:
        raise ValueError(f"{path}: no weights under {prefix!r}")
    return state
