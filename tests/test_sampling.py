"""Token choice: one call for rows with different settings, each row as it would be alone."""

import pytest
import torch

from unimodal.inference.sampling import apply_repetition_penalty, choose, filter_top_k_top_p
from unimodal.models.generation import SamplingSettings

MIXED = [
    SamplingSettings(temperature=0),
    SamplingSettings(temperature=0.8),
    SamplingSettings(top_k=5),
    SamplingSettings(temperature=0.5, top_p=0.9),
    SamplingSettings(top_k=3, top_p=0.5, temperature=1.5),
    SamplingSettings(),
]


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_each_row_draws_in_a_mixed_batch_what_it_draws_alone():
    logits = torch.randn(len(MIXED), 50, generator=torch.Generator().manual_seed(0))
    for trial in range(20):
        seeds = [100 * trial + i for i in range(len(MIXED))]
        together = choose(logits, MIXED, generators(seeds)).tolist()
        alone = [choose(logits[i : i + 1], [s], generators([seeds[i]])).item() for i, s in enumerate(MIXED)]
        assert together == alone


def test_greedy_rows_take_the_argmax_and_filters_bound_the_draws():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    top3 = set(logits[2].topk(3).indices.tolist())
    settings = [SamplingSettings(temperature=0), SamplingSettings(top_k=1), SamplingSettings(top_k=3), SamplingSettings(top_p=1e-6)]
    for seed in range(30):
        chosen = choose(logits, settings, generators([seed] * 4)).tolist()
        assert chosen[0] == logits[0].argmax().item()
        assert chosen[1] == logits[1].argmax().item()
        assert chosen[2] in top3
        assert chosen[3] == logits[3].argmax().item()


def test_the_nucleus_keeps_the_fewest_tokens_that_reach_top_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])

    def kept(p: float) -> list[bool]:
        return torch.isfinite(filter_top_k_top_p(probs.log(), torch.tensor([0]), torch.tensor([p])))[0].tolist()

    assert kept(0.5) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.9) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]
    # top-k first, then the nucleus of what is left
    both = filter_top_k_top_p(probs.log(), torch.tensor([2]), torch.tensor([0.7]))
    assert torch.isfinite(both)[0].tolist() == [True, True, False, False]


def test_a_penalty_per_row_leaves_rows_with_none_unchanged():
    scores = torch.tensor([[2.0, -1.0, 0.5], [2.0, -1.0, 0.5]])
    ids, valid = torch.tensor([[0, 1], [0, 1]]), torch.ones(2, 2, dtype=torch.bool)
    out = apply_repetition_penalty(scores, ids, valid, torch.tensor([[2.0], [1.0]]))
    assert out.tolist() == [[1.0, -2.0, 0.5], [2.0, -1.0, 0.5]]


def test_rows_settings_and_generators_must_agree():
    with pytest.raises(ValueError, match="2 rows need as many settings and generators, got 1 and 2"):
        choose(torch.zeros(2, 5), [SamplingSettings()], generators([0, 1]))
