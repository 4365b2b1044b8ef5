"""Voices unlike the digits world's, for docs/refit-codec.md: media of a user's own to refit a codec on.

    python docs/tools/synthetic_voices.py make --out /tmp/fitc/voices          # 40 WAV files, 22.05 kHz
    python docs/tools/synthetic_voices.py usage builtin:digits/audio_codec /tmp/fitc/voices --skip 20

``make`` writes ``voice-NNN.wav``: a glottal pulse train (its pitch gliding between two values in
90-260 Hz) shaped by the formants of a random vowel (three resonances, F1 250-900 Hz, F2 800-2500
Hz, F3 2300-3400 Hz), 1-1.8 s at 22.05 kHz, seeded. The world's voices are harmonic hums, so the
digits speech codec, fitted on those, puts these on a few of its codes. ``usage`` counts the
first-layer codes a codec gives the clips of a folder (sorted by name, after ``--skip`` of
them): with ``fit-codec --limit 20`` fitting on the first 20, ``--skip 20`` scores the other 20.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import soundfile

RATE = 22050


def formant_gain(freqs: np.ndarray, centres: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The magnitude response of two-pole resonators in series (one per formant), at ``freqs``."""
    z = np.exp(-2j * np.pi * freqs / RATE)
    gain = np.ones_like(freqs)
    for centre, width in zip(centres, widths):
        radius, angle = np.exp(-np.pi * width / RATE), 2 * np.pi * centre / RATE
        response = np.abs(1 - 2 * radius * np.cos(angle) * z + radius**2 * z**2)
        gain = gain / response * (1 - radius)  # about unit gain at each peak
    return gain


def voice(rng: np.random.Generator) -> np.ndarray:
    """One clip: pulses at the gliding pitch, each a short decaying click, through the vowel's formants."""
    length = int(RATE * rng.uniform(1.0, 1.8))
    start, end = rng.uniform(90, 260, size=2)
    pitch = np.geomspace(start, end, length) * (1 + 0.01 * np.sin(2 * np.pi * 5 * np.arange(length) / RATE))
    phase = np.cumsum(pitch / RATE)
    pulses = np.diff(np.floor(phase), prepend=0.0)  # 1 at each glottal closure
    click = np.exp(-np.arange(64) / 8.0)
    source = np.convolve(pulses, click)[:length] + 0.02 * rng.standard_normal(length)  # a little breath
    centres = np.array([rng.uniform(250, 900), rng.uniform(800, 2500), rng.uniform(2300, 3400)])
    widths = rng.uniform(60, 160, size=3)
    spectrum = np.fft.rfft(source) * formant_gain(np.fft.rfftfreq(length, 1 / RATE), centres, widths)
    signal = np.fft.irfft(spectrum, n=length)
    fade = np.minimum(1.0, np.minimum(np.arange(length), np.arange(length)[::-1]) / (0.02 * RATE))
    signal = signal * fade
    return (0.8 * signal / np.abs(signal).max()).astype(np.float32)


def make(out: Path, count: int, seed: int) -> None:
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: give a new directory")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        soundfile.write(out / f"voice-{i:03d}.wav", voice(rng), RATE)
    print(f"wrote {count} voices to {out}")


def usage(codec_spec: str, folder: Path, skip: int) -> None:
    from unimodal.data.fit_codec import first_layer_usage, read_media, trainable_codec
    from unimodal.worlds import resolve

    codec, _ = trainable_codec(resolve(codec_spec))
    items = read_media(str(folder), codec)[skip:]
    if not items:
        raise SystemExit(f"{folder}: no clips after the first {skip}")
    print(f"{codec_spec} on {len(items)} clips of {folder}: first-layer codes used "
          f"{first_layer_usage(codec, items)} of {codec.codebook_size}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    made = verbs.add_parser("make", help="write the voices")
    made.add_argument("--out", type=Path, required=True)
    made.add_argument("--count", type=int, default=40)
    made.add_argument("--seed", type=int, default=0)
    used = verbs.add_parser("usage", help="first-layer codes a codec gives the clips of a folder")
    used.add_argument("codec", help="a fitted codec directory or builtin:digits/audio_codec")
    used.add_argument("folder", type=Path)
    used.add_argument("--skip", type=int, default=0, help="leave out the first N clips (those a --limit N refit saw)")
    args = parser.parse_args()
    if args.verb == "make":
        make(args.out, args.count, args.seed)
    else:
        usage(args.codec, args.folder, args.skip)


if __name__ == "__main__":
    main()
