"""The digits scoreboard: scoring proven with fake models (an oracle, wrong ones) and the CLI path."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from unimodal.worlds.digits import WORDS, digit_images, parse_digits, utterances
from unimodal.worlds import digits_suite as suite
from unimodal.worlds.digits_suite import Item, assistant_responder, items, judge_reply, run_suite

KEYS = ("caption_acc", "transcribe_acc", "draw_acc", "speak_acc", "interleaved_acc", "judge_image_acc", "judge_audio_acc")
HELD_OUT = ("caption_heldout_acc", "transcribe_heldout_acc", "draw_heldout_acc", "speak_heldout_acc", "interleaved_heldout_acc")
SPEAK_WORDS = ("say", "speak", "pronounce", "hear", "recording", "out loud")


class Oracle:
    """Answers from the ground truth: the test media's labels, real train images and voices."""

    def __init__(self, shift: int = 0, story_order: int = 1):
        self.shift, self.story_order = shift, story_order
        self.images = {im.rgb().tobytes(): im.digit for im in digit_images("test")}
        self.clips = {u.load()[0].tobytes(): u.digit for u in utterances("test")}
        self.drawn = {d: next(im.pixels for im in digit_images("train") if im.digit == d) for d in range(10)}
        self.spoken = {d: next(u.load() for u in utterances("train") if u.digit == d) for d in range(10)}

    def answer(self, messages: list[dict]) -> list[dict]:
        content = messages[-1]["content"]
        text = " ".join(p["text"] for p in content if p["type"] == "text")
        for part in content:
            if part["type"] == "image":
                return [{"type": "text", "text": f"It is {WORDS[(self.images[part['image'].tobytes()] + self.shift) % 10]}."}]
            if part["type"] == "audio":
                return [{"type": "text", "text": WORDS[(self.clips[part["audio"][0].tobytes()] + self.shift) % 10]}]
        asked = [(d + self.shift) % 10 for d in parse_digits(text)]
        if len(asked) == 2:  # a story asks for a range
            first, last = asked
            out = []
            for d in list(range(first, last + 1))[:: self.story_order]:
                out += [{"type": "text", "text": f"{WORDS[d]}:"}, {"type": "image", "image": self.drawn[d]}]
            return out
        if any(word in text.lower() for word in SPEAK_WORDS):
            return [{"type": "audio", "audio": self.spoken[asked[0]]}]
        return [{"type": "image", "image": self.drawn[asked[0]]}]

    def __call__(self, batch: list[list[dict]]) -> list[list[dict]]:
        return [self.answer(messages) for messages in batch]


def test_oracle_scores_full_marks(caplog):
    with caplog.at_level(logging.INFO, logger="unimodal.eval"):
        report = run_suite(Oracle(), batch_size=64)
    # the log names each task's metric too: the story task is scored as interleaved_acc
    assert "digits story/heldout (interleaved_heldout_acc): 216/216" in caplog.messages
    lines = suite.summary(report).splitlines()
    assert "ok" in lines[0]
    assert len({line.index(line.split()[1]) for line in lines}) == 1  # one column of values, long names too
    for key in KEYS + HELD_OUT:
        assert report[key] is not None
        assert key in report["goals"]
    assert all(report[key] == 1.0 for key in KEYS[:5] + HELD_OUT)
    assert report["transcribe_by_voice"] == {voice: 1.0 for voice in ("en+f5", "en-gb-x-rp+m6", "en-us+m4")}
    assert "transcribe:en+f5" + " " * 10 + "1.000" in lines
    assert report["judge_image_acc"] >= 0.97 and report["judge_audio_acc"] >= 0.95
    counts = {"caption": 360, "transcribe": 270, "draw": 200, "speak": 200, "story": 216}
    assert report["counts"] == {**counts, **{f"{task}/heldout": n for task, n in counts.items()}}
    assert min(counts.values()) >= suite.MIN_QUESTIONS
    assert report["image_codec_roundtrip_acc"] is None and all(not f for f in report["failures"].values())


def test_wrong_answers_score_zero_and_are_shown():
    report = run_suite(Oracle(shift=1), limit=12)
    for key in KEYS[:5] + HELD_OUT:
        assert report[key] == 0.0
    assert report["counts"]["caption"] == 12
    assert set(report["transcribe_by_voice"].values()) == {0.0}
    first = report["failures"]["caption"][0]
    assert first["read"] == [(first["expected"] + 1) % 10]


