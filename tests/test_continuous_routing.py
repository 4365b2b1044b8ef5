"""Modality experts (LlamaFusion): exactness with tied experts, routing by modality, names, KV cache."""

from __future__ import annotations

import copy

import pytest
import torch

from unimodal.models.attention import build_attention_mask
from unimodal.models.backbone import BackboneConfig, cache_keyword, load_backbone
from unimodal.models.routing import add_modality_experts
from unimodal.training.policy import apply_trainable_policy

IMAGE = 1


def tiny_pair(tiny_llama_config):
    torch.manual_seed(0)
    plain = load_backbone(BackboneConfig(config=tiny_llama_config, attention="sdpa"), 128).eval()
    routed = copy.deepcopy(plain)
    router = add_modality_experts(routed, ["image"])
    return plain, routed, router


def inputs(batch: int = 2, length: int = 12):
    torch.manual_seed(1)
    embeds = torch.randn(batch, length, 64)
    modality = torch.zeros(batch, length, dtype=torch.long)
    modality[0, 3:7] = IMAGE
    modality[1, 5:11] = IMAGE
    modality[1, 1] = 2  # audio has no expert: it goes to the text expert
    doc_ids = torch.ones(batch, length, dtype=torch.long)
    mask = build_attention_mask(doc_ids, torch.full((batch, length), -1))
    positions = torch.arange(length).expand(batch, -1)
    return embeds, modality, mask, positions


def run(model, embeds, mask, positions):
    return model.get_decoder()(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state


def test_tied_experts_equal_the_unwrapped_model(tiny_llama_config):
    plain, routed, router = tiny_pair(tiny_llama_config)
    embeds, modality, mask, positions = inputs()
    router.set(modality)
    with torch.no_grad():
        torch.testing.assert_close(run(routed, embeds, mask, positions), run(plain, embeds, mask, positions), atol=1e-5, rtol=1e-5)


def test_image_positions_use_the_image_experts(tiny_llama_config):
    plain, routed, router = tiny_pair(tiny_llama_config)
    embeds, modality, mask, positions = inputs()
    with torch.no_grad():
        for name, param in routed.named_parameters():
            if ".experts.image." in name:
                param.add_(0.05 * torch.randn_like(param))
        router.set(modality)
        out, ref = run(routed, embeds, mask, positions), run(plain, embeds, mask, positions)
    # row 0: positions before the first image never see an image; image positions differ; text after
    # the image differs too, through the shared attention
    torch.testing.assert_close(out[0, :3], ref[0, :3], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[0, 3:7], ref[0, 3:7], atol=1e-3)
    assert not torch.allclose(out[0, 7:], ref[0, 7:], atol=1e-3)


def test_text_weights_keep_their_names_and_experts_are_copies(tiny_llama_config):
    plain, routed, _ = tiny_pair(tiny_llama_config)
    plain_state, routed_state = plain.state_dict(), routed.state_dict()
    assert set(plain_state) <= set(routed_state)
    extra = sorted(set(routed_state) - set(plain_state))
    assert all(".experts.image." in name for name in extra)
    for part in ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "post_attention_layernorm"):
        assert f"model.layers.1.{part}.experts.image.weight" in extra
    assert "model.layers.1.mlp.experts.image.up_proj.weight" in extra
    assert "model.norm.experts.image.weight" in extra
    q, q_image = routed.model.layers[0].self_attn.q_proj.weight, routed.model.layers[0].self_attn.q_proj.experts.image.weight
    assert torch.equal(q, q_image) and q.data_ptr() != q_image.data_ptr()


def test_policy_trains_only_the_image_experts(tiny_llama_config):
    _, routed, router = tiny_pair(tiny_llama_config)
    apply_trainable_policy(routed, ["*.experts.image.*"], [])
    embeds, modality, mask, positions = inputs()
    router.set(modality)
    run(routed, embeds, mask, positions).sum().backward()
    for name, param in routed.named_parameters():
        assert (param.grad is not None) == (".experts.image." in name), name


def test_router_needs_ids_of_the_current_call(tiny_llama_config):
    _, routed, router = tiny_pair(tiny_llama_config)
    embeds, modality, mask, positions = inputs()
    with pytest.raises(RuntimeError, match="call router.set"):
        run(routed, embeds, mask, positions)
    router.set(modality[:, :5])
    with pytest.raises(RuntimeError, match="call router.set"):
        run(routed, embeds, mask, positions)
    with pytest.raises(ValueError, match="unknown modalities"):
        add_modality_experts(copy.deepcopy(routed), ["video"])


def test_incremental_decoding_with_a_kv_cache(tiny_llama_config):
    """An engine sets the ids of the positions it feeds; cached keys keep their own experts."""
    from transformers import DynamicCache

    _, routed, router = tiny_pair(tiny_llama_config)
    with torch.no_grad():
        for name, param in routed.named_parameters():
            if ".experts.image." in name:
                param.add_(0.05 * torch.randn_like(param))
    embeds, modality, _, positions = (x[1:] for x in inputs())  # row 1: an image across the cache boundary
    decoder = routed.get_decoder()
    keyword = cache_keyword(type(decoder))  # as the engine passes it, without transformers' rename warning
    with torch.no_grad():
        router.set(modality)
        full = decoder(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
        cache = DynamicCache()
        router.set(modality[:, :8])
        decoder(inputs_embeds=embeds[:, :8], position_ids=positions[:, :8], use_cache=True, **{keyword: cache})
        steps = []
        for i in range(8, 12):
            router.set(modality[:, i : i + 1])
            out = decoder(inputs_embeds=embeds[:, i : i + 1], position_ids=positions[:, i : i + 1],
                          use_cache=True, **{keyword: cache})
            steps.append(out.last_hidden_state)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 8:], atol=1e-5, rtol=1e-5)


def test_gemma_feed_forward_norms_get_experts_and_tied_experts_change_nothing():
    """Gemma 2's layers add pre/post feed-forward norms, position-wise like the Llama ones."""
    config = {"model_type": "gemma2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 128, "head_dim": 16, "query_pre_attn_scalar": 16}
    torch.manual_seed(0)
    plain = load_backbone(BackboneConfig(config=config, attention="eager"), 128).eval()
    routed = copy.deepcopy(plain)
    router = add_modality_experts(routed, ["image"])
    names = {name for name, _ in routed.named_parameters()}
    assert {"model.layers.0.pre_feedforward_layernorm.experts.image.weight",
            "model.layers.0.post_feedforward_layernorm.experts.image.weight"} <= names
    embeds, modality, _, positions = inputs()
    mask = torch.zeros(2, 1, 12, 12).masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), torch.finfo(torch.float32).min)
    router.set(modality)
    with torch.no_grad():
        torch.testing.assert_close(run(routed, embeds, mask, positions), run(plain, embeds, mask, positions), atol=1e-5, rtol=1e-5)
