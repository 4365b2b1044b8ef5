"""Judges: classifiers independent of the model under test, trained only on the train split of real data.

The digits suite cannot compare a generated image or waveform with a reference, so it asks a
judge which digit it shows or says. A judge's own accuracy on the real held-out data
(``heldout_accuracy``) is reported next to the model's scores: a judged number is only as
trustworthy as its judge.

- :class:`ImageJudge`: an RBF support-vector machine on the 16x16 pixels of the train images
  (robust to the blur and noise a generator leaves: see ``tests/test_judges.py``).
- :class:`AudioJudge`: an RBF support-vector machine on a fixed-size spectral summary of the
  word (MFCCs after trimming silence, resampled to a fixed number of frames, with per-utterance
  mean removal) of the train voices; its held-out score is on voices it never heard.

Neither is asked about a picture without ink or a clip without sound: both read those as
:data:`NO_DIGIT`, since a classifier names some digit for anything, and a model that draws
nothing must not score on the prompts of whichever digit a blank reads as.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from unimodal.modalities.audio import resample, to_mono
from unimodal.modalities.digit_audio import log_mel
from unimodal.worlds.digits import IMAGE_SIZE, digit_images, utterances

RATE = 16000
MFCC_BANDS, MFCC_KEEP, MFCC_FRAMES = 40, 20, 16
NO_DIGIT = -1  # what a judge reads in a blank picture or in silence
BLANK_CONTRAST = 0.1  # a picture whose grey levels (0..1) span less than this has no ink
SILENT_PEAK = 1e-3  # a clip whose loudest sample is below this (-60 dBFS) is silence


def image_array(image: Any) -> np.ndarray:
    """Any image (PIL, HxW or HxWxC array, uint8 0..255 or float 0..1) -> 16x16 float grey in [0, 1]."""
    from PIL import Image

    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("L"))
    array = np.asarray(image)
    if array.ndim == 3:
        array = array[..., :3].mean(axis=2)
    if array.ndim != 2 or min(array.shape) < 1:
        raise ValueError(f"expected an HxW or HxWxC image, got shape {array.shape}")
    array = array.astype(np.float64)
    if not np.issubdtype(np.asarray(image).dtype, np.integer) and array.max(initial=0) <= 1.0:
        array = array * 255
    if array.shape != (IMAGE_SIZE, IMAGE_SIZE):
        grey = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
        array = np.asarray(grey.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR), dtype=np.float64)
    return np.clip(array, 0, 255) / 255


def audio_features(waveform: np.ndarray, sample_rate: int) -> np.ndarray:
    """A fixed-size vector for a spoken word: trimmed, peak-scaled MFCCs at MFCC_FRAMES time points."""
    from scipy.fft import dct

    signal = resample(to_mono(waveform), int(sample_rate), RATE)
    peak = np.abs(signal).max(initial=0)
    loud = np.nonzero(np.abs(signal) > 0.05 * peak)[0]
    if len(loud):
        # at the training clips' peak (0.9): c0 then carries the word's loudness contour, not the
        # level a synthesiser or a decoder happened to write it at
        signal = 0.9 * signal[loud[0] : loud[-1] + 1] / peak
    mfcc = dct(log_mel(signal, RATE, 512, 128, MFCC_BANDS), type=2, norm="ortho", axis=1)[:, :MFCC_KEEP]
    frames = np.linspace(0, len(mfcc) - 1, MFCC_FRAMES)
    resampled = np.stack([np.interp(frames, np.arange(len(mfcc)), mfcc[:, k]) for k in range(MFCC_KEEP)], axis=1)
    resampled[:, 1:] -= resampled[:, 1:].mean(axis=0)  # remove the voice's average timbre, keep loudness (c0)
    return np.concatenate([resampled.ravel(), [np.log(len(signal) / RATE + 1e-3)]]).astype(np.float32)


class _Judge:
    """An RBF support-vector machine over a feature function, optionally standardising first."""

    def __init__(self, features: list[np.ndarray], labels: list[int], C: float, standardise: bool):
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import SVC

        self.model = make_pipeline(*([StandardScaler()] if standardise else []), SVC(C=C, gamma="scale"))
        self.model.fit(np.stack(features), np.asarray(labels))

    def _predict(self, features: list[np.ndarray]) -> list[int]:
        return [int(d) for d in self.model.predict(np.stack(features))] if features else []


class ImageJudge(_Judge):
    def __init__(self) -> None:
        train = digit_images("train")
        # raw pixels, not standardised: border pixels are ~always black in training, and scaling
        # them by their tiny spread would make a faint smudge there decide the label
        super().__init__([image_array(im.pixels).ravel() for im in train], [im.digit for im in train], C=3.0, standardise=False)

    def predict(self, images: list[Any]) -> list[int]:
        """The digit each image shows (any format :func:`image_array` takes), NO_DIGIT for a blank one."""
        arrays = [image_array(im) for im in images]
        read = self._predict([a.ravel() for a in arrays])
        return [NO_DIGIT if np.ptp(a) < BLANK_CONTRAST else d for a, d in zip(arrays, read)]

    def heldout_accuracy(self) -> float:
        test = digit_images("test")
        return float(np.mean(np.asarray(self.predict([im.pixels for im in test])) == [im.digit for im in test]))


class AudioJudge(_Judge):
    def __init__(self) -> None:
        train = utterances("train")
        super().__init__([audio_features(*u.load()) for u in train], [u.digit for u in train], C=10.0, standardise=True)

    def predict(self, clips: list[tuple[np.ndarray, int]]) -> list[int]:
        """The digit each ``(waveform, sample_rate)`` clip says, NO_DIGIT for silence."""
        read = self._predict([audio_features(w, r) for w, r in clips])
        return [NO_DIGIT if np.abs(np.asarray(w)).max(initial=0) < SILENT_PEAK else d for (w, _), d in zip(clips, read)]

    def heldout_accuracy(self) -> float:
        test = utterances("test")
        return float(np.mean(np.asarray(self.predict([u.load() for u in test])) == [u.digit for u in test]))


@lru_cache(maxsize=1)
def image_judge() -> ImageJudge:
    return ImageJudge()


@lru_cache(maxsize=1)
def audio_judge() -> AudioJudge:
    return AudioJudge()
