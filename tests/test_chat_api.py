"""The Python chat API: messages in every documented form, ordered reply parts, history trimming."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
from conftest import CharTokenizer
from inference_helpers import bias_tokens, media_assistant, text_assistant, tiny_model
from PIL import Image

from unimodal.cli import main
from unimodal.inference.chat import ChatError
from unimodal.inference.chat import load as unimodal_load
from unimodal.inference.terminal import Terminal, printable

GREEDY = {"temperature": 0.0}


def test_chat_renders_the_template_and_streams_text():
    assistant = text_assistant()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    prompt, dropped = assistant.prompt(messages)
    rendered = CharTokenizer().decode(prompt.ids.tolist())
    assert rendered == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert dropped == 0
    chunks: list[str] = []
    reply = assistant.chat(messages, on_text=chunks.append, max_new_tokens=8, **GREEDY)
    assert [p.type for p in reply.parts] == ["text"] and "".join(chunks) == reply.text
    assert reply.prompt_tokens == len(prompt) and 0 < reply.completion_tokens <= 8
    again = assistant.chat(messages, max_new_tokens=8, **GREEDY)
    assert again.text == reply.text
    batch = assistant.generate([messages, [{"role": "user", "content": "another question"}]], max_new_tokens=8, **GREEDY)
    assert batch[0].text == reply.text
    assert batch[1].text == assistant.chat([{"role": "user", "content": "another question"}], max_new_tokens=8, **GREEDY).text


def test_a_reply_may_start_only_with_a_medium_the_model_writes_and_developer_is_system():
    assistant = text_assistant()
    assert assistant.writes == ("text",) and media_assistant().writes == ("text", "audio", "image")
    with pytest.raises(ChatError, match="start_with='audio', but this model writes text only"):
        assistant.chat([{"role": "user", "content": "hi"}], start_with="audio")
    as_developer, _ = assistant.prompt([{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}])
    as_system, _ = assistant.prompt([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert as_developer.ids.tolist() == as_system.ids.tolist()


def test_media_inputs_in_every_form_give_the_same_prompt(tmp_path, monkeypatch):
    assistant = media_assistant()
    monkeypatch.chdir(tmp_path)  # relative paths are relative to the working directory
    pixels = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    png = tmp_path / "x.png"
    Image.fromarray(pixels).save(png)
    url = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    pcm = np.random.default_rng(1).integers(-32768, 32768, 800).astype(np.int16)
    wave = pcm.astype(np.float32) / 32768  # integer PCM is scaled as soundfile reads it
    wav = tmp_path / "x.wav"
    soundfile.write(wav, wave, 8000, subtype="FLOAT")
    audio_b64 = base64.b64encode(wav.read_bytes()).decode()
    forms = [
        ({"type": "image", "image": str(png)}, {"type": "audio", "audio": str(wav)}),
        ({"type": "image", "image": Image.fromarray(pixels)}, {"type": "audio", "audio": (wave, 8000)}),
        ({"type": "image", "image": pixels}, {"type": "audio", "audio": wave}),  # a bare waveform is at the codec's rate
        ({"type": "image", "image": pixels}, {"type": "audio", "audio": (pcm, 8000)}),
        ({"type": "image_url", "image_url": {"url": url}}, {"type": "input_audio", "input_audio": {"data": audio_b64, "format": "wav"}}),
        ({"type": "image", "path": str(png)}, {"type": "audio", "path": str(wav)}),
        ({"type": "image_url", "image_url": {"url": "x.png"}}, {"type": "audio", "path": "x.wav"}),
    ]
    prompts = []
    for image, audio in forms:
        messages = [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, image, audio]}]
        prompts.append(assistant.prompt(messages)[0])
    for other in prompts[1:]:
        np.testing.assert_array_equal(other.ids, prompts[0].ids)
        np.testing.assert_allclose(other.features, prompts[0].features, atol=1e-6)
    assert prompts[0].continuous.sum() == 3 and len(prompts[0].features) == 3
    for bad, match in [
        ({"type": "image", "image": str(tmp_path / "missing.png")}, "missing.png' not found"),
        ({"type": "image", "image": str(png.with_suffix(".wav"))}, "has extension 'wav', expected one of"),
        ({"type": "video", "video": "x.mp4"}, "has type 'video'"),
        ({"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}, "remote; give a local path or a data: URL"),
        ({"type": "image", "image": 42}, "must be a path"),
        ({"type": "image", "image": pixels / 255.0}, "an HxWxC image array must be uint8 .0-255., got float64"),
        ({"type": "image", "image": Image.new("RGB", (0, 0))}, "the image is 0x0 pixels"),
        ({"type": "image", "image": np.zeros((1, 4), np.float32)}, r"image features of shape \(1, 4\); one image is \[3, feature_dim\]"),
        ({"type": "audio", "audio": (wave, None)}, "needs a positive integer rate second, got None"),
        ({"type": "audio", "audio": (8000, wave)}, "needs a positive integer rate second, got a ndarray"),
        ({"type": "audio", "audio": (np.stack([wave, wave]), 8000)}, r"shape \(2, 800\) is channels-first; give \[samples, channels\]"),
    ]:
        with pytest.raises(ChatError, match=match):
            assistant.chat([{"role": "user", "content": [bad]}])
    with pytest.raises(ChatError, match="role 'robot'"):
        assistant.chat([{"role": "robot", "content": "hi"}])
    with pytest.raises(ChatError, match="no image codec"):
        text_assistant().chat([{"role": "user", "content": [{"type": "image", "image": pixels}]}])


def test_reply_parts_are_decoded_saved_and_fit_back_into_the_history(tmp_path):
    assistant = media_assistant()
    layout = assistant.model.layout
    bias_tokens(assistant.model, {layout.special_id("<|boi|>"): 50.0, CharTokenizer.eos_id: 40.0})
    messages = [{"role": "user", "content": "draw two things"}]
    reply = assistant.chat(messages, max_media=2, seed=0, **GREEDY)
    assert [p.type for p in reply.parts] == ["image", "image"] and reply.finish_reason == "stop"
    assert reply.images[0].size == (8, 8) and reply.parts[0].data.shape == (3, 4)
    saved = reply.parts[0].save(tmp_path / "out.png")
    assert np.asarray(Image.open(saved)).shape == (8, 8, 3)
    history = messages + [reply.to_message(), {"role": "user", "content": "and now a sound"}]
    prompt, dropped = assistant.prompt(history, assistant.settings.replace(max_new_tokens=16))
    assert dropped == 0
    np.testing.assert_allclose(prompt.features, np.concatenate([p.data for p in reply.parts]), atol=1e-6)
    sound = assistant.chat(history, start_with="audio", max_media=1, max_new_tokens=16, seed=0, **GREEDY)
    assert sound.parts[0].type == "audio" and sound.parts[0].data.shape == (4,)
    wave, rate = sound.audios[0]
    assert rate == 8000 and wave.dtype == np.float32 and len(wave) == 4 * 80
    written = sound.parts[0].save(tmp_path / "out.wav")
    assert soundfile.info(str(written)).samplerate == 8000
    with pytest.raises(ValueError, match="cannot write audio as out.png: give a path ending in a format soundfile writes"):
        sound.parts[0].save(tmp_path / "out.png")
    with pytest.raises(ValueError, match="cannot write an image as out.wav: give a path ending in an image format"):
        reply.parts[0].save(tmp_path / "out.wav")
    # a clip its codec decodes to no samples is left out, never sent as a header-only WAV
    assistant.codecs["audio"].decode = lambda codes: np.zeros(0, np.float32)
    silent = assistant.chat(history, start_with="audio", max_media=1, max_new_tokens=16, seed=0, **GREEDY)
    assert not [p for p in silent.parts if p.type == "audio"]


def test_pictures_an_encoder_only_codec_cannot_decode_keep_their_features_with_one_warning(caplog):
    """transformers ships the Chameleon VQ-VAE's encoder only: an Orthus export reads pictures but
    cannot render the ones it writes; its replies still come, with the features, not a traceback."""
    assistant = media_assistant()
    bias_tokens(assistant.model, {assistant.model.layout.special_id("<|boi|>"): 50.0, CharTokenizer.eos_id: 40.0})

    def encoder_only(features):
        raise NotImplementedError("this codec has no decoder")

    assistant.codecs["image"].decode = encoder_only
    for _ in range(2):
        reply = assistant.chat([{"role": "user", "content": "draw two things"}], max_media=2, seed=0, **GREEDY)
        assert [(p.type, p.image, p.data.shape) for p in reply.parts] == [("image", None, (3, 4))] * 2
    warnings = [r.getMessage() for r in caplog.records if "cannot turn generated image" in r.getMessage()]
    assert len(warnings) == 1 and "this codec has no decoder" in warnings[0]


def test_an_unconditional_message_is_the_guidance_rows_user_turn():
    """``unconditional=`` (Orthus' "Generate an image."): the guidance rows' prompt is that user
    message through the chat template, and guided replies are drawn with it."""
    assistant = media_assistant(unconditional="draw")
    expected = assistant.prompt([{"role": "user", "content": "draw"}])[0]
    np.testing.assert_array_equal(assistant.unconditional_prompt().ids, expected.ids)
    reply = assistant.chat([{"role": "user", "content": "a picture"}], image={"cfg_scale": 3.0}, start_with="image",
                           max_media=1, max_new_tokens=8, seed=0)
    assert [p.type for p in reply.parts][:1] == ["image"]


def test_history_is_trimmed_to_the_context_with_the_system_prompt_kept():
    assistant = text_assistant(context_length=160)
    turns = [{"role": "system", "content": "sys"}]
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    turns.append({"role": "user", "content": "last"})
    prompt, dropped = assistant.prompt(turns, assistant.settings.replace(max_new_tokens=16))
    assert dropped > 0 and dropped % 2 == 0 and len(prompt) <= 160 - 16
    rendered = CharTokenizer().decode(prompt.ids.tolist())
    assert rendered.startswith("<|im_start|>system\nsys") and "<|im_start|>user\nlast" in rendered
    assert "question 0" not in rendered and rendered.split("<|im_end|>\n")[1].startswith("<|im_start|>user")
    reply = assistant.chat(turns, max_new_tokens=16, **GREEDY)
    assert reply.trimmed == dropped
    with pytest.raises(ChatError, match="the context holds 160"):
        assistant.chat([{"role": "user", "content": "x" * 200}], max_new_tokens=16)


def test_trimming_leaves_the_reply_its_room_when_it_starts_with_media():
    """``start_with``'s begin token is part of the prompt: trimming makes room for it too, so the
    reply keeps its whole ``max_new_tokens`` (here the 5 positions of a 4-code audio span)."""
    assistant = media_assistant(context_length=128)
    settings = assistant.resolve(max_new_tokens=5)
    old = [{"role": "user", "content": "old question"}, {"role": "assistant", "content": "old answer"},
           {"role": "user", "content": "m"}, {"role": "assistant", "content": "n"}]
    # the last message padded so that the text prompt without the oldest two turns fills 128 - 5 exactly
    for k in range(1, 80):
        turns = old + [{"role": "user", "content": "s" * k}]
        text_prompt, dropped = assistant.prompt(turns, settings)
        if len(text_prompt) == 128 - 5 and dropped == 2:
            break
    else:
        pytest.fail("no padding of the last message fills the context exactly")
    prompt, dropped = assistant.prompt(turns, settings, start_with="audio")
    assert dropped == 4 and len(prompt) <= 128 - 5
    reply = assistant.chat(turns, start_with="audio", max_new_tokens=5, seed=0)
    assert [p.type for p in reply.parts] == ["audio"] and reply.trimmed == 4


def test_trimming_a_long_history_encodes_it_a_logarithmic_number_of_times(monkeypatch):
    """2,000 short messages (the 38 s request of issue 14): the kept tail is found by bisection,
    and the result is the one dropping the oldest turns one at a time would give. A history of far
    more text than fits is searched from its newest end, so what is encoded is about what fits
    (encoding all of 100,000 messages first took 11 s of the server's one model thread)."""
    assistant = text_assistant(context_length=160)
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(1999)]
    settings = assistant.settings.replace(max_new_tokens=16)
    encodings = []
    encode = assistant._encode
    monkeypatch.setattr(assistant, "_encode", lambda kept: encodings.append(len(kept)) or encode(kept))
    prompt, dropped = assistant.prompt(turns, settings)
    assert len(encodings) <= 2 + 11  # the whole history, the shortest, then log2(1000) halvings
    assert len(prompt) <= 160 - 16 and dropped % 2 == 0
    assert sum(encodings) <= 8 * (len(turns) - dropped)  # turns encoded in all: the whole history would be 1999
    monkeypatch.undo()
    assert assistant.prompt(turns[dropped - 2 :], settings)[1] == 2  # the two turns before the kept ones do not fit


def test_more_media_than_the_context_could_hold_is_refused_before_any_is_read(monkeypatch):
    """80,000 one-pixel pictures (a 12 MB request) were each decoded and encoded, 20 s of the
    model worker, before the prompt was found too long: each takes 3 positions or more."""
    from unimodal.inference import chat

    assistant = media_assistant(context_length=60)
    monkeypatch.setattr(chat, "_decode", lambda *a: pytest.fail("a picture was decoded"))
    picture = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(ChatError, match="21 images and clips: at most 20 fit in the context of 60 tokens"):
        assistant.prompt([{"role": "user", "content": [picture] * 20}, {"role": "user", "content": [picture]}])
    monkeypatch.undo()
    with pytest.raises(ChatError, match="not a .png file"):  # 20 are read
        assistant.prompt([{"role": "user", "content": [picture] * 20}])


def test_settings_are_checked_with_clear_messages(caplog):
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match=f"context_length={bad!r}; it must be an integer >= 2"):
            text_assistant(context_length=bad)
    trained = text_assistant().model.backbone.config.max_position_embeddings
    text_assistant(context_length=trained + 1)
    assert f"beyond the backbone's max_position_embeddings={trained}" in caplog.text
    assistant = text_assistant()
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="unknown generation setting 'temprature'"):
        assistant.chat(hi, temprature=0.5)
    with pytest.raises(ValueError, match="top_p must be in"):
        assistant.chat(hi, top_p=1.5)
    with pytest.raises(ValueError, match="num_beams applies to text only"):
        assistant.chat(hi, image={"num_beams": 2})
    reply = assistant.chat(hi, num_beams=2, max_new_tokens=6)
    assert reply.parts and reply.completion_tokens <= 6


