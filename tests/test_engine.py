"""The generation engine against transformers' generate() and against uncached recomputation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CharTokenizer
from inference_helpers import FEATURE_DIM, bias_tokens, family_model, tiny_model

from unimodal.data.processor import Processor
from unimodal.schema import Document, Part
from unimodal.inference.engine import Engine
from unimodal.inference.modes import open_span
from unimodal.inference.outputs import GenerationTimeout
from unimodal.batch import PackedBatch
from unimodal.models.generation import GenerationSettings, SamplingSettings
from unimodal.models.attention import build_attention_mask

TOK = CharTokenizer()
GREEDY = {"temperature": 0.0}
# transformers may pick the framework's special tokens and the vocabulary padding rows; the engine
# never does in text mode, so the comparison suppresses them on the transformers side
NOT_TEXT = list(range(TOK.vocab_size, 320))


def encoder(model, bidirectional=()) -> Processor:
    return Processor(TOK, model.layout, feature_dim=FEATURE_DIM, add_eos=False, bidirectional=bidirectional)


def prompt(model, *parts, bidirectional=(), begin: str | None = None):
    doc = encoder(model, bidirectional).encode(Document([p if isinstance(p, Part) else Part("text", text=p) for p in parts]))
    return doc if begin is None else open_span(doc, model.layout, begin)


def text_ids(generation) -> list[int]:
    return [i for s in generation.segments if s.type == "text" for i in s.ids]


def test_greedy_batch_matches_transformers_generate():
    model = tiny_model()
    prompts = [prompt(model, "hello world"), prompt(model, "hi")]  # the second row is left-padded
    out = Engine(model, TOK).generate(prompts, GenerationSettings(text=GREEDY, max_new_tokens=10))
    for doc, gen in zip(prompts, out):
        ref = model.backbone.generate(torch.tensor(doc.ids)[None], max_new_tokens=10, do_sample=False, suppress_tokens=NOT_TEXT)
        assert text_ids(gen) == ref[0, len(doc) :].tolist()
        assert gen.finish_reason == "length" and gen.completion_tokens == 10 and gen.prompt_tokens == len(doc)


def test_each_row_is_handed_over_when_it_ends_while_the_others_go_on():
    model = tiny_model()
    prompts = [prompt(model, "long"), prompt(model, "short"), prompt(model, "mid")]
    rows = [GenerationSettings(text=GREEDY, max_new_tokens=n) for n in (9, 2, 5)]
    handed: list = []
    out = Engine(model, TOK).generate(prompts, rows, on_done=lambda index, generation: handed.append((index, generation)))
    assert [index for index, _ in handed] == [1, 2, 0]  # in the order the rows ended
    for index, generation in handed:
        assert generation.completion_tokens == rows[index].max_new_tokens and text_ids(generation) == text_ids(out[index])


def test_beam_search_matches_transformers_generate():
    model = tiny_model(seed=1)
    prompts = [prompt(model, "beam"), prompt(model, "a longer prompt")]
    settings = GenerationSettings(text={"num_beams": 3, "repetition_penalty": 1.3}, max_new_tokens=8)
    out = Engine(model, TOK).generate(prompts, settings)
    for doc, gen in zip(prompts, out):
        ref = model.backbone.generate(
            torch.tensor(doc.ids)[None], max_new_tokens=8, num_beams=3, do_sample=False, repetition_penalty=1.3, suppress_tokens=NOT_TEXT
        )
        expected = ref[0, len(doc) :].tolist()
        assert text_ids(gen) == [t for t in expected if t != TOK.eos_id]


def test_beam_search_ends_at_stop_strings_keeps_the_text_cap_streams_and_expires_per_row():
    import threading

    model = tiny_model(seed=1)
    engine = Engine(model, TOK)
    prompts = [prompt(model, "beam"), prompt(model, "a longer prompt")]
    beams = {"num_beams": 3, "repetition_penalty": 1.3}
    # the text cap is the budget: the same search as transformers' with max_new_tokens=3
    capped = engine.generate(prompts[:1], GenerationSettings(text=beams | {"max_tokens": 3}, max_new_tokens=8))[0]
    ref = model.backbone.generate(torch.tensor(prompts[0].ids)[None], max_new_tokens=3, num_beams=3, do_sample=False,
                                  repetition_penalty=1.3, suppress_tokens=NOT_TEXT)
    assert text_ids(capped) == ref[0, len(prompts[0]):].tolist() and capped.completion_tokens == 3
    assert capped.finish_reason == "length"
    # a hypothesis ends at the token that completes a stop string, counted up to there
    full = engine.generate(prompts[:1], GenerationSettings(text=beams, max_new_tokens=8))[0].segments[0].text
    stop = full[2:4]
    chunks: list = []
    stopped = engine.generate(prompts[:1], GenerationSettings(text=beams, max_new_tokens=8, stop=(stop,)),
                              on_text=lambda row, text: chunks.append((row, text)))[0]
    ids = stopped.segments[0].ids if stopped.segments else []
    assert stopped.finish_reason == "stop" and TOK.decode(ids).endswith(stop) and stopped.completion_tokens == len(ids) < 8
    assert stop not in (stopped.segments[0].text if stopped.segments else "")
    assert chunks == ([(0, stopped.segments[0].text)] if stopped.segments else [])  # a stream gets the text whole
    # a cancelled row leaves; the other's search is its own, with its own seed
    gone = threading.Event()
    gone.set()
    both = engine.generate(prompts, GenerationSettings(text=beams, max_new_tokens=8, seed=5), cancel=[gone, None])
    alone = engine.generate(prompts[1:], GenerationSettings(text=beams, max_new_tokens=8, seed=6))[0]
    assert both[0].finish_reason == "cancelled" and text_ids(both[1]) == text_ids(alone) and [g.seed for g in both] == [5, 6]
    with pytest.raises(GenerationTimeout, match="cancelled"):
        engine.generate(prompts, GenerationSettings(text=beams, max_new_tokens=8), cancel=gone)


def test_a_stop_string_completed_by_the_last_token_allowed_is_a_stop():
    model = tiny_model()
    bias_tokens(model, {4 + ord(c): 20.0 for c in "abcdefghijklmnopqrstuvwxyz"})  # one character per token
    engine = Engine(model, TOK)
    doc = prompt(model, "stream me")
    full = engine.generate([doc], GenerationSettings(text=GREEDY, max_new_tokens=12))[0].segments[0].text
    assert len(full) == 12
    # the shortest tail found nowhere before it: the twelfth token completes it
    stop = next(full[-n:] for n in range(1, 12) if full.index(full[-n:]) == 12 - n)
    for settings in (GenerationSettings(text=GREEDY, max_new_tokens=12, stop=(stop,)),
                     GenerationSettings(text=GREEDY | {"max_tokens": 12}, max_new_tokens=30, stop=(stop,)),
                     GenerationSettings(text=GREEDY, max_new_tokens=30, stop=(stop,))):
        handed: list = []
        gen = engine.generate([doc], settings, on_done=lambda row, generation: handed.append(generation))[0]
        assert (gen.finish_reason, gen.segments[0].text, gen.completion_tokens) == ("stop", full[: -len(stop)], 12)
        assert handed == [gen]  # what a server answers with, as soon as the row ends


def test_a_reply_the_model_ends_keeps_a_tail_that_only_began_a_stop_string():
    """Only a limit cuts off a tail that began a stop string (an end-of-turn marker cut in two):
    a reply the model ended with its end token keeps its last text whole, streamed or not."""
    model = tiny_model()
    bias_tokens(model, {4 + ord(c): 20.0 for c in "abcdefghijklmnopqrstuvwxyz"} | {TOK.eos_id: 20.15})  # a few letters, then the end
    engine = Engine(model, TOK)
    doc = prompt(model, "stream me")
    for text_settings in (GREEDY, {"num_beams": 2}):
        settings = GenerationSettings(text=text_settings, max_new_tokens=30)
        free = engine.generate([doc], settings)[0]
        text = free.segments[0].text
        assert free.finish_reason == "stop" and len(text) == free.completion_tokens > 0
        chunks: list[str] = []
        gen = engine.generate([doc], settings.replace(stop=(text[-1] + "\n\n",)), on_text=lambda row, t: chunks.append(t))[0]
        assert (gen.finish_reason, gen.segments[0].text, "".join(chunks)) == ("stop", text, text)


def test_whitespace_before_a_stop_string_is_dropped_streamed_or_not():
    """A template's end marker is tokenised as a text of its own, so SentencePiece gives it a
    leading space: every chat reply ended with one ("This is a handwritten five. "), in the
    terminal, the server's content and saved chats."""
    chunks: list[str] = []
    for seed in range(16):  # a model whose greedy text has a space between letters
        model = tiny_model(seed=seed)
        bias_tokens(model, {4 + ord(c): 20.0 for c in "abcd "})
        engine = Engine(model, TOK)
        doc = prompt(model, "stream me")
        full = engine.generate([doc], GenerationSettings(text=GREEDY, max_new_tokens=16))[0].segments[0].text
        at = next((i for i in range(1, 15) if full[i] == " " and " " not in full[i - 1] + full[i + 1]
                   and full.index(full[i + 1]) == i + 1), None)
        if at is not None:
            break
    assert at is not None, "no seed gave a text with a space before a stop string"
    settings = GenerationSettings(text=GREEDY, max_new_tokens=16, stop=(full[at + 1],))
    gen = engine.generate([doc], settings, on_text=lambda row, text: chunks.append(text))[0]
    assert (gen.finish_reason, gen.segments[0].text, "".join(chunks)) == ("stop", full[:at].rstrip(), full[:at].rstrip())


