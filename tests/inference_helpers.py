"""Tiny models and fakes for the inference tests: a random Llama in a UnifiedModel, continuous
modalities that follow the generation API (``embed_clean``, ``sample_next``, ``denoise_block``),
and codecs. The fakes are deterministic functions of their inputs plus generator noise, so the
tests can recompute what the engine should have produced without a cache."""

from __future__ import annotations

import numpy as np
import torch
from conftest import TINY_LLAMA, CharTokenizer
from torch import nn

from unimodal.schema import Part
from unimodal.modalities.base import MediaCodec
from unimodal.models.diffusion import guided
from unimodal.modalities.vocab import VocabLayout
from unimodal.models.backbone import BackboneConfig, load_backbone
from unimodal.models.unified import ContinuousModality, UnifiedModel

FEATURE_DIM = 4


def row_noise(shape: tuple[int, ...], generator) -> torch.Tensor:
    """Standard noise from one generator, or one row each from a list of them (as the engine passes)."""
    if isinstance(generator, list):
        return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generator])
    return torch.randn(shape, generator=generator)


class FakeContinuous(ContinuousModality):
    """A continuous image modality: linear in, linear "head" out, guidance on the head output."""

    def __init__(self, hidden: int, attention: str = "causal", slots: int = 3, noise: float = 0.1, steps: int = 2):
        super().__init__()
        self.attention, self.slots_per_item, self.feature_dim = attention, slots, FEATURE_DIM
        self.noise, self.default_steps = noise, steps
        self.inp = nn.Linear(FEATURE_DIM, hidden)
        self.head = nn.Linear(hidden, FEATURE_DIM)
        self.calls: list[tuple[int, float]] = []

    def embed(self, features, batch, rows):
        return self.inp(features), None

    def embed_clean(self, features: torch.Tensor) -> torch.Tensor:
        return self.inp(features)

    def _guide(self, out: torch.Tensor, cfg_scale) -> torch.Tensor:
        """Guidance on the head output, with one scale or one per row (1: that row unguided)."""
        if not guided(cfg_scale):
            return out
        n = out.shape[0] // 2
        scale = torch.tensor(cfg_scale if isinstance(cfg_scale, list) else [cfg_scale] * n).view(-1, *[1] * (out.dim() - 1))
        return torch.where(scale == 1.0, out[:n], out[n:] + scale * (out[:n] - out[n:]))

    def sample_next(self, hidden, *, cfg_scale, steps, generator, on_step=None):
        self.calls.append((hidden.shape[0], cfg_scale))
        out = self._guide(self.head(hidden), cfg_scale)
        return out + self.noise * row_noise(out.shape, generator).to(out.device)

    def denoise_block(self, run_backbone, batch_size, *, cfg_scale, steps, generator):
        self.calls.append((batch_size, cfg_scale))
        x = row_noise((batch_size, self.slots_per_item, FEATURE_DIM), generator)
        for _ in range(max(s or self.default_steps for s in steps) if isinstance(steps, list) else steps or self.default_steps):
            embeds = self.inp(x)
            hidden = run_backbone(torch.cat([embeds, embeds]) if guided(cfg_scale) else embeds)
            x = x - 0.5 * self._guide(self.head(hidden), cfg_scale)
        return x


class FakeImageCodec(MediaCodec):
    """Pixels <-> continuous features (or discrete codes): a fixed, invertible-enough toy."""

    modality = "image"

    def __init__(self, slots: int = 3, codes: int | None = None):
        self.slots, self.codes = slots, codes

    def encode(self, part: Part) -> np.ndarray:
        pixels = np.asarray(part.data, dtype=np.float32) / 255.0
        flat = np.resize(pixels.reshape(-1), self.slots * FEATURE_DIM)
        if self.codes:
            return (flat * (self.codes - 1)).astype(np.int64)[: self.slots]
        return flat.reshape(self.slots, FEATURE_DIM).astype(np.float32)

    def decode(self, array: np.ndarray) -> np.ndarray:
        values = np.asarray(array, dtype=np.float32).reshape(-1)
        image = np.resize(np.clip(np.abs(values), 0, 1) * 255, 8 * 8 * 3)
        return image.reshape(8, 8, 3).astype(np.uint8)