def test_terminal_attaches_media_writes_replies_and_saves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the output folder as a user gives it: relative
    assistant = media_assistant(context_length=200)
    bias_tokens(assistant.model, {assistant.model.layout.special_id("<|boi|>"): 50.0, CharTokenizer.eos_id: 40.0})
    picture = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(picture)
    script = "\n".join([
        "/image in.png", "what is in it?", "/image nope.png", "/audio", "/bogus", "/save", "again " * 10, "again " * 10, "/reset", "/quit",
    ]) + "\n"
    settings = {"max_media": 1, "max_new_tokens": 8, "seed": 0, "temperature": 0}
    out = io.StringIO()
    terminal = Terminal(assistant, "outs", settings=settings, system="sys", stdin=io.StringIO(script), stdout=out)
    terminal.run()
    text = out.getvalue()
    assert "attached image in.png" in text and "no such file: 'nope.png'" in text and "unknown command /bogus" in text
    assert "usage: /audio PATH" in text
    written = sorted(Path("outs").glob("reply*.png"))
    assert written and f"[image saved to {written[0]}]" in text
    assert "oldest messages no longer fit in the context of 200 tokens and were dropped" in text
    assert "the conversation is reset" in text and terminal.history == [{"role": "system", "content": "sys"}]
    saved = next(Path("outs").glob("conversation-*.jsonl"))
    record = json.loads(saved.read_text())
    user, reply = record["messages"][1:3]
    # paths relative to the record's folder, wherever it was written from
    assert user["content"][1] == {"type": "image", "path": "../in.png"}
    assert reply["content"][0] == {"type": "image", "path": written[0].name}
    monkeypatch.chdir(tmp_path / "outs")
    assert main(["data", "pack", saved.name, "--out", str(tmp_path / "shards")]) == 0  # as chat.md says
    assert list((tmp_path / "shards").glob("*.tar"))
    # a second session in the same folder numbers its replies on: the first session's files stay
    monkeypatch.chdir(tmp_path)
    first = {f.name: f.read_bytes() for f in Path("outs").glob("reply*")}
    Terminal(assistant, "outs", settings={**settings, "seed": 1}, stdin=io.StringIO("draw\n/quit\n"), stdout=io.StringIO()).run()
    assert {f.name: f.read_bytes() for f in Path("outs").glob("reply*") if f.name in first} == first
    assert len(list(Path("outs").glob("reply*"))) > len(first)