def test_seeded_sampling_is_reproducible():
    model = tiny_model()
    engine = Engine(model, TOK)
    prompts = [prompt(model, "seed"), prompt(model, "another")]
    run = lambda **kw: [text_ids(g) for g in engine.generate(prompts, GenerationSettings(max_new_tokens=8, **kw))]  # noqa: E731
    assert run(seed=3) == run(seed=3)
    assert run(seed=3) != run(seed=4)
    assert run(seed=5, text={"top_k": 1}) == run(text=GREEDY)
    assert engine.generate(prompts, GenerationSettings(max_new_tokens=2, seed=11))[0].seed == 11


def test_stop_strings_streaming_and_limits():
    model = tiny_model()
    engine = Engine(model, TOK)
    doc = prompt(model, "stream me")
    full = engine.generate([doc], GenerationSettings(text=GREEDY, max_new_tokens=12))[0].segments[0].text
    stop = full[4:6]
    chunks: list[str] = []
    gen = engine.generate([doc], GenerationSettings(text=GREEDY, max_new_tokens=12, stop=(stop,)), on_text=lambda row, t: chunks.append(t))[0]
    assert gen.finish_reason == "stop" and gen.segments[0].text == full[: full.index(stop)]
    assert "".join(chunks) == gen.segments[0].text
    # a reply the length limit cuts inside a stop string ends before it, as its stream did
    chunks.clear()
    cut = engine.generate([doc], GenerationSettings(text=GREEDY, max_new_tokens=12, stop=(full[-2:] + "\u2603",)),
                          on_text=lambda row, t: chunks.append(t))[0]
    assert cut.finish_reason == "length" and cut.segments[0].text == full[:-2] == "".join(chunks)
    capped = engine.generate([doc], GenerationSettings(text={"temperature": 0, "max_tokens": 3}, max_new_tokens=12))[0]
    assert capped.finish_reason == "length" and capped.completion_tokens == 3
    with pytest.raises(GenerationTimeout):
        engine.generate([doc], GenerationSettings(max_new_tokens=50, timeout_s=1e-9))
    with pytest.raises(ValueError, match="fills the context"):
        Engine(model, TOK, max_length=5).generate([doc])


