"""The judges: trained on the train split only, accurate on held-out data, tolerant of formats."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from unimodal.worlds.digits import digit_images, utterances
from unimodal.worlds.judges import NO_DIGIT, audio_features, audio_judge, image_array, image_judge


def test_image_judge_heldout_accuracy():
    assert image_judge().heldout_accuracy() >= 0.97


def test_audio_judge_heldout_accuracy_on_unheard_voices():
    assert audio_judge().heldout_accuracy() >= 0.95


def test_image_judge_reads_every_image_format():
    images = digit_images("test")[:20]
    expected = image_judge().predict([im.pixels for im in images])
    assert image_judge().predict([im.rgb() for im in images]) == expected
    assert image_judge().predict([Image.fromarray(im.pixels) for im in images]) == expected
    assert image_judge().predict([im.pixels / 255.0 for im in images]) == expected
    bigger = [np.asarray(Image.fromarray(im.pixels).resize((64, 64), Image.BILINEAR)) for im in images]
    assert np.mean(np.asarray(image_judge().predict(bigger)) == expected) >= 0.9
    assert image_judge().predict([]) == []


def test_image_judge_survives_blur_and_noise():
    """Generated pictures are rarely clean: a judge that a faint smudge flips could not be trusted."""
    images = digit_images("test")
    labels = np.asarray([im.digit for im in images])
    rng = np.random.default_rng(0)
    noisy = [np.clip(im.pixels / 255 + rng.normal(0, 0.1, im.pixels.shape), 0, 1) for im in images]
    assert np.mean(np.asarray(image_judge().predict(noisy)) == labels) >= 0.95
    blurred = [np.asarray(Image.fromarray(im.pixels).resize((8, 8), Image.BILINEAR)) for im in images]
    assert np.mean(np.asarray(image_judge().predict(blurred)) == labels) >= 0.9


def test_image_array_rejects_bad_shapes():
    with pytest.raises(ValueError, match="HxW"):
        image_array(np.zeros(16))
    assert image_array(np.full((16, 16, 4), 255, np.uint8)).max() == 1.0


def test_audio_judge_tolerates_rate_and_channels():
    clips = [u.load() for u in utterances("test")[:10]]
    expected = audio_judge().predict(clips)
    stereo = [(np.stack([w, w], axis=1), r) for w, r in clips]
    assert audio_judge().predict(stereo) == expected
    from unimodal.modalities.audio import resample

    resampled = [(resample(w, r, 22050), 22050) for w, r in clips]
    assert np.mean(np.asarray(audio_judge().predict(resampled)) == expected) >= 0.9


def test_audio_features_are_fixed_size():
    short, long = utterances("train")[0].load(), utterances("train")[1].load()
    assert audio_features(*short).shape == audio_features(*long).shape
    silence = audio_features(np.zeros(4000, np.float32), 16000)
    assert np.isfinite(silence).all()


def test_judges_read_no_digit_in_blank_pictures_and_silence():
    """A classifier names some digit for anything: without this, a model that draws a black square
    or stays silent scores on every prompt of the digit a blank happens to read as."""
    blanks = [np.zeros((16, 16, 3), np.uint8), np.full((16, 16), 255, np.uint8), np.full((16, 16), 0.5)]
    assert image_judge().predict(blanks) == [NO_DIGIT] * 3
    silences = [(np.zeros(16000, np.float32), 16000), (np.zeros(0, np.float32), 16000)]
    assert audio_judge().predict(silences) == [NO_DIGIT] * 2
    quiet = [(w * 0.01, r) for w, r in (u.load() for u in utterances("test")[:10])]  # -40 dB, not silence
    assert NO_DIGIT not in audio_judge().predict(quiet)
