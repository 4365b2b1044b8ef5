"""Chat templates in the encoder, OpenAI-style messages to documents, packing chats with a val split."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import soundfile
from PIL import Image

from unimodal.data.messages import messages_to_parts
from unimodal.data.templates import get_template, render
from unimodal.data.datamodule import UnimodalDataModule
from unimodal.data.processor import Processor
from unimodal.schema import Document, DocumentError, Part
from unimodal.data.jsonl import pack_jsonl
from unimodal.data.shards import read_documents
from unimodal.modalities.vocab import VocabLayout


def chat() -> Document:
    return Document([
        Part("text", text="Be brief.", role="system", loss=False),
        Part("text", text="Hi?", role="user", loss=True),  # a user flag never supervises
        Part("text", text="Hello.", role="assistant"),
        Part("text", text="Bye?", role="user", loss=False),
        Part("text", text="Ok", role="assistant", loss=False),  # an unsupervised assistant turn
    ], key="c")


def supervised_text(tokenizer, template: str) -> tuple[str, str]:
    """(the whole rendered text, the supervised characters), eos shown as '<eos>'."""
    encoded = Processor(tokenizer, VocabLayout(tokenizer.vocab_size), chat_template=get_template(template)).encode(chat())

    def text(ids) -> str:
        return "".join("<eos>" if i == tokenizer.eos_id else tokenizer.decode([i]) for i in ids if i != tokenizer.bos_id)

    return text(encoded.ids), text(encoded.ids[encoded.target])


def test_chatml_supervises_assistant_content_and_its_end_marker_only(char_tokenizer):
    whole, supervised = supervised_text(char_tokenizer, "chatml")
    assert whole == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye?<|im_end|>\n"
        "<|im_start|>assistant\nOk<|im_end|>\n<eos>"
    )
    assert supervised == "Hello.<|im_end|>"


def test_vicuna_ends_assistant_turns_with_the_eos_id(char_tokenizer):
    whole, supervised = supervised_text(char_tokenizer, "vicuna")
    assert whole == "Be brief.\nUSER: Hi?\nASSISTANT:Hello.<eos>\nUSER: Bye?\nASSISTANT:Ok<eos>\n<eos>"
    assert supervised == "Hello.<eos>"


def test_generation_prompt_and_documents_without_roles():
    rendered = render(Document([Part("text", text="hi", role="user")]), get_template("chatml"), add_generation_prompt=True)
    assert [p.text for p in rendered] == ["<|im_start|>user\n", "hi", "<|im_end|>", "\n", "<|im_start|>assistant\n"]
    assert render(Document([Part("text", text="hi", role="user")]), "chatml", add_generation_prompt=True) == rendered  # by name
    plain = Document([Part("text", text="plain text")])
    assert render(plain, get_template("chatml")) == plain.parts
    chat = Document([Part("text", text="hi", role="user")])
    assert render(chat, None) == render(chat, get_template(None)) == chat.parts  # no template: the parts as they are
    with pytest.raises(DocumentError, match="part 1 has no role"):
        render(Document([Part("text", text="a", role="user"), Part("text", text="b")]), get_template("vicuna"))
    with pytest.raises(ValueError, match="unknown chat template 'llama'"):
        UnimodalDataModule(datasets=["x"], tokenizer="t", chat_template="llama")


def png_data_url() -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), 200, np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def wav_base64() -> str:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(160, np.float32), 16000, format="WAV")
    return base64.b64encode(buffer.getvalue()).decode()


def test_openai_messages_with_image_and_audio_parts(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "cat.png")
    messages = [
        {"role": "system", "content": "You see and hear."},
        {"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "cat.png"}},
            {"type": "input_audio", "input_audio": {"data": wav_base64(), "format": "wav"}},
        ]},
        {"role": "assistant", "content": [{"type": "text", "text": "A picture:"}, {"type": "image_url", "image_url": {"url": png_data_url()}}]},
        {"role": "assistant", "content": "skipped", "weight": 0},
    ]
    parts = messages_to_parts(messages, tmp_path, "chats.jsonl:1")
    assert [(p.type, p.role, p.loss, p.media) for p in parts] == [
        ("text", "system", False, None), ("text", "user", False, None), ("image", "user", False, 0),
        ("audio", "user", False, 1), ("text", "assistant", True, None), ("image", "assistant", True, 2),
        ("text", "assistant", False, None),
    ]
    assert [p.data.ext for p in parts if p.type != "text"] == ["png", "wav", "png"]
    # inline media are stored as the format their bytes have, whatever their label says
    mislabelled = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url().replace("image/png", "image/jpeg")}},
        {"type": "input_audio", "input_audio": {"data": wav_base64(), "format": "mp3"}}]}]
    assert [p.data.ext for p in messages_to_parts(mislabelled, tmp_path, "f:1")] == ["png", "wav"]
    with pytest.raises(DocumentError, match="remote"):
        messages_to_parts([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}], tmp_path, "f:1")
    # a file:// URL escapes a space as %20 (Path.as_uri), which is no part of the file's name
    (tmp_path / "my cat.png").write_bytes((tmp_path / "cat.png").read_bytes())
    by_url = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": (tmp_path / "my cat.png").as_uri()}}]}]
    assert messages_to_parts(by_url, tmp_path, "f:1")[0].data.data == (tmp_path / "cat.png").read_bytes()
    with pytest.raises(DocumentError, match="role 'tool'"):
        messages_to_parts([{"role": "tool", "content": "x"}], tmp_path, "f:1")


def test_pack_chat_jsonl_with_a_validation_split(tmp_path):
    src = tmp_path / "chats.jsonl"
    with src.open("w") as f:
        for i in range(40):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}) + "\n")
    stats = pack_jsonl(src, tmp_path / "out", progress=False, val_fraction=0.25)
    assert stats["train"]["documents"] + stats["val"]["documents"] == 40
    assert 3 <= stats["val"]["documents"] <= 18
    train = {d.key for d in read_documents(tmp_path / "out" / "train")}
    val = list(read_documents(tmp_path / "out" / "val"))
    assert not train & {d.key for d in val}
    assert [(p.role, p.loss) for p in val[0].parts] == [("user", False), ("assistant", True)]
    # the same split every time: a key's side depends on the key only
    again = pack_jsonl(src, tmp_path / "again", progress=False, val_fraction=0.25)
    assert again["val"]["documents"] == stats["val"]["documents"]