def test_a_bad_attachment_is_refused_when_attached_and_a_failed_turn_drops_its_attachments(tmp_path):
    assistant = media_assistant(context_length=200)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really a wave file")
    picture = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(picture)
    script = f"/audio {broken}\n/image {tmp_path}\nwhat is this?\n/image {picture}\n{'word ' * 300}\nhello\n/quit\n"
    out = io.StringIO()
    Terminal(assistant, tmp_path / "outs", settings={"max_new_tokens": 4, "seed": 0, "temperature": 0},
             stdin=io.StringIO(script), stdout=out).run()
    text = out.getvalue()
    assert f"not attached: audio file {str(broken)!r} is not a .wav file" in text and f"not attached: image file {str(tmp_path)!r} is a directory, not a regular file" in text
    assert text.count("(error:") == 1 and "; 1 attachment dropped)" in text  # the over-long message, not the bad files
    # the message typed after a refused file is still answered; the refused message shows no reply prefix
    assert text.count("assistant> ") == 2 and "you> (error: the last message makes a prompt" in text


def test_an_unreadable_file_or_a_fifo_is_not_attached_and_the_chat_goes_on(tmp_path, monkeypatch):
    import os

    picture = tmp_path / "locked.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(picture)
    os.mkfifo(tmp_path / "pipe.wav")
    read_bytes = Path.read_bytes

    def denied(path: Path) -> bytes:  # chmod 000, which root (as in CI containers) reads anyway
        if path.name == "locked.png":
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", denied)
    out = io.StringIO()
    Terminal(media_assistant(context_length=200), tmp_path / "outs", settings={"max_new_tokens": 4, "seed": 0, "temperature": 0},
             stdin=io.StringIO(f"/image {picture}\n/audio {tmp_path / 'pipe.wav'}\nhello\n/quit\n"), stdout=out).run()
    text = out.getvalue()
    assert f"not attached: image file {str(picture)!r} cannot be read (Permission denied)" in text
    assert f"not attached: audio file {str(tmp_path / 'pipe.wav')!r} is a FIFO, not a regular file" in text
    assert text.count("assistant> ") == 1 and "(error:" not in text


