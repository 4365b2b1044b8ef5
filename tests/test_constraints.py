"""Constrained decoding: every media span a random model writes is well formed, in every decoding mode."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

from unimodal.inference.constraints import MalformedSpan, MediaSpanConstraint, extract_spans
from unimodal.modalities.vocab import VocabLayout

LAYOUT = VocabLayout(text_size=40, code_ranges={"image": 16, "audio": 24}, code_layers={"audio": 3})
SPANS = {"image": {"length": 5}, "audio": {"layers": 3, "min_length": 1, "max_length": 4}}
BOI, BOA = LAYOUT.special_id("<|boi|>"), LAYOUT.special_id("<|boa|>")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=LAYOUT.size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


class OpenSpans:
    """Pushes a random model to start media spans often, so that the test sees many."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[:, [BOI, BOA]] += 4.0
        return scores


def generate(model, processors, **kwargs) -> torch.Tensor:
    prompts = torch.randint(4, 40, (200, 3), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    return model.generate(prompts, max_new_tokens=30, logits_processor=LogitsProcessorList(processors), pad_token_id=0, **kwargs)


def check(rows: torch.Tensor) -> tuple[int, dict[str, int]]:
    """(malformed rows, complete spans per modality); a span cut by the token budget must be a valid beginning."""
    bad, spans = 0, {"image": 0, "audio": 0}
    for row in rows.tolist():
        try:
            for span in extract_spans(row, LAYOUT, SPANS, partial=True):
                spans[span.modality] += 1
        except MalformedSpan:
            bad += 1
    return bad, spans


@pytest.mark.parametrize(
    "mode", [{"do_sample": False}, {"do_sample": True, "top_p": 0.7}, {"num_beams": 3, "do_sample": False}], ids=["greedy", "sampling", "beam"]
)
def test_spans_are_always_well_formed(model, mode):
    bad, spans = check(generate(model, [OpenSpans(), MediaSpanConstraint(LAYOUT, SPANS)], **mode))
    assert bad == 0
    assert spans["image"] >= 20 and spans["audio"] >= 20, spans


def test_without_the_constraint_spans_break(model):
    bad, _ = check(generate(model, [OpenSpans()], do_sample=True))
    assert bad > 100


def test_audio_spans_have_equal_layers_of_free_length(model):
    rows = generate(model, [OpenSpans(), MediaSpanConstraint(LAYOUT, SPANS)], do_sample=True)
    lengths = {span.codes.shape for row in rows.tolist() for span in extract_spans(row, LAYOUT, SPANS, partial=True) if span.modality == "audio"}
    assert {shape[0] for shape in lengths} == {3}
    assert len({shape[1] for shape in lengths}) > 1  # the model chose different lengths


def test_grammar_states_and_padding():
    constraint = MediaSpanConstraint(LAYOUT, SPANS)
    audio = LAYOUT.range_offset("audio")
    allowed = constraint.allowed(torch.tensor([[5, BOA, audio + 1, audio + 2]]))[0]
    # two layer-0 codes written: more layer-0 codes, or the first layer-1 code; nothing else
    assert allowed.nonzero().flatten().tolist() == list(range(audio, audio + 2 * 8))
    outside = constraint.allowed(torch.tensor([[5, 6]]))[0]
    assert not outside[LAYOUT.used_size :].any() and not outside[LAYOUT.range_offset("image") :].any()
    assert outside[BOI] and outside[BOA] and not outside[LAYOUT.special_id("<|eoi|>")]
    scores = constraint(torch.tensor([[5, BOI]]), torch.zeros(1, LAYOUT.size))
    assert torch.isfinite(scores).sum() == 16


def test_a_code_range_without_a_spec_cannot_start():
    constraint = MediaSpanConstraint(LAYOUT, {"image": {"length": 5}})
    allowed = constraint.allowed(torch.tensor([[5]]))[0]
    assert allowed[BOI] and not allowed[BOA]
    with pytest.raises(ValueError, match="no code range"):
        MediaSpanConstraint(VocabLayout(40, code_ranges={"image": 4}), {"audio": {}})


def test_extract_spans_reports_malformed_sequences():
    img = LAYOUT.range_offset("image")
    eoi = LAYOUT.special_id("<|eoi|>")
    assert extract_spans([5, BOI, *range(img, img + 5), eoi], LAYOUT, SPANS)[0].codes.tolist() == [[0, 1, 2, 3, 4]]
    for ids, message in [
        ([5, BOI, img, img, eoi], "expected 1 x 5"),
        ([5, img], "outside a media span"),
        ([5, BOI, img], "not closed"),
        ([BOI, img, BOA], "inside an open image span"),
    ]:
        with pytest.raises(MalformedSpan, match=message):
            extract_spans(ids, LAYOUT, SPANS)


def test_spans_follow_the_tokenizers_in_the_layout():
    from unimodal.inference.constraints import SpanSpec, spans_from_layout

    layout = VocabLayout(
        text_size=40, code_ranges={"image": 16, "audio": 24}, code_layers={"audio": 3},
        code_sources={"image": {"name": "seed", "tokens_per_item": 5}, "audio": {"name": "encodec", "frame_rate": 50.0}},
    )
    assert spans_from_layout(layout, max_seconds=2) == {"image": SpanSpec(length=5), "audio": SpanSpec(layers=3, max_length=100)}


def test_the_state_from_counted_codes_is_the_state_from_the_spans_body():
    """The engine counts each layer's codes as it writes them rather than reading the open span
    at every step: both give the same state after every prefix of a well-formed span (a fixed
    length image, a free-length three-layer clip cut at its shortest, middle and longest)."""
    constraint = MediaSpanConstraint(LAYOUT, SPANS)
    image = [LAYOUT.code_ids("image", code) for code in (3, 0, 7, 7, 1)]
    clips = [[LAYOUT.code_ids("audio", code, layer) for layer in range(3) for code in range(frames)] for frames in (1, 2, 4)]
    for name, body in [("image", image)] + [("audio", clip) for clip in clips]:
        counts = [0] * SPANS[name].get("layers", 1)
        for end in range(len(body) + 1):
            assert constraint.counted_state(name, counts) == constraint.span_state(name, body[:end]), (name, end)
            if end < len(body):
                counts[constraint.layer_of(name, body[end])] += 1
