"""A small speech tokenizer with RVQ layers, trained by the framework on the digits world's audio.

Why this shape: the spoken digits are short (about half a second) synthetic words, so a
learned neural codec would be overkill. A log-mel frame (64 bands, 32 ms hop: 31.25 frames/s,
about 14 frames a word) is quantised by residual k-means: layer 0 picks the nearest of
``codebook_size`` centroids, each further layer quantises what the layers before it left over.
The codes ``[layers, frames]`` (layer 0 is the coarse "content" layer, as in MIO's
SpeechTokenizer) go into the vocabulary layer-major; decoding sums the layers' centroids back
into a log-mel frame, maps it to a linear spectrum with the pseudo-inverse of the mel filterbank
and recovers a phase by Griffin-Lim. The round trip keeps the words recognisable, which is what
the digits suite needs; it is not a hi-fi codec.

It is an :class:`~unimodal.modalities.audio.RVQCodec` (mono, resampling, ``max_seconds``, the
fingerprint and the code checks come from there). ``fit`` trains the codebooks; ``save`` and
``DigitAudioCodec(path=...)`` (the form a recipe's ``codecs:`` entry uses) keep them in a
directory: ``codec.json`` + ``codebooks.npy``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from unimodal.modalities.audio import RVQCodec
from unimodal.modalities.base import CODEC_FILE, read_codec_files, save_codec_files, weights_checksum
from unimodal.modalities.kmeans import fitting_bar, kmeans, nearest
from unimodal.schema import local_path

CODEBOOKS_FILE = "codebooks.npy"
LOG_FLOOR = 1e-6


@lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular filters on the HTK mel scale from 0 Hz to Nyquist: ``[n_mels, n_fft // 2 + 1]``."""

    def mel(hz: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    def hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = hz(np.linspace(0.0, mel(np.asarray(sample_rate / 2)), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    bank = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    bank.flags.writeable = False  # shared by the cache
    return bank


@lru_cache(maxsize=8)
def _window(n_fft: int) -> np.ndarray:
    """The periodic Hann window (``torch.hann_window``'s default)."""
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    window.flags.writeable = False  # shared by the cache
    return window


# numpy, not torch, for the short transforms below, and einsum rather than BLAS for their small
# products: single-threaded code, where thread pools made these tiny ops 10-40x slower on a busy
# CPU (measured on a shared 2-core machine)
def stft(signal: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """Complex spectrogram ``[1 + len // hop, n_fft // 2 + 1]`` of centred (reflect-padded) Hann frames."""
    signal = np.asarray(signal, dtype=np.float64)
    if len(signal) <= n_fft // 2:  # reflect padding needs more samples than half a window
        signal = np.pad(signal, (0, n_fft // 2 + 1 - len(signal)))
    frames = np.lib.stride_tricks.sliding_window_view(np.pad(signal, n_fft // 2, mode="reflect"), n_fft)[::hop]
    return np.fft.rfft(frames * _window(n_fft), axis=1)


def istft(spec: np.ndarray, n_fft: int, hop: int, length: int) -> np.ndarray:
    """The signal whose :func:`stft` is closest to ``spec`` (windowed overlap-add), ``length`` samples."""
    window = _window(n_fft)
    frames = np.fft.irfft(spec, n=n_fft, axis=1) * window
    out = _overlap_add(frames, hop)
    return (out / _overlap_norm(len(frames), n_fft, hop))[n_fft // 2 : n_fft // 2 + length]


def _overlap_add(frames: np.ndarray, hop: int) -> np.ndarray:
    """Sum of ``frames [count, n_fft]`` placed ``hop`` samples apart. When the hop divides the
    window (the codec's half-window hop) it is ``n_fft // hop`` shifted slice additions rather than
    one per frame: Griffin-Lim calls this 49 times per clip."""
    count, n_fft = frames.shape
    out = np.zeros(n_fft + hop * (count - 1))
    if n_fft % hop:
        for i, frame in enumerate(frames):
            out[i * hop : i * hop + n_fft] += frame
        return out
    shifts = n_fft // hop
    blocks = out.reshape(count + shifts - 1, hop)
    pieces = frames.reshape(count, shifts, hop)
    for k in range(shifts):
        blocks[k : k + count] += pieces[:, k]
    return out


@lru_cache(maxsize=64)
def _overlap_norm(count: int, n_fft: int, hop: int) -> np.ndarray:
    """The overlap-added squared window of ``count`` frames, floored: what :func:`istft` divides by."""
    norm = _overlap_add(np.broadcast_to(_window(n_fft) ** 2, (count, n_fft)), hop)
    norm = np.maximum(norm, 1e-8)
    norm.flags.writeable = False  # shared by the cache
    return norm


def log_mel(waveform: np.ndarray, sample_rate: int, n_fft: int, hop: int, n_mels: int) -> np.ndarray:
    """Log mel power spectrogram ``[frames, n_mels]`` (float32) of a mono waveform."""
    power = np.abs(stft(waveform, n_fft, hop)) ** 2
    mel = np.einsum("fb,mb->fm", power, mel_filterbank(sample_rate, n_fft, n_mels))
    return np.log(np.maximum(mel, LOG_FLOOR)).astype(np.float32)


@dataclass
class DigitAudioConfig:
    sample_rate: int = 16000
    n_fft: int = 1024
    hop: int = 512
    n_mels: int = 64
    layers: int = 2
    codebook_size: int = 256
    kmeans_iters: int = 20
    griffin_lim_iters: int = 48

    def __post_init__(self) -> None:
        """A fitted codec's ``codec.json`` is input: a hop of 0 divides by zero, an FFT of 2**34
        allocates without bound and 10**9 Griffin-Lim iterations never finish a reply."""
        bounds = {
            "sample_rate": (1000, 192_000),
            "n_fft": (16, 16_384),
            "hop": (1, self.n_fft),
            "n_mels": (1, self.n_fft // 2 + 1),
            "layers": (1, 16),
            "codebook_size": (1, 65_536),
            "kmeans_iters": (0, 10_000),
            "griffin_lim_iters": (1, 1_000),
        }
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"DigitAudioConfig: {name}={value!r}; it must be an integer in [{low}, {high}]")


class DigitAudioCodec(RVQCodec):
    """Log-mel frames -> residual k-means codes ``[layers, frames]`` -> Griffin-Lim waveform.

    ``DigitAudioCodec(path=DIR)`` loads a fitted codec (the saved config then replaces
    ``config``); ``DigitAudioCodec(config=...)``
    makes an unfitted one for :meth:`fit`.
    """

    def __init__(self, path: str | None = None, config: DigitAudioConfig | None = None, max_seconds: float = 2.0):
        self.config = config or DigitAudioConfig()
        self.codebooks: torch.Tensor | None = None  # [layers, codebook_size, n_mels]
        if path is not None:
            self._read(Path(local_path(path)))
        c = self.config
        super().__init__("digit-audio", c.sample_rate, c.sample_rate / c.hop, c.codebook_size, c.layers, max_seconds)
        # mel power -> linear power, for decoding
        self._unmel = np.linalg.pinv(mel_filterbank(c.sample_rate, c.n_fft, c.n_mels))

    def features(self, waveform: np.ndarray, sample_rate: int) -> np.ndarray:
        """Log-mel frames ``[frames, n_mels]``: what the codebooks quantise."""
        c = self.config
        return log_mel(self.prepare(waveform, sample_rate), c.sample_rate, c.n_fft, c.hop, c.n_mels)

    def fit(self, clips: list[tuple[np.ndarray, int]], seed: int = 0, progress: bool = False) -> DigitAudioCodec:
        """Train the codebooks by residual k-means on the log-mel frames of ``clips`` ((waveform, rate)
        pairs); ``progress``: a bar of its k-means steps."""
        if not clips:
            raise ValueError("fit needs at least one audio clip")
        frames = torch.as_tensor(np.concatenate([self.features(w, r) for w, r in clips]))
        if len(frames) < self.codebook_size:
            raise ValueError(f"fit needs at least codebook_size={self.codebook_size} frames, got {len(frames)}")
        generator = torch.Generator().manual_seed(seed)
        residual, books = frames, []
        with fitting_bar(self.layers * (self.config.kmeans_iters + 1), progress) as bar:
            for _ in range(self.layers):
                book = kmeans(residual, self.codebook_size, self.config.kmeans_iters, generator, tick=bar.update)
                residual = residual - book[nearest(residual, book)[0]]
                books.append(book)
        self.codebooks = torch.stack(books)
        self.__dict__.pop("checksum", None)  # RVQCodec caches it
        return self

    def _books(self) -> torch.Tensor:
        if self.codebooks is None:
            raise RuntimeError("the DigitAudioCodec is not fitted: call fit() or load a fitted one (path=...)")
        return self.codebooks

    # -- RVQCodec ------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Log-mel, k-means and Griffin-Lim run in numpy."""
        return torch.device("cpu")

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        residual = torch.as_tensor(log_mel(x[0, 0].numpy(), c.sample_rate, c.n_fft, c.hop, c.n_mels))
        codes = []
        for book in self._books():
            index = nearest(residual, book)[0]
            residual = residual - book[index]
            codes.append(index)
        return torch.stack(codes)

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        books = self._books()
        frames = sum(books[layer][codes[layer]] for layer in range(len(codes)))  # fewer layers: coarser
        return torch.as_tensor(self.waveform_from_log_mel(np.asarray(frames)))

    def _state_dict(self) -> dict[str, torch.Tensor]:
        return {"codebooks": self._books()}

    def waveform_from_log_mel(self, frames: np.ndarray) -> np.ndarray:
        """Invert log-mel frames ``[frames, n_mels]``: pseudo-inverse filterbank, then fast Griffin-Lim
        (Perraudin et al. 2013, momentum 0.99 as in torchaudio's ``griffinlim``)."""
        c = self.config
        if len(frames) == 0:
            return np.zeros(0, dtype=np.float32)
        power = np.einsum("fm,bm->fb", np.exp(frames.astype(np.float64)), self._unmel)  # [frames, bins]
        magnitude = np.sqrt(np.maximum(power, 0.0))
        length = max(len(frames) - 1, 1) * c.hop  # a centred frame spans a hop: one frame is not silence
        angles = np.exp(2j * np.pi * np.random.default_rng(0).random(magnitude.shape))
        previous = np.zeros_like(angles)
        for _ in range(c.griffin_lim_iters):
            rebuilt = stft(istft(magnitude * angles, c.n_fft, c.hop, length), c.n_fft, c.hop)
            # very short spans (a frame or two) pad up to half a window, giving extra frames
            if len(rebuilt) != len(frames):
                rebuilt = np.pad(rebuilt[: len(frames)], ((0, max(0, len(frames) - len(rebuilt))), (0, 0)))
            accelerated = rebuilt - (0.99 / 1.99) * previous
            previous = rebuilt
            angles = accelerated / np.maximum(np.abs(accelerated), 1e-16)
        signal = istft(magnitude * angles, c.n_fft, c.hop, length)
        peak = np.abs(signal).max(initial=0.0)
        # scaled down only where it would clip: silence decoded stays silence, not noise at full scale
        return (0.9 * signal / peak if peak > 0.9 else signal).astype(np.float32)

    # -- files ---------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        saved = {"config": asdict(self.config), "fingerprint": self.fingerprint()}
        return save_codec_files(directory, saved, {CODEBOOKS_FILE: self._books()})

    def _read(self, directory: Path) -> None:
        saved, arrays = read_codec_files(directory, "DigitAudioCodec", (CODEBOOKS_FILE,))
        self.config = DigitAudioConfig(**saved["config"])
        books = arrays[CODEBOOKS_FILE]
        expected = (self.config.layers, self.config.codebook_size, self.config.n_mels)
        if tuple(books.shape) != expected:
            raise ValueError(f"{directory}: codebooks have shape {tuple(books.shape)}, {CODEC_FILE} says {expected}")
        self.codebooks = books
        if weights_checksum(self._state_dict()) != saved["fingerprint"]["checksum"]:
            raise ValueError(f"{directory}: {CODEBOOKS_FILE} does not match the checksum in {CODEC_FILE}")