def test_a_clip_the_codec_refuses_is_refused_when_attached_not_with_the_message_typed_next(tmp_path, monkeypatch):
    from unimodal.modalities.base import AudioTooLong

    assistant = media_assistant(context_length=200)
    codec = assistant.processor.codecs["audio"]

    def too_long(part):
        raise AudioTooLong("audio of 3.0 s is longer than the fake codec's max_seconds=2")

    monkeypatch.setattr(codec, "encode", too_long)
    clip = tmp_path / "long.wav"
    soundfile.write(clip, np.zeros(8000 * 3, np.float32), 8000)
    out = io.StringIO()
    terminal = Terminal(assistant, tmp_path / "outs", settings={"max_new_tokens": 4, "seed": 0, "temperature": 0},
                        stdin=io.StringIO(f"/audio {clip}\nhello\n/quit\n"), stdout=out)
    terminal.run()
    text = out.getvalue()
    assert "not attached: the audio codec cannot read it (audio of 3.0 s is longer than the fake codec's max_seconds=2)" in text
    assert "(error:" not in text and [m["content"][0]["text"] for m in terminal.history if m["role"] == "user"] == ["hello"]


def test_an_attached_file_removed_later_leaves_the_conversation_whole(tmp_path):
    """The history keeps what was read when the file was attached, not its path."""
    picture = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(picture)
    lines = io.StringIO(f"/image {picture}\nlook\nand now?\n//usr/bin is a path\n/quit\n")

    def readline() -> str:
        line = lines.readline()
        if line.startswith("and now"):
            picture.unlink()  # moved or deleted while the chat goes on
        return line

    out = io.StringIO()
    Terminal(media_assistant(context_length=200), tmp_path / "outs", settings={"max_new_tokens": 4, "seed": 0, "temperature": 0},
             stdin=type("Stdin", (), {"readline": staticmethod(readline)})(), stdout=out).run()
    assert "(error:" not in out.getvalue() and out.getvalue().count("assistant> ") == 3  # "//" sends "/usr/bin ..."


