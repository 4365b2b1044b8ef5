"""LoRA on the backbone and on framework modules, new-token rows, trainables, adapter files, merging."""

from __future__ import annotations

import copy

import numpy as np
import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import TINY_LLAMA
from unimodal.data.processor import Processor
from unimodal.data.packing import Packer, collate
from unimodal.schema import Document, Part
from unimodal.modalities.vocab import VocabLayout
from unimodal.models.backbone import BackboneConfig, load_backbone
from unimodal.models.unified import LinearAdapter, UnifiedModel
from unimodal.models.lora import (
    TRAINABLES_FILE,
    LoraSettings,
    LoraTargetError,
    apply_lora,
    match_targets,
    merge_injected,
    save_adapter,
)
from unimodal.training.policy import apply_trainable_policy

FEATURES = 6


def build(tied: bool = True) -> UnifiedModel:
    torch.manual_seed(0)
    layout = VocabLayout(260, code_ranges={"image": 16})
    backbone = load_backbone(BackboneConfig(config={**TINY_LLAMA, "tie_word_embeddings": tied}), layout.size)
    return UnifiedModel(backbone, layout, continuous={"image": LinearAdapter(64, FEATURES)})


def batch(tokenizer, layout: VocabLayout):
    rng = np.random.default_rng(0)
    image = Part("image", media=0, data=rng.normal(size=(3, FEATURES)).astype(np.float32))
    codes = Part("image", media=1, data=np.array([1, 5, 7]))
    doc = Document([Part("text", text="a cat"), image, Part("text", text="then codes"), codes], key="d")
    encoded = Processor(tokenizer, layout, FEATURES).encode(doc)
    return collate([next(Packer(64, 0, FEATURES).pack([encoded]))])


def new_rows(model: UnifiedModel) -> list[int]:
    return list(range(model.layout.text_size, model.layout.used_size))


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_lora_on_backbone_and_framework_modules_keeps_policy_trainables():
    model = build()
    apply_trainable_policy(model, ["backbone.model.norm"], [])
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "continuous.image.proj"])
    apply_lora(model, settings, new_rows(model))
    names = trainable(model)
    assert isinstance(model.backbone, peft.PeftModel)
    assert {n for n in names if "lora_A" in n} == {
        "backbone.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "backbone.base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight",
        "backbone.base_model.model.model.layers.0.self_attn.v_proj.lora_A.default.weight",
        "backbone.base_model.model.model.layers.1.self_attn.v_proj.lora_A.default.weight",
        "continuous.image.proj.lora_A.default.weight",
    }
    assert "backbone.base_model.model.model.norm.weight" in names  # the policy's choice survives peft
    assert not any("base_layer" in n or "embed_tokens.token_adapter.base_layer" in n for n in names)


@pytest.mark.parametrize("targets", [["o_proj"], []])
def test_new_token_rows_train_without_the_embedding_matrix(targets, char_tokenizer):
    model = build(tied=False)
    model.requires_grad_(False)
    apply_lora(model, LoraSettings(r=4, target_modules=targets, train_new_tokens=True), new_rows(model))
    names = trainable(model)
    deltas = {n: p for n, p in model.named_parameters() if "trainable_tokens_delta" in n}
    assert len(deltas) == 2  # input embedding and the untied output layer
    assert all(p.shape == (len(new_rows(model)), 64) for p in deltas.values())
    assert not any(n.endswith("embed_tokens.weight") or n.endswith("lm_head.weight") for n in names)
    # the forward still runs through the unified model (continuous slots, masked padding rows)
    loss = model(batch(char_tokenizer, model.layout))["ce/text"].total
    loss.backward()
    assert all(p.grad is not None for p in deltas.values())


def test_targets_by_pattern_and_clear_errors():
    model = build()
    assert match_targets(model, ["backbone.model.layers.1.mlp.*_proj"]) == [
        "backbone.model.layers.1.mlp.down_proj", "backbone.model.layers.1.mlp.gate_proj", "backbone.model.layers.1.mlp.up_proj",
    ]
    # a container name wraps the layers inside it
    assert len(match_targets(model, ["mlp"])) == 6
    with pytest.raises(LoraTargetError, match="'q_prj' matches no module; near matches: q_proj"):
        match_targets(model, ["q_prj"])


def test_adapter_files_load_with_peft_and_merging_keeps_outputs(char_tokenizer, tmp_path):
    model = build()
    model.requires_grad_(False)
    apply_lora(model, LoraSettings(r=4, dropout=0.0, target_modules=["q_proj", "continuous.image.proj"], train_new_tokens=True), new_rows(model))
    with torch.no_grad():  # LoRA B starts at zero: move every trainable so the adapter matters
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    data = batch(char_tokenizer, model.layout)
    before = model(data)["ce/text"].total

    out = save_adapter(model, tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert set(load_file(str(out / TRAINABLES_FILE))) == {
        "continuous.image.proj.lora_A.default.weight", "continuous.image.proj.lora_B.default.weight",
    }
    # the backbone adapter loads with peft on the plain base model and gives the same logits
    ids = data.input_ids.clamp(max=model.layout.used_size - 1)
    expected = model.backbone(input_ids=ids).logits
    base = tmp_path / "base"
    copy.deepcopy(model.backbone).unload().save_pretrained(base)
    plain = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out))
    torch.testing.assert_close(plain(input_ids=ids).logits, expected)

    assert merge_injected(model) == 1
    model.backbone = model.backbone.merge_and_unload()
    assert not any("lora" in n or "token_adapter" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(data)["ce/text"].total, before, rtol=1e-5, atol=1e-5)


def test_lora_on_a_routed_projection_merges_into_every_expert():
    """One adapter on LlamaFusion's routed q_proj moves image positions in training too, so the
    merged model must keep that update in the image expert, not only in the text weights."""
    from unimodal.models.build import build_model
    from unimodal.models.lora import merge_backbone_adapter
    from unimodal.schema import MODALITY_IDS

    torch.manual_seed(0)
    model = build_model(BackboneConfig(config=TINY_LLAMA), VocabLayout(260, code_ranges={"image": 16}), routing=["image"])
    model.requires_grad_(False)
    apply_lora(model, LoraSettings(r=4, dropout=0.0, target_modules=["q_proj"]), [])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    ids, modality = torch.randint(0, 260, (1, 12)), torch.zeros(1, 12, dtype=torch.long)
    modality[0, 4:10] = MODALITY_IDS["image"]
    model.routing.set(modality)
    trained = model.backbone(input_ids=ids).logits
    model.backbone = merge_backbone_adapter(model.backbone)
    model.routing.set(modality)
    torch.testing.assert_close(model.backbone(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)
