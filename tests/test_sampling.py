"""Token choice: the top-k and nucleus bounds, and greedy rows."""

import torch

from unimodal.inference.sampling import choose, filter_top_k_top_p
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
    import pytest

    from unimodal.models.generation import MAX_STOP_CHARS, MAX_STOP_STRINGS, GenerationSettings

    assert GenerationSettings(stop=["x" * MAX_STOP_CHARS] * MAX_STOP_STRINGS).stop[0] == "x" * MAX_STOP_CHARS
    for stop in (["x" * (MAX_STOP_CHARS + 1)], ["x"] * (MAX_STOP_STRINGS + 1)):
        with pytest.raises(ValueError, match="stop takes at most 16 strings of at most 1000 characters each"):
            GenerationSettings(stop=stop)