def test_tasks_of_media_the_model_lacks_are_skipped_not_failed():
    class NoSpeech(Oracle):
        def answer(self, messages: list[dict]) -> list[dict]:
            assert not any(p["type"] == "audio" for p in messages[-1]["content"]), "a speech question reached an image-only model"
            text = " ".join(p["text"] for p in messages[-1]["content"] if p["type"] == "text")
            assert not any(word in text.lower() for word in SPEAK_WORDS), text
            return super().answer(messages)

    report = run_suite(NoSpeech(), limit=6, modalities={"image"})
    assert report["transcribe_acc"] is None and report["speak_acc"] is None and report["speak_heldout_acc"] is None
    why = "the model has no audio codec"
    assert report["skipped"] == {"transcribe": why, "speak": why, "transcribe/heldout": why, "speak/heldout": why}
    assert report["caption_acc"] == report["draw_acc"] == report["interleaved_acc"] == report["draw_heldout_acc"] == 1.0
    assert "transcribe" not in report["counts"]


def test_stories_must_be_in_order():
    assert run_suite(Oracle(story_order=-1), limit=6)["interleaved_acc"] == 0.0


def test_reply_judging_rules():
    caption = Item("caption", [], 7)
    assert judge_reply(caption, [{"type": "text", "text": "It is seven (7)."}])[0]
    assert not judge_reply(caption, [{"type": "text", "text": "seven or eight"}])[0]
    assert not judge_reply(caption, [{"type": "text", "text": "I do not know."}])[0]
    assert not judge_reply(caption, [])[0]
    seven = next(im.pixels for im in digit_images("train") if im.digit == 7)
    draw = Item("draw", [], 7)
    assert judge_reply(draw, [{"type": "text", "text": "Here:"}, {"type": "image", "image": seven}])[0]
    assert not judge_reply(draw, [{"type": "text", "text": "seven"}])[0]
    assert not judge_reply(draw, [{"type": "image", "image": None}])[0]  # the codec decoded nothing
    story = Item("story", [], (6, 7))
    assert not judge_reply(story, [{"type": "image", "image": seven}])[0]  # a picture is missing
    # the wrong medium fails: a picture with speech attached is neither a drawing nor speech
    clip = next(u.load() for u in utterances("train") if u.digit == 7)
    both = [{"type": "image", "image": seven}, {"type": "audio", "audio": clip}]
    assert not judge_reply(draw, both)[0] and not judge_reply(Item("speak", [], 7), both)[0]
    assert judge_reply(Item("speak", [], 7), both[1:])[0]
    assert not judge_reply(caption, [{"type": "text", "text": "It is seven."}, {"type": "image", "image": seven}])[0]
    # a story's labels must be right too, not only its pictures
    six = next(im.pixels for im in digit_images("train") if im.digit == 6)
    labelled = lambda a, b: [{"type": "text", "text": f"{a}:"}, {"type": "image", "image": six},  # noqa: E731
                             {"type": "text", "text": f"{b}:"}, {"type": "image", "image": seven}]
    assert judge_reply(story, labelled("Six", "Seven"))[0]
    ok, read = judge_reply(story, labelled("Zero", "One"))
    assert not ok and read == {"pictures": [6, 7], "labels": [0, 1]}


def test_questions_come_in_seen_and_held_out_phrasings():
    questions = items()
    text = lambda q: " ".join(p["text"] for p in q.messages[0]["content"] if p["type"] == "text")  # noqa: E731
    for task in suite.TASKS:
        seen, held = questions[task], questions[f"{task}/heldout"]
        assert len(seen) == len(held) >= suite.MIN_QUESTIONS
        assert [q.target for q in seen] == [q.target for q in held]  # the same questions, phrased two ways
        assert len({text(q) for q in seen}) > 20 and len({text(q) for q in held}) > 10
        assert not {text(q) for q in seen} & {text(q) for q in held}
        assert all(q.phrasing == "heldout" for q in held) and all(q.phrasing == "seen" for q in seen)
    draw = {text(q) for q in questions["draw"]}
    assert any(any(c.isdigit() for c in p) for p in draw) and any(not any(c.isdigit() for c in p) for p in draw)
    first = [p["type"] for p in questions["caption"][0].messages[0]["content"]]
    assert {tuple(p["type"] for p in q.messages[0]["content"]) for q in questions["caption"]} == {("image", "text"), ("text", "image")}
    assert first in (["image", "text"], ["text", "image"])


def test_limit_takes_a_fixed_sample_of_every_digit():
    questions = items(limit=10)
    assert all(len(q) == 10 for q in questions.values())
    # a sample of the whole test set, not its start (which holds only zeros and fives)
    assert len({q.target for q in questions["caption"]}) >= 6 and len({q.target for q in questions["transcribe"]}) >= 5
    assert [q.target for q in items(limit=10)["caption"]] == [q.target for q in questions["caption"]]  # fixed


def test_bad_responders_are_caught():
    with pytest.raises(RuntimeError, match="answered 0 of"):
        run_suite(lambda batch: [], limit=2)
    with pytest.raises(ValueError, match="batch_size"):
        run_suite(Oracle(), batch_size=0)


