"""Synthesise the spoken digit words committed under data/digits/speech/ (run once; needs espeak-ng).

    apt-get install -y espeak-ng
    .venv/bin/python data/digits/make_speech.py              # every voice
    .venv/bin/python data/digits/make_speech.py en+f5        # those voices only; the manifest lists all

Every voice (an espeak-ng language + voice variant) says "zero" ... "nine" at three speed and pitch
settings (below). The waveform is resampled to 16 kHz mono, trimmed to the spoken word
(plus a short margin), peak-normalised and written as 16-bit FLAC. ``manifest.json`` lists
every file with its digit, voice, speed, pitch and split: the voices in TEST_VOICES are the
held-out split, never seen in training. The world (unimodal/data/digits.py) reads the manifest
and the files; it does not need espeak-ng.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import soundfile

from unimodal.modalities.audio import resample

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# espeak-ng 1.51 applies no variant after "en-gb" (en-gb+m7, en-gb+f2 and en-gb+f5 all say plain
# en-gb) but does after "en", its British English too; tests/test_digits_world.py checks that
# every voice sounds unlike every other; the test voices' variants (m4, f5, m6) are in no
# training voice, so a held-out voice is unheard in its accent and its variant alike. The female
# variants f1-f4 share one narrow pitch range (base 140-142 Hz), so three named female variants
# with higher voices (Annie, Andrea, steph) widen it. Breathiness is covered by a rule: every
# variant espeak-ng 1.51 ships whose voice file mixes breath noise into a voiced source (a
# `breath` line and `voicing` above 0) trains, but the held-out f5: f2 and f3, and Alicia,
# Demonic, sandro and victor, each of the last four on the next accent in the order below (the
# whispers and caleb have no voicing)
TRAIN_VOICES = (
    "en-us+m1", "en-us+f3", "en-us+f2", "en-us+m7", "en-us+Annie",
    "en+m7", "en+f2", "en+m3", "en+f1", "en+Andrea",
    "en-gb-scotland+m3", "en-gb-scotland+f1", "en-gb-scotland+m5",
    "en-us-nyc+f4", "en-us-nyc+m3", "en-us-nyc+steph",
    "en-gb-x-rp+m2", "en-gb-x-rp+f2",
    "en-029+f1", "en-029+m2", "en-029+f3",
    "en-gb-x-gbclan+m5", "en-gb-x-gbclan+f4", "en-gb-x-gbclan+m3",
    "en-us+Alicia", "en+Demonic", "en-gb-scotland+sandro", "en-us-nyc+victor",
)  # fmt: skip
TEST_VOICES = ("en-us+m4", "en+f5", "en-gb-x-rp+m6")
# (words per minute, pitch 0-99): espeak-ng -s and -p; three settings per voice keep the files small
SETTINGS = ((140, 35), (175, 65), (210, 50))
RATE = 16000
MARGIN_S = 0.03
SILENCE = 0.02  # fraction of the peak below which a sample counts as silence


def synthesise(voice: str, speed: int, pitch: int, word: str) -> np.ndarray:
    raw = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
        check=True,
        capture_output=True,
    ).stdout
    with wave.open(io.BytesIO(raw)) as w:
        source_rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768
    audio = resample(pcm, source_rate, RATE)
    loud = np.nonzero(np.abs(audio) > SILENCE * np.abs(audio).max())[0]
    margin = int(MARGIN_S * RATE)
    audio = audio[max(loud[0] - margin, 0) : loud[-1] + margin]
    return (0.9 * audio / np.abs(audio).max()).astype(np.float32)


def main(out: Path = Path(__file__).parent, only: tuple[str, ...] = ()) -> None:
    """Write the files of every voice, or of the voices ``only`` names, and the whole manifest."""
    unknown = set(only) - set(TRAIN_VOICES + TEST_VOICES)
    if unknown:
        raise SystemExit(f"unknown voices {sorted(unknown)}; the voices are {TRAIN_VOICES + TEST_VOICES}")
    speech = out / "speech"
    speech.mkdir(parents=True, exist_ok=True)
    entries = []
    for split, voices in (("train", TRAIN_VOICES), ("test", TEST_VOICES)):
        for voice in voices:
            for speed, pitch in SETTINGS:
                for digit, word in enumerate(WORDS):
                    name = f"{voice.replace('+', '_')}-s{speed}-p{pitch}-{digit}.flac"
                    if not only or voice in only:
                        audio = synthesise(voice, speed, pitch, word)
                        soundfile.write(speech / name, audio, RATE, subtype="PCM_16", compression_level=1.0)
                    entries.append(
                        {"file": f"speech/{name}", "digit": digit, "voice": voice, "speed": speed, "pitch": pitch, "split": split}
                    )
    rows = ",\n".join(json.dumps(entry) for entry in entries)  # one file per line: readable diffs
    (out / "manifest.json").write_text(f'{{"rate": {RATE}, "files": [\n{rows}\n]}}\n')
    size = sum((out / e["file"]).stat().st_size for e in entries)
    print(f"wrote {len(entries)} files ({size / 2**20:.2f} MiB) and manifest.json under {out}")


if __name__ == "__main__":
    main(only=tuple(sys.argv[1:]))
