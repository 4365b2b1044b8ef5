"""RVQ speech/audio codecs behind one interface: waveform -> codes ``[layers, frames]`` -> waveform.

Backends: transformers' EnCodec, Mimi and DAC read from a local directory (or built from a config
dict, random, for tests and ``--tiny`` runs), and SpeechTokenizer checkpoints (MIO's codec) where
the ``speechtokenizer`` package is installed. Every codec downmixes stereo, resamples to its own
rate and refuses clips longer than ``max_seconds`` before encoding. How codes become vocabulary
ids (layer-major, content layer first) is in ``docs/audio-tokens.md``.
"""

from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from unimodal.modalities.base import MediaCodec, check_fits_weights, load_pretrained, model_config, weights_checksum
from unimodal.schema import Part

HF_CODECS = ("encodec", "mimi", "dac")


def to_mono(waveform: np.ndarray) -> np.ndarray:
    """``[n]`` or ``[n, channels]`` (soundfile's layout) to ``[n]`` float32, channels averaged."""
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim == 2 and waveform.shape[0] < waveform.shape[1]:  # more channels than samples: torchaudio's layout
        raise ValueError(f"waveform of shape {waveform.shape} is channels-first; give [samples, channels] (waveform.T)")
    if waveform.ndim == 2:
        return waveform.mean(axis=1)
    if waveform.ndim != 1:
        raise ValueError(f"waveform of shape {waveform.shape}; expected [samples] or [samples, channels]")
    return waveform


# the loudest sample a codec takes: float audio may overshoot [-1, 1] a little, but samples far
# beyond it are unscaled integer PCM or garbage, on which the neural codecs overflow into one code
MAX_PEAK = 100.0

# the most filter values a resampling holds at once (float64: 32 MB)
KERNEL_LIMIT = 4 * 2**20


def resample(waveform: np.ndarray, orig_rate: int, new_rate: int, zero_crossings: int = 16) -> np.ndarray:
    """Band-limited resampling of a mono waveform (Hann-windowed sinc, polyphase).

    The rate ratio is reduced to ``up / down``; output sample ``i * up + j`` sits at input time
    ``i * down + j * down / up``, so one conv1d with stride ``down`` and ``up`` output channels
    (one filter phase each) computes every output sample.
    """
    if orig_rate == new_rate:
        return np.asarray(waveform, dtype=np.float32)
    g = math.gcd(int(orig_rate), int(new_rate))
    down, up = orig_rate // g, new_rate // g
    cutoff = 0.5 * min(1.0, up / down) * 0.97  # cycles per input sample, a little below Nyquist
    width = math.ceil(zero_crossings / (2 * cutoff))
    if up * (2 * width + down) > KERNEL_LIMIT:  # rates that share no factor: the phases would not fit
        return _resample_direct(np.asarray(waveform, dtype=np.float32), orig_rate, new_rate, cutoff, width)
    taps = torch.arange(-width, width + down, dtype=torch.float64)
    t = taps[None, :] - torch.arange(up, dtype=torch.float64)[:, None] * down / up  # [up, taps]
    window = torch.where(t.abs() <= width, 0.5 + 0.5 * torch.cos(math.pi * t / width), torch.zeros_like(t))
    kernel = (2 * cutoff * torch.sinc(2 * cutoff * t) * window).float()[:, None, :]
    x = torch.as_tensor(np.asarray(waveform, dtype=np.float32))[None, None]
    n_out = math.ceil(x.shape[-1] * up / down)
    x = F.pad(x, (width, width + down))
    out = F.conv1d(x, kernel, stride=down)  # [1, up, frames]
    return out[0].t().reshape(-1)[:n_out].numpy()