def test_discrete_spans_follow_the_grammar_and_the_media_limit():
    model = tiny_model(code_ranges={"image": 16, "audio": 16})
    model.layout.code_layers["audio"] = 2
    layout = model.layout
    # script: text mode always wants an image, then end-of-sequence once images are used up
    bias_tokens(model, {layout.special_id("<|boi|>"): 50.0, TOK.eos_id: 40.0})
    spans = {"image": {"length": 4}, "audio": {"layers": 2, "min_length": 1, "max_length": 3}}
    engine = Engine(model, TOK, spans=spans)
    doc = prompt(model, "say it, then draw", begin="<|boa|>")
    gen = engine.generate([doc], GenerationSettings(text=GREEDY, image={"top_p": 0.9}, max_media=3, seed=0, max_new_tokens=64))[0]
    assert [s.type for s in gen.segments] == ["audio", "image", "image"]
    audio = gen.segments[0].data
    assert audio.shape[0] == 2 and 1 <= audio.shape[1] <= 3 and audio.max() < 8
    assert all(s.data.shape == (4,) and 0 <= s.data.min() and s.data.max() < 16 for s in gen.segments[1:])
    assert gen.finish_reason == "stop"
    # a reply too short for a whole image writes none
    short = engine.generate([prompt(model, "draw")], GenerationSettings(text=GREEDY, max_new_tokens=5))[0]
    assert short.segments == [] and short.finish_reason == "stop"


def test_each_rows_grammar_state_is_the_one_its_history_gives(monkeypatch):
    """The engine passes the span grammar each row's state from the span it tracks; at every
    sampling step of a mixed batch that opens many spans, that is the state the constraint reads
    from the row's whole history (kept here by a repetition penalty)."""
    from unimodal.inference.engine import _Run

    model = tiny_model(code_ranges={"image": 16, "audio": 16})
    model.layout.code_layers["audio"] = 2
    layout = model.layout
    bias_tokens(model, {layout.special_id("<|boi|>"): 3.0, layout.special_id("<|boa|>"): 3.0})
    engine = Engine(model, TOK, spans={"image": {"length": 4}, "audio": {"layers": 2, "min_length": 1, "max_length": 3}})
    tracked = _Run._grammar_states
    compared = []

    def checked(run, rows):
        states = tracked(run, rows)
        history = torch.where(run.valid, run.ids, engine.pad_id)
        assert states == [engine.constraint.state(history[r.slot].numpy()) for r in rows]
        compared.extend(states)
        return states

    monkeypatch.setattr(_Run, "_grammar_states", checked)
    docs = [prompt(model, "draw"), prompt(model, "say", begin="<|boa|>"), prompt(model, "a longer prompt here"), prompt(model, "x")]
    settings = GenerationSettings(text={"repetition_penalty": 1.1}, max_media=4, seed=3, max_new_tokens=40)
    generations = engine.generate(docs, settings)
    kinds = {state[0] for state in compared}
    assert {"outside", "image", "audio"} <= kinds, kinds
    assert sum(s.type != "text" for g in generations for s in g.segments) >= 4


