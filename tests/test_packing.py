"""The packer and the attention mask: positions, labels, splitting, and no cross-document leakage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unimodal.data.processor import EncodedDocument, Processor
from unimodal.batch import IGNORE_INDEX
from unimodal.data.packing import DocumentTooLong, Packer, collate
from unimodal.schema import Document, Part
from unimodal.modalities.vocab import VocabLayout
from unimodal.models.attention import build_attention_mask
from unimodal.models.backbone import BackboneConfig, load_backbone
from unimodal.models.unified import LinearAdapter, UnifiedModel

FEATURES = 6


def make_doc(key: str, rng: np.random.Generator, texts: list[str], image_tokens: int = 3) -> Document:
    """Text, image, text, image, ...: every document has >= 2 images of >= 2 tokens."""
    parts = []
    for i, text in enumerate(texts):
        parts.append(Part("text", text=text))
        if i < len(texts) - 1:
            parts.append(Part("image", media=i, data=rng.normal(size=(image_tokens, FEATURES)).astype(np.float32)))
    return Document(parts, key=key)


def encoder(tokenizer, bidirectional: tuple[str, ...] = ()) -> Processor:
    return Processor(tokenizer, VocabLayout(tokenizer.vocab_size), FEATURES, bidirectional=bidirectional)


def test_positions_restart_and_labels_shift(char_tokenizer):
    rng = np.random.default_rng(0)
    enc = encoder(char_tokenizer)
    docs = [enc.encode(make_doc("a", rng, ["hi", "yo", "ok"])), enc.encode(make_doc("b", rng, ["abc", "de", "f"]))]
    seq = next(Packer(seq_len=64, pad_id=0, feature_dim=FEATURES, open_sequences=1).pack(docs))
    n_a = len(docs[0])
    assert seq["position_ids"][0] == 0 and seq["position_ids"][n_a] == 0
    assert list(seq["doc_ids"][: n_a + 1]) == [1] * n_a + [2]
    # labels are the next id within a document, never across its end
    ids, labels = seq["input_ids"], seq["labels"]
    assert labels[n_a - 1] == IGNORE_INDEX
    text_pos = [t for t in range(n_a - 1) if labels[t] != IGNORE_INDEX]
    assert all(labels[t] == ids[t + 1] for t in text_pos)
    # continuous slots are never CE targets, but they are marked as targets for the diffusion heads
    slots = np.flatnonzero(seq["continuous_mask"])
    assert len(slots) == 12 and all(labels[t - 1] == IGNORE_INDEX for t in slots)
    assert seq["target_mask"][slots].all()
    assert seq["features"].shape == (12, FEATURES)


def test_loss_flags_mask_labels(char_tokenizer):
    doc = Document([Part("text", text="question", loss=False), Part("text", text="answer")], key="q")
    enc = encoder(char_tokenizer).encode(doc)
    seq = next(Packer(seq_len=64, pad_id=0).pack([enc]))
    supervised = seq["labels"][seq["labels"] != IGNORE_INDEX]
    assert char_tokenizer.decode(list(supervised)) == "answer"


def test_overlong_documents_split_at_span_boundaries_or_refused(char_tokenizer):
    rng = np.random.default_rng(0)
    enc = encoder(char_tokenizer).encode(make_doc("long", rng, ["x" * 20, "y" * 20, "z" * 20], image_tokens=4))
    pieces = list(Packer(seq_len=32, pad_id=0, feature_dim=FEATURES, open_sequences=1).pack([enc]))
    total = sum(int((p["doc_ids"] > 0).sum()) for p in pieces)
    assert total == len(enc)  # nothing dropped
    features = np.concatenate([p["features"] for p in pieces])
    np.testing.assert_array_equal(features, enc.features)
    for p in pieces:  # no image is cut: each piece holds whole 4-slot images
        assert int(p["continuous_mask"].sum()) % 4 == 0
    with pytest.raises(DocumentTooLong, match="more than seq_len=32"):
        list(Packer(seq_len=32, pad_id=0, overlong="error").pack([enc]))


def test_a_long_document_is_cut_between_two_adjacent_media_spans(char_tokenizer):
    """Three 12-token images in a row, seq_len 20: each fits, so each becomes a piece of its own."""
    rng = np.random.default_rng(0)
    images = [Part("image", media=i, data=rng.normal(size=(10, FEATURES)).astype(np.float32)) for i in range(3)]
    enc = encoder(char_tokenizer).encode(Document(images, key="images"))
    pieces = Packer(seq_len=20, pad_id=0, feature_dim=FEATURES).pieces(enc)
    assert [len(p) for p in pieces] == [13, 12, 13]  # BOS + image, image, image + EOS
    assert [int(p.continuous.sum()) for p in pieces] == [10, 10, 10]


def test_mask_blocks_documents_and_future_images():
    doc_ids = torch.tensor([[1, 1, 1, 1, 2, 2, 0]])
    block_ids = torch.tensor([[-1, 0, 0, -1, 1, 1, -1]])
    mask = build_attention_mask(doc_ids, block_ids)[0, 0]
    assert mask[1, 2] and not mask[0, 1]  # bidirectional inside the block, causal outside
    assert not mask[4, 3] and not mask[3, 4]  # never across documents
    assert mask[6].sum() == 1 and mask[6, 6]  # padding sees only itself


@pytest.mark.parametrize("bidirectional", [(), ("image",)], ids=["causal-images", "bidirectional-images"])
def test_no_cross_document_leakage(char_tokenizer, tiny_llama_config, bidirectional):
    """Perturb one document (text and images) and check the other documents' logits do not move."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    layout = VocabLayout(char_tokenizer.vocab_size)
    backbone = load_backbone(BackboneConfig(config=tiny_llama_config, attention="sdpa"), layout.size)
    model = UnifiedModel(backbone, layout, continuous={"image": LinearAdapter(64, FEATURES)}).eval()
    enc = encoder(char_tokenizer, bidirectional)
    texts = [["one", "two", "three"], ["four", "five", "six"], ["seven", "eight", "nine"]]
    docs = [make_doc(f"d{i}", rng, t) for i, t in enumerate(texts)]
    packer = Packer(seq_len=128, pad_id=0, feature_dim=FEATURES, open_sequences=1)

    def logits_for(documents):
        batch = collate(list(packer.pack([enc.encode(d) for d in documents])))
        with torch.no_grad():
            return model.logits(model.hidden_states(batch))[0], batch

    base, batch = logits_for(docs)
    changed = make_doc("d1", rng, ["FOUR", "FIVE", "SIX"])  # same lengths, new text and new images
    perturbed, _ = logits_for([docs[0], changed, docs[2]])
    doc_ids = batch.doc_ids[0]
    for number in (1, 3):
        rows = doc_ids == number
        torch.testing.assert_close(perturbed[rows], base[rows], rtol=0, atol=1e-5)
    assert not torch.allclose(perturbed[doc_ids == 2], base[doc_ids == 2])  # the test can fail
    assert batch.continuous_mask.sum() == 18