def _resample_direct(x: np.ndarray, orig_rate: int, new_rate: int, cutoff: float, width: int) -> np.ndarray:
    """The same windowed sinc evaluated at each output time, a bounded chunk of outputs at a
    time: memory follows the taps, not the ratio of the rates."""
    n_out = math.ceil(len(x) * new_rate / orig_rate)
    offsets = np.arange(-width, width + 1)
    padded = np.pad(x.astype(np.float64), (width + 1, width + 1))
    out = np.empty(n_out, dtype=np.float32)
    chunk = max(1, KERNEL_LIMIT // len(offsets))
    for start in range(0, n_out, chunk):
        times = np.arange(start, min(n_out, start + chunk)) * (orig_rate / new_rate)  # in input samples
        index = np.floor(times).astype(np.int64)[:, None] + offsets[None, :]
        t = times[:, None] - index
        window = np.where(np.abs(t) <= width, 0.5 + 0.5 * np.cos(np.pi * t / width), 0.0)
        weights = 2 * cutoff * np.sinc(2 * cutoff * t) * window
        inside = (index >= 0) & (index < len(x))
        out[start : start + len(times)] = (padded[np.clip(index, -width - 1, len(x) + width) + width + 1] * weights * inside).sum(1)
    return out


class RVQCodec(MediaCodec):
    """Waveform <-> codes ``[layers, frames]``; subclasses implement ``_encode`` and ``_decode``."""

    modality = "audio"
    model: torch.nn.Module

    def __init__(self, name: str, sample_rate: int, frame_rate: float, codebook_size: int, layers: int, max_seconds: float):
        self.name, self.sample_rate, self.frame_rate = name, int(sample_rate), float(frame_rate)
        self.codebook_size, self.layers, self.max_seconds = int(codebook_size), int(layers), float(max_seconds)

    @property
    def device(self) -> torch.device:
        """Where the codec runs (``load_codec(..., device)`` moves it): inputs go there."""
        return next(self.model.parameters()).device

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[1, 1, samples]`` at ``sample_rate`` on :attr:`device` -> long ``[layers, frames]``."""
        raise NotImplementedError

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        """long ``[layers, frames]`` -> ``[samples]``."""
        raise NotImplementedError

    def _state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def prepare(self, waveform: np.ndarray, rate: int) -> np.ndarray:
        """Mono, at the codec's rate, no longer than ``max_seconds``."""
        if rate <= 0:
            raise ValueError(f"sample rate {rate}; it must be positive")
        mono = to_mono(waveform)
        if not np.isfinite(mono).all():
            raise ValueError("the waveform holds NaN or infinite samples")
        peak = float(np.abs(mono).max(initial=0.0))
        if peak > MAX_PEAK:
            raise ValueError(f"the waveform peaks at {peak:.3g}; samples belong in [-1, 1] (integer PCM divided by its full scale, "
                             "e.g. int16 / 32768)")
        self.check_seconds(len(mono) / rate)
        if not len(mono):
            raise ValueError("empty waveform")
        return resample(mono, int(rate), self.sample_rate)

    @torch.no_grad()
    def encode_waveform(self, waveform: np.ndarray, rate: int) -> np.ndarray:
        x = torch.as_tensor(self.prepare(waveform, rate), device=self.device)[None, None]
        codes = self._encode(x)[: self.layers]
        return codes.cpu().numpy().astype(np.int64)

    @torch.no_grad()
    def decode_codes(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim != 2 or not 1 <= len(codes) <= self.layers:
            raise ValueError(f"codes of shape {codes.shape}; expected [layers <= {self.layers}, frames]")
        if codes.min(initial=0) < 0 or codes.max(initial=0) >= self.codebook_size:
            raise ValueError(f"codes outside [0, {self.codebook_size})")
        return self._decode(torch.as_tensor(codes, dtype=torch.long, device=self.device)).float().cpu().numpy()

    def encode(self, part: Part) -> np.ndarray:
        if not (isinstance(part.data, tuple) and len(part.data) == 2):
            raise ValueError(f"audio part {part.media}: expected a decoded (waveform, sample_rate) pair")
        return self.encode_waveform(*part.data)

    def decode(self, array: np.ndarray) -> tuple[np.ndarray, int]:
        return self.decode_codes(array), self.sample_rate

    @cached_property
    def checksum(self) -> str:
        return weights_checksum(self._state_dict())

    def fingerprint(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sample_rate": self.sample_rate,
            "frame_rate": self.frame_rate,
            "codebook_size": self.codebook_size,
            "layers": self.layers,
            "checksum": self.checksum,
        }


class HFAudioCodec(RVQCodec):
    """transformers' EnCodec, Mimi or DAC; ``layers`` keeps the first RVQ layers (all by default)."""

    def __init__(self, model: torch.nn.Module, layers: int | None = None, max_seconds: float = 30.0):
        config = model.config
        kind = config.model_type
        if kind not in HF_CODECS:
            raise ValueError(f"model type {kind!r} is not an RVQ codec this wraps ({', '.join(HF_CODECS)})")
        if kind == "encodec" and config.chunk_length is not None:
            raise ValueError("chunked EnCodec models (the 48 kHz music codec) are not supported; use the 24 kHz one")
        total = config.n_codebooks if kind == "dac" else config.num_quantizers
        if kind == "encodec":  # the quantizer count is reached through a target bandwidth
            total = min(total, max(1, math.floor(max(config.target_bandwidths) / _encodec_layer_kbps(config))))
        layers = total if layers is None else layers
        if not 1 <= layers <= total:
            raise ValueError(f"{kind} codec has {total} RVQ layers; asked for {layers}")
        super().__init__(kind, config.sampling_rate, config.frame_rate, config.codebook_size, layers, max_seconds)
        self.model = model.eval()

    @classmethod
    def from_pretrained(cls, path: str | Path, layers: int | None = None, max_seconds: float = 30.0) -> HFAudioCodec:
        from transformers import AutoModel

        model = load_pretrained(AutoModel, path).float()  # as saved (bf16, say), it would refuse fp32 waveforms
        return cls(model, layers, max_seconds)

    @classmethod
    def from_config(cls, config: dict[str, Any], layers: int | None = None, max_seconds: float = 30.0, seed: int = 0) -> HFAudioCodec:
        """A random codec (tests, ``--tiny``), codebooks filled so that codes are not all zero."""
        from transformers import AutoConfig, AutoModel

        raw = dict(config)
        torch.manual_seed(seed)
        model = AutoModel.from_config(AutoConfig.for_model(raw.pop("model_type"), **raw))
        cls(model, None, max_seconds).fill_codebooks(seed)
        return cls(model, layers, max_seconds)

    @torch.no_grad()
    def fill_codebooks(self, seed: int = 0) -> None:
        """Set the zero-initialised EMA codebooks of a random EnCodec/Mimi, layer by layer, to
        residual vectors the layer sees on noise, so that codes spread over the codebook (DAC's
        codebooks start random already)."""
        generator = torch.Generator().manual_seed(seed)
        noise = (0.1 * torch.randn(1, 1, self.sample_rate, generator=generator)).to(self.device)
        books = [m for m in self.model.modules() if hasattr(m, "quantize") and hasattr(m, "codebook_size")]
        for book in books:
            seen: list[torch.Tensor] = []
            quantize = book.quantize
            book.quantize = lambda h, quantize=quantize: seen.append(h.detach().float()) or quantize(h)
            try:
                self._encode(noise)
            finally:
                del book.quantize  # the instance attribute shadowed the method
            vectors = torch.cat(seen).cpu()
            pick = torch.randint(len(vectors), (book.codebook_size,), generator=generator)
            entries = vectors[pick] + 1e-3 * vectors.std() * torch.randn(book.codebook_size, vectors.shape[1], generator=generator)
            if hasattr(book, "embed_sum"):  # Mimi: embed = embed_sum / cluster_usage, cached
                book.embed_sum.copy_(entries)
                book.cluster_usage.fill_(1.0)
                book._embed = None
            else:
                book.embed.copy_(entries)

    @property
    def _bandwidth(self) -> float:
        config = self.model.config
        return min(b for b in config.target_bandwidths if math.floor(b / _encodec_layer_kbps(config) + 1e-9) >= self.layers)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.name
        if kind == "encodec":
            return self.model.encode(x, bandwidth=self._bandwidth, return_dict=True).audio_codes[0, 0]
        if kind == "mimi":
            return self.model.encode(x, num_quantizers=self.layers, return_dict=True).audio_codes[0]
        short = self.model.config.hop_length - x.shape[-1]  # DAC's strided convolutions need a whole frame
        return self.model.encode(F.pad(x, (0, max(0, short))), n_quantizers=self.layers, return_dict=True).audio_codes[0]

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        if self.name == "encodec":
            return self.model.decode(codes[None, None], [None], return_dict=True).audio_values[0, 0]
        if self.name == "mimi":
            return self.model.decode(codes[None], return_dict=True).audio_values[0, 0]
        return self.model.decode(audio_codes=codes[None], return_dict=True).audio_values[0]

    def _state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()


def _encodec_layer_kbps(config: Any) -> float:
    """The bandwidth one RVQ layer of an EnCodec adds: EnCodec picks its layer count by bandwidth."""
    return math.log2(config.codebook_size) * config.frame_rate / 1000


class SpeechTokenizerCodec(RVQCodec):
    """A SpeechTokenizer checkpoint directory (``config.json`` + one ``.pt``), MIO's speech codec:
    16 kHz, 50 frames/s, RVQ layer 0 carries content, further layers timbre. Needs the
    ``speechtokenizer`` package."""

    def __init__(self, path: str | Path, layers: int | None = None, max_seconds: float = 30.0):
        try:
            from speechtokenizer import SpeechTokenizer
        except ImportError:
            raise ValueError("SpeechTokenizer checkpoints need the speechtokenizer package: pip install speechtokenizer") from None
        path = Path(path)
        weights = sorted(path.glob("*.pt"))
        if len(weights) != 1:
            raise FileNotFoundError(f"{path}: expected one SpeechTokenizer .pt file next to config.json, found {len(weights)}")
        config = model_config(path, "SpeechTokenizer")
        # built and filled here: the package's load_from_checkpoint unpickles the .pt with torch.load's
        # defaults, which run code before torch 2.6; sized on the meta device against the weights first
        check_fits_weights(lambda: SpeechTokenizer(config), weights[0], path / "config.json", "a SpeechTokenizer",
                           "copy the checkpoint again")
        self.model = SpeechTokenizer(config)
        try:
            self.model.load_state_dict(torch.load(weights[0], map_location="cpu", weights_only=True))
        except RuntimeError as err:  # missing or unexpected tensors, other shapes
            raise ValueError(f"{weights[0]} does not fill the SpeechTokenizer {path / 'config.json'} describes "
                             f"({str(err).splitlines()[0]})") from None
        self.model.eval()
        total = int(config["n_q"])
        layers = total if layers is None else layers
        if not 1 <= layers <= total:
            raise ValueError(f"SpeechTokenizer has {total} RVQ layers; asked for {layers}")
        rate = int(config["sample_rate"])
        super().__init__("speechtokenizer", rate, rate / math.prod(config["strides"]), int(config["codebook_size"]), layers, max_seconds)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x, n_q=self.layers)[:, 0]  # [layers, 1, frames] -> [layers, frames]

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(codes[:, None])[0, 0]

    def _state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()


def load_audio_codec(path: str | Path, layers: int | None = None, max_seconds: float = 30.0) -> RVQCodec:
    """The codec in a local directory: an HF EnCodec/Mimi/DAC model, or a SpeechTokenizer checkpoint."""
    path = Path(path)
    config = model_config(path, "audio codec")
    if config.get("model_type") in HF_CODECS:
        return HFAudioCodec.from_pretrained(path, layers, max_seconds)
    if "n_q" in config and "strides" in config:
        return SpeechTokenizerCodec(path, layers, max_seconds)
    raise ValueError(f"{path / 'config.json'}: neither an HF codec ({', '.join(HF_CODECS)}) nor a SpeechTokenizer config")
