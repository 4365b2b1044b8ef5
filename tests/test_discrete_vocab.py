"""The vocabulary layout with media code ranges, and integer codes spliced into documents."""

from __future__ import annotations

import numpy as np
import pytest

from unimodal.data.processor import Processor
from unimodal.schema import Document, DocumentError, Part
from unimodal.modalities.base import MediaCodec
from unimodal.modalities.vocab import VocabLayout

MIO_LIKE = {"text_size": 260, "code_ranges": {"image": 16, "audio": 12}, "code_layers": {"audio": 3}}


def test_ranges_are_contiguous_and_layered():
    layout = VocabLayout(**MIO_LIKE)
    spans = layout.spans()
    assert spans[0] == ("text", 0, 260)
    assert [s[0] for s in spans[1:6]] == list(layout.specials)
    assert spans[-2:] == [("image", 265, 281), ("audio", 281, 293)]
    assert layout.used_size == 293 and layout.size == 320  # padded to a multiple of 64
    assert layout.codebook_size("audio") == 4 and layout.layers("image") == 1
    # token = offset + layer * codebook_size + code
    assert layout.code_ids("audio", 3, 2) == 281 + 2 * 4 + 3
    assert layout.code_ids("image", np.arange(3)).tolist() == [265, 266, 267]


def test_readable_names_for_every_added_id():
    layout = VocabLayout(**MIO_LIKE)
    names = layout.added_tokens()
    assert len(names) == layout.used_size - layout.text_size == len(set(names))
    assert names[:2] == ["<|boi|>", "<|eoi|>"]
    assert layout.token_name(265 + 7) == "<|image_7|>"
    assert layout.token_name(281 + 4 + 1) == "<|audio_l1_1|>"
    assert layout.token_name(300) == "<|pad_7|>"
    with pytest.raises(ValueError, match="text id"):
        layout.token_name(5)


def test_render_decodes_text_and_names_media(char_tokenizer):
    layout = VocabLayout(**MIO_LIKE)
    ids = char_tokenizer.encode("hi ") + [layout.special_id("<|boi|>"), 265, 266, layout.special_id("<|eoi|>")] + char_tokenizer.encode("!")
    assert layout.render(ids, char_tokenizer) == "hi <|boi|><|image_0|><|image_1|><|eoi|>!"


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"specials": ("<|boi|>", "<|boi|>")}, "used twice"),
        ({"code_ranges": {"<|boi|>": 4}}, "used twice"),
        ({"code_ranges": {"audio": 10}, "code_layers": {"audio": 3}}, "equal layers"),
        ({"code_ranges": {"image": 0}}, "equal layers"),
        ({"code_layers": {"audio": 2}}, "not code ranges"),
        ({"code_sources": {"image": {"name": "x"}}}, "not code ranges"),
    ],
)
def test_ambiguous_layouts_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        VocabLayout(text_size=10, **bad)


def test_layout_round_trips_and_mismatch_names_the_difference():
    layout = VocabLayout(**MIO_LIKE, code_sources={"image": {"name": "seed", "checksum": "a"}})
    assert VocabLayout.from_dict(layout.to_dict()) == layout
    other = VocabLayout(**MIO_LIKE, code_sources={"image": {"name": "seed", "checksum": "b"}})
    with pytest.raises(ValueError, match="mismatch with the data in code_sources"):
        layout.check_compatible(other, "the data")
    # the same ranges in another order give their codes other ids (a resume with them reordered)
    swapped = VocabLayout(**{**MIO_LIKE, "code_ranges": {"audio": 12, "image": 16}})
    with pytest.raises(ValueError, match=r"mismatch with the data in code_ranges \(the same ranges in another order"):
        VocabLayout(**MIO_LIKE).check_compatible(swapped, "the data")
    VocabLayout(**MIO_LIKE).check_compatible(VocabLayout(**MIO_LIKE), "the data")


def _doc(*parts: Part) -> Document:
    return Document(list(parts), key="k")


def test_rvq_codes_are_spliced_layer_major(char_tokenizer):
    layout = VocabLayout(**MIO_LIKE)
    encoder = Processor(char_tokenizer, layout, add_bos=False, add_eos=False)
    codes = np.array([[0, 1], [2, 3], [1, 0]], dtype=np.int32)  # [layers, frames]
    out = encoder.encode(_doc(Part("audio", media=0, data=codes)))
    offset = layout.range_offset("audio")
    assert out.ids.tolist() == [layout.special_id("<|boa|>"), offset + 0, offset + 1, offset + 4 + 2, offset + 4 + 3,
                                offset + 8 + 1, offset + 8 + 0, layout.special_id("<|eoa|>")]
    assert (out.modality == 2).all()