def test_an_attached_image_is_encoded_once_for_the_whole_conversation(tmp_path, monkeypatch):
    """Attaching checks the image against the codec and the context; the codes it makes are what
    every later turn sends, so neither the message it goes with nor the turns after encode it again."""
    assistant = media_assistant(context_length=200)
    codec = assistant.processor.codecs["image"]
    calls = []
    encode = codec.encode
    monkeypatch.setattr(codec, "encode", lambda part: calls.append(part) or encode(part))
    picture = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(picture)
    out = io.StringIO()
    terminal = Terminal(assistant, tmp_path / "outs", settings={"max_new_tokens": 4, "seed": 0, "temperature": 0, "max_media": 0},
                        stdin=io.StringIO(f"/image {picture}\nlook\nand now?\n/save {tmp_path / 'c.jsonl'}\n/quit\n"), stdout=out)
    terminal.run()
    assert "(error:" not in out.getvalue() and out.getvalue().count("assistant> ") == 2
    assert len(calls) == 1
    # the saved record still names the file
    assert json.loads((tmp_path / "c.jsonl").read_text())["messages"][0]["content"][1] == {"type": "image", "path": "in.png"}


class _Interrupting:
    """stdin whose first read is a Ctrl-C."""

    def __init__(self, lines: str):
        self.lines, self.first = io.StringIO(lines), True

    def readline(self) -> str:
        if self.first:
            self.first = False
            raise KeyboardInterrupt
        return self.lines.readline()


def test_ctrl_c_cancels_a_reply_and_at_the_prompt_keeps_the_conversation(tmp_path, monkeypatch):
    assistant = media_assistant(context_length=200)
    chat = assistant.chat
    calls = []

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return chat(*args, **kwargs)

    monkeypatch.setattr(assistant, "chat", interrupted_once)
    out = io.StringIO()
    terminal = Terminal(assistant, tmp_path / "outs", settings={"max_new_tokens": 4, "seed": 0, "temperature": 0},
                        stdin=_Interrupting("first\nsecond\n/quit\n"), stdout=out)
    terminal.run()
    text = out.getvalue()
    assert "(/quit or Ctrl-D leaves; /save keeps the conversation)" in text
    assert "(reply cancelled; your message was not added to the conversation)" in text
    assert [m["content"][0]["text"] for m in terminal.history if m["role"] == "user"] == ["second"]


def test_ctrl_c_while_a_file_is_attached_keeps_the_conversation(tmp_path, monkeypatch):
    picture = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(picture)
    assistant = media_assistant(context_length=200)
    encode = assistant.encode_media
    calls = []

    def interrupted_once(item):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C while a large file is read and encoded
        return encode(item)

    monkeypatch.setattr(assistant, "encode_media", interrupted_once)
    out = io.StringIO()
    terminal = Terminal(assistant, tmp_path / "outs", settings={"max_new_tokens": 4, "seed": 0, "temperature": 0},
                        stdin=io.StringIO(f"first\n/image {picture}\nsecond\n/quit\n"), stdout=out)
    terminal.run()
    assert "(/image cancelled; /quit or Ctrl-D leaves)" in out.getvalue()
    assert [m["content"][0]["text"] for m in terminal.history if m["role"] == "user"] == ["first", "second"]


