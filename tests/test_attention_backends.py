"""Attention backends: selection everywhere, numerical equivalence where a GPU is present."""

from __future__ import annotations

import pytest
import torch

from unimodal.batch import PackedBatch
from unimodal.models import attention
from unimodal.models.backbone import BackboneConfig, load_backbone
from unimodal.models.unified import UnifiedModel
from unimodal.modalities.vocab import VocabLayout


def test_auto_picks_sdpa_without_cuda(monkeypatch):
    monkeypatch.setattr(attention, "xformers_available", lambda: False)
    assert attention.resolve_backend("auto") == "sdpa"
    with pytest.raises(RuntimeError, match="needs CUDA and the xformers package"):
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


@pytest.mark.gpu
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
