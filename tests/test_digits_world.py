"""The digits world: splits, templates, and a small build read back through the data tools."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from unimodal.worlds import digits
from unimodal.worlds.digits import (
    _documents,
    COPIES,
    PRETRAIN,
    REPLIES,
    WORDS,
    build_world,
    chat_prompt,
    chat_segments,
    digit_images,
    parse_digits,
    pretrain_segments,
    render,
    shifted,
    story_targets,
    upsample,
    utterances,
)
from unimodal.modalities.digit_audio import DigitAudioConfig
from unimodal.worlds import phrasings
from unimodal.worlds.phrasings import FRAMES, VERBS, held_out_questions, normal, templates

SMALL = {"image": 0.03, "speech": 0.3, "story": 12, "arithmetic": 6}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    build_world(root, copies={"train": SMALL, "test": SMALL}, audio_codec=DigitAudioConfig(layers=2, codebook_size=64))
    return root


def test_image_split_holds_out_every_fifth_index():
    train, test = digit_images("train"), digit_images("test")
    assert (len(train), len(test)) == (1437, 360)
    assert all(im.index % 5 == 0 for im in test) and not any(im.index % 5 == 0 for im in train)
    assert {im.digit for im in test} == set(range(10))
    assert train[0].pixels.shape == (16, 16) and train[0].pixels.dtype == np.uint8
    assert train[0].rgb().shape == (16, 16, 3)


def test_upsample_maps_grey_levels_to_bytes():
    pixels = np.zeros((8, 8))
    pixels[2:6, 2:6] = 16
    image = upsample(pixels)
    assert image.shape == (16, 16) and image.dtype == np.uint8
    assert image.max() == 255 and image[0, 0] == 0 and image[7, 7] == 255


def test_shifted_pictures_move_by_one_pixel_and_only_caption_train_copies_use_them():
    image = digit_images("train")[0]  # index 1, copy 1: SHIFTS[2] moves it one row down
    moved = shifted(image, 1)
    np.testing.assert_array_equal(moved[1:], image.pixels[:-1])
    assert (moved[0] == 0).all() and moved.dtype == np.uint8
    moved = shifted(image, 8)  # SHIFTS[1]: one column left
    np.testing.assert_array_equal(moved[:, :-1], image.pixels[:, 1:])
    assert (moved[:, -1] == 0).all()
    rng = np.random.default_rng(0)
    copies = {"image": 3, "speech": 0, "story": 0, "arithmetic": 0}
    train = list(_documents("train", "pretrain", rng, copies))
    paths = {doc["meta"]["task"]: [] for doc in train}
    for doc in train:
        paths[doc["meta"]["task"]] += [p["path"] for p in doc["parts"] if p["type"] == "image"]
    # copies 2 and 3 of every caption are moved, each in its own direction; pictures to draw are not
    assert sum("-shifted1.png" in p for p in paths["caption"]) == sum("-shifted2.png" in p for p in paths["caption"]) == 1437
    assert len(paths["caption"]) == len(paths["draw"]) == 3 * 1437
    assert not any("-shifted" in p for p in paths["draw"])
    test = list(_documents("test", "pretrain", rng, copies))
    assert not any("-shifted" in p.get("path", "") for doc in test for p in doc["parts"])


def test_speech_split_holds_out_whole_voices():
    train, test = utterances("train"), utterances("test")
    assert (len(train), len(test)) == (840, 90)
    assert not {u.voice for u in train} & {u.voice for u in test}
    variant = lambda voice: voice.partition("+")[2]  # noqa: E731
    assert not {variant(u.voice) for u in train} & {variant(u.voice) for u in test}  # unheard in its variant too
    waveform, rate = test[0].load()
    assert rate == 16000 and waveform.dtype == np.float32 and 0.1 < len(waveform) / rate < 1.0
    waveform[:] = 0  # a copy: the cached file stays intact
    assert np.abs(test[0].load()[0]).max() > 0


def test_every_voice_sounds_unlike_every_other():
    """Held out by what is heard, not by name: espeak-ng 1.51 applies no variant after "en-gb", so
    voices named en-gb+m7, en-gb+f2 and en-gb+f5 say every word alike, and a held-out one among
    them would be training speech (en-us-nyc+m1 says 21 of its 30 clips as en-us+m1 does). No clip
    equals another voice's clip of its word, speed and pitch."""
    voices: dict[str, dict[tuple[int, int, int], np.ndarray]] = {}
    for u in utterances("train") + utterances("test"):
        voices.setdefault(u.voice, {})[(u.digit, u.speed, u.pitch)] = u.load()[0]
    assert len(voices) == 31
    same = []
    for i, a in enumerate(sorted(voices)):
        for b in sorted(voices)[i + 1:]:
            alike = sum(len(voices[b][k]) == len(wave) and np.allclose(voices[b][k], wave, atol=1e-3)
                        for k, wave in voices[a].items() if k in voices[b])
            if alike:
                same.append((a, b, alike))
    assert not same, same


