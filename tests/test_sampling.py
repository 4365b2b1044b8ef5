"""Token choice: the top-k and nucleus bounds, and greedy rows."""

import pytest
import torch

from unimodal.inference.sampling import choose, draw, filter_top_k_top_p
from unimodal.models.generation import SamplingSettings


def kept(logits: torch.Tensor, top_k: int, top_p: float) -> list[bool]:
    return torch.isfinite(filter_top_k_top_p(logits, top_k, top_p))[0].tolist()


def test_the_nucleus_keeps_the_fewest_tokens_that_reach_top_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert kept(logits, 0, 0.45) == [True, False, False, False]
    assert kept(logits, 0, 0.6) == [True, True, False, False]
    assert kept(logits, 0, 0.9) == [True, True, True, False]
    assert kept(logits, 0, 1.0) == [True, True, True, True]
    assert kept(logits, 0, 1e-6) == [True, False, False, False]  # the most likely token always stays
    assert kept(logits, 2, 0.7) == [True, True, False, False]  # top-k first, then the nucleus of what is left


def test_draws_stay_inside_the_filters_and_greedy_takes_the_argmax():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(1))
    top3 = set(logits[0].topk(3).indices.tolist())
    for seed in range(30):
        generators = [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)]
        assert set(choose(logits, SamplingSettings(top_k=3), generators).tolist()[:1]) <= top3
        assert choose(logits, SamplingSettings(top_k=1, temperature=1.5), generators).tolist() == logits.argmax(-1).tolist()
    assert choose(logits, SamplingSettings(temperature=0), []).tolist() == logits.argmax(-1).tolist()
    # top_p 0, which OpenAI's API takes: only the most likely token, whatever the draw
    for seed in range(5):
        generators = [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)]
        assert choose(logits, SamplingSettings(top_p=0.0, temperature=1.5), generators).tolist() == logits.argmax(-1).tolist()


def test_stop_strings_are_bounded_in_number_and_length():
    """Every step looks for each stop string at the reply's end, at a cost growing with the square
    of its length: a megabyte of stop strings froze the server's model worker."""
    from unimodal.models.generation import MAX_STOP_CHARS, MAX_STOP_STRINGS, GenerationSettings

    assert GenerationSettings(stop=["x" * MAX_STOP_CHARS] * MAX_STOP_STRINGS).stop[0] == "x" * MAX_STOP_CHARS
    for stop in (["x" * (MAX_STOP_CHARS + 1)], ["x"] * (MAX_STOP_STRINGS + 1)):
        with pytest.raises(ValueError, match="stop takes at most 16 strings of at most 1000 characters each"):
            GenerationSettings(stop=stop)


MIXED = [SamplingSettings(temperature=0), SamplingSettings(temperature=0.8), SamplingSettings(temperature=0.5, top_p=0.9),
         SamplingSettings(top_p=0.7), SamplingSettings(top_k=20, top_p=0.7), SamplingSettings(top_k=5, temperature=1.3),
         SamplingSettings(top_p=0.0, temperature=1.5)]


def test_a_batch_of_mixed_settings_draws_what_each_row_draws_alone():
    """A server's batch filters rows of different settings in one pass: each row must still get
    what it gets alone with its own settings and generator, and leave its generator where that
    left it (the row's next draw depends on it)."""
    logits = torch.randn(len(MIXED), 300, generator=torch.Generator().manual_seed(0)) * 3
    logits[:, 200:] = float("-inf")  # what a span grammar forbids
    for seed in range(20):
        together = [torch.Generator().manual_seed(seed * 10 + i) for i in range(len(MIXED))]
        alone = [torch.Generator().manual_seed(seed * 10 + i) for i in range(len(MIXED))]
        batch = choose(logits, MIXED, together).tolist()
        assert batch == [choose(logits[i : i + 1], s, [alone[i]]).item() for i, s in enumerate(MIXED)]
        assert all(torch.equal(torch.rand(2, generator=a), torch.rand(2, generator=b)) for a, b in zip(together, alone))
    ks, ps = [s.top_k for s in MIXED], [s.top_p for s in MIXED]
    each = torch.cat([filter_top_k_top_p(logits[i : i + 1], k, p) for i, (k, p) in enumerate(zip(ks, ps))])
    assert torch.equal(filter_top_k_top_p(logits, ks, ps), each)


def test_a_draw_is_the_id_torch_multinomial_draws_from_the_same_generator():
    """``draw`` takes multinomial's own one-sample rule for all rows at once: the same ids, and
    the generators advanced alike (seeded replies written before stay the same)."""
    probs = (torch.randn(5, 1000, generator=torch.Generator().manual_seed(1)) * 4).softmax(-1)
    for seed in range(20):
        ours = [torch.Generator().manual_seed(seed + i) for i in range(5)]
        torchs = [torch.Generator().manual_seed(seed + i) for i in range(5)]
        expected = [torch.multinomial(row, 1, generator=g).item() for row, g in zip(probs, torchs)]
        assert draw(probs, ours).tolist() == expected
        assert all(torch.equal(torch.rand(2, generator=a), torch.rand(2, generator=b)) for a, b in zip(ours, torchs))
    with pytest.raises(ValueError, match="no token left to draw"):
        draw(torch.full((1, 4), float("-inf")).softmax(-1), [torch.Generator()])
