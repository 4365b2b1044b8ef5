"""The SEED image tokenizer (arXiv 2307.08041): images to 32 discrete, left-to-right codes and back.

    frozen vision encoder -> causal Q-Former (learned queries, causal among themselves,
    cross-attending to the vision features) -> 768 -> 32 projection -> VQ codebook 8192 x 32
    (commitment loss, straight-through) -> 32 ids
    ids -> 32 -> 768 projection + positions -> 4 transformer blocks -> reconstructed causal
    embeddings, and one image embedding -> pixel decoder -> image

The pixel decoder is a diffusers unCLIP pipeline read from a local directory at full scale
(SEED's choice), or a small convolutional decoder trained in tokenizer stage 2 for small data.
Training is in ``unimodal.training.seed_tokenizer_stages``; ``docs/seed-tokenizer.md`` maps the paper's
settings to config keys. Departures from the paper: the Q-Former is a plain pre-norm transformer
trained from scratch (the paper starts from BLIP-2's BERT-base one) and the codebook looks up
l2-normalised vectors (cosine nearest neighbour), which keeps small codebooks from collapsing.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unimodal.modalities.base import (
    MediaCodec,
    check_fits_weights,
    load_pretrained,
    model_config,
    model_files_read,
    no_weights_bar,
    weights_checksum,
)
from unimodal.modalities.image_continuous import MAX_IMAGE_SIZE, center_crop
from unimodal.schema import Part, local_path, read_json_object

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_FILE = "seed_tokenizer.json"
WEIGHTS_FILE = "seed_tokenizer.safetensors"


@dataclass
class EncoderSpec:
    """A Hugging Face encoder (vision, or text for stage 1's captions): ``path`` (local directory)
    or ``config`` (dict with model_type, random weights, for tests). ``projection``: a CLIP vision
    tower with its projection, whose ``image_embeds`` are the embedding unCLIP decoders take."""

    path: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    projection: bool = False


def load_encoder(spec: EncoderSpec) -> nn.Module:
    from transformers import AutoConfig, AutoModel, CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    if (spec.path is None) == (not spec.config):
        raise ValueError("encoder: set exactly one of 'path' (local model directory) or 'config' (with model_type)")
    if spec.path is not None:  # fp32 whatever it was saved in, as the Q-Former it feeds
        config = model_config(spec.path, "encoder")
        if spec.projection:
            return load_pretrained(CLIPVisionModelWithProjection, spec.path).float()
        if config.get("model_type") == "clip":
            return load_pretrained(CLIPVisionModel, spec.path).float()  # the vision tower of a full CLIP
        return load_pretrained(AutoModel, spec.path).float()
    raw = dict(spec.config)
    kind = raw.pop("model_type", None)
    if kind is None:
        raise ValueError("encoder config needs a 'model_type' (e.g. clip_vision_model, vit, bert)")
    if spec.projection:
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**raw))
    return AutoModel.from_config(AutoConfig.for_model(kind, **raw))


def image_embedding(encoder: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """One vector per image: ``image_embeds`` (CLIP with projection), else the pooled output, else the mean token."""
    out = encoder(pixel_values=pixels)
    for name in ("image_embeds", "pooler_output"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    return out.last_hidden_state.mean(1)


@dataclass
class SeedConfig:
    """Architecture; defaults are the paper's (32 queries, BERT-base width, codebook 8192 x 32, 4
    decoder blocks). ``embed_dim`` and ``vision_dim`` are read from the encoders at build time."""

    num_queries: int = 32
    width: int = 768
    depth: int = 12
    heads: int = 12
    codebook_size: int = 8192
    code_dim: int = 32
    decoder_depth: int = 4
    beta: float = 0.25
    image_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    pixel_decoder_size: int = 0  # > 0: a small trained pixel decoder of that output size
    vision_dim: int = 0
    embed_dim: int = 0

    def __post_init__(self) -> None:
        """A saved tokenizer's ``seed_tokenizer.json`` is input: a value the modules cannot be built
        from is one line here, not an assertion deep inside torch."""
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        positive = ("num_queries", "width", "depth", "heads", "codebook_size", "code_dim", "decoder_depth", "image_size")
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"SEED tokenizer config: {name}={value!r}; it must be an integer >= 1")
        if self.width % self.heads:
            raise ValueError(f"SEED tokenizer config: width {self.width} is not a multiple of heads {self.heads}")
        stats_ok = all(len(v) == 3 and all(isinstance(x, (int, float)) and math.isfinite(x) for x in v) for v in (self.mean, self.std))
        if not stats_ok or min(self.std) <= 0:
            raise ValueError(f"SEED tokenizer config: mean {list(self.mean)} and std {list(self.std)} must be 3 finite numbers "
                             "each (one per colour channel), std > 0")
        if not (isinstance(self.beta, (int, float)) and self.beta >= 0) or self.pixel_decoder_size < 0:
            raise ValueError(f"SEED tokenizer config: beta={self.beta!r} and pixel_decoder_size={self.pixel_decoder_size!r} "
                             "must be >= 0")


class Block(nn.Module):
    """Pre-norm transformer block; ``context`` adds cross-attention (the Q-Former's look at the image)."""

    def __init__(self, width: int, heads: int, context_dim: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross = None
        if context_dim:
            self.norm2 = nn.LayerNorm(width)
            self.norm_context = nn.LayerNorm(context_dim)
            self.cross = nn.MultiheadAttention(width, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.norm3 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        h = self.norm1(x)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device, dtype=x.dtype) if causal else None
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        if self.cross is not None:
            c = self.norm_context(context)
            x = x + self.cross(self.norm2(x), c, c, need_weights=False)[0]
        return x + self.mlp(self.norm3(x))


class CausalQFormer(nn.Module):
    """Learned queries, causal among themselves, reading frozen vision features by cross-attention."""

    def __init__(self, config: SeedConfig):
        super().__init__()
        self.queries = nn.Parameter(0.02 * torch.randn(config.num_queries, config.width))
        self.blocks = nn.ModuleList(Block(config.width, config.heads, config.vision_dim) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.queries.expand(len(features), -1, -1)
        for block in self.blocks:
            x = block(x, features, causal=True)
        return self.norm(x)


class VectorQuantizer(nn.Module):
    """Nearest l2-normalised codebook entry; loss ``|sg(z) - e|^2 + beta |z - sg(e)|^2``; straight-through."""

    def __init__(self, size: int, dim: int, beta: float):
        super().__init__()
        self.codebook = nn.Embedding(size, dim)
        self.beta = beta

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.codebook(codes), dim=-1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``z [..., dim]`` -> (codes, quantised with straight-through gradient, loss)."""
        z = F.normalize(z, dim=-1)
        codes = (z @ F.normalize(self.codebook.weight, dim=-1).t()).argmax(-1)
        q = self.lookup(codes)
        loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
        return codes, z + (q - z).detach(), loss


class SeedDecoder(nn.Module):
    """Codes back to the causal embeddings (reconstruction) and to one image embedding (distillation)."""

    def __init__(self, config: SeedConfig):
        super().__init__()
        self.project = nn.Linear(config.code_dim, config.width)
        self.positions = nn.Parameter(0.02 * torch.randn(config.num_queries, config.width))
        self.embed_token = nn.Parameter(0.02 * torch.randn(1, 1, config.width))
        self.blocks = nn.ModuleList(Block(config.width, config.heads) for _ in range(config.decoder_depth))
        self.norm = nn.LayerNorm(config.width)
        self.to_embedding = nn.Linear(config.width, config.embed_dim)

    def forward(self, quantized: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.project(quantized) + self.positions
        x = torch.cat([x, self.embed_token.expand(len(x), -1, -1)], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, :-1], self.to_embedding(x[:, -1])


class SmallPixelDecoder(nn.Module):
    """Image embedding -> ``[3, size, size]`` in [0, 1]: a linear seed and two upsampling convs, for small data."""

    def __init__(self, embed_dim: int, size: int, channels: int = 64):
        super().__init__()
        if size % 4:
            raise ValueError(f"pixel_decoder_size must be a multiple of 4, got {size}")
        self.channels, self.base = channels, size // 4
        self.seed = nn.Linear(embed_dim, channels * self.base * self.base)
        self.body = nn.Sequential(
            nn.Upsample(scale_factor=2), nn.Conv2d(channels, channels, 3, padding=1), nn.GELU(),
            nn.Upsample(scale_factor=2), nn.Conv2d(channels, channels // 2, 3, padding=1), nn.GELU(),
            nn.Conv2d(channels // 2, 3, 3, padding=1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        x = self.seed(embedding).view(-1, self.channels, self.base, self.base)
        return torch.sigmoid(self.body(x))


class UnCLIPPixelDecoder:
    """A diffusers unCLIP image-variation pipeline (``StableUnCLIPImg2ImgPipeline``) from a local
    directory; it draws an image from the tokenizer's image embedding, as in SEED.

    Its weight-bearing models are read one by one through :func:`load_pretrained`, so a damaged or
    hostile folder is one line naming it (a ``config.json`` declaring far more than its weights
    included) and no pickle runs code; the pipeline itself then reads only JSON and text (schedulers,
    tokenizer, image processor)."""

    def __init__(self, path: str | Path, steps: int = 25, guidance_scale: float = 10.0, device: str = "cpu"):
        from diffusers import AutoencoderKL, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel
        from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
        from diffusers.utils import logging as diffusers_logging
        from transformers import CLIPTextModel, CLIPVisionModelWithProjection

        path = Path(path)
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline directory (no model_index.json); "
                                    "save the unCLIP pipeline with save_pretrained and attach that directory")
        models = {
            name: load_pretrained(cls, path / name)
            for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel),
                              ("image_encoder", CLIPVisionModelWithProjection), ("image_normalizer", StableUnCLIPImageNormalizer))
        }
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # else it says it "cannot verify" the normalizer it asks to be given
        try:
            with model_files_read(path), no_weights_bar():
                self.pipeline = StableUnCLIPImg2ImgPipeline.from_pretrained(str(path), local_files_only=True, **models).to(device)
        finally:
            diffusers_logging.set_verbosity(level)
        self.pipeline.set_progress_bar_config(disable=True)  # one bar per drawn picture says nothing
        self.steps, self.guidance_scale = steps, guidance_scale

    @property
    def embedding_dim(self) -> int:
        """The width of the image embeddings the pipeline draws from."""
        return self.pipeline.image_normalizer.config.embedding_dim

    def __call__(self, embedding: torch.Tensor) -> np.ndarray:
        images = self.pipeline(
            image_embeds=embedding, prompt=[""] * len(embedding), num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale, output_type="np",
        ).images
        return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


class SeedTokenizer(MediaCodec, nn.Module):
    """The whole tokenizer; as a :class:`MediaCodec` it turns HxWx3 uint8 images
    into 32 codes and back."""

    modality = "image"

    def __init__(self, config: SeedConfig, vision: nn.Module, target: nn.Module | None = None, target_projection: bool = True):
        super().__init__()
        self.target_projection = target_projection
        self.vision = vision.eval().requires_grad_(False)
        self.target = None if target is None else target.eval().requires_grad_(False)
        if not config.vision_dim or not config.embed_dim:
            with torch.no_grad():
                probe = torch.zeros(1, 3, config.image_size, config.image_size)
                config.vision_dim = vision(pixel_values=probe).last_hidden_state.shape[-1]
                config.embed_dim = image_embedding(target or vision, probe).shape[-1]
        self.config = config
        self.qformer = CausalQFormer(config)
        self.to_code = nn.Linear(config.width, config.code_dim)
        self.quantizer = VectorQuantizer(config.codebook_size, config.code_dim, config.beta)
        self.decoder = SeedDecoder(config)
        self.pixel_decoder = SmallPixelDecoder(config.embed_dim, config.pixel_decoder_size) if config.pixel_decoder_size else None
        self.unclip: UnCLIPPixelDecoder | None = None

    def train(self, mode: bool = True) -> SeedTokenizer:
        super().train(mode)
        if not self.vision_trained:
            self.vision.eval()  # frozen encoders stay in eval mode (no dropout)
        if self.target is not None:
            self.target.eval()
        return self

    # -- the pieces, on batches ------------------------------------------------------------------

    def pixels(self, images: list[np.ndarray] | torch.Tensor) -> torch.Tensor:
        """uint8 images -> normalised ``[B, 3, S, S]`` on the tokenizer's device: HxWx3 arrays of any
        size (centre-cropped to ``image_size``), or a ``[B, S, S, 3]`` tensor already cropped."""
        c = self.config
        if not isinstance(images, torch.Tensor):
            images = torch.from_numpy(np.stack([center_crop(image, c.image_size) for image in images]))
        if tuple(images.shape[1:]) != (c.image_size, c.image_size, 3):
            raise ValueError(f"images of shape {tuple(images.shape[1:])}; the tokenizer takes {c.image_size}x{c.image_size}x3")
        x = images.to(self.device).permute(0, 3, 1, 2).float() / 255.0
        mean, std = (torch.tensor(v, device=x.device)[:, None, None] for v in (c.mean, c.std))
        return (x - mean) / std

    @property
    def device(self) -> torch.device:
        return self.qformer.queries.device

    @property
    def vision_trained(self) -> bool:
        """Whether a stage unfroze the vision encoder (``SeedTokenizerStage1(train_vision=True)``)."""
        return any(p.requires_grad for p in self.vision.parameters())

    def causal_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> ``[B, queries, width]``; gradients reach the vision encoder only where
        a stage unfroze it."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.vision_trained):
            features = self.vision(pixel_values=pixels).last_hidden_state
        return self.qformer(features)

    def target_embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return image_embedding(self.target or self.vision, pixels)

    def quantize(self, causal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.quantizer(self.to_code(causal))

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.quantize(self.causal_embeddings(pixels))[0]

    @torch.no_grad()
    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, queries]`` -> image embeddings ``[B, embed_dim]``."""
        return self.decoder(self.quantizer.lookup(codes.to(self.device)))[1]

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> np.ndarray:
        """Codes ``[B, queries]`` -> uint8 images ``[B, H, W, 3]`` through the pixel decoder."""
        embedding = self.embed_codes(codes)
        if self.unclip is not None:
            return self.unclip(embedding)
        if self.pixel_decoder is None:
            raise ValueError("this SEED tokenizer has no pixel decoder: train one (pixel_decoder_size) or attach an unCLIP pipeline (attach_unclip)")
        images = self.pixel_decoder(embedding).permute(0, 2, 3, 1)
        return (images * 255).round().byte().cpu().numpy()

    def attach_unclip(self, path: str | Path, **kwargs: Any) -> None:
        """Draw pictures with the unCLIP pipeline saved in ``path`` (``UnCLIPPixelDecoder``'s
        ``steps`` and ``guidance_scale`` as keywords); its image embeddings must be as wide as the
        ones this tokenizer decodes to."""
        decoder = UnCLIPPixelDecoder(path, device=str(self.device), **kwargs)
        if decoder.embedding_dim != self.config.embed_dim:
            raise ValueError(
                f"the unCLIP pipeline in {path} draws from {decoder.embedding_dim}-wide image embeddings, and this tokenizer "
                f"decodes codes to {self.config.embed_dim}-wide ones; attach the pipeline whose image encoder stage 2 distilled into"
            )
        self.unclip = decoder

    # -- MediaCodec ----------------------------------------------------------------------------

    def encode(self, part: Part) -> np.ndarray:
        return self.encode_batch([part])[0]

    def encode_batch(self, parts: list[Part]) -> np.ndarray:
        """Codes ``[n, queries]`` of n image parts in one forward pass."""
        return self.encode_pixels(self.pixels([part.data for part in parts])).cpu().numpy().astype(np.int64)

    def decode(self, array: np.ndarray) -> np.ndarray:
        return self.decode_codes(torch.as_tensor(np.asarray(array, dtype=np.int64)).view(1, -1))[0]

    @cached_property
    def checksum(self) -> str:
        return weights_checksum(self.state_dict())

    def fingerprint(self) -> dict[str, Any]:
        c = self.config
        return {"name": "seed", "codebook_size": c.codebook_size, "layers": 1, "tokens_per_item": c.num_queries, "checksum": self.checksum}

    # -- files ---------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        """``seed_tokenizer.json`` + ``seed_tokenizer.safetensors`` + the encoders as HF directories."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.vision.save_pretrained(out / "vision")
        if self.target is not None:
            self.target.save_pretrained(out / "target")
        own = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith(("vision.", "target."))}
        save_file(own, str(out / WEIGHTS_FILE))
        (out / CONFIG_FILE).write_text(json.dumps({"config": asdict(self.config), "target": self.target is not None, "target_projection": self.target_projection}, indent=2) + "\n")
        return out

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> SeedTokenizer:
        """Load a saved tokenizer; every weight must match (no silently missing decoder)."""
        from safetensors.torch import load_file

        path = Path(directory)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a SEED tokenizer directory (no {CONFIG_FILE})")
        saved = read_json_object(path / CONFIG_FILE, "save the SEED tokenizer again")
        known = {f.name for f in fields(SeedConfig)}
        if not isinstance(saved.get("config"), dict) or not set(saved["config"]) <= known:
            raise ValueError(f"{path / CONFIG_FILE}: 'config' must be an object of SeedConfig's fields ({', '.join(sorted(known))}); "
                             "save the SEED tokenizer again")
        try:
            config = SeedConfig(**saved["config"])
        except (TypeError, ValueError) as err:  # a value of the wrong type or out of range
            raise ValueError(f"{path / CONFIG_FILE}: {err}; save the SEED tokenizer again") from None
        # the sizes are input: probing the encoders at image_size, or building a config of 10**6
        # layers, would allocate before the weights could say the file is wrong
        if not (isinstance(config.vision_dim, int) and config.vision_dim > 0 and isinstance(config.embed_dim, int) and config.embed_dim > 0):
            raise ValueError(f"{path / CONFIG_FILE}: a saved SEED tokenizer names its vision_dim and embed_dim (> 0); save it again")
        if not (isinstance(config.image_size, int) and 1 <= config.image_size <= MAX_IMAGE_SIZE):
            raise ValueError(f"{path / CONFIG_FILE}: image_size={config.image_size!r}; it must be an integer in [1, {MAX_IMAGE_SIZE}]")
        vision = load_encoder(EncoderSpec(path=str(path / "vision")))
        projection = saved.get("target_projection", True)
        target = load_encoder(EncoderSpec(path=str(path / "target"), projection=projection)) if saved.get("target") else None
        check_fits_weights(lambda: cls(SeedConfig(**saved["config"]), vision, target, projection), path / WEIGHTS_FILE,
                           path / CONFIG_FILE, "a tokenizer", "save the SEED tokenizer again")
        tokenizer = cls(config, vision, target, projection)
        with model_files_read(path):
            own = load_file(str(path / WEIGHTS_FILE))
            missing, unexpected = tokenizer.load_state_dict(own, strict=False)  # a shape mismatch: one line naming the tensor
        missing = [k for k in missing if not k.startswith(("vision.", "target."))]
        if missing or unexpected:
            raise ValueError(f"{path}: SEED tokenizer weights do not match its config (missing {missing[:5]}, unexpected {unexpected[:5]})")
        return tokenizer.to(device).eval()


class SeedImageCodec(MediaCodec):
    """A saved SEED tokenizer as a recipe's image codec, named by its directory:
    ``{class_path: unimodal.modalities.seed_tokenizer.SeedImageCodec, init_args: {path: DIR}}``.

    Why: a :class:`SeedTokenizer` is built from modules, but a recipe (and an export's
    ``unimodal.json``, which ``unimodal.load`` rebuilds codecs from) can only name a directory.
    With it the LLM stages encode raw images on the fly, and the exported model reads and draws
    pictures, instead of training on shards pre-encoded with ``unimodal data encode``.
    """

    modality = "image"

    def __init__(self, path: str, device: str = "cpu"):
        self.path = path
        self.tokenizer = SeedTokenizer.from_pretrained(local_path(path), device=device)

    def encode(self, part: Part) -> np.ndarray:
        return self.tokenizer.encode(part)

    def encode_batch(self, parts: list[Part]) -> np.ndarray:
        return self.tokenizer.encode_batch(parts)

    def decode(self, array: np.ndarray) -> np.ndarray:
        return self.tokenizer.decode(array)

    def fingerprint(self) -> dict[str, Any]:
        return self.tokenizer.fingerprint()


TINY_VISION = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "image_size": 16, "patch_size": 4}
TINY_CONFIG = {"num_queries": 8, "width": 32, "depth": 2, "heads": 2, "codebook_size": 64, "code_dim": 8, "decoder_depth": 1, "image_size": 16, "pixel_decoder_size": 16}


def tiny_tokenizer(seed: int = 0) -> SeedTokenizer:
    """A random tokenizer for tests and ``--tiny`` runs: a 16x16 ViT, 8 queries, 64 codes, a pixel decoder."""
    torch.manual_seed(seed)
    return SeedTokenizer(SeedConfig(**TINY_CONFIG), load_encoder(EncoderSpec(config=dict(TINY_VISION))))
