"""Trainable-parameter policy and the learning-rate schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unimodal.training.optim import warmup_cosine
from unimodal.training.policy import PatternMatchError, apply_trainable_policy, parameter_counts


def toy() -> nn.Module:
    return nn.ModuleDict(
        {"backbone": nn.ModuleDict({"embed_tokens": nn.Embedding(8, 4), "layer": nn.Linear(4, 4)}), "head": nn.Linear(4, 2)}
    )


def test_patterns_select_modules_and_parameters():
    model = toy()
    apply_trainable_policy(model, ["head", "backbone.layer.weight"], frozen=[])
    n_train, n_total = parameter_counts(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias", "backbone.layer.weight"}
    assert n_train == 10 + 16 and n_total == 32 + 20 + 10


def test_frozen_wins_and_none_means_everything():
    model = toy()
    apply_trainable_policy(model, None, frozen=["backbone.*"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}


def test_a_pattern_that_matches_nothing_lists_near_matches():
    with pytest.raises(PatternMatchError, match=r"'backbone.embed_token' matches no parameter; near matches: .*backbone.embed_tokens"):
        apply_trainable_policy(toy(), ["backbone.embed_token"], frozen=[])


def test_warmup_then_cosine_to_the_floor():
    values = [warmup_cosine(s, warmup=10, total=110, min_ratio=0.1) for s in range(111)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_zero3_partitioned_parameters_are_counted_by_their_full_size():
    layer = nn.Linear(4, 4, bias=False)
    layer.weight.ds_numel = 16  # what DeepSpeed sets when zero.Init partitions the parameter
    layer.weight.data = torch.empty(0)
    apply_trainable_policy(layer, None, frozen=[])
    assert parameter_counts(layer) == (16, 16)