def test_a_speech_span_ends_whole_within_its_cap_and_the_reply_budget():
    """A free-length span stops at the last frame that fits the modality's max_tokens (markers
    included) or the reply's budget: its end comes then, instead of a clip cut off or a cap
    overrun; and a reply that must open with a span its settings leave no room for is refused."""
    model = tiny_model(code_ranges={"audio": 16})
    model.layout.code_layers["audio"] = 2
    layout = model.layout
    audio_codes = range(layout.range_offset("audio"), layout.range_offset("audio") + 8)  # layer 0
    bias_tokens(model, {code: 30.0 for code in audio_codes} | {TOK.eos_id: 40.0})  # long clips, then the end
    engine = Engine(model, TOK, spans={"audio": {"layers": 2, "min_length": 1, "max_length": 40}})
    doc = prompt(model, "say it", begin="<|boa|>")
    free = engine.generate([doc], GenerationSettings(text=GREEDY, seed=0, max_media=1, max_new_tokens=200))[0]
    assert free.segments[0].data.shape == (2, 40)  # the bias alone runs to max_length
    for cap in (3, 9, 10, 20):
        gen = engine.generate([doc], GenerationSettings(text=GREEDY, audio={"max_tokens": cap}, seed=0, max_media=1, max_new_tokens=200))[0]
        frames = (cap - 1) // 2  # 2 layers of frames and the end (the begin token is the prompt's)
        assert gen.segments[0].data.shape == (2, frames) and gen.finish_reason == "stop", (cap, gen.segments[0].data.shape)
    # opened from text, the begin token counts too: 9 positions hold 3 frames, not 4
    bias_tokens(model, {layout.special_id("<|boa|>"): 60.0})
    from_text = engine.generate([prompt(model, "say it")], GenerationSettings(text=GREEDY, audio={"max_tokens": 9}, seed=0, max_media=1, max_new_tokens=200))[0]
    assert from_text.segments[0].data.shape == (2, 3)
    budget = engine.generate([doc], GenerationSettings(text=GREEDY, seed=0, max_media=1, max_new_tokens=11))[0]
    # the begin token is the prompt's: the reply's 11 positions are 2 x 5 codes and the end
    assert budget.segments[0].data.shape == (2, 5) and budget.finish_reason == "length"
    with pytest.raises(ValueError, match="must start with audio, which its settings leave no room for"):
        engine.generate([doc], GenerationSettings(max_media=0))
    with pytest.raises(ValueError, match="the rest of an audio span takes at least 3 positions"):
        engine.generate([doc], GenerationSettings(audio={"max_tokens": 2}))


def test_guidance_at_scale_zero_follows_the_unconditional_prompt():
    """With cfg_scale 0 the guided output is the unconditional row's own: a plain generation from
    the unconditional prompt must give the same media (discrete, causal and bidirectional)."""
    for kind in ("discrete", "causal", "bidirectional"):
        if kind == "discrete":
            model, spans = tiny_model(code_ranges={"image": 16}), {"image": {"length": 4}}
        else:
            model, spans = tiny_model(continuous={"image": {"attention": kind, "noise": 0.0}}), {}
        bidirectional = ("image",) if kind == "bidirectional" else ()
        engine = Engine(model, TOK, spans=spans)
        uncond = prompt(model, "an image.", bidirectional=bidirectional)
        cond = prompt(model, "a very specific image of a cat", begin="<|boi|>", bidirectional=bidirectional)
        base = GenerationSettings(text=GREEDY, max_new_tokens=8, seed=1, max_media=1)
        plain = engine.generate([open_span(uncond, model.layout, "<|boi|>")], base.replace(image=SamplingSettings(temperature=0)))[0]
        guided = engine.generate([cond], base.replace(image=SamplingSettings(temperature=0, cfg_scale=0.0)), unconditional=uncond)[0]
        unguided = engine.generate([cond], base.replace(image=SamplingSettings(temperature=0)))[0]
        assert guided.segments[0].type == "image", kind
        np.testing.assert_allclose(guided.segments[0].data, plain.segments[0].data, atol=1e-4, err_msg=kind)
        assert not np.allclose(guided.segments[0].data, unguided.segments[0].data), kind
    with pytest.raises(ValueError, match="unconditional prompt"):
        engine.generate([cond], base.replace(image={"cfg_scale": 3.0}))


def _reference_hidden(model, ids: list[int], slots: dict[int, torch.Tensor], blocks: list[int]) -> torch.Tensor:
    """Final hidden states of one whole sequence, recomputed without a cache; ``slots`` maps a
    position to its input embedding."""
    with torch.no_grad():
        embeds = model.backbone.get_input_embeddings()(torch.tensor(ids))
        for position, embedding in slots.items():
            embeds[position] = embedding
        mask = build_attention_mask(torch.ones(1, len(ids), dtype=torch.long), torch.tensor([blocks]))
        out = model.backbone.get_decoder()(inputs_embeds=embeds[None], attention_mask=mask, position_ids=torch.arange(len(ids))[None])
        return out.last_hidden_state[0]