def test_control_characters_of_a_reply_are_shown_escaped():
    assert printable("a\x1b[2Jb\tc\nd\x9b") == "a\\x1b[2Jb\tc\nd\\x9b"


def test_a_save_or_a_reply_file_that_cannot_be_written_fails_one_line_and_the_chat_goes_on(tmp_path):
    assistant = media_assistant(context_length=200)
    bias_tokens(assistant.model, {assistant.model.layout.special_id("<|boi|>"): 50.0, CharTokenizer.eos_id: 40.0})
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    script = f"draw\n/save {tmp_path}\n/save {blocker}/x.json\nhello\n/quit\n"
    out = io.StringIO()
    Terminal(assistant, blocker / "outs", settings={"max_media": 1, "max_new_tokens": 8, "seed": 0, "temperature": 0},
             stdin=io.StringIO(script), stdout=out).run()
    text = out.getvalue()
    assert f"[the image could not be written under {blocker / 'outs'}:" in text
    assert text.count("could not save the conversation:") == 2 and text.count("assistant> ") == 2


def test_save_expands_a_home_path_and_a_default_name_never_overwrites_an_earlier_save(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr("unimodal.inference.terminal.time.strftime", lambda fmt: "20250101-120000")  # two saves in one second
    script = "first\n/save\n/reset\nsecond\n/save\n/save ~/kept.jsonl\n/quit\n"
    Terminal(text_assistant(), "outs", settings={"max_new_tokens": 2, "seed": 0}, stdin=io.StringIO(script), stdout=io.StringIO()).run()
    saved = sorted(Path("outs").glob("conversation-*.jsonl"))
    assert [p.name for p in saved] == ["conversation-20250101-120000-2.jsonl", "conversation-20250101-120000.jsonl"]
    firsts = [json.loads(p.read_text())["messages"][0]["content"][0]["text"] for p in saved]
    assert firsts == ["second", "first"]
    assert (tmp_path / "home" / "kept.jsonl").is_file() and not Path("~").exists()


def test_a_save_cut_short_by_a_full_disk_leaves_the_earlier_save_whole(tmp_path, monkeypatch):
    import errno
    import os

    saved = tmp_path / "conversation.jsonl"
    out = io.StringIO()
    lines = io.StringIO(f"first\n/save {saved}\nsecond\n/save {saved}\n/quit\n")

    def full_disk(fd: int) -> None:  # the bytes written so far never reach the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    def readline() -> str:
        line = lines.readline()
        if line.startswith("second"):
            monkeypatch.setattr(os, "fsync", full_disk)
        return line

    Terminal(text_assistant(), tmp_path / "outs", settings={"max_new_tokens": 2, "seed": 0},
             stdin=type("Stdin", (), {"readline": staticmethod(readline)})(), stdout=out).run()
    assert "could not save the conversation: [Errno 28] No space left on device" in out.getvalue()
    assert [m["content"][0]["text"] for m in json.loads(saved.read_text())["messages"] if m["role"] == "user"] == ["first"]
    assert not list(tmp_path.glob(".*partial"))  # nor a temporary file left behind


def test_a_media_file_name_that_is_not_utf8_fails_the_save_in_one_line_and_the_chat_goes_on(tmp_path):
    import os

    name = os.fsdecode(b"\xff.png")  # as a terminal of another encoding passes it
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name)
    out = io.StringIO()
    script = f"/image {tmp_path / name}\nlook\n/save {tmp_path / 'c.jsonl'}\nhello\n/quit\n"
    Terminal(media_assistant(context_length=200), tmp_path / "outs", settings={"max_new_tokens": 4, "seed": 0, "temperature": 0},
             stdin=io.StringIO(script), stdout=out).run()
    text = out.getvalue()
    assert "could not save the conversation: the path '\\udcff.png' is not UTF-8, which a chat record (JSON) cannot hold" in text
    assert text.count("assistant> ") == 2 and not (tmp_path / "c.jsonl").exists()


def test_a_bad_device_or_bad_settings_fail_before_the_model_loads(tmp_path):
    with pytest.raises(ChatError, match="'tpu' is not a device name"):
        unimodal_load(tmp_path / "no-export", device="tpu")
    with pytest.raises(ValueError, match="temperature must be 0"):
        Terminal(text_assistant(), tmp_path, settings={"temperature": -1})


def test_unimodal_load_is_the_assistant_loader():
    import unimodal
    from unimodal.inference import chat

    assert unimodal.load is chat.load


