"""Continuous image codecs: pixel patches, a diffusers VAE, Chameleon VQ-encoder features.

Every codec turns one image into float *patch tokens* ``[n, d]`` in raster order, which the
document encoder places as ``n`` continuous slots:

- ``PixelPatchCodec``: the pixels themselves in [-1, 1], cut into ``patch x patch`` squares
  (small synthetic data such as the digits world; no model needed);
- ``VAECodec``: a diffusers ``AutoencoderKL`` read from a local directory; latents are shifted
  and scaled (``(z - shift) * scale``, from the VAE config unless given) and cut into patches
  (Transfusion / LlamaFusion);
- ``ChameleonVQCodec``: the encoder and ``quant_conv`` of a Chameleon VQ-VAE, *without* the
  quantiser: one 256-d feature per latent cell (Orthus).

The transform every codec applies first (``ImageTransform``): convert to RGB, resize so the
shorter side is ``size`` (bicubic, antialiased), centre-crop to ``size x size``, scale to [-1, 1].
A file or array that is not an image raises :class:`DocumentError`, which the data pipeline
counts as a skipped sample.

A patch token holds ``patch * patch * channels`` values ordered (row in patch, column in patch,
channel); ``patchify`` and ``unpatchify`` are the one definition of that layout, shared with the
model's patchify adapters.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unimodal.modalities.base import MediaCodec, check_declared, load_pretrained, model_config, model_files_read, weights_checksum
from unimodal.schema import IMAGE_FORMATS, DocumentError, Part


def patchify(grid: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)(W/p), p*p*C]`` patch tokens in raster order."""
    b, c, h, w = grid.shape
    if h % patch or w % patch:
        raise ValueError(f"a {h}x{w} grid does not split into {patch}x{patch} patches")
    x = grid.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for square grids: ``[B, n, p*p*C]`` -> ``[B, C, H, W]``."""
    b, n, d = tokens.shape
    side = int(round(n**0.5))
    if side * side != n or d != patch * patch * channels:
        raise ValueError(f"{n} patch tokens of width {d} are not a square grid of {patch}x{patch}x{channels} patches")
    x = tokens.reshape(b, side, side, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, side * patch, side * patch)


# PIL's modes for 16-bit grey (a 16-bit PNG opens as one of them); its own conversion to RGB clips them at 255
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def rgb_image(image: Any) -> Any:
    """A PIL image as RGB the way a viewer shows it: turned upright by its EXIF orientation (a
    phone's portrait photo is stored sideways), 16-bit grey scaled to 8 bits, and transparent
    pixels laid over white (a drawing or logo often stores black under them, which dropping the
    alpha channel would show)."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        image = Image.fromarray((np.clip(np.asarray(image), 0, 65535) >> 8).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return image.convert("RGB")


def load_image(data: Any, where: str = "image") -> Any:
    """A PIL RGB image from an HxW[xC] uint8 array, a PIL image, encoded bytes or a file path."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(data, Image.Image):
        return rgb_image(data)
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim not in (2, 3) or (data.ndim == 3 and data.shape[2] not in (1, 3, 4)):
            raise DocumentError(f"{where}: expected an HxW or HxWx{{1,3,4}} uint8 array, got {data.dtype} {data.shape}")
        return rgb_image(Image.fromarray(data[..., 0] if data.ndim == 3 and data.shape[2] == 1 else data))
    raw = getattr(data, "data", data)  # MediaBytes carry the encoded file in .data
    try:
        if isinstance(raw, (bytes, bytearray)):
            image = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
        elif isinstance(raw, (str, Path)):
            image = Image.open(raw, formats=IMAGE_FORMATS)
        else:
            raise DocumentError(f"{where}: cannot read an image from {type(data).__name__}")
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DocumentError(f"{where}: not a readable image ({type(err).__name__}: {err})") from None
    return rgb_image(image)


# the largest square a codec resizes images to: 4096 x 4096 x 3 float32 is 200 MB a picture
MAX_IMAGE_SIZE = 4096


@dataclass
class ImageTransform:
    """Resize the shorter side to ``size`` (bicubic), centre-crop ``size x size``, map to [-1, 1]."""

    size: int

    def __call__(self, data: Any, where: str = "image") -> torch.Tensor:
        image = np.asarray(load_image(data, where), dtype=np.uint8)
        pixels = torch.from_numpy(center_crop(image, self.size).astype(np.float32))
        return pixels.permute(2, 0, 1) / 127.5 - 1.0


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """An HxWx3 uint8 image with its shortest side resized to ``size``, centre-cropped to ``size x size``.
    Only the central square is resized: resizing the whole image first would make a 2 KB PNG of
    2,000,000 x 1 pixels 2,000,000 times ``size`` wide, gigabytes."""
    from PIL import Image

    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"expected an HxWx3 uint8 image, got {getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
    h, w = image.shape[:2]
    if h == w == size:  # what PIL's resize and crop would return, without their copies
        return image
    side = min(h, w)
    left, top = (w - side) / 2, (h - side) / 2
    square = Image.fromarray(image).resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))
    return np.asarray(square, dtype=np.uint8)


def to_pixels(image: np.ndarray, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """An HxWx3 uint8 image -> ``[3, size, size]`` float: :func:`center_crop`, then normalised."""
    pixels = torch.from_numpy(center_crop(image, size).astype(np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` in [-1, 1] -> ``HxWx3`` uint8."""
    x = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0).cpu().numpy()