@pytest.mark.parametrize("kind", ["causal", "bidirectional"])
def test_continuous_images_match_uncached_recomputation(kind):
    model = tiny_model(continuous={"image": {"attention": kind, "noise": 0.0, "slots": 3}})
    layout, fake = model.layout, model.continuous["image"]
    boi, eoi, media = (layout.special_id(t) for t in ("<|boi|>", "<|eoi|>", "<|media|>"))
    bias_tokens(model, {boi: 50.0})
    bidirectional = ("image",) if kind == "bidirectional" else ()
    picture = Part("image", data=np.random.default_rng(0).normal(size=(3, FEATURE_DIM)).astype(np.float32))
    docs = [prompt(model, "look", picture, "now draw", bidirectional=bidirectional), prompt(model, "draw", bidirectional=bidirectional)]
    settings = GenerationSettings(text=GREEDY, max_media=1, max_new_tokens=12, seed=7)
    out = Engine(model, TOK).generate(docs, settings)
    for row, (doc, gen) in enumerate(zip(docs, out)):
        assert [s.type for s in gen.segments] == ["image", "text"] and gen.finish_reason == "length"
        ids, blocks = list(doc.ids), list(doc.block)
        embed = lambda f: fake.embed_clean(f).detach()  # noqa: E731
        slots = {int(p): embed(torch.from_numpy(f)) for p, f in zip(np.flatnonzero(doc.continuous), doc.features)}
        ids.append(boi)
        blocks.append(-1)
        image = torch.from_numpy(gen.segments[0].data)
        start = len(ids)
        if kind == "bidirectional":  # replay the denoiser, alone, against an uncached backbone
            prefix, prefix_blocks = list(ids), list(blocks)

            def run_backbone(x):
                trial = {**slots, **{start + k: x[0, k] for k in range(3)}}
                return _reference_hidden(model, prefix + [media] * 3, trial, prefix_blocks + [9] * 3)[None, start:]

            alone = Engine(model, TOK).generate([doc], settings)[0].segments[0].data
            expected = fake.denoise_block(run_backbone, 1, cfg_scale=1.0, steps=None, generator=torch.Generator().manual_seed(7))
            torch.testing.assert_close(torch.from_numpy(alone), expected[0], atol=1e-4, rtol=1e-4)
        for k in range(3):
            if kind == "causal":
                hidden = _reference_hidden(model, ids, slots, blocks)[-1]
                torch.testing.assert_close(image[k], fake.head(hidden).detach(), atol=1e-4, rtol=1e-4)
            slots[len(ids)] = embed(image[k])
            ids.append(media)
            blocks.append(9 if kind == "bidirectional" else -1)
        ids.append(eoi)
        blocks.append(-1)
        for token in gen.segments[1].ids:  # the text after the image follows from the right cache
            logits = model.logits(_reference_hidden(model, ids, slots, blocks)[-1])
            assert token == int(logits[: TOK.vocab_size].argmax())
            ids.append(token)
            blocks.append(-1)


@pytest.mark.parametrize("family", ["orthus", "llamafusion"])
def test_real_image_modalities_generate_with_guidance(family):
    """Issue 3's modalities through the engine: batched prompts, guidance pairs, a few sampler
    steps; the reply holds whole images and the run is reproducible."""
    model = family_model(family)
    bias_tokens(model, {model.layout.special_id("<|boi|>"): 50.0})  # the second prompt opens its image from text
    bidirectional = ("image",) if family == "llamafusion" else ()
    engine = Engine(model, TOK)
    docs = [prompt(model, "a red square", begin="<|boi|>", bidirectional=bidirectional), prompt(model, "a cat", bidirectional=bidirectional)]
    uncond = prompt(model, "", bidirectional=bidirectional)
    settings = GenerationSettings(text=GREEDY, image={"cfg_scale": 3.0, "steps": 2}, max_media=1, max_new_tokens=10, seed=0)
    first = engine.generate(docs, settings, unconditional=uncond)
    again = engine.generate(docs, settings, unconditional=uncond)
    for a, b in zip(first, again):
        assert a.segments[0].type == "image" and a.segments[0].data.shape == (4, FEATURE_DIM)
        assert np.isfinite(a.segments[0].data).all()
        np.testing.assert_array_equal(a.segments[0].data, b.segments[0].data)
    assert not np.allclose(first[0].segments[0].data, first[1].segments[0].data)