def test_an_image_never_sees_a_later_image(char_tokenizer, tiny_llama_config):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    layout = VocabLayout(char_tokenizer.vocab_size)
    backbone = load_backbone(BackboneConfig(config=tiny_llama_config, attention="sdpa"), layout.size)
    model = UnifiedModel(backbone, layout, continuous={"image": LinearAdapter(64, FEATURES)}).eval()
    enc = encoder(char_tokenizer, ("image",))
    doc = make_doc("d", rng, ["ab", "cd", "ef"])
    packer = Packer(seq_len=64, pad_id=0, feature_dim=FEATURES)
    batch = collate(list(packer.pack([enc.encode(doc)])))
    later = batch.features.clone()
    later[3:] += 1.0  # second image only
    with torch.no_grad():
        before = model.hidden_states(batch)[0]
        batch.features = later
        after = model.hidden_states(batch)[0]
    second_image_start = int(torch.nonzero(batch.continuous_mask[0])[3, 0])
    torch.testing.assert_close(after[:second_image_start], before[:second_image_start], rtol=0, atol=1e-5)
    assert not torch.allclose(after[second_image_start:], before[second_image_start:])


def text_documents(lengths: np.ndarray) -> list[EncodedDocument]:
    """Encoded text documents of the given lengths, document ``i`` made of the id ``i`` only."""
    return [
        EncodedDocument(
            ids=np.full(n, i, np.int64), modality=np.zeros(n, np.int8), target=np.ones(n, bool),
            block=np.full(n, -1, np.int32), continuous=np.zeros(n, bool), features=np.zeros((0, 0), np.float32), key=str(i),
        )
        for i, n in enumerate(map(int, lengths))
    ]


