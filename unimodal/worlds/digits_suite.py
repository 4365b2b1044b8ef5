"""The digits scoreboard: ``unimodal eval DIR --suite digits`` (``docs/digits-world.md``).

The suite asks the digits world's chat questions on the held-out split and scores the replies.
Every task is asked twice, in two phrasing sets of at least 200 questions each
(:mod:`unimodal.worlds.phrasings`): *seen* phrasings, which the training chats use, and
*held-out* ones, which no training text contains; ``caption_acc`` is the first,
``caption_heldout_acc`` the second, and every goal applies to both.

- ``caption_acc``: test images; right when the reply names exactly the shown digit (as a word or
  a numeral, possibly several times, and no other number);
- ``transcribe_acc``: test voices' utterances, scored the same way;
- ``draw_acc`` / ``speak_acc``: "draw 7" / "say 7" prompts; right when the image judge / audio
  judge recognises the requested digit in the reply's first image / audio part;
- ``interleaved_acc``: "count from 3 to 5 with pictures"; right when the reply holds exactly
  one image per number, the judge reads them as 3, 4, 5 in order, and its text labels them
  three, four, five;
- ``judge_image_acc`` / ``judge_audio_acc``: the judges' accuracy on the real held-out data;
- ``{image,audio}_codec_roundtrip_acc``: judge accuracy on held-out media after the model's codec
  encodes and decodes them (what generation can at best reach); null without a codec.

The model is reached through one narrow function, a :data:`Responder`: a batch of conversations
(OpenAI-style messages, media as arrays) in, one reply per conversation out, each an ordered list
of parts ``{"type": "text", "text": str}``, ``{"type": "image", "image": PIL | HxW[xC] array}``,
``{"type": "audio", "audio": (waveform, sample_rate)}``. :func:`assistant_responder` builds it
from ``unimodal.load(DIR)``; tests use fake models.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from unimodal.checkpoints.load import read_export_config
from unimodal.errors import UserError
from unimodal.inference.chat import load
from unimodal.models.generation import GenerationSettings
from unimodal.schema import Part
from unimodal.worlds.digits import chat_prompt, digit_images, parse_digits, story_targets, utterances
from unimodal.worlds.judges import audio_judge, image_judge
from unimodal.worlds.phrasings import templates

log = logging.getLogger("unimodal.eval")

Message = dict[str, Any]
ReplyParts = list[dict[str, Any]]
Responder = Callable[[list[list[Message]]], list[ReplyParts]]

TASKS = ("caption", "transcribe", "draw", "speak", "story")
PHRASINGS = ("seen", "heldout")
TASK_METRIC = {
    "caption": "caption_acc", "transcribe": "transcribe_acc", "draw": "draw_acc", "speak": "speak_acc",
    "story": "interleaved_acc",
}  # fmt: skip
# the media modality each task reads or writes: a model without that modality's codec skips it
TASK_MODALITY = {"caption": "image", "transcribe": "audio", "draw": "image", "speak": "audio", "story": "image"}
TASK_GOALS = {"caption": 0.97, "transcribe": 0.95, "draw": 0.95, "speak": 0.85, "story": 0.85}
MIN_QUESTIONS = 200  # per task and phrasing set: one question moves a score by at most 0.005


def metric(task: str, phrasing: str) -> str:
    """``draw_acc`` (seen phrasings) or ``draw_heldout_acc``."""
    name = TASK_METRIC[task]
    return name if phrasing == "seen" else name.replace("_acc", "_heldout_acc")


GOALS = {
    **{metric(task, phrasing): goal for task, goal in TASK_GOALS.items() for phrasing in PHRASINGS},
    "judge_image_acc": 0.97, "judge_audio_acc": 0.95,
}  # fmt: skip


@dataclass
class Item:
    """One question: its task, phrasing set, the conversation to send, and the expected digit (or story range)."""

    task: str
    messages: list[Message]
    target: Any
    phrasing: str = "seen"
    voice: str | None = None  # the held-out voice a transcription question plays

    @property
    def key(self) -> str:
        """``draw`` or ``draw/heldout``: where the question is counted."""
        return self.task if self.phrasing == "seen" else f"{self.task}/{self.phrasing}"


def check_sizes(limit: int | None = None, batch_size: int = 1) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 question per task, got {limit}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def items(limit: int | None = None) -> dict[str, list[Item]]:
    """The held-out questions of every task in both phrasing sets (keys ``draw``, ``draw/heldout``;
    at most ``limit`` each, a fixed sample).

    Each set has at least ``MIN_QUESTIONS`` questions per task: every test image (caption), every
    test utterance three times (transcribe), each digit 20 times (draw, speak), each counting range
    9 times (story). Phrasings, numerals or words, and where the input media goes are drawn from a
    fixed generator, the same in every run.
    """
    check_sizes(limit)
    images, clips = digit_images("test"), utterances("test")
    jobs: dict[str, list[tuple[Any, list[Any], str | None]]] = {
        "caption": [(im.digit, [im.rgb()], None) for im in images],
        "transcribe": [(u.digit, [u.load()], u.voice) for _ in range(3) for u in clips],
        "draw": [(d, [], None) for _ in range(20) for d in range(10)],
        "speak": [(d, [], None) for _ in range(20) for d in range(10)],
        "story": [(target, [], None) for _ in range(9) for target in story_targets()],
    }
    out: dict[str, list[Item]] = {}
    for phrasing in PHRASINGS:
        for t, task in enumerate(TASKS):
            rng = np.random.default_rng([t, PHRASINGS.index(phrasing)])
            options = templates(task, held_out=phrasing == "heldout")
            questions = []
            for target, media, voice in jobs[task]:
                template = options[int(rng.integers(len(options)))]
                messages = chat_prompt(task, target, media, template, numeral=bool(rng.integers(2)), media_first=bool(rng.integers(2)))
                questions.append(Item(task, messages, target, phrasing, voice))
            out[questions[0].key] = _spread(questions, limit)
    return out


def _spread(questions: list[Item], limit: int | None) -> list[Item]:
    """At most ``limit`` questions, a fixed random sample in their order: the test sets are ordered
    by digit or by voice, so the first few (or evenly spaced ones) would cover a few digits only."""
    if limit is None or limit >= len(questions):
        return questions
    keep = np.sort(np.random.default_rng(0).permutation(len(questions))[: max(limit, 0)])
    return [questions[i] for i in keep]


def _of_type(reply: ReplyParts, kind: str) -> list[Any]:
    return [part.get(kind) for part in reply if part.get("type") == kind]


def judge_reply(item: Item, reply: ReplyParts) -> tuple[bool, Any]:
    """Whether a reply is right, and what was read from it (digits said, or digits judged).

    A reply in another medium than the task's fails: a caption with a picture attached, a
    picture with speech attached (which fails draw and speak alike). A story must label its
    pictures with the right numbers, in order, as well as draw them.
    """
    kinds = {part.get("type") for part in reply}
    said = parse_digits(" ".join(_of_type(reply, "text")))
    if item.task in ("caption", "transcribe"):
        return bool(said) and all(d == item.target for d in said) and kinds <= {"text"}, said
    if item.task in ("draw", "speak"):
        medium, other = ("image", "audio") if item.task == "draw" else ("audio", "image")
        made = [m for m in _of_type(reply, medium) if m is not None][:1]
        seen = (image_judge() if medium == "image" else audio_judge()).predict(made)
        return seen == [item.target] and other not in kinds, seen
    first, last = item.target
    expected = list(range(first, last + 1))
    seen = image_judge().predict([im for im in _of_type(reply, "image") if im is not None])
    return seen == expected and said == expected and "audio" not in kinds, {"pictures": seen, "labels": said}


def _prompt_text(item: Item) -> str:
    return " ".join(p.get("text", f"<{p['type']}>") for p in item.messages[-1]["content"])


def codec_roundtrip(modality: str, codec: Any) -> float:
    """Judge accuracy on held-out media after ``codec.encode`` then ``codec.decode``."""
    if modality == "image":
        test = digit_images("test")
        decoded = [codec.decode(codec.encode(Part("image", data=im.rgb()))) for im in test]
        return float(np.mean(np.asarray(image_judge().predict(decoded)) == [im.digit for im in test]))
    test = utterances("test")
    decoded = [codec.decode(codec.encode(Part("audio", data=u.load()))) for u in test]
    return float(np.mean(np.asarray(audio_judge().predict(decoded)) == [u.digit for u in test]))


def run_suite(
    respond: Responder,
    *,
    limit: int | None = None,
    batch_size: int = 16,
    codecs: dict[str, Any] | None = None,
    modalities: set[str] | None = None,
    failures_kept: int = 5,
) -> dict[str, Any]:
    """Score ``respond`` on every task; return the report (metrics, counts, goals, first failures).

    ``modalities``: the media the model reads and writes (None: all). Tasks of other media score
    null and are listed under ``skipped``, so a text-and-image model is not marked wrong on speech.
    """
    check_sizes(limit, batch_size)
    report: dict[str, Any] = {"suite": "digits"}
    counts, failures, skipped = {}, {}, {}
    by_voice: dict[str, list[int]] = {}  # voice -> [right, asked] over both phrasing sets
    tasks = items(limit)
    answerable = sum(len(qs) for qs in tasks.values() if modalities is None or TASK_MODALITY[qs[0].task] in modalities)
    # on a terminal only (disable=None): a log file keeps the one line per task below
    with tqdm(total=answerable, desc="digits eval", unit="question", disable=None) as bar:
        for key, questions in tasks.items():
            task, phrasing = questions[0].task, questions[0].phrasing
            if modalities is not None and TASK_MODALITY[task] not in modalities:
                report[metric(task, phrasing)] = None
                skipped[key] = f"the model has no {TASK_MODALITY[task]} codec"
                log.info("digits %s (%s): skipped (%s)", key, metric(task, phrasing), skipped[key])
                continue
            right, failed = 0, []
            for start in range(0, len(questions), batch_size):
                batch = questions[start : start + batch_size]
                bar.set_postfix_str(key)
                replies = respond([q.messages for q in batch])
                bar.update(len(batch))
                if len(replies) != len(batch):
                    raise RuntimeError(f"the responder answered {len(replies)} of {len(batch)} conversations")
                for item, reply in zip(batch, replies):
                    ok, read = judge_reply(item, reply)
                    right += ok
                    if item.voice is not None:
                        tally = by_voice.setdefault(item.voice, [0, 0])
                        tally[0], tally[1] = tally[0] + ok, tally[1] + 1
                    if not ok and len(failed) < failures_kept:
                        text = " ".join(_of_type(reply, "text"))
                        failed.append({"prompt": _prompt_text(item), "expected": item.target, "read": read, "reply_text": text})
            report[metric(task, phrasing)] = right / len(questions) if questions else None
            counts[key], failures[key] = len(questions), failed
            log.info("digits %s (%s): %d/%d", key, metric(task, phrasing), right, len(questions))
    report["judge_image_acc"] = image_judge().heldout_accuracy()
    report["judge_audio_acc"] = audio_judge().heldout_accuracy()
    for modality in ("image", "audio"):
        codec = (codecs or {}).get(modality)
        report[f"{modality}_codec_roundtrip_acc"] = None if codec is None else codec_roundtrip(modality, codec)
    # which unheard voice a transcription score is lost on (one voice unlike the training ones
    # can hold most of the errors)
    report["transcribe_by_voice"] = {voice: right / asked for voice, (right, asked) in sorted(by_voice.items())}
    report.update(counts=counts, skipped=skipped, goals=GOALS, failures=failures, limit=limit)
    return report


def _reply_parts(reply: Any) -> ReplyParts:
    """An Assistant ``Reply`` as suite parts (media the model's codecs could not decode become None)."""
    parts: ReplyParts = []
    for part in reply.parts:
        if part.type == "text":
            parts.append({"type": "text", "text": part.text})
        elif part.type == "image":
            parts.append({"type": "image", "image": part.image})
        else:
            parts.append({"type": "audio", "audio": None if part.audio is None else (part.audio, part.sample_rate)})
    return parts


def assistant_responder(assistant: Any, **settings: Any) -> Responder:
    """A Responder over ``unimodal.load(DIR)`` (batched ``generate``); ``settings`` go to generation."""

    def respond(batch: list[list[Message]]) -> list[ReplyParts]:
        return [_reply_parts(reply) for reply in assistant.generate(batch, **settings)]

    return respond


def evaluate(
    model_dir: str | Path,
    out: str | Path | None = None,
    *,
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "auto",
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load an export directory, run the suite, write the JSON report (default ``DIR/eval-digits.json``).

    Text is decoded greedily unless ``settings`` say otherwise: the answers are scored as
    classifications. Pictures and speech are sampled with the model's own defaults, seeded (seed
    0 unless ``settings`` give one) so that a scoreboard can be reproduced.
    """
    if Path(model_dir).is_file():  # a checkpoint: say it is not an export, not that no report can be written beside it
        read_export_config(model_dir)
    path = Path(out) if out is not None else Path(model_dir) / "eval-digits.json"
    existing = next(p for p in [path.parent, *path.parent.parents] if p.exists())
    if path.is_dir() or not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ValueError(f"cannot write the report to {path}: give a JSON file path in a directory you can write to (--out)")
    check_sizes(limit, batch_size)  # these and the settings before the model loads
    generation = {"temperature": 0.0, "seed": 0, **(settings or {})}
    GenerationSettings().replace(**generation)
    assistant = load(model_dir, device=device)
    if not set(assistant.codecs) & set(TASK_MODALITY.values()):  # a scoreboard of nothing but n/a
        raise UserError(f"{model_dir} has no image or audio codec, and every task of the digits suite is about pictures "
                        "or speech: nothing in it applies to this model")
    respond = assistant_responder(assistant, **generation)
    report = run_suite(respond, limit=limit, batch_size=batch_size, codecs=assistant.codecs, modalities=set(assistant.codecs))
    # what reproduces the scores: row i of a batch samples with seed + i, so the batch size counts too
    report.update(model=str(model_dir), batch_size=batch_size, settings=generation)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    report["report_path"] = str(path)
    return report


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def summary(report: dict[str, Any]) -> str:
    """The scoreboard as lines: metric, value, goal. A run cut by ``--limit`` is a sample, too small
    to say whether a goal is met; the judges' accuracy is on all the held-out data whatever the limit."""
    lines = []
    sample = report.get("limit")
    width = len("audio_codec_roundtrip_acc")  # the longest name: one column of values
    for metric, goal in GOALS.items():
        value = report.get(metric)
        shown = "n/a" if value is None else f"{value:.3f}"
        if value is None:
            mark = ""
        elif sample is not None and not metric.startswith("judge_"):
            mark = f" not judged: --limit {sample}"
        else:
            mark = " ok" if value >= goal else " below goal"
        lines.append(f"{metric:<{width}} {shown}  (goal >= {goal}){mark}")
    for modality in ("image", "audio"):
        value = report.get(f"{modality}_codec_roundtrip_acc")
        lines.append(f"{modality + '_codec_roundtrip_acc':<{width}} {'n/a' if value is None else f'{value:.3f}'}")
    for voice, value in (report.get("transcribe_by_voice") or {}).items():
        lines.append(f"{'transcribe:' + voice:<{width}} {value:.3f}" + (f"  not judged: --limit {sample}" if sample is not None else ""))
    return "\n".join(lines)