@pytest.mark.parametrize("family", ["orthus", "llamafusion"])
def test_text_after_an_image_matches_the_training_forward(family):
    """The cache after a generated image (committed slots, routed experts) gives the same next
    tokens as one uncached forward of the whole sequence through ``UnifiedModel.hidden_states``."""
    model = family_model(family)
    layout = model.layout
    bidirectional = ("image",) if family == "llamafusion" else ()
    doc = prompt(model, "draw", begin="<|boi|>", bidirectional=bidirectional)
    gen = Engine(model, TOK).generate([doc], GenerationSettings(text=GREEDY, image={"steps": 2}, max_media=1, max_new_tokens=12, seed=0))[0]
    assert [s.type for s in gen.segments][:1] == ["image"]
    features = gen.segments[0].data
    after = [i for s in gen.segments[1:] for i in s.ids] + ([TOK.eos_id] if gen.finish_reason == "stop" else [])
    slots = len(features)
    ids = list(doc.ids) + [layout.special_id("<|media|>")] * slots + [layout.special_id("<|eoi|>")] + after
    n = len(ids)
    image_at = np.arange(len(doc), len(doc) + slots)
    modality = np.zeros(n, np.int64)
    modality[len(doc) - 1 : len(doc) + slots + 1] = 1  # <|boi|>, slots, <|eoi|> are image positions
    block = np.full(n, -1, np.int64)
    if bidirectional:
        block[image_at] = 0
    continuous = np.zeros(n, bool)
    continuous[image_at] = True
    as_batch = lambda a: torch.from_numpy(np.asarray(a))[None]  # noqa: E731
    batch = PackedBatch(
        input_ids=as_batch(np.asarray(ids, np.int64)), modality_ids=as_batch(modality), position_ids=torch.arange(n)[None],
        doc_ids=torch.ones(1, n, dtype=torch.long), block_ids=as_batch(block), labels=torch.full((1, n), -100),
        target_mask=torch.zeros(1, n, dtype=torch.bool), continuous_mask=as_batch(continuous), features=torch.from_numpy(features),
    )
    with torch.no_grad():
        logits = model.logits(model.hidden_states(batch)[0])
    eoi_at = len(doc) + slots  # predicts the first token after the image
    for k, token in enumerate(after):
        allowed = logits[eoi_at + k].clone()
        allowed[layout.text_size :] = float("-inf")  # specials and codes are forbidden in text mode
        assert token == int(allowed.argmax()), (family, k)


@pytest.mark.parametrize("kind", ["causal", "bidirectional"])
def test_a_bf16_backbone_drives_fp32_image_heads(kind):
    model = tiny_model(continuous={"image": {"attention": kind}})
    model.backbone.to(torch.bfloat16)
    bidirectional = ("image",) if kind == "bidirectional" else ()
    docs = [prompt(model, "draw", begin="<|boi|>", bidirectional=bidirectional)]
    gen = Engine(model, TOK).generate(docs, GenerationSettings(image={"cfg_scale": 2.0}, max_new_tokens=6, seed=0), unconditional=prompt(model, ""))[0]
    assert gen.segments[0].type == "image" and gen.segments[0].data.dtype == np.float32


def injected_clock(monkeypatch):
    """A clock the engine and its deadlines read instead of time.monotonic(): tests advance it, so
    deadline tests count steps instead of racing a loaded CPU."""
    from types import SimpleNamespace

    from unimodal.inference import engine as engine_module
    from unimodal.inference import outputs

    clock = SimpleNamespace(now=0.0)
    fake_time = SimpleNamespace(monotonic=lambda: clock.now)
    monkeypatch.setattr(engine_module, "time", fake_time)
    monkeypatch.setattr(outputs, "time", fake_time)
    return clock


def timed_calls(module, clock, seconds: float = 0.01) -> list[int]:
    """Make every call of ``module`` take ``seconds`` of the injected clock; the list counts them."""
    calls: list[int] = []

    def timed(*args, **kwargs):
        calls.append(1)
        clock.now += seconds
        return type(module).forward(module, *args, **kwargs)

    module.forward = timed
    return calls


def test_a_deadline_stops_per_token_diffusion_between_sampler_steps(monkeypatch):
    """Orthus samples each image slot with many head steps: the deadline is read at every step,
    not only between slots, so a huge `steps` cannot hold the model past it. Each head step (its
    input layer runs once a step) takes 0.01 s of the injected clock; the deadline is 0.05 s."""
    clock = injected_clock(monkeypatch)
    model = family_model("orthus")
    calls = timed_calls(model.continuous["image"].head.input, clock)
    doc = prompt(model, "a square", begin="<|boi|>")
    settings = GenerationSettings(text=GREEDY, image={"steps": 1000}, max_media=1, max_new_tokens=8, timeout_s=0.05)
    with pytest.raises(GenerationTimeout):
        Engine(model, TOK).generate([doc], settings)
    assert 5 <= len(calls) <= 6  # the steps within the deadline, then the one that crossed it; one slot alone: 1000


def test_a_deadline_stops_bidirectional_diffusion_between_denoising_passes(monkeypatch):
    """LlamaFusion denoises a whole image with one backbone pass per step: the deadline is read at
    every pass, so a huge `steps` cannot hold the model past it (issue 14's first probe). The
    clock is injected: each pass takes 0.01 s of it, the deadline is 0.05 s."""
    clock = injected_clock(monkeypatch)
    model = family_model("llamafusion")
    calls = timed_calls(model.continuous["image"].output_adapter, clock)
    doc = prompt(model, "a square", begin="<|boi|>", bidirectional=("image",))
    settings = GenerationSettings(text=GREEDY, image={"steps": 1000}, max_media=1, max_new_tokens=8, timeout_s=0.05)
    with pytest.raises(GenerationTimeout):
        Engine(model, TOK).generate([doc], settings)
    assert 5 <= len(calls) <= 6  # the passes within the deadline, then the one that crossed it; alone: 1000


