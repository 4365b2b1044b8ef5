"""Memory and speed levers change how a step runs, never what it computes."""

from __future__ import annotations

import copy

import pytest
import torch
from inference_helpers import tiny_model
from test_attention_backends import packed_batch

from unimodal.models.backbone import compile_layers, enable_activation_checkpointing


def loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    losses = model(batch)
    loss = sum(term.total / term.count for term in losses.values())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(a, b, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a[0], b[0], atol=tol, rtol=tol)
    assert a[1].keys() == b[1].keys()
    for name, grad in a[1].items():
        torch.testing.assert_close(b[1][name], grad, atol=tol, rtol=tol, msg=name)


def test_chunked_cross_entropy_equals_the_full_one_and_never_holds_all_logits():
    model = tiny_model().train()
    batch = packed_batch()
    full = loss_and_grads(model, batch)
    chunked_model = copy.deepcopy(model)
    chunked_model.ce_chunk = 7
    rows: list[int] = []
    logits = chunked_model.logits
    chunked_model.logits = lambda hidden: (rows.append(hidden.shape[0]), logits(hidden))[1]
    chunked = loss_and_grads(chunked_model, batch)
    assert_same_step(full, chunked)
    targets = int((batch.labels != -100).sum())
    assert max(rows) == 7 and sum(rows) == 2 * targets  # every chunk's logits again in backward


def test_compiled_layers_compute_the_same_step(one_thread):
    model = tiny_model().train()
    batch = packed_batch()
    eager = loss_and_grads(model, batch)
    compiled = copy.deepcopy(model)
    compile_layers(compiled.backbone, backend="aot_eager")
    assert all(layer._compiled_call_impl is not None for layer in compiled.backbone.get_decoder().layers)
    assert_same_step(eager, loss_and_grads(compiled, batch))


def test_activation_checkpointing_computes_the_same_step():
    model = tiny_model().train()
    batch = packed_batch()
    plain = loss_and_grads(model, batch)
    checkpointed = copy.deepcopy(model)
    enable_activation_checkpointing(checkpointed.backbone)
    layers = checkpointed.backbone.get_decoder().layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert_same_step(plain, loss_and_grads(checkpointed, batch))


def test_ce_chunk_must_not_be_negative():
    model = tiny_model()
    with pytest.raises(ValueError, match="ce_chunk must be >= 0"):
        type(model)(model.backbone, model.layout, ce_chunk=-1)


@pytest.mark.slow
def test_inductor_compiled_layers_with_flex_and_experts_match_the_dense_forward():
    """backbone.compile as the GPU runs it, on a CPU: inductor-compiled layers with FlexAttention
    (its forward) and LlamaFusion's modality experts, against eager SDPA on the dense mask."""
    from inference_helpers import family_model
    from test_attention_backends import with_backend

    model = family_model("llamafusion")
    batch = packed_batch()
    batch.modality_ids[batch.block_ids >= 0] = 1
    compiled = with_backend(model, "flex")
    compile_layers(compiled.backbone)
    with torch.no_grad():
        dense, out = model.hidden_states(batch), compiled.hidden_states(batch)
    real = batch.doc_ids > 0
    torch.testing.assert_close(out[real], dense[real], atol=1e-5, rtol=1e-5)