@pytest.mark.slow
def test_an_exported_model_chats_from_python_and_the_terminal(tmp_path):
    """The commands of docs/chat.md: the tiny text pipeline, then unimodal.load and unimodal chat."""
    import subprocess
    import sys

    import unimodal

    root = tmp_path / "runs"
    subprocess.run([sys.executable, "-m", "unimodal.cli", "pipeline", "recipes/pipelines/text.yaml", "--tiny", "--root", str(root)], check=True)
    export = root / "chat_sft" / "export"
    assistant = unimodal.load(export)
    assert assistant.template.name == "chatml" and assistant.context_length == 256
    reply = assistant.chat([{"role": "user", "content": "What does len do?"}], max_new_tokens=8, seed=0)
    assert reply.completion_tokens <= 8
    done = subprocess.run([sys.executable, "-m", "unimodal.cli", "chat", str(export), "--max_new_tokens", "8", "--out", str(tmp_path)],
                          input="hello\n/quit\n", capture_output=True, text=True, check=True)
    assert "assistant> " in done.stdout



def test_span_shapes_come_from_the_codecs():
    from unimodal.inference.constraints import SpanSpec, spans_from_layout

    def default_spans(model, codecs):  # what an Assistant takes when it is given no spans
        return spans_from_layout(model.layout, codecs, max_seconds=None, skip=tuple(model.continuous))

    class Seed:
        def fingerprint(self):
            return {"name": "seed", "tokens_per_item": 32, "layers": 1}

    class Speech:
        max_seconds = 2.0

        def fingerprint(self):
            return {"name": "speech", "frame_rate": 50.0, "layers": 4}

    model = tiny_model(code_ranges={"image": 64, "audio": 64})
    model.layout.code_layers["audio"] = 4
    spans = default_spans(model, {"image": Seed(), "audio": Speech()})
    assert spans == {"image": SpanSpec(length=32), "audio": SpanSpec(layers=4, min_length=1, max_length=100)}
    orthus = tiny_model(code_ranges={"image": 16}, continuous={"image": {}})  # soft-VQ rows, not a discrete modality
    assert default_spans(orthus, {}) == {}


def test_unimodal_load_draws_no_weights_bar_unless_asked(capfd, monkeypatch):
    """transformers' "Loading weights" bar is off in Python as in the CLI; HF_HUB_DISABLE_PROGRESS_BARS=0
    shows it, and its own switch is left as it was."""
    from transformers.utils import logging as hf_logging

    old_export = Path(__file__).resolve().parent / "fixtures" / "demo-export-a96b9df"
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    hf_logging.enable_progress_bar()
    capfd.readouterr()
    unimodal_load(old_export, device="cpu")
    assert "Loading weights" not in capfd.readouterr().err and hf_logging.is_progress_bar_enabled()
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    unimodal_load(old_export, device="cpu")
    assert "Loading weights" in capfd.readouterr().err


def test_python_api_mistakes_are_one_line_before_any_work(tmp_path):
    """What a first script gets wrong, said in one line that names the argument and the fix."""
    import threading

    old_export = Path(__file__).resolve().parent / "fixtures" / "demo-export-a96b9df"
    for call, needle in [
        (lambda: unimodal_load(None), "load takes the path of an export directory, got NoneType"),
        (lambda: unimodal_load(old_export, temperature=0), r"unknown argument temperature; sampling settings go in settings=\{'temperature': ...\}"),
        (lambda: unimodal_load(old_export, device=None), "device None is not a device name"),
        (lambda: unimodal_load(old_export, max_audio_seconds="8"), "max_audio_seconds must be a number of seconds, got '8'"),
    ]:
        with pytest.raises(ChatError, match=needle):
            call()
    assistant = text_assistant()
    hello = [{"role": "user", "content": "hi"}]
    for call, needle in [
        (lambda: assistant.generate(hello), "generate takes a list of conversations .* for one conversation use chat"),
        (lambda: assistant.chat(hello, on_text="print"), "on_text must be a function of the text, got str"),
        (lambda: assistant.generate([hello], cancel=True), "cancel must be a threading.Event, got bool"),
        (lambda: assistant.prompt(hello, {"max_new_tokens": 4}), "settings must be GenerationSettings"),
        (lambda: assistant.chat([{"role": "user", "content": 5}]), "message 0 has content of type int; expected a string or a list"),
        (lambda: media_assistant(unconditional=5), "unconditional must be a string"),
    ]:
        with pytest.raises(ChatError, match=needle):
            call()
    assert assistant.generate([hello], cancel=threading.Event(), max_new_tokens=2, seed=np.int64(3))[0].prompt_tokens > 0
    reply = media_assistant().chat([{"role": "user", "content": "x"}], start_with="audio", max_media=1, max_new_tokens=16, seed=0)
    with pytest.raises(ValueError, match="it is a directory; give a file name in it"):
        next(p for p in reply.parts if p.type == "audio").save(tmp_path)


def test_a_media_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from unimodal.data.media import MAX_MEDIA_BYTES
    from unimodal.inference import chat

    big = tmp_path / "big.png"
    with big.open("wb") as file:
        file.truncate(MAX_MEDIA_BYTES + 1)  # sparse: no disk, but read_bytes would take 512 MiB
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("the file was read"))
    with pytest.raises(ChatError, match="big.png' is 512 MiB, over the 512 MiB a media file may have"):
        chat.parse_messages([{"role": "user", "content": [{"type": "image", "image": str(big)}]}])