def test_input_parts_keep_the_content_layer_only(char_tokenizer):
    layout = VocabLayout(**MIO_LIKE)
    encoder = Processor(char_tokenizer, layout, add_bos=False, add_eos=False, input_layers={"audio": 1})
    codes = np.array([[0, 1], [2, 3], [1, 0]], dtype=np.int32)
    heard = encoder.encode(_doc(Part("audio", media=0, data=codes, loss=False)))
    spoken = encoder.encode(_doc(Part("audio", media=0, data=codes, loss=True)))
    assert len(heard) == 2 + 2 and len(spoken) == 2 + 6
    assert heard.ids[1:3].tolist() == spoken.ids[1:3].tolist()


def test_bad_codes_are_document_errors(char_tokenizer):
    layout = VocabLayout(**MIO_LIKE)
    encoder = Processor(char_tokenizer, layout)
    with pytest.raises(DocumentError, match=r"expected \[layers <= 3, frames\]"):
        encoder.encode(_doc(Part("audio", media=0, data=np.zeros((4, 2), np.int32))))
    with pytest.raises(DocumentError, match=r"outside \[0, 4\)"):
        encoder.encode(_doc(Part("audio", media=0, data=np.full((1, 2), 4, np.int32))))
    with pytest.raises(DocumentError, match="no image code range"):
        Processor(char_tokenizer, VocabLayout(260)).encode(_doc(Part("image", media=0, data=np.zeros(3, np.int32))))
    image = encoder.encode(_doc(Part("image", media=0, data=np.arange(6, dtype=np.int64).reshape(2, 3))))
    assert image.ids[2:8].tolist() == list(range(265, 271))  # any shape, raster order


def test_a_local_backbone_is_resized_to_the_padded_layout(tmp_path, tiny_llama_config):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from unimodal.models.backbone import BackboneConfig, load_backbone

    raw = dict(tiny_llama_config)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw, vocab_size=260, tie_word_embeddings=False)
    original = AutoModelForCausalLM.from_config(config)
    original.save_pretrained(tmp_path / "llm")
    layout = VocabLayout(**MIO_LIKE)
    model = load_backbone(BackboneConfig(path=str(tmp_path / "llm")), layout.size)
    assert model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == 320
    assert torch.equal(model.get_input_embeddings().weight[:260], original.get_input_embeddings().weight)


def test_names_registered_in_a_hf_tokenizer_line_up_with_ids():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "a", "red", "circle"]
    inner = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    inner.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>")
    layout = VocabLayout(text_size=4, code_ranges={"image": 8, "audio": 8}, code_layers={"audio": 2})
    layout.register_added_tokens(tokenizer)
    ids = [1, 2, layout.special_id("<|boi|>"), layout.code_ids("image", 3), layout.code_ids("audio", 1, 1)]
    assert tokenizer.decode(ids).replace(" ", "") == "ared<|boi|><|image_3|><|audio_l1_1|>"
    with pytest.raises(ValueError, match="has 25 tokens"):
        layout.register_added_tokens(tokenizer)


def test_raw_media_are_encoded_once_per_content(char_tokenizer):
    layout = VocabLayout(**MIO_LIKE)
    calls: list[str] = []

    class Counting(MediaCodec):  # a codec that counts its calls
        def encode(self, part: Part) -> np.ndarray:
            calls.append(part.type)
            if part.type == "image":
                return np.array([int(part.data.sum()) % 4, 1])
            waveform, rate = part.data
            return np.array([[rate % 4, 0], [1, 2]])

    encoder = Processor(char_tokenizer, layout, codecs={"image": Counting(), "audio": Counting()})
    picture = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    clip = np.linspace(-1, 1, 100, dtype=np.float32)
    doc = _doc(Part("image", media=0, data=picture), Part("audio", media=1, data=(clip, 16000)))
    first = encoder.encode(doc)
    again = encoder.encode(_doc(Part("image", media=0, data=picture.copy()), Part("audio", media=1, data=(clip.copy(), 16000))))
    assert calls == ["image", "audio"] and first.ids.tolist() == again.ids.tolist()
    other = picture.copy()
    other[0, 0, 0] += 1
    encoder.encode(_doc(Part("image", media=0, data=other), Part("audio", media=1, data=(clip, 8000))))
    assert calls == ["image", "audio", "image", "audio"]  # another picture, another sample rate
