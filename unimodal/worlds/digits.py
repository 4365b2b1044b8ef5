"""The digits world: a small any-to-any world built offline from real material (``docs/digits-world.md``).

- images: scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), upsampled to 16x16 by
  :func:`upsample`; the test split is every image whose index is a multiple of 5;
- speech: the words "zero" ... "nine" in 27 espeak-ng voices at 3 speed/pitch settings, committed
  as FLAC under ``data/digits/`` (``make_speech.py`` made them); 3 whole voices are the test split;
- text: captions, instructions and short chats; the users' instructions come in many phrasings
  (:mod:`unimodal.worlds.phrasings`), some of them held out from training.

Tasks, each in a pretraining form (plain interleaved text, every part supervised) and a chat form
(user parts unsupervised, assistant parts supervised): caption (image -> text), draw (text ->
image), transcribe (audio -> text), speak (text -> audio), story (count from a to b with a
picture per number) and a little text-only arithmetic. The eval suite asks chat questions
(:func:`chat_prompt`) on the test split twice: in phrasings the training chats use, and in
held-out ones that no training text contains.

:func:`build_world` writes the source JSONL, the shards, a SentencePiece tokenizer trained on the
world's text and a :class:`~unimodal.modalities.digit_audio.DigitAudioCodec` fitted on the train
voices; ``builtin:digits/...`` builds it on first use.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from unimodal.data.jsonl import pack_jsonl
from unimodal.data.sentencepiece_trainer import train_tokenizer
from unimodal.data.templates import TEMPLATES
from unimodal.data.templates import render as render_chat
from unimodal.errors import refuse_nonempty
from unimodal.modalities.digit_audio import DigitAudioCodec, DigitAudioConfig
from unimodal.modalities.image_discrete import PatchVQCodec
from unimodal.schema import Document, Modality, Part
from unimodal.worlds.phrasings import WORDS, templates

IMAGE_SIZE = 16
TEST_EVERY = 5
SPLITS = ("train", "test")
FORMS = ("pretrain", "chat")
TASKS = ("caption", "draw", "transcribe", "speak", "story", "arithmetic")
SPEECH_TASKS = ("transcribe", "speak")
IMAGE_TEXT = "image-text"  # the subset of the world without speech
STORY_LENGTHS = (2, 3, 4)

# One template is a string whose {image} / {audio} fields are media and whose other fields are
# text. Pretraining forms follow MIO's templates (arXiv 2409.17692).
PRETRAIN: dict[str, tuple[str, ...]] = {
    "caption": ("{image} The caption of this image is: a handwritten {word}.", "{image} This picture shows the digit {word}."),
    "draw": ('Please generate an image of "a handwritten {word}": {image}', "A handwritten {word}: {image}"),
    "transcribe": ("{audio} Transcribe this speech: {word}", "{audio} The speaker says: {word}."),
    "speak": ('Please generate a speech of "{word}": {audio}', "Say {word}: {audio}"),
    "story": ("Counting from {first} to {last} with pictures. {pictures}",),
    "arithmetic": ("After {word} comes {next}.", "Adding {other} to {word} gives {total}."),
}
# chat forms: the user's instruction comes from unimodal.worlds.phrasings (seen templates only);
# the assistant replies in one of these
REPLIES: dict[str, tuple[str, ...]] = {
    "caption": ("It is {word}.", "The number {word}.", "This is a handwritten {word}."),
    "draw": ("{image}", "Here it is: {image}"),
    "transcribe": ("{word}", "The speaker says {word}.", "I hear {word}."),
    "speak": ("{audio}", "Like this: {audio}"),
    "story": ("{pictures}",),
}
# the text-only arithmetic chats keep their own (user, assistant) pairs; the suite does not ask them
ARITHMETIC_CHAT = (
    ("What number comes after {word}?", "The number after {word} is {next}."),
    ("What is {word} plus {other}?", "Adding {other} to {word} gives {total}."),
)
MEDIA_FIELD = {"caption": "{image}", "transcribe": "{audio}"}
STORY_PICTURE = "{Word}: {image}"

# one piece of a filled template: ("text", str), ("image", picture) or ("audio", waveform)
Piece = tuple[Modality, Any]
_MEDIA_FIELD = re.compile(r"\{(image|audio)\}")


# ------------------------------------------------------------------------------------------------
# material


def upsample(pixels: np.ndarray) -> np.ndarray:
    """The documented image transform: 8x8 grey levels 0..16 -> 16x16 uint8 0..255 (bilinear).

    Ink stays white on black, as in scikit-learn's array.
    """
    from PIL import Image

    grey = np.clip(np.rint(np.asarray(pixels, dtype=np.float64) * 255 / 16), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(grey).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))


@dataclass(frozen=True)
class DigitImage:
    index: int  # row in sklearn.datasets.load_digits()
    digit: int
    pixels: np.ndarray  # IMAGE_SIZE x IMAGE_SIZE uint8

    def rgb(self) -> np.ndarray:
        """HxWx3 uint8, what the data module decodes a PNG to."""
        return np.repeat(self.pixels[:, :, None], 3, axis=2)


# caption copy k >= 1 of a train image shows it moved by one pixel in direction
# SHIFTS[(index + k) % 8]: augmentation for reading, the classic fix for a small digits set
SHIFTS = ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (-1, -1), (1, -1), (-1, 1))


def shifted(image: DigitImage, copy: int) -> np.ndarray:
    """The pixels of caption copy ``copy`` (rows, columns moved by one; black fills the edge)."""
    dy, dx = SHIFTS[(image.index + copy) % len(SHIFTS)]
    padded = np.pad(image.pixels, 1)
    return padded[1 - dy : 1 - dy + IMAGE_SIZE, 1 - dx : 1 - dx + IMAGE_SIZE]


def shifted_name(image: DigitImage, copy: int) -> str:
    return f"media/images/{image.index:04d}-shifted{copy}.png"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


@lru_cache(maxsize=1)
def _all_images() -> tuple[DigitImage, ...]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return tuple(DigitImage(i, int(t), upsample(p)) for i, (p, t) in enumerate(zip(data.images, data.target)))


def digit_images(split: str) -> list[DigitImage]:
    """The train or test images; test = every index that is a multiple of ``TEST_EVERY``."""
    _check_split(split)
    return [im for im in _all_images() if (im.index % TEST_EVERY == 0) == (split == "test")]


def speech_dir() -> Path:
    """The committed speech (``data/digits`` of the repository, or ``$UNIMODAL_DIGITS_SPEECH``)."""
    default = Path(__file__).resolve().parents[2] / "data" / "digits"
    root = Path(os.environ.get("UNIMODAL_DIGITS_SPEECH", default))
    if not (root / "manifest.json").is_file():
        raise FileNotFoundError(
            f"{root}/manifest.json not found: the digits world needs the committed speech files "
            "(data/digits in the repository; set UNIMODAL_DIGITS_SPEECH to their directory)"
        )
    return root


@dataclass(frozen=True)
class Utterance:
    path: Path
    digit: int
    voice: str
    speed: int
    pitch: int
    split: str

    def load(self) -> tuple[np.ndarray, int]:
        """``(float32 mono waveform, sample_rate)``; a fresh copy of the cached file."""
        waveform, rate = _load_audio(str(self.path))
        return waveform.copy(), rate


@lru_cache(maxsize=1024)
def _load_audio(path: str) -> tuple[np.ndarray, int]:
    import soundfile

    waveform, rate = soundfile.read(path, dtype="float32")
    waveform.flags.writeable = False  # shared by the cache
    return waveform, rate


def utterances(split: str) -> list[Utterance]:
    """Spoken digits of the train voices or of the held-out test voices (never none: the world,
    its judge and its scoreboard need both)."""
    _check_split(split)
    root = speech_dir()
    files = json.loads((root / "manifest.json").read_text())["files"]
    found = [
        Utterance(root / f["file"], f["digit"], f["voice"], f["speed"], f["pitch"], f["split"])
        for f in files
        if f["split"] == split
    ]
    if not found:
        raise FileNotFoundError(f"{root}/manifest.json lists no {split!r} utterances: the digits world needs both splits")
    return found


# ------------------------------------------------------------------------------------------------
# templates


def render(template: str, media: Sequence[Any] = (), **fields: Any) -> list[Piece]:
    """Split ``template`` at its media fields, taking ``media`` in order; format the text between."""
    pieces = _MEDIA_FIELD.split(template)
    segments: list[Piece] = []
    items = iter(media)
    for i, piece in enumerate(pieces):
        if i % 2:
            try:
                segments.append((piece, next(items)))
            except StopIteration:
                raise ValueError(f"template {template!r} has more media fields than the {len(media)} given") from None
        elif piece.strip():
            segments.append(("text", piece.strip().format(**fields)))
    if next(items, None) is not None:
        raise ValueError(f"template {template!r} has fewer media fields than the {len(media)} given")
    return segments


def _ref(digit: int, numeral: bool) -> str:
    return str(digit) if numeral else WORDS[digit]


def _fill(task: str, template: str, target: Any, media: Sequence[Any], numeral: bool) -> list[Piece]:
    """Render one template of ``task`` for ``target``: a digit, a story's (first, last), or an
    arithmetic (word, other) pair. ``ref`` is the digit as a numeral or a word, ``word`` always a word."""
    if task == "story":
        first, last = target
        pictures = " ".join(STORY_PICTURE.replace("{Word}", WORDS[d].capitalize()) for d in range(first, last + 1))
        fields = {"first": _ref(first, numeral), "last": _ref(last, numeral)}
        return render(template.replace("{pictures}", pictures), media, **fields)
    if task == "arithmetic":
        word, other = target
        fields = {"word": WORDS[word], "next": WORDS[word + 1], "other": WORDS[other], "total": WORDS[word + other]}
        return render(template, media, **fields)
    return render(template, media, word=WORDS[target], ref=_ref(target, numeral))


def pretrain_segments(task: str, target: Any, media: Sequence[Any], variant: int, numeral: bool = False) -> list[Piece]:
    templates = PRETRAIN[task]
    return _fill(task, templates[variant % len(templates)], target, media, numeral)


def user_template(task: str, phrasing: str, media_first: bool) -> str:
    """A phrasing of ``task`` as a user message template; the input media of caption and
    transcribe go before or after the words."""
    media = MEDIA_FIELD.get(task)
    if media is None:
        return phrasing
    return f"{media} {phrasing}" if media_first else f"{phrasing} {media}"


def chat_segments(
    task: str, target: Any, media: Sequence[Any], phrasing: str, variant: int, numeral: bool = False, media_first: bool = True
) -> tuple[list[Piece], list[Piece]]:
    """(user, assistant) segments: the user says ``phrasing`` (a template of
    :mod:`unimodal.worlds.phrasings`), the assistant replies in its ``variant``-th way. Input media
    (caption, transcribe) go to the user, the rest to the assistant."""
    if task == "arithmetic":
        user, reply = ARITHMETIC_CHAT[variant % len(ARITHMETIC_CHAT)]
    else:
        user, reply = user_template(task, phrasing, media_first), REPLIES[task][variant % len(REPLIES[task])]
    inputs = task in MEDIA_FIELD
    user_media, assistant_media = (media, ()) if inputs else ((), media)
    return _fill(task, user, target, user_media, numeral), _fill(task, reply, target, assistant_media, numeral)


def chat_prompt(task: str, target: Any, media: Sequence[Any], phrasing: str, numeral: bool = False, media_first: bool = True) -> list[dict[str, Any]]:
    """The user message of a chat-form question, in the engine's message format.

    ``media`` are HxWx3 uint8 images or ``(waveform, rate)`` pairs for the input-media tasks.
    """
    user = _fill(task, user_template(task, phrasing, media_first), target, media, numeral)
    content = [{"type": "text", "text": value} if kind == "text" else {"type": kind, kind: value} for kind, value in user]
    return [{"role": "user", "content": content}]


def story_targets() -> list[tuple[int, int]]:
    """Every (first, last) counting range: 2 to 4 consecutive digits."""
    return [(first, first + n - 1) for n in STORY_LENGTHS for first in range(0, 11 - n)]


# number words past nine: a reply that names one ("seventeen", "twenty-seven") names another number
LARGER_WORDS = {word: 10 + i for i, word in enumerate((
    "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"))}
LARGER_WORDS.update({word: 10 * (2 + i) for i, word in enumerate(("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"))})
LARGER_WORDS.update(hundred=100, thousand=1000)


def parse_digits(text: str) -> list[int]:
    """Every number a reply mentions, as a word or a numeral, in order: digits as themselves,
    larger numbers too ("7 out of 10" names 7 and 10), so a reply that names the digit among
    other numbers is not read as naming the digit alone."""
    pattern = r"\b(" + "|".join([*WORDS, *LARGER_WORDS]) + r"|[0-9]+)\b"
    return [int(m) if m.isdigit() else WORDS.index(m) if m in WORDS else LARGER_WORDS[m] for m in re.findall(pattern, text.lower())]


# ------------------------------------------------------------------------------------------------
# building


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _source_parts(segments: list[Piece], role: str | None, loss: bool) -> list[dict[str, Any]]:
    parts = []
    for kind, value in segments:
        part: dict[str, Any] = {"type": kind, "loss": loss, **({"text": value} if kind == "text" else {"path": value})}
        if role is not None:
            part["role"] = role
        parts.append(part)
    return parts


def _copies(items: list[Any], copies: float, rng: np.random.Generator) -> list[Any]:
    """``int(copies)`` full copies of ``items`` plus a random fraction ``copies % 1`` of them."""
    whole = int(copies)
    extra = rng.choice(len(items), round((copies - whole) * len(items)), replace=False)
    return items * whole + [items[i] for i in sorted(extra)]


def _documents(split: str, form: str, rng: np.random.Generator, copies: dict[str, float]) -> Iterator[dict[str, Any]]:
    """Source JSONL records (media by path relative to the world root) of one split and form."""
    images = digit_images(split)
    by_digit = {d: [im for im in images if im.digit == d] for d in range(10)}
    image_path = lambda im: f"media/images/{im.index:04d}.png"  # noqa: E731
    audio_path = lambda u: f"media/speech/{u.path.name}"  # noqa: E731

    jobs: list[tuple[str, Any, list[str], str]] = []
    for task in ("caption", "draw"):
        for k, im in enumerate(_copies(images, copies["image"], rng)):
            copy = k // len(images)
            if task == "caption" and split == "train" and copy >= 1:
                jobs.append((task, im.digit, [shifted_name(im, copy)], f"image{im.index}-shifted{copy}"))
            else:
                jobs.append((task, im.digit, [image_path(im)], f"image{im.index}"))
    for task in ("transcribe", "speak"):
        jobs += [(task, u.digit, [audio_path(u)], u.path.stem) for u in _copies(utterances(split), copies["speech"], rng)]
    for _ in range(int(copies["story"])):
        first, last = story_targets()[int(rng.integers(len(story_targets())))]
        pictures = [image_path(by_digit[d][int(rng.integers(len(by_digit[d])))]) for d in range(first, last + 1)]
        jobs.append(("story", (first, last), pictures, f"{first}to{last}"))
    for _ in range(int(copies["arithmetic"])):
        word = int(rng.integers(9))  # "after nine" has no digit answer
        jobs.append(("arithmetic", (word, int(rng.integers(10 - word))), [], str(word)))

    for n, job in enumerate(rng.permutation(len(jobs))):
        task, target, media, source = jobs[job]
        variant, numeral = int(rng.integers(6)), bool(rng.integers(2))
        if form == "pretrain":
            parts = _source_parts(pretrain_segments(task, target, media, variant, numeral), None, True)
        else:
            seen = templates(task) if task in REPLIES else ()  # arithmetic keeps its own pairs
            phrasing = seen[int(rng.integers(len(seen)))] if seen else ""
            user, assistant = chat_segments(task, target, media, phrasing, variant, numeral, media_first=bool(rng.integers(2)))
            parts = _source_parts(user, "user", False) + _source_parts(assistant, "assistant", True)
        yield {"key": f"{split}-{form}-{task}-{n:06d}", "parts": parts, "meta": {"task": task, "source": source}}


# documents per split and form: each image (caption, draw) and each utterance (transcribe, speak)
# ``image`` / ``speech`` times per task (a fraction: a random part of them), stories and sums by count
COPIES = {
    "train": {"image": 3, "speech": 2, "story": 1000, "arithmetic": 200},
    "test": {"image": 1, "speech": 1, "story": 100, "arithmetic": 20},
}


def _tokenizer_text(pretrain: Path, chat: Path, out: Path) -> None:
    """The text a tokenizer for this world must read well: pretraining text, and the chats rendered
    with every chat template, so that markers such as ``<|im_start|>`` become a few pieces, not bytes."""

    with out.open("w") as f:
        f.write(pretrain.read_text())
        for line in chat.read_text().splitlines():
            parts = [Part(p["type"], text=p.get("text"), role=p["role"], loss=p["loss"]) for p in json.loads(line)["parts"]]
            for template in TEMPLATES.values():
                rendered = render_chat(Document(parts), template)
                texts = [{"type": "text", "text": p.text} for p in rendered if isinstance(p, Part) and p.type == "text"]
                f.write(json.dumps({"parts": texts}) + "\n")


def build_world(
    root: str | Path,
    seed: int = 0,
    copies: dict[str, dict[str, float]] = COPIES,
    text_vocab_size: int = 512,
    audio_codec: DigitAudioConfig | None = None,
) -> dict[str, Any]:
    """Build the world under ``root`` and return its summary (also written to ``root/world.json``).

    Layout: ``{pretrain,chat}/{train,test}/`` shards (+ their source ``*.jsonl``), the same without
    the speech tasks in ``image-text/{pretrain,chat}/{train,test}/``, ``media/``,
    ``tokenizer.model``, ``audio_codec/`` (a :class:`DigitAudioCodec` of config ``audio_codec``),
    ``image_codec/`` (a :class:`PatchVQCodec`: 4 codes of 256 per image). A build cut short
    (Ctrl-C, a full disk) removes what it wrote, so that no half world refuses the rerun.
    """

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r}; it must be an integer >= 0")
    speech_dir()  # its one line before anything is written
    root = Path(root)
    refuse_nonempty(root, "build the digits world into a new directory")
    existed = root.is_dir()
    try:
        return _build(root, seed, copies, text_vocab_size, audio_codec)
    except BaseException:
        for written in root.iterdir() if existed else [root]:  # an empty directory given stays, empty
            if written.is_dir() and not written.is_symlink():
                shutil.rmtree(written, ignore_errors=True)
            else:
                written.unlink(missing_ok=True)
        raise


def _build(
    root: Path, seed: int, copies: dict[str, dict[str, float]], text_vocab_size: int, audio_codec: DigitAudioConfig | None
) -> dict[str, Any]:
    (root / "media" / "images").mkdir(parents=True, exist_ok=True)
    (root / "media" / "speech").mkdir(parents=True, exist_ok=True)
    for image in _all_images():
        (root / "media" / "images" / f"{image.index:04d}.png").write_bytes(_png(image.pixels))
    for copy in range(1, math.ceil(copies["train"]["image"])):
        for image in digit_images("train"):
            (root / shifted_name(image, copy)).write_bytes(_png(shifted(image, copy)))
    for split in SPLITS:
        for u in utterances(split):
            shutil.copyfile(u.path, root / "media" / "speech" / u.path.name)

    summary: dict[str, Any] = {"seed": seed, "image_size": IMAGE_SIZE, "test_rule": f"image index % {TEST_EVERY} == 0"}
    for split in SPLITS:
        for form in FORMS:
            rng = np.random.default_rng([seed, SPLITS.index(split), FORMS.index(form)])
            src = root / f"{form}-{split}.jsonl"
            with src.open("w") as f:
                for record in _documents(split, form, rng, copies[split]):
                    f.write(json.dumps(record) + "\n")
            stats = pack_jsonl(src, root / form / split, max_docs_per_shard=512, progress=False)
            summary[f"{form}/{split}"] = stats["documents"]
            # the same documents less the speech tasks, for families without speech (Orthus,
            # LlamaFusion, SEED-LLaMA; docs/families-on-digits.md)
            no_speech = root / f"{IMAGE_TEXT}-{form}-{split}.jsonl"
            with src.open() as records, no_speech.open("w") as f:
                f.writelines(line for line in records if json.loads(line)["meta"]["task"] not in SPEECH_TASKS)
            stats = pack_jsonl(no_speech, root / IMAGE_TEXT / form / split, max_docs_per_shard=512, progress=False)
            summary[f"{IMAGE_TEXT}/{form}/{split}"] = stats["documents"]

    text = root / "tokenizer-text.jsonl"  # the train split's text only; the test split stays unseen
    _tokenizer_text(root / "pretrain-train.jsonl", root / "chat-train.jsonl", text)
    train_tokenizer(text, root / "tokenizer.model", vocab_size=text_vocab_size)
    text.unlink()

    codec = DigitAudioCodec(config=audio_codec).fit([u.load() for u in utterances("train")], seed=seed)
    codec.save(root / "audio_codec")
    summary["audio_codec"] = codec.fingerprint()
    image_codec = PatchVQCodec(size=IMAGE_SIZE).fit([im.rgb() for im in digit_images("train")], seed=seed)
    image_codec.save(root / "image_codec")
    summary["image_codec"] = image_codec.fingerprint()
    summary["speech"] = {s: sorted({u.voice for u in utterances(s)}) for s in SPLITS}
    (root / "world.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