def test_a_requests_media_are_decoded_one_at_a_time_and_a_clip_too_long_is_not_decoded(monkeypatch):
    """Each image or clip is decoded just before it is encoded, so a request of many large files
    never holds them all decoded at once; a clip the codec would refuse is refused from the
    length its header declares, before it is decoded."""
    import unimodal.inference.chat as chat_module

    assistant = media_assistant(context_length=200)
    codecs, steps = assistant.processor.codecs, []
    decode = chat_module.decode_media
    monkeypatch.setattr(chat_module, "decode_media", lambda media, kind, where: steps.append(f"decode {kind}") or decode(media, kind, where))
    for kind in ("image", "audio"):
        encode = codecs[kind].encode
        monkeypatch.setattr(codecs[kind], "encode", lambda part, encode=encode: steps.append(f"encode {part.type}") or encode(part))

    def wav(seconds: float) -> dict:
        buffer = io.BytesIO()
        soundfile.write(buffer, np.zeros(int(8000 * seconds), np.float32), 8000, format="WAV")
        return {"type": "input_audio", "input_audio": {"data": base64.b64encode(buffer.getvalue()).decode(), "format": "wav"}}

    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png, format="PNG")
    picture = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()}}
    assistant.prompt([{"role": "user", "content": [picture, wav(0.1), picture]}])
    assert steps == ["decode image", "encode image", "decode audio", "encode audio", "decode image", "encode image"]

    steps.clear()
    codecs["audio"].max_seconds = 0.5
    with pytest.raises(ChatError, match=r"message 0, part 1: the audio codec cannot read it \(audio of 2.0 s is longer than "
                                        r"the audio codec's max_seconds=0.5; .*max_audio_seconds at load, chat and serve"):
        assistant.prompt([{"role": "user", "content": [picture, wav(2.0)]}])
    assert steps == ["decode image", "encode image"]


def test_media_arrive_as_they_are_written_in_the_replys_order(tmp_path):
    """on_media gets each picture or clip decoded when its span closes, after the text before it:
    the callbacks replay the reply's parts in order, and the terminal saves and names each one
    where the reply has it (it had printed every picture after all the text)."""
    mixed = media_assistant()
    bias_tokens(mixed.model, {mixed.model.layout.special_id("<|boi|>"): 4.0, mixed.model.layout.special_id("<|boa|>"): 4.0})
    hello = [{"role": "user", "content": "hi"}]
    interleaved = 0
    for seed in range(6):
        events: list = []
        reply = mixed.chat(hello, on_text=lambda text: events.append(("text", text)), on_media=lambda part: events.append(("media", part)),
                           max_new_tokens=32, max_media=3, seed=seed)
        heard = []
        for kind, value in events:
            if kind == "text" and heard and heard[-1][0] == "text":
                heard[-1] = ("text", heard[-1][1] + value)
            elif kind == "media" or value:
                heard.append((kind, value))
        assert [("text", p.text) if p.type == "text" else ("media", p) for p in reply.parts] == heard, seed
        kinds = [kind for kind, _ in heard]
        interleaved += any("text" in kinds[:i] and "text" in kinds[i + 1:] for i, k in enumerate(kinds) if k == "media")
    assert interleaved, "no seed gave media between text: the test shows nothing"

    out = io.StringIO()
    Terminal(mixed, tmp_path / "outs", settings={"max_new_tokens": 32, "max_media": 3, "seed": 0},
             stdin=io.StringIO("hi\n/quit\n"), stdout=out).run()
    saved = sorted((tmp_path / "outs").glob("reply001-*"))
    shown = out.getvalue()
    assert saved and all(f"saved to {path}]" in shown for path in saved)
    assert shown.index(f"saved to {saved[0]}]") < shown.rindex("you> ")


def test_a_cancelled_reply_leaves_none_of_its_pictures_behind(tmp_path):
    """Media are saved as they come; a reply cut by Ctrl-C after one was saved takes it back, so the
    next reply's files are its own."""
    from unimodal.inference.chat import ReplyPart

    assistant = media_assistant()

    def chat_cut_short(messages, on_text=None, on_media=None, **settings):
        on_text("a picture: ")
        on_media(ReplyPart("image", image=Image.fromarray(np.zeros((8, 8, 3), np.uint8))))
        raise KeyboardInterrupt

    assistant.chat = chat_cut_short
    out = io.StringIO()
    Terminal(assistant, tmp_path / "outs", stdin=io.StringIO("hi\n/quit\n"), stdout=out).run()
    assert "[image saved to" in out.getvalue() and "(reply cancelled" in out.getvalue()
    assert list((tmp_path / "outs").glob("reply*")) == []
