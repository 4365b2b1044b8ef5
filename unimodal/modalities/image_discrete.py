"""Discrete image tokenizers other than SEED.

- :class:`ChameleonImageTokenizer`: Chameleon's VQ-VAE through transformers. A 512x512 image
  becomes 32x32 = 1024 codes of an 8192-entry codebook (raster order). The model directory is
  either a full Chameleon checkpoint (only ``model.vqmodel.*`` is read) or a ``ChameleonVQVAE``
  saved alone. transformers ships the VQ-VAE encoder only, so codes cannot be turned back into
  pixels here; SEED (``unimodal.modalities.seed_tokenizer``) can.
- :class:`PatchVQCodec`: grey pixel patches quantised by k-means, the digits world's image
  tokenizer (fitted when the world is built).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unimodal.modalities.base import CODEC_FILE, MediaCodec, read_codec_files, save_codec_files, weights_checksum
from unimodal.modalities.image_continuous import PixelPatchCodec, latent_side, load_chameleon_vqvae, to_pixels
from unimodal.modalities.kmeans import fitting_bar, kmeans, nearest
from unimodal.schema import Part, local_path

PATCH_VQ_CODEBOOK = "codebook.npy"


class ChameleonImageTokenizer(MediaCodec):
    """Chameleon's VQ-VAE as an image codec: HxWx3 uint8 -> int64 codes ``[h, w]`` (raster order)."""

    modality = "image"

    def __init__(self, vqmodel: torch.nn.Module):
        self.model = vqmodel.eval()
        config = vqmodel.config
        self.resolution = int(config.resolution)
        self.codebook_size = int(config.num_embeddings)
        self.grid = latent_side(config)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ChameleonImageTokenizer:
        return cls(load_chameleon_vqvae(path))

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


class PatchVQCodec(MediaCodec):
    """Grey ``patch x patch`` pixel patches, each replaced by the nearest of ``codebook_size`` k-means
    centroids: a 16x16 digit is 4 codes with the defaults (raster order), decoded by pasting the
    centroids back.

    Why this shape: discrete-token families (MIO, SEED-LLaMA) need image codes, and small grey
    digits need no learned VQ-VAE; on the digits world's held-out images the image judge reads
    97.8% of the round trips right (docs/digits-world.md). ``fit`` trains the codebook;
    ``save`` and ``PatchVQCodec(path=DIR)`` (the form a recipe's ``codecs:`` entry uses) keep it in
    a directory: ``codec.json`` + ``codebook.npy``.
    """

    modality = "image"

    def __init__(self, path: str | None = None, size: int = 16, patch: int = 8, codebook_size: int = 256, kmeans_iters: int = 20):
        self.codebook: torch.Tensor | None = None  # [codebook_size, patch * patch]
        if path is not None:
            size, patch, codebook_size = self._read(Path(local_path(path)))
        self.pixels = PixelPatchCodec(size, patch, grey=True)
        self.codebook_size, self.kmeans_iters = codebook_size, kmeans_iters

    def fit(self, images: list[np.ndarray], seed: int = 0, progress: bool = False) -> PatchVQCodec:
        """Train the codebook on the patches of ``images`` (HxWx3 uint8); ``progress``: a bar of its
        k-means steps."""
        patches = torch.as_tensor(np.concatenate([self.pixels.encode(Part("image", data=im)) for im in images]))
        if len(patches) < self.codebook_size:
            raise ValueError(f"fit needs at least codebook_size={self.codebook_size} patches, got {len(patches)}")
        with fitting_bar(self.kmeans_iters + 1, progress) as bar:
            self.codebook = kmeans(patches, self.codebook_size, self.kmeans_iters, torch.Generator().manual_seed(seed), tick=bar.update)
        self.__dict__.pop("checksum", None)
        return self

    def _book(self) -> torch.Tensor:
        if self.codebook is None:
            raise RuntimeError("the PatchVQCodec is not fitted: call fit() or load a fitted one (path=...)")
        return self.codebook

    def encode(self, part: Part) -> np.ndarray:
        patches = torch.as_tensor(self.pixels.encode(part))
        return nearest(patches, self._book())[0].numpy().astype(np.int64)

    def decode(self, array: np.ndarray) -> np.ndarray:
        codes = np.asarray(array, dtype=np.int64).reshape(-1)
        if len(codes) != self.pixels.slots or codes.min(initial=0) < 0 or codes.max(initial=0) >= self.codebook_size:
            raise ValueError(f"a PatchVQCodec image is {self.pixels.slots} codes in [0, {self.codebook_size}), got {codes.tolist()}")
        return self.pixels.decode(self._book()[torch.as_tensor(codes)].numpy())

    @cached_property
    def checksum(self) -> str:
        return weights_checksum({"codebook": self._book()})

    def fingerprint(self) -> dict[str, Any]:
        return {
            "name": "patch-vq",
            "codebook_size": self.codebook_size,
            "layers": 1,
            "tokens_per_item": self.pixels.slots,
            "size": self.pixels.transform.size,
            "patch": self.pixels.patch,
            "checksum": self.checksum,
        }

    def save(self, directory: str | Path) -> Path:
        return save_codec_files(directory, {"fingerprint": self.fingerprint()}, {PATCH_VQ_CODEBOOK: self._book()})

    def _read(self, directory: Path) -> tuple[int, int, int]:
        """Load the codebook; return the saved (size, patch, codebook_size)."""
        config, arrays = read_codec_files(directory, "PatchVQCodec", (PATCH_VQ_CODEBOOK,))
        saved, book = config["fingerprint"], arrays[PATCH_VQ_CODEBOOK]
        expected = (saved["codebook_size"], saved["patch"] ** 2)
        if tuple(book.shape) != expected:
            raise ValueError(f"{directory}: the codebook has shape {tuple(book.shape)}, {CODEC_FILE} says {expected}")
        if weights_checksum({"codebook": book}) != saved["checksum"]:
            raise ValueError(f"{directory}: {PATCH_VQ_CODEBOOK} does not match the checksum in {CODEC_FILE}")
        self.codebook = book
        return saved["size"], saved["patch"], saved["codebook_size"]


