"""Attention backends: one packing rule in every form, checked against the dense mask."""

from __future__ import annotations

import copy

import pytest
import torch
from inference_helpers import family_model
from test_engine import GREEDY, prompt, text_ids

from unimodal.batch import PackedBatch
from unimodal.errors import UserError
from unimodal.inference.engine import Engine
from unimodal.models import attention
from unimodal.models.backbone import BackboneConfig, load_backbone
from unimodal.models.generation import GenerationSettings
from unimodal.models.unified import UnifiedModel
from unimodal.modalities.vocab import VocabLayout
from conftest import CharTokenizer


def test_auto_picks_flex_on_cuda_and_sdpa_elsewhere(monkeypatch):
    monkeypatch.setattr(attention, "flex_available", lambda: False)
    monkeypatch.setattr(attention, "xformers_available", lambda: False)
    assert attention.resolve_backend("auto") == "sdpa"
    monkeypatch.setattr(attention, "flex_available", lambda: True)
    assert attention.resolve_backend("auto") == attention.FLEX_IMPLEMENTATION
    with pytest.raises(UserError, match="needs CUDA and the xformers package"):
        attention.resolve_backend("xformers")
    with pytest.raises(ValueError, match="not one of"):
        attention.resolve_backend("flash")


def packed_batch(length: int = 48, device: str = "cpu") -> PackedBatch:
    """Two rows, three documents each, one bidirectional block per document, some padding."""
    doc_ids = torch.zeros(2, length, dtype=torch.long)
    block_ids = torch.full((2, length), -1, dtype=torch.long)
    positions = torch.zeros(2, length, dtype=torch.long)
    for row in range(2):
        start = 0
        for doc, size in enumerate((14, 12, 16 - row * 4), start=1):
            doc_ids[row, start : start + size] = doc
            positions[row, start : start + size] = torch.arange(size)
            block_ids[row, start + 3 : start + 7] = doc - 1
            start += size
    ids = torch.randint(0, 200, (2, length))
    zeros = torch.zeros(2, length, dtype=torch.bool)
    return PackedBatch(
        input_ids=ids, modality_ids=torch.zeros_like(ids), position_ids=positions, doc_ids=doc_ids,
        block_ids=block_ids, labels=ids, target_mask=zeros, continuous_mask=zeros, features=torch.zeros(0, 4),
    ).to(device)



def with_backend(model: UnifiedModel, backend: str) -> UnifiedModel:
    other = copy.deepcopy(model)
    other.backbone.config._attn_implementation = attention.resolve_backend(backend)
    return other


def test_block_mask_allows_exactly_what_the_dense_mask_allows():
    batch = packed_batch(length=300)
    dense = attention.build_attention_mask(batch.doc_ids, batch.block_ids)[:, 0]
    block_mask = attention.build_block_mask(batch.doc_ids, batch.block_ids)
    b, q, k = torch.arange(2)[:, None, None], torch.arange(300)[None, :, None], torch.arange(300)[None, None, :]
    assert torch.equal(block_mask.mask_mod(b, torch.zeros(()), q, k).expand_as(dense), dense)


def test_block_mask_skips_blocks_across_documents():
    """Eight 512-token documents in a 4096 row: most 128 x 128 tiles are never computed."""
    doc_ids = torch.arange(1, 9).repeat_interleave(512)[None]
    block_mask = attention.build_block_mask(doc_ids, torch.full_like(doc_ids, -1))
    # causal alone would skip ~48% of the tiles; document boundaries skip ~90%
    assert block_mask.sparsity() > 85


@pytest.mark.parametrize("backend", ["flex", "eager"])
@pytest.mark.parametrize("family", ["orthus", "llamafusion"])
def test_flex_and_eager_forwards_match_the_dense_mask(family, backend):
    """Image blocks (bidirectional for LlamaFusion, with modality experts) and padding. Eager
    attention adds its mask to the scores, so it must get the mask as floats, not booleans."""
    model = family_model(family)
    batch = packed_batch()
    batch.modality_ids[batch.block_ids >= 0] = 1  # the block positions are image slots for routing
    with torch.no_grad():
        dense = model.hidden_states(batch)
        other = with_backend(model, backend).hidden_states(batch)
    real = batch.doc_ids > 0
    torch.testing.assert_close(other[real], dense[real], atol=1e-5, rtol=1e-5)


def test_flex_refuses_to_train_on_cpu_in_one_line():
    model = with_backend(family_model("orthus"), "flex").train()
    with pytest.raises(UserError, match="flex cannot train on CPU"):
        model.hidden_states(packed_batch()).sum().backward()