@pytest.mark.parametrize("family", ["orthus", "llamafusion"])
def test_each_row_keeps_its_settings_and_seed_in_a_mixed_batch(family):
    """A server batches requests that differ in settings, seeds and media: every row must write
    the reply it writes alone (its own sampling settings, guidance, sampler steps and noise)."""
    model = family_model(family)
    bias_tokens(model, {model.layout.special_id("<|boi|>"): 50.0})  # text rows open an image when they may
    bidirectional = ("image",) if family == "llamafusion" else ()
    engine = Engine(model, TOK)
    uncond = prompt(model, "", bidirectional=bidirectional)
    base = GenerationSettings(max_new_tokens=10, max_media=1)
    rows = [
        (prompt(model, "a red square", begin="<|boi|>", bidirectional=bidirectional), base.replace(image={"cfg_scale": 3.0, "steps": 2}, seed=5)),
        (prompt(model, "words only", bidirectional=bidirectional), base.replace(temperature=0.9, max_media=0, seed=7)),
        (prompt(model, "a blue one", begin="<|boi|>", bidirectional=bidirectional), base.replace(image={"steps": 3}, seed=1)),
        (prompt(model, "draw", bidirectional=bidirectional), base.replace(text=GREEDY, image={"steps": 2}, seed=3)),
    ]
    batched = engine.generate([doc for doc, _ in rows], [settings for _, settings in rows], unconditional=uncond)
    assert [g.seed for g in batched] == [5, 7, 1, 3]
    kinds = [[s.type for s in g.segments] for g in batched]
    assert kinds[1] == ["text"] and kinds[0][0] == kinds[2][0] == "image" and "image" in kinds[3]
    for (doc, settings), together in zip(rows, batched):
        alone = engine.generate([doc], settings, unconditional=uncond)[0]
        assert [s.type for s in alone.segments] == [s.type for s in together.segments]
        assert text_ids(alone) == text_ids(together)
        for a, b in zip(alone.segments, together.segments):
            if a.type == "image":
                np.testing.assert_allclose(a.data, b.data, atol=1e-4)


@pytest.mark.parametrize("family", ["orthus", "llamafusion"])
def test_only_rows_that_guide_have_a_partner_and_find_it_after_rows_leave(family, monkeypatch):
    """Every row in the cache is computed at every step: the batch holds the unconditional prompt
    once, a row gets a partner copied from it when a guided span opens, and the partner leaves when
    the span closes. The first row ends first, so the partners move up in the cache mid-span;
    every row still writes what it writes alone."""
    from unimodal.inference.cache import KVCache

    model = family_model(family)
    bias_tokens(model, {model.layout.special_id("<|boi|>"): 50.0})
    with torch.no_grad():  # a fresh head's zero-initialised layers ignore the hidden state, and so the partner
        for param in model.continuous["image"].parameters():
            param.add_(0.1 * torch.randn_like(param))
    bidirectional = ("image",) if family == "llamafusion" else ()
    engine = Engine(model, TOK)
    uncond = prompt(model, "", bidirectional=bidirectional)
    base = GenerationSettings(max_new_tokens=10, max_media=1)
    rows = [
        (prompt(model, "hi", bidirectional=bidirectional), base.replace(text=GREEDY, max_new_tokens=2, max_media=0, seed=2)),
        (prompt(model, "a red square", begin="<|boi|>", bidirectional=bidirectional), base.replace(image={"cfg_scale": 3.0, "steps": 2}, seed=5)),
        (prompt(model, "draw", begin="<|boi|>", bidirectional=bidirectional), base.replace(image={"steps": 2}, seed=3)),
        # a repetition penalty reads the row's token history, which moves up with it
        (prompt(model, "a blue one", begin="<|boi|>", bidirectional=bidirectional),
         base.replace(image={"cfg_scale": 2.0}, text={"temperature": 0.0, "repetition_penalty": 1.5}, seed=1)),
    ]
    sizes, steps = [], []
    made, step = KVCache.__init__, KVCache.step

    def counted(self, model, docs, pad_id):
        sizes.append(len(docs))
        made(self, model, docs, pad_id)

    def stepped(self, embeds, *args, **kwargs):
        steps.append(embeds.shape[0])
        return step(self, embeds, *args, **kwargs)

    monkeypatch.setattr(KVCache, "__init__", counted)
    monkeypatch.setattr(KVCache, "step", stepped)
    batched = engine.generate([doc for doc, _ in rows], [settings for _, settings in rows], unconditional=uncond)
    assert sizes == [5]  # four prompts and the unconditional one
    assert max(steps) == 7 and steps[-1] == 4, steps  # two partners at most; none once the spans have closed
    assert len(text_ids(batched[0])) == 2 and all(g.segments[0].type == "image" for g in batched[1:])
    for (doc, settings), together in zip(rows, batched):
        alone = engine.generate([doc], settings, unconditional=uncond)[0]
        assert [s.type for s in alone.segments] == [s.type for s in together.segments]
        assert text_ids(alone) == text_ids(together)
        for a, b in zip(alone.segments, together.segments):
            if a.type == "image":
                np.testing.assert_allclose(a.data, b.data, atol=1e-4)