def _where(part: Part) -> str:
    return f"image part {part.media}" if part.media is not None else "image"


class PixelPatchCodec(MediaCodec):
    """Raw pixels as patch tokens: ``(size/patch)^2`` slots of ``patch*patch*C`` values in [-1, 1].

    ``grey=True`` keeps one channel (the mean of R, G, B; decoded back to three equal channels):
    a third of the width for grey material such as handwritten digits.
    """

    modality = "image"

    def __init__(self, size: int = 16, patch: int = 4, grey: bool = False):
        if not 1 <= patch <= size <= MAX_IMAGE_SIZE:  # a codec file's sizes are input too
            raise ValueError(f"image size {size} and patch {patch}: need 1 <= patch <= size <= {MAX_IMAGE_SIZE}")
        if size % patch:
            raise ValueError(f"image size {size} is not a multiple of patch {patch}")
        self.transform = ImageTransform(size)
        self.patch = patch
        self.grey = grey
        self.channels = 1 if grey else 3

    @property
    def slots(self) -> int:
        return (self.transform.size // self.patch) ** 2

    @property
    def feature_dim(self) -> int:
        return self.patch * self.patch * self.channels

    def encode(self, part: Part) -> np.ndarray:
        pixels = self.transform(part.data, _where(part))
        if self.grey:
            pixels = pixels.mean(0, keepdim=True)
        return patchify(pixels[None], self.patch)[0].numpy()

    def decode(self, array: np.ndarray) -> np.ndarray:
        tokens = torch.as_tensor(np.asarray(array, dtype=np.float32))[None]
        return to_uint8(unpatchify(tokens, self.patch, self.channels)[0].expand(3, -1, -1))

    def fingerprint(self) -> dict[str, Any]:
        return {"name": type(self).__name__, "size": self.transform.size, "patch": self.patch, "grey": self.grey}


class VAECodec(MediaCodec):
    """A diffusers ``AutoencoderKL`` from a local directory; latents ``(z - shift) * scale`` as patches.

    The posterior mean is used (not a sample) so that encoding is deterministic; ``scale`` and
    ``shift`` default to the VAE config's ``scaling_factor`` and ``shift_factor``.
    """

    modality = "image"

    def __init__(
        self,
        path: str,
        size: int = 256,
        patch: int = 2,
        scale: float | None = None,
        shift: float | None = None,
        device: str = "cpu",
    ):
        from diffusers import AutoencoderKL

        self.path = Path(path)
        model_config(self.path, "VAE")
        self.vae = load_pretrained(AutoencoderKL, self.path).float().to(device).eval().requires_grad_(False)
        self.transform = ImageTransform(size)
        self.patch = patch
        self.channels = int(self.vae.config.latent_channels)
        self.scale = float(self.vae.config.scaling_factor if scale is None else scale)
        self.shift = float((self.vae.config.shift_factor or 0.0) if shift is None else shift)
        self.device = torch.device(device)

    @property
    def feature_dim(self) -> int:
        return self.patch * self.patch * self.channels

    @torch.no_grad()
    def encode(self, part: Part) -> np.ndarray:
        pixels = self.transform(part.data, _where(part))[None].to(self.device)
        latent = self.vae.encode(pixels).latent_dist.mean
        return patchify((latent - self.shift) * self.scale, self.patch)[0].float().cpu().numpy()

    @torch.no_grad()
    def decode(self, array: np.ndarray) -> np.ndarray:
        tokens = torch.as_tensor(np.asarray(array, dtype=np.float32), device=self.device)[None]
        latent = unpatchify(tokens, self.patch, self.channels) / self.scale + self.shift
        return to_uint8(self.vae.decode(latent).sample[0])

    @cached_property
    def checksum(self) -> str:
        """Of the weights, not the config files, which a VAE fine-tuned in place keeps."""
        return weights_checksum(self.vae.state_dict())

    def fingerprint(self) -> dict[str, Any]:
        return {
            "name": type(self).__name__,
            "checksum": self.checksum,
            "size": self.transform.size,
            "patch": self.patch,
            "scale": self.scale,
            "shift": self.shift,
        }


def latent_side(config: Any) -> int:
    """The side of a Chameleon VQ-VAE's latent grid: each down block but the first halves the image."""
    return int(config.resolution) // 2 ** (len(config.channel_multiplier) - 1)


def load_chameleon_vqvae(path: str | Path) -> Any:
    """The ``ChameleonVQVAE`` of a local directory: one saved alone (``unimodal convert orthus``
    writes one), or the ``vq_config`` and ``model.vqmodel.*`` weights of a whole Chameleon checkpoint."""
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    path = Path(path)
    config = model_config(path, "Chameleon VQ-VAE")
    kind = config.get("model_type")
    if kind == "chameleon_vqgan":  # fp32 whatever it was saved in (Orthus's conversion keeps bf16): pixels come as fp32
        return load_pretrained(ChameleonVQVAE, path).float()
    if kind != "chameleon":
        raise ValueError(f"{path}: model_type {kind!r} is neither a Chameleon VQ-VAE ('chameleon_vqgan') nor a Chameleon "
                         "checkpoint ('chameleon')")
    if not isinstance(config.get("vq_config"), dict):
        raise ValueError(f"{path / 'config.json'}: a Chameleon checkpoint without a vq_config object; copy the model directory again")
    check_declared(path, lambda: ChameleonVQVAE(ChameleonVQVAEConfig(**config["vq_config"])))
    with model_files_read(path):
        model = ChameleonVQVAE(ChameleonVQVAEConfig(**config["vq_config"]))
        missing, unexpected = model.load_state_dict(_prefixed_weights(path, "model.vqmodel."), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: VQ-VAE weights do not match (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model


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


class ChameleonVQCodec(MediaCodec):
    """Chameleon VQ-VAE encoder + ``quant_conv`` features, the quantiser skipped (Orthus).

    A 512x512 image gives 32x32 = 1024 features of 256 values. ``transformers`` ships only the
    encoder half of this VQ-VAE, so ``decode`` cannot render pixels; it is refused with a message.
    """

    modality = "image"

    def __init__(self, path: str, size: int = 512, device: str = "cpu"):
        self.path = Path(path)
        self.vq = load_chameleon_vqvae(self.path).to(device).eval().requires_grad_(False)
        self.transform = ImageTransform(size)
        self.device = torch.device(device)

    @property
    def feature_dim(self) -> int:
        return int(self.vq.config.embed_dim)

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [-1, 1] -> ``[B, h*w, embed_dim]`` unquantised features."""
        grid = self.vq.quant_conv(self.vq.encoder(pixels.to(self.device)))
        return grid.flatten(2).transpose(1, 2)

    def encode(self, part: Part) -> np.ndarray:
        pixels = self.transform(part.data, _where(part))[None]
        return self.features(pixels)[0].float().cpu().numpy()

    def decode(self, array: np.ndarray) -> Any:
        raise NotImplementedError(
            "ChameleonVQCodec cannot decode: transformers ships only the Chameleon VQ-VAE encoder; "
            "render generated features with the Chameleon VQGAN decoder"
        )

    def fingerprint(self) -> dict[str, Any]:
        return {"name": type(self).__name__, "checksum": self.checksum, "size": self.transform.size}

    @cached_property
    def checksum(self) -> str:
        """Of the weights, not the config files, which a VQ-VAE fine-tuned in place keeps."""
        return weights_checksum(self.vq.state_dict())