class FakeAudioCodec(MediaCodec):
    """Waveforms <-> one-layer codes; decodes to a short tone per code."""

    modality = "audio"
    sample_rate = 8000

    def __init__(self, codes: int):
        self.codes = codes

    def encode(self, part: Part) -> np.ndarray:
        wave, _ = part.data
        chunks = np.array_split(np.asarray(wave, dtype=np.float32), 4)
        return np.asarray([int(abs(c).mean() * (self.codes - 1)) % self.codes for c in chunks], dtype=np.int64)

    def decode(self, array: np.ndarray) -> np.ndarray:
        codes = np.asarray(array).reshape(-1)
        t = np.arange(80) / self.sample_rate
        return np.concatenate([0.1 * np.sin(2 * np.pi * (200 + 10 * c) * t) for c in codes]).astype(np.float32)


def tiny_model(code_ranges: dict[str, int] | None = None, continuous: dict[str, dict] | None = None, seed: int = 0) -> UnifiedModel:
    """A random tiny Llama in a UnifiedModel over the CharTokenizer's 260 ids."""
    torch.manual_seed(seed)
    layout = VocabLayout(text_size=CharTokenizer.vocab_size, code_ranges=dict(code_ranges or {}))
    backbone = load_backbone(BackboneConfig(config=dict(TINY_LLAMA), attention="sdpa"), layout.size)
    hidden = backbone.config.hidden_size
    modalities = {name: FakeContinuous(hidden, **kw) for name, kw in (continuous or {}).items()}
    return UnifiedModel(backbone, layout, modalities).eval()


def bias_tokens(model: UnifiedModel, biases: dict[int, float]) -> None:
    """Give the LM head a bias so that chosen tokens win greedy decoding (scripts a random model)."""
    head = model.backbone.get_output_embeddings()
    biased = nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        for token, value in biases.items():
            biased.bias[token] = value
    model.backbone.set_output_embeddings(biased)


def family_model(family: str, seed: int = 0) -> UnifiedModel:
    """A tiny model with the real image modality of a family: ``orthus`` (TokenDiffusionImage, causal,
    soft-VQ over an image code range) or ``llamafusion`` (TransfusionImage, bidirectional, with
    image experts in every layer)."""
    from unimodal.models.continuous import TokenDiffusionImage, TransfusionImage
    from unimodal.models.diffusion import ScheduleConfig
    from unimodal.models.routing import add_modality_experts

    torch.manual_seed(seed)
    schedule = ScheduleConfig(sample_steps=4)
    codes = {"image": 16} if family == "orthus" else {}
    layout = VocabLayout(text_size=CharTokenizer.vocab_size, code_ranges=codes)
    backbone = load_backbone(BackboneConfig(config=dict(TINY_LLAMA), attention="sdpa"), layout.size)
    hidden = backbone.config.hidden_size
    routing = None
    if family == "orthus":
        image = TokenDiffusionImage(hidden, feature_dim=FEATURE_DIM, slots_per_item=4, codebook_size=16, head_width=32, head_depth=1, schedule=schedule)
    elif family == "llamafusion":
        image = TransfusionImage(hidden, feature_dim=FEATURE_DIM, slots_per_item=4, patchify="linear", schedule=schedule)
        routing = add_modality_experts(backbone, ["image"])
        with torch.no_grad():  # make the image experts differ from the text weights they copy
            for name, param in backbone.named_parameters():
                if ".experts.image." in name:
                    param.add_(0.05 * torch.randn_like(param))
    else:
        raise ValueError(family)
    return UnifiedModel(backbone, layout, {"image": image}, routing=routing).eval()


def text_assistant(**kw):
    """A chatml Assistant over a text-only tiny model."""
    from unimodal.data.processor import Processor
    from unimodal.data.templates import get_template
    from unimodal.inference.chat import Assistant

    model = tiny_model()
    return Assistant(model, Processor(CharTokenizer(), model.layout, chat_template=get_template("chatml")), **kw)


def media_assistant(**kw):
    """A chatml Assistant over continuous images (fake causal head, fake codec) and discrete
    one-layer audio codes of 4 per clip (fake codec)."""
    from unimodal.data.processor import Processor
    from unimodal.data.templates import get_template
    from unimodal.inference.chat import Assistant

    model = tiny_model(code_ranges={"audio": 16}, continuous={"image": {"attention": "causal", "slots": 3}})
    codecs = {"image": FakeImageCodec(slots=3), "audio": FakeAudioCodec(codes=16)}
    processor = Processor(CharTokenizer(), model.layout, codecs=codecs, chat_template=get_template("chatml"))
    return Assistant(model, processor, spans={"audio": {"length": 4}}, **kw)
