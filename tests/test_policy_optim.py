"""Trainable-parameter policy and the learning-rate schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unimodal.training.optim import OptimizerConfig, build_optimizer, warmup_cosine
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


TINY_CHAMELEON = {
    "model_type": "chameleon", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 128, "max_position_embeddings": 256, "vocabulary_map": {"<image>": 3},
    "vq_config": {"embed_dim": 8, "num_embeddings": 16, "latent_channels": 8, "resolution": 16, "base_channels": 32,
                  "channel_multiplier": [1, 1], "num_res_blocks": 1},
}


def test_a_backbone_part_the_language_path_never_runs_stays_frozen_when_everything_trains():
    """Orthus post-training trains every parameter; Chameleon's VQ-VAE inside the backbone gets no
    gradient, which would fail DDP on its second step and hold optimiser state for nothing."""
    from unimodal.modalities.vocab import VocabLayout
    from unimodal.models.backbone import BackboneConfig
    from unimodal.training.module import UnimodalModule

    module = UnimodalModule(BackboneConfig(config=dict(TINY_CHAMELEON), attention="sdpa"), vocab=VocabLayout(100).to_dict())
    module.configure_model()
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert not {n for n in trainable if ".vqmodel." in n}
    ids = torch.randint(0, 100, (1, 8))
    module.model.backbone(input_ids=ids, labels=ids).loss.backward()
    assert {n for n, p in module.model.named_parameters() if p.requires_grad and p.grad is None} == set()


def test_a_pattern_that_matches_nothing_lists_near_matches():
    with pytest.raises(PatternMatchError, match=r"'backbone.embed_token' matches no parameter; near matches: .*backbone.embed_tokens"):
        apply_trainable_policy(toy(), ["backbone.embed_token"], frozen=[])


def test_frozen_with_lora_and_no_trainable_is_refused_since_it_would_change_nothing():
    """With LoRA and no ``trainable`` every base weight is frozen: ``frozen`` there was never read,
    so a misspelt pattern passed unseen where anywhere else it is an error."""
    from unimodal.models.backbone import BackboneConfig
    from unimodal.models.lora import LoraSettings
    from unimodal.modalities.vocab import VocabLayout
    from unimodal.training.module import UnimodalModule

    module = UnimodalModule(BackboneConfig(config=dict(TINY_CHAMELEON), attention="sdpa"), vocab=VocabLayout(100).to_dict(),
                            lora=LoraSettings(r=2), frozen=["backbone.embed_token"])
    with pytest.raises(ValueError, match=r"frozen=\['backbone.embed_token'\] does nothing here: with LoRA and no model.trainable"):
        module.configure_model()


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


def test_zero3_partitioned_matrices_keep_their_weight_decay():
    """Under zero.Init every parameter is an empty 1-D placeholder: by ``ndim`` alone, a ZeRO-3 run
    would train every matrix without weight decay, unlike the same recipe on DDP or FSDP."""
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    for param in model.parameters():
        param.ds_shape = param.shape  # what DeepSpeed sets when zero.Init partitions the parameter
        param.data = torch.empty(0)
    groups = build_optimizer(model, OptimizerConfig(weight_decay=0.1), 10)["optimizer"].param_groups
    assert [(g["weight_decay"], len(g["params"])) for g in groups] == [(0.1, 1), (0.0, 3)]


def test_a_chameleon_checkpoint_without_its_vq_vae_loads(tmp_path):
    """The VQ-VAE is a part the language path never runs (``UNUSED_SUBMODULES``): weights that
    leave it out still fill the language model, which is not a cut-short copy."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, ChameleonForConditionalGeneration

    from unimodal.models.backbone import causal_lm_from_pretrained

    ChameleonForConditionalGeneration(AutoConfig.for_model(**TINY_CHAMELEON, vocab_size=100)).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".vqmodel." not in k}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert isinstance(causal_lm_from_pretrained(tmp_path), ChameleonForConditionalGeneration)