def test_flex_on_cpu_is_refused_before_any_batch_is_read(tmp_path, tiny_llama_config):
    """Not after the sanity validation, as the first backward would."""
    import lightning as L

    from unimodal.training.module import UnimodalModule

    class Unread(L.LightningDataModule):
        def train_dataloader(self):
            raise AssertionError("the train data was read")

        def val_dataloader(self):
            raise AssertionError("the validation data was read")

    layout = VocabLayout(text_size=64)
    module = UnimodalModule(backbone=BackboneConfig(config=tiny_llama_config, attention="flex"), vocab=layout.to_dict())
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(UserError, match="flex cannot train on CPU"):
        trainer.fit(module, datamodule=Unread())


@pytest.mark.parametrize("backend", ["flex", "eager"])
def test_engine_prefill_and_cached_steps_generate_the_same_tokens_on_each_backend(backend):
    model = family_model("orthus")
    prompts = [prompt(model, "hello world"), prompt(model, "hi")]  # the second row is left-padded
    settings = GenerationSettings(text=GREEDY, max_new_tokens=12)
    dense = [text_ids(g) for g in Engine(model, CharTokenizer()).generate(prompts, settings)]
    other = [text_ids(g) for g in Engine(with_backend(model, backend), CharTokenizer()).generate(prompts, settings)]
    assert other == dense


def test_xformers_gets_document_segments_or_the_dense_mask():
    doc_ids = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1]])
    assert attention.document_lengths(doc_ids) == [2, 3, 1, 3, 3, 1, 5]
    no_blocks = torch.full_like(doc_ids, -1)
    args = attention.decoder_mask(attention.XFORMERS_IMPLEMENTATION, doc_ids, no_blocks)
    assert args == {"attention_mask": None, attention.XFORMERS_SEGMENTS: [2, 3, 1, 3, 3, 1, 5]}
    blocks = no_blocks.clone()
    blocks[0, 2:4] = 0
    with pytest.warns(UserWarning, match="cannot express bidirectional image blocks"):
        args = attention.decoder_mask(attention.XFORMERS_IMPLEMENTATION, doc_ids, blocks)
    assert torch.equal(args["attention_mask"], attention.build_attention_mask(doc_ids, blocks))


def test_xformers_never_gets_segments_for_a_document_split_by_conditioning_dropout():
    """A dropped image span has a document id of its own; the text after it is still its
    document's and sees the text before it, which one segment per run would hide."""
    doc_ids = torch.tensor([[1, 1, 1, 2, 2, 2, 1, 1], [1, 1, 1, 1, 2, 2, 0, 0]])
    no_blocks = torch.full_like(doc_ids, -1)
    assert not attention.split_documents(doc_ids[1:])
    assert attention.split_documents(doc_ids)
    with pytest.warns(UserWarning, match="nor documents split by conditioning dropout"):
        args = attention.decoder_mask(attention.XFORMERS_IMPLEMENTATION, doc_ids, no_blocks)
    assert torch.equal(args["attention_mask"], attention.build_attention_mask(doc_ids, no_blocks))
    assert bool(args["attention_mask"][0, 0, 6, 0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["orthus", "llamafusion"])
def test_flex_matches_dense_forward_and_backward_in_bf16_on_gpu(family):
    model = family_model(family).cuda().train()
    flex = with_backend(model, "flex")
    batch = packed_batch(length=256, device="cuda")
    batch.modality_ids[batch.block_ids >= 0] = 1
    real = batch.doc_ids > 0
    results = {}
    for name, m in (("dense", model), ("flex", flex)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = m.hidden_states(batch)
        hidden[real].float().pow(2).mean().backward()
        grads = {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None}
        results[name] = hidden[real].float(), grads
    # bf16 tolerances: a 2-layer model, outputs of order 1
    torch.testing.assert_close(results["flex"][0], results["dense"][0], atol=3e-2, rtol=3e-2)
    assert results["flex"][1].keys() == results["dense"][1].keys()
    for name, grad in results["dense"][1].items():
        torch.testing.assert_close(results["flex"][1][name], grad, atol=5e-2, rtol=5e-2, msg=name)


@pytest.mark.xformers
@pytest.mark.skipif(not attention.xformers_available(), reason="needs CUDA and xformers")
def test_xformers_matches_sdpa_on_gpu(tiny_llama_config):
    torch.manual_seed(0)
    layout = VocabLayout(256)
    outputs = {}
    for backend in ("sdpa", "xformers"):
        torch.manual_seed(0)
        backbone = load_backbone(BackboneConfig(config=tiny_llama_config, attention=backend, dtype="bfloat16"), layout.size)
        model = UnifiedModel(backbone.cuda(), layout).eval()
        torch.manual_seed(1)
        batch = packed_batch(device="cuda")
        with torch.no_grad():
            outputs[backend] = model.hidden_states(batch).float()
    real = packed_batch().doc_ids.cuda() > 0
    torch.testing.assert_close(outputs["xformers"][real], outputs["sdpa"][real], rtol=2e-2, atol=2e-2)