def test_a_row_past_its_deadline_or_cancelled_leaves_the_batch_and_the_others_go_on():
    import threading

    model = tiny_model()
    engine = Engine(model, TOK)
    docs = [prompt(model, "late"), prompt(model, "on time")]
    settings = GenerationSettings(text=GREEDY, max_new_tokens=12)
    alone = engine.generate(docs[1:], settings)[0]
    late = engine.generate(docs, [settings.replace(timeout_s=1e-9), settings])
    assert late[0].finish_reason == "timeout" and late[0].completion_tokens == 0
    assert text_ids(late[1]) == text_ids(alone) and late[1].finish_reason == alone.finish_reason
    gone = threading.Event()
    gone.set()
    cancelled = engine.generate(docs, settings, cancel=[gone, None])
    assert cancelled[0].finish_reason == "cancelled" and text_ids(cancelled[1]) == text_ids(alone)
    with pytest.raises(GenerationTimeout, match="cancelled"):  # nobody left to answer
        engine.generate(docs, settings, cancel=gone)


def test_a_row_that_expires_inside_the_diffusion_head_leaves_and_the_others_draw_on(monkeypatch):
    """Per-token diffusion reads every row's clock at each sampler step; a row past its deadline
    leaves mid-image (here inside a head call it shares with the other row, which asked for 2
    steps) and the call runs again without it, from the other row's generator state."""
    model = family_model("orthus")
    engine = Engine(model, TOK)
    docs = [prompt(model, "a square", begin="<|boi|>"), prompt(model, "a circle", begin="<|boi|>")]
    base = GenerationSettings(text=GREEDY, max_media=1, max_new_tokens=8, seed=0)
    settings = [base.replace(image={"steps": 1000}, timeout_s=0.05), base.replace(image={"steps": 2})]
    alone = engine.generate(docs[1:], settings[1])[0]
    calls = timed_calls(model.continuous["image"].head.input, injected_clock(monkeypatch))
    out = engine.generate(docs, settings)
    assert out[0].finish_reason == "timeout" and not out[0].segments
    assert 5 + 8 <= len(calls) <= 6 + 8  # the shared calls within the deadline, then the other row's 4 slots x 2 steps
    assert out[1].segments[0].type == "image"
    np.testing.assert_allclose(out[1].segments[0].data, alone.segments[0].data, atol=1e-4)


def test_a_row_that_expires_while_its_image_is_denoised_writes_nothing_after(monkeypatch):
    """A bidirectional image is denoised before the step's tokens are chosen: a row that passes
    its deadline there has ended, and samples no token after its end (which would reach its
    stream after the timeout and count as one more completion token)."""
    model = family_model("llamafusion")
    engine = Engine(model, TOK)
    docs = [prompt(model, shape, begin="<|boi|>", bidirectional=("image",)) for shape in ("a square", "a circle")]
    base = GenerationSettings(text=GREEDY, max_media=1, max_new_tokens=8, seed=0)
    settings = [base.replace(image={"steps": 1000}, timeout_s=0.05), base.replace(image={"steps": 2})]
    timed_calls(model.continuous["image"].output_adapter, injected_clock(monkeypatch))
    streamed = []
    out = engine.generate(docs, settings, on_text=lambda row, text: streamed.append(row))
    assert out[0].finish_reason == "timeout" and out[0].completion_tokens == 0 and 0 not in streamed
    assert out[1].segments[0].type == "image"


def test_an_understanding_only_adapter_reads_prompt_features_as_the_training_forward_does():
    """A LinearAdapter has no embed_clean: the engine embeds prompt features with its training
    ``embed``, and the first greedy token is the uncached forward's."""
    from unimodal.models.unified import LinearAdapter, UnifiedModel

    base = tiny_model()
    model = UnifiedModel(base.backbone, base.layout, {"image": LinearAdapter(base.backbone.config.hidden_size, FEATURE_DIM)}).eval()
    features = np.random.default_rng(0).normal(size=(3, FEATURE_DIM)).astype(np.float32)
    doc = prompt(model, "look", Part("image", media=0, data=features), "what?")
    gen = Engine(model, TOK).generate([doc], GenerationSettings(text=GREEDY, max_new_tokens=4, seed=0))[0]
    as_batch = lambda a: torch.from_numpy(np.asarray(a))[None]  # noqa: E731
    n = len(doc)
    batch = PackedBatch(
        input_ids=as_batch(doc.ids.astype(np.int64)), modality_ids=as_batch(doc.modality.astype(np.int64)),
        position_ids=torch.arange(n)[None], doc_ids=torch.ones(1, n, dtype=torch.long), block_ids=as_batch(doc.block.astype(np.int64)),
        labels=torch.full((1, n), -100), target_mask=torch.zeros(1, n, dtype=torch.bool), continuous_mask=as_batch(doc.continuous),
        features=torch.from_numpy(doc.features),
    )
    with torch.no_grad():
        logits = model.logits(model.hidden_states(batch)[0])[-1]
    logits[model.layout.text_size :] = float("-inf")
    assert text_ids(gen)[0] == int(logits.argmax())