@dataclass
class FakePart:
    type: str
    text: str = ""
    image: Any = None
    audio: Any = None
    sample_rate: int | None = None


@dataclass
class FakeReply:
    parts: list[FakePart]


@dataclass
class FakeAssistant:
    """Stands in for ``unimodal.load(DIR)``: an Assistant whose ``generate`` answers like the oracle."""

    oracle: Oracle = field(default_factory=Oracle)
    codecs: dict = field(default_factory=dict)
    calls: list = field(default_factory=list)

    def generate(self, batch, **settings):
        self.calls.append(settings)
        replies = []
        for parts in self.oracle(batch):
            converted = []
            for p in parts:
                if p["type"] == "audio":
                    converted.append(FakePart("audio", audio=p["audio"][0], sample_rate=p["audio"][1]))
                else:
                    converted.append(FakePart(p["type"], text=p.get("text", ""), image=p.get("image")))
            replies.append(FakeReply(converted))
        return replies


def test_assistant_responder_converts_replies():
    assistant = FakeAssistant()
    report = run_suite(assistant_responder(assistant, temperature=0.0), limit=5)
    assert all(report[key] == 1.0 for key in KEYS[:5] + HELD_OUT)
    assert assistant.calls and all(call == {"temperature": 0.0} for call in assistant.calls)


def test_eval_cli_writes_the_report(monkeypatch, tmp_path, capsys):
    from unimodal.cli import main
    from unimodal.worlds import digits_suite

    class PassThrough:  # an audio "codec" that keeps the waveform: round trip = judge accuracy
        def encode(self, part):
            return part.data[0]

        def decode(self, array):
            return array, 16000

    codec = PassThrough()
    loaded = []
    fake = FakeAssistant(codecs={"audio": codec})
    monkeypatch.setattr(digits_suite, "load", lambda path, device: loaded.append((path, device)) or fake)
    out = tmp_path / "report.json"
    argv = ["eval", str(tmp_path), "--suite", "digits", "--limit", "3", "--out", str(out), "--device", "cpu", "--seed", "1"]
    assert main(argv) == 0
    # text is greedy and sampling seeded unless the command line says otherwise
    assert fake.calls and all(call == {"temperature": 0.0, "seed": 1} for call in fake.calls)
    assert loaded == [(tmp_path, "cpu")]
    assert main([*argv[:-2], "--temperature", "0.7"]) == 0
    assert fake.calls[-1] == {"temperature": 0.7, "seed": 0}
    report = json.loads(out.read_text())
    assert all(key in report for key in KEYS + HELD_OUT)
    assert report["audio_codec_roundtrip_acc"] == report["judge_audio_acc"] and report["image_codec_roundtrip_acc"] is None
    printed = capsys.readouterr().out
    assert "caption_acc" in printed and str(out) in printed
    # a sample of 3 questions a task is not held against the goals
    transcribe = next(line for line in printed.splitlines() if line.startswith("transcribe_acc"))
    assert transcribe.endswith("not judged: --limit 3") and report["limit"] == 3
    # what reproduces the scores is in the report: row i of a batch samples with seed + i
    assert report["settings"] == {"temperature": 0.7, "seed": 0} and report["batch_size"] == 16
    judge = next(line for line in printed.splitlines() if line.startswith("judge_audio_acc"))  # all held-out clips
    assert judge.endswith(" ok"), judge


def test_eval_cli_errors_in_one_line(tmp_path, capsys):
    from unimodal.cli import main

    assert main(["eval", str(tmp_path / "missing"), "--suite", "digits"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unimodal eval: error:") and err.count("\n") == 1
    assert main(["eval", str(tmp_path), "--suite", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unimodal eval: error: --suite:") and err.count("\n") == 1
    # an --out that cannot be written is refused before the model loads, not after the run
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out in (tmp_path, blocker / "report.json"):
        assert main(["eval", str(tmp_path / "missing"), "--suite", "digits", "--out", str(out)]) == 2
        assert f"cannot write the report to {out}" in capsys.readouterr().err


def test_codec_roundtrip_uses_the_codec():
    class Blank:
        def encode(self, part):
            return np.zeros((1, 1), np.int64)

        def decode(self, array):
            return np.zeros((16, 16), np.uint8)

    assert suite.codec_roundtrip("image", Blank()) <= 0.2  # every image decoded blank: one label at most


def test_the_suite_drives_a_real_assistant():
    """The adapter against the real chat engine (a random tiny model with fake codecs): every
    question gets an answer, and the scores are well-formed fractions."""
    from inference_helpers import media_assistant

    report = run_suite(assistant_responder(media_assistant(), max_new_tokens=12, seed=0), limit=2, batch_size=4)
    assert report["counts"] == {task: 2 for task in report["counts"]}
    assert all(0.0 <= report[key] <= 1.0 for key in KEYS + HELD_OUT)