def test_missing_speech_dir_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("UNIMODAL_DIGITS_SPEECH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="UNIMODAL_DIGITS_SPEECH"):
        utterances("train")
    with pytest.raises(ValueError, match="split"):
        digit_images("val")
    # a manifest without held-out voices: one line, not an IndexError deep in the scoreboard
    clip = {"file": "a.flac", "digit": 1, "voice": "v", "speed": 1, "pitch": 1, "split": "train"}
    (tmp_path / "manifest.json").write_text(json.dumps({"files": [clip]}))
    assert len(utterances("train")) == 1
    with pytest.raises(FileNotFoundError, match="no 'test' utterances"):
        utterances("test")


def test_render_places_media_and_checks_their_count():
    assert render("{image} It is {word}.", ["I"], word="two") == [("image", "I"), ("text", "It is two.")]
    with pytest.raises(ValueError, match="more media"):
        render("{image} and {image}", ["I"])
    with pytest.raises(ValueError, match="fewer media"):
        render("{image}", ["I", "J"])


@pytest.mark.parametrize("task", ["caption", "draw", "transcribe", "speak"])
def test_every_phrasing_states_only_the_target(task):
    kind = "image" if task in ("caption", "draw") else "audio"
    for held_out in (False, True):
        for phrasing in templates(task, held_out):
            for variant in range(len(REPLIES[task])):
                numeral, media_first = bool(variant % 2), bool(len(phrasing) % 2)
                user, assistant = chat_segments(task, 7, ["M"], phrasing, variant, numeral, media_first)
                media_side = user if task in ("caption", "transcribe") else assistant
                assert [s for s in media_side if s[0] == kind] == [(kind, "M")]
                said = parse_digits(" ".join(v for k, v in user + assistant if k == "text"))
                assert said and set(said) == {7}, (phrasing, user, assistant)
    for variant in range(len(PRETRAIN[task])):
        segments = pretrain_segments(task, 3, ["M"], variant)
        assert (kind, "M") in segments and set(parse_digits(" ".join(v for k, v in segments if k == "text"))) == {3}


@pytest.mark.parametrize("task", sorted(VERBS))
def test_held_out_phrasings_differ_in_verb_or_frame_and_keep_every_verb_and_frame_seen(task):
    seen, held = templates(task), templates(task, held_out=True)
    assert len(seen) >= 20 and len(held) >= 10 and not set(seen) & set(held)
    for verb in VERBS[task]:  # every verb phrase is taught in some frame
        stem = verb.split("{")[0].strip().lower()
        assert any(stem in s.lower() for s in seen), stem
    for frame in FRAMES:  # and every frame with some verb
        head = frame.split("{")[0].strip().lower()
        assert not head or any(s.lower().startswith(head) for s in seen), frame
    quoted = {"Please draw a {ref}.", "draw {ref}", "Can you draw {ref} for me?"}
    assert task != "draw" or quoted <= set(held)
    # no held-out template shares both its verb phrase and its frame with a seen one
    plain = {phrasings.FRAMES.index("{vp}"), phrasings.FRAMES.index("{VP}.")}

    def pairs(texts: tuple[str, ...]) -> set[tuple[int, int]]:
        found = set()
        for v, verb in enumerate(VERBS[task]):
            for f, frame in enumerate(FRAMES):
                for obj in phrasings.OBJECTS.get(task, ("",)):
                    if phrasings._sentence(frame, verb.replace("{obj}", obj)) in texts:
                        found.add((v, min(plain) if f in plain else f))
        return found

    assert not pairs(seen) & pairs(held)


def _held_out_pattern() -> re.Pattern:
    """The held-out questions in :func:`normal` form: search ``normal(text)`` with it, so that a
    training text that differs from one only in case or punctuation is found too."""
    questions = {q for task in VERBS for q in held_out_questions(task)}
    assert {"please draw a 7.", "draw 7", "can you draw four for me?"} <= questions
    return re.compile("|".join(re.escape(normal(q)) for q in sorted(questions, key=len, reverse=True)))


def test_no_held_out_question_is_in_any_training_or_validation_text():
    """Every document the world writes (both splits, both forms, full size): the shards, the
    fine-tune sets and the tokenizer's text are made of these."""
    pattern = _held_out_pattern()
    for split in ("train", "test"):
        for form in ("pretrain", "chat"):
            rng = np.random.default_rng(0)
            for record in _documents(split, form, rng, COPIES[split]):
                text = normal(" ".join(p["text"] for p in record["parts"] if p["type"] == "text"))
                found = pattern.search(text)
                assert found is None, f"{record['key']}: {found.group(0)!r} in {text!r}"


def test_story_pictures_follow_their_numbers():
    user, assistant = chat_segments("story", (3, 5), ["a", "b", "c"], "Count from {first} to {last}.", 0)
    assert [s for s in assistant if s[0] == "image"] == [("image", "a"), ("image", "b"), ("image", "c")]
    assert [s[1] for s in assistant if s[0] == "text"] == ["Three:", "Four:", "Five:"]
    for phrasing in templates("story") + templates("story", held_out=True):
        for numeral in (False, True):
            user, _ = chat_segments("story", (3, 5), ["a", "b", "c"], phrasing, 0, numeral)
            assert parse_digits(user[0][1]) == [3, 5]
    assert len(story_targets()) == 24 and all(2 <= last - first + 1 <= 4 for first, last in story_targets())


def test_chat_prompt_is_engine_messages():
    image = digit_images("test")[0]
    [message] = chat_prompt("caption", image.digit, [image.rgb()], templates("caption")[0])
    assert message["role"] == "user"
    assert [p["type"] for p in message["content"]] == ["image", "text"]
    assert message["content"][0]["image"].shape == (16, 16, 3)
    [message] = chat_prompt("caption", image.digit, [image.rgb()], templates("caption")[0], media_first=False)
    assert [p["type"] for p in message["content"]] == ["text", "image"]


def test_parse_digits_reads_words_and_numerals_only_as_words():
    assert parse_digits("It is Seven, not 8.") == [7, 8]
    assert parse_digits("someone wrote none of these") == []
    # larger numbers are numbers too: "7 out of 10" does not name the digit 7 alone
    assert parse_digits("7 or 17, 7 out of 10, twenty-seven, seventeen") == [7, 17, 7, 10, 20, 7, 17]
    assert parse_digits("") == []
    assert WORDS[parse_digits("I hear nine.")[0]] == "nine"


def test_built_world_reads_back(world):
    from unimodal.data.shards import read_documents

    summary = json.loads((world / "world.json").read_text())
    for form in ("pretrain", "chat"):
        for split in ("train", "test"):
            docs = list(read_documents(world / form / split))
            assert len(docs) == summary[f"{form}/{split}"] > 0
            assert {d.meta["task"] for d in docs} == set(digits.TASKS)
            no_speech = list(read_documents(world / digits.IMAGE_TEXT / form / split))
            assert len(no_speech) == summary[f"{digits.IMAGE_TEXT}/{form}/{split}"]
            assert {d.meta["task"] for d in no_speech} == set(digits.TASKS) - set(digits.SPEECH_TASKS)
            assert [d.key for d in no_speech] == [d.key for d in docs if d.meta["task"] not in digits.SPEECH_TASKS]
    chat = list(read_documents(world / "chat" / "train"))
    for doc in chat:
        roles = [p.role for p in doc.parts]
        assert roles[0] == "user" and roles[-1] == "assistant" and sorted(set(roles)) == ["assistant", "user"]
        assert all(p.loss == (p.role == "assistant") for p in doc.parts)
    pattern = _held_out_pattern()
    for form in ("pretrain", "chat"):  # the shards as the trainer reads them
        for split in ("train", "test"):
            for doc in read_documents(world / form / split):
                assert pattern.search(normal(" ".join(p.text or "" for p in doc.parts))) is None, doc.key
    caption = next(d for d in chat if d.meta["task"] == "caption")
    assert [p.data.shape for p in caption.parts if p.type == "image"] == [(16, 16, 3)]
    assert not any(p.role for d in read_documents(world / "pretrain" / "train") for p in d.parts)


def test_built_world_keeps_test_media_out_of_training(world):
    test_voices = {u.voice for u in utterances("test")}
    for form in ("pretrain", "chat"):
        for line in (world / f"{form}-train.jsonl").read_text().splitlines():
            for part in json.loads(line)["parts"]:
                if part["type"] == "image":
                    assert int(Path(part["path"]).stem) % 5 != 0
                elif part["type"] == "audio":
                    assert not any(part["path"].split("/")[-1].startswith(v.replace("+", "_") + "-") for v in test_voices)


def test_built_world_tokenizer_and_codec(world):
    from unimodal.data.tokenizer import load_tokenizer
    from unimodal.modalities.digit_audio import DigitAudioCodec

    tokenizer = load_tokenizer(world / "tokenizer.model")
    assert tokenizer.vocab_size == 512
    assert len(tokenizer.encode("It is seven.")) <= 5
    assert tokenizer.decode(tokenizer.encode("Count from 3 to 5 with pictures.")) == "Count from 3 to 5 with pictures."
    assert len(tokenizer.encode("<|im_start|>assistant")) <= 8  # chat markers were in its training text
    codec = DigitAudioCodec(path=str(world / "audio_codec"))
    assert codec.fingerprint() == json.loads((world / "world.json").read_text())["audio_codec"]
    assert codec.encode_waveform(*utterances("test")[0].load()).shape[0] == 2


def test_built_world_image_codec_round_trips_digits(world, tmp_path):
    from unimodal.schema import Part
    from unimodal.worlds.digits_suite import codec_roundtrip
    from unimodal.modalities.image_discrete import PatchVQCodec

    codec = PatchVQCodec(path=str(world / "image_codec"))
    assert codec.fingerprint() == json.loads((world / "world.json").read_text())["image_codec"]
    codes = codec.encode(Part("image", data=digit_images("test")[0].rgb()))
    assert codes.shape == (4,) and codes.dtype == np.int64 and codes.max() < 256
    assert codec.decode(codes).shape == (16, 16, 3)
    assert codec_roundtrip("image", codec) >= 0.95  # 0.978 with the world's seed
    with pytest.raises(ValueError, match="4 codes in \\[0, 256\\)"):
        codec.decode(np.array([1, 2, 300, 4]))
    broken = tmp_path / "codec"
    codec.save(broken)
    np.save(broken / "codebook.npy", np.zeros((256, 64), dtype=np.float32))
    with pytest.raises(ValueError, match="does not match the checksum"):
        PatchVQCodec(path=str(broken))
    with pytest.raises(RuntimeError, match="not fitted"):
        PatchVQCodec().encode(Part("image", data=digit_images("test")[0].rgb()))


def test_builtin_and_cli_build_the_world(monkeypatch, tmp_path, capsys):
    from unimodal.cli import main
    from unimodal.worlds import builtin

    assert builtin.BUILDERS["digits"] is digits.build_world
    built = []

    def build(out, seed):
        built.append(seed)
        out.mkdir(parents=True)
        (out / "world.json").write_text("{}")
        return {"chat/train": 3}

    monkeypatch.setattr(digits, "build_world", build)
    assert main(["data", "digits", "--out", str(tmp_path / "w"), "--seed", "4"]) == 0
    assert built == [4] and (tmp_path / "w" / "world.json").is_file()
    assert "chat/train 3" in capsys.readouterr().out



def test_a_build_cut_short_leaves_no_half_world(monkeypatch, tmp_path, capsys):
    """A build stopped midway (Ctrl-C, a full disk) removes what it wrote, so the rerun is not refused."""
    from unimodal.cli import main

    def full_disk(pixels):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(digits, "_png", full_disk)  # the first file written after the media directories
    assert main(["data", "digits", "--out", str(tmp_path / "v")]) == 1
    assert capsys.readouterr().err.startswith("unimodal data digits: error: No space left on device (")  # no ": None"
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "empty").mkdir()  # an empty --out given is left empty, not removed
    with pytest.raises(OSError, match="No space left"):
        build_world(tmp_path / "empty")
    assert [p.name for p in tmp_path.iterdir()] == ["empty"] and not any((tmp_path / "empty").iterdir())


def test_a_negative_seed_is_one_line_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"seed=-1; it must be an integer >= 0"):
        build_world(tmp_path / "w", seed=-1)
    assert not (tmp_path / "w").exists()


def test_the_world_is_not_built_over_an_existing_one(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty; build the digits world into a new directory"):
        build_world(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