def test_best_fit_fills_sequences_without_splitting_documents():
    """Documents of 20-256 tokens into 256-token rows: every document whole, in exactly one row,
    and rows ~94% full before the stream's last open rows (first fit over 4 open rows, oldest
    closed first, left 11% padding here)."""
    docs = text_documents(np.random.default_rng(0).integers(20, 257, size=400))
    rows = list(Packer(seq_len=256, pad_id=-1).pack(docs))
    seen = []
    for row in rows:
        ids, doc_ids = row["input_ids"], row["doc_ids"]
        for d in np.unique(doc_ids[doc_ids > 0]):
            values = np.unique(ids[doc_ids == d])
            assert len(values) == 1  # one document per doc id, never mixed
            seen.append((int(values[0]), int((doc_ids == d).sum())))
    assert sorted(seen) == sorted((i, len(d)) for i, d in enumerate(docs))  # each whole, once
    steady = rows[:-16]  # the stream's end closes its 16 open rows, however full
    fill = sum(int((row["doc_ids"] > 0).sum()) for row in steady) / (256 * len(steady))
    assert fill >= 0.93, fill


def test_a_document_cut_anyway_first_fills_a_gap():
    """Documents of 150-500 tokens into 256-token rows: those that fit stay whole; a longer one,
    cut anyway, begins with a piece that fills the smallest open gap (one cut more at most), which
    takes the rows from below 96% full to above 99%."""
    docs = text_documents(np.random.default_rng(1).integers(150, 501, size=600))

    def packed(packer: Packer) -> tuple[float, dict[int, list[int]]]:
        rows = list(packer.pack(docs))
        lengths: dict[int, list[int]] = {}
        for row in rows:
            ids, doc_ids = row["input_ids"], row["doc_ids"]
            for d in np.unique(doc_ids[doc_ids > 0]):
                lengths.setdefault(int(ids[doc_ids == d][0]), []).append(int((doc_ids == d).sum()))
        steady = rows[:-16]
        return sum(int((row["doc_ids"] > 0).sum()) for row in steady) / (256 * len(steady)), lengths

    fill, lengths = packed(Packer(seq_len=256, pad_id=-1))
    plain_fill, _ = packed(Packer(seq_len=256, pad_id=-1, min_first_piece=257))  # no gap is ever that large
    assert plain_fill < 0.96 and fill > 0.99, (plain_fill, fill)
    refilled = 0
    for i, doc in enumerate(docs):
        assert sum(lengths[i]) == len(doc)
        if len(doc) <= 256:
            assert lengths[i] == [len(doc)]
        else:
            assert len(lengths[i]) <= -(-len(doc) // 256) + 1
            refilled += lengths[i][0] < 256
    assert refilled > 100


def test_a_first_piece_that_would_cut_a_media_span_falls_back_to_full_pieces(char_tokenizer):
    rng = np.random.default_rng(0)
    images = [Part("image", media=i, data=rng.normal(size=(10, FEATURES)).astype(np.float32)) for i in range(3)]
    enc = encoder(char_tokenizer).encode(Document(images, key="images"))
    packer = Packer(seq_len=20, pad_id=0, feature_dim=FEATURES)
    # a cut at 5 would move back to 1 (BOS alone), one at 14 to 13: both shorter than asked
    assert [len(p) for p in packer.pieces(enc, first=5)] == [13, 12, 13]
    assert [len(p) for p in packer.pieces(enc, first=14)] == [13, 12, 13]
    assert [len(p) for p in Packer(seq_len=20, pad_id=0, min_first_piece=4).pieces(enc, first=14)] == [13, 12, 13]
