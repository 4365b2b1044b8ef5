"""Seeded fuzzing with a fixed budget: the shard reader, the request parser and the packer take
random input and fail only in the ways they promise (issue 14)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unimodal.data.packing import Packer, collate
from unimodal.data.processor import Processor
from unimodal.data.shards import BadSamplePolicy, ShardError, read_documents, write_documents
from unimodal.inference.server import APIError, ServerLimits, check_caps, parse_request
from unimodal.modalities.vocab import VocabLayout
from unimodal.models.backbone import BackboneConfig, load_backbone
from unimodal.models.generation import GenerationSettings
from unimodal.models.unified import LinearAdapter, UnifiedModel
from unimodal.schema import Document, DocumentError, Part

FEATURES = 6


def random_document(rng: np.random.Generator, key: str) -> Document:
    """Text and image parts in a random order, random lengths and loss flags."""
    parts = []
    for _ in range(int(rng.integers(1, 6))):
        if rng.random() < 0.3:
            slots = int(rng.integers(1, 5))
            parts.append(Part("image", media=sum(p.type == "image" for p in parts), data=rng.normal(size=(slots, FEATURES)).astype(np.float32)))
        else:
            text = "".join(rng.choice(list("abcdefghij klmnop"), size=int(rng.integers(1, 12))))
            parts.append(Part("text", text=text, loss=bool(rng.random() < 0.8)))
    if all(p.type == "image" for p in parts):
        parts.append(Part("text", text="x"))
    return Document(parts, key=key)


def test_fuzz_shard_reader_cuts_and_corruption(tmp_path):
    rng = np.random.default_rng(0)
    docs = [Document([Part("text", text=f"document {i} " * int(rng.integers(1, 30)))], key=f"d{i:03d}") for i in range(30)]
    write_documents(docs, tmp_path / "clean")
    (shard,) = sorted((tmp_path / "clean").glob("*.tar"))
    original = shard.read_bytes()
    for trial in range(60):
        data = bytearray(original)
        if trial % 2:
            data = data[: int(rng.integers(0, len(data)))]
        else:
            for offset in rng.integers(0, len(data), size=int(rng.integers(1, 20))):
                data[int(offset)] = int(rng.integers(0, 256))
        shard.write_bytes(bytes(data))
        policy = BadSamplePolicy(max_bad_fraction=1.0)
        read = list(read_documents([str(shard)], policy=policy))
        assert len(read) <= len(docs) and all(isinstance(d, Document) for d in read)
        if len(read) < len(docs):  # a cut in the archive's zero padding loses nothing, and says nothing
            assert policy.skipped >= 1, f"a shard cut at byte {len(data)} of {len(original)} lost documents unnoticed"
        with pytest.raises((ShardError, DocumentError)) if policy.skipped else _nothing():
            list(read_documents([str(shard)]))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def random_json(rng: np.random.Generator, depth: int = 0):
    kind = int(rng.integers(0, 8 if depth < 3 else 5))
    if kind == 0:
        return None
    if kind == 1:
        return bool(rng.random() < 0.5)
    if kind == 2:
        return int(rng.integers(-5, 10**7))
    if kind == 3:
        return float(rng.choice([0.5, -1.0, 1e30, 3.0, 0.0]))
    if kind == 4:
        return str(rng.choice(["", "hi", "user", "image", "data:image/png;base64,AA==", "text", "x" * 50]))
    if kind in (5, 6):
        keys = ["role", "content", "type", "text", "image_url", "url", "input_audio", "steps", "temperature", "cfg_scale", "data"]
        return {str(rng.choice(keys)): random_json(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))}
    return [random_json(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]


def test_fuzz_request_parser_answers_every_body_with_a_request_or_a_4xx():
    rng = np.random.default_rng(1)
    fields = ["messages", "max_tokens", "n", "stop", "stream", "temperature", "top_p", "image", "audio", "seed", "start_with", "model"]
    caps = {"max_media": 16.0, "image.steps": 400.0, "image.cfg_scale": 20.0, "text.num_beams": 4.0}
    for _ in range(400):
        body = {field: random_json(rng) for field in rng.choice(fields, size=int(rng.integers(0, 6)), replace=False)}
        if rng.random() < 0.5:
            body["messages"] = [{"role": str(rng.choice(["user", "assistant", "system", "robot"])), "content": random_json(rng)}]
        try:
            call = parse_request(json.dumps(body).encode(), "tiny", ServerLimits())
            check_caps(call.settings, caps)
            GenerationSettings().replace(**call.settings)
        except APIError as err:
            assert 400 <= err.status < 500
        except ValueError:
            pass  # the settings' own check: the server answers it with a 400


@pytest.mark.parametrize("bidirectional", [(), ("image",)], ids=["causal-images", "bidirectional-images"])
def test_fuzz_packed_documents_see_only_themselves(char_tokenizer, tiny_llama_config, bidirectional):
    """Random documents packed together: no token is lost or doubled, and each document's logits
    are those it gets alone (stronger than 'the mask never crosses documents')."""
    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    layout = VocabLayout(char_tokenizer.vocab_size)
    backbone = load_backbone(BackboneConfig(config=tiny_llama_config, attention="sdpa"), layout.size)
    model = UnifiedModel(backbone, layout, continuous={"image": LinearAdapter(64, FEATURES)}).eval()
    processor = Processor(char_tokenizer, layout, FEATURES, bidirectional=bidirectional)

    def logits(documents, seq_len, open_sequences):
        packer = Packer(seq_len=seq_len, pad_id=0, feature_dim=FEATURES, open_sequences=open_sequences)
        batch = collate(list(packer.pack([processor.encode(d) for d in documents])))
        with torch.no_grad():
            return model.logits(model.hidden_states(batch)), batch

    for trial in range(6):
        docs = [random_document(rng, f"t{trial}d{i}") for i in range(int(rng.integers(2, 7)))]
        encoded = [processor.encode(d) for d in docs]
        longest = max(len(e) for e in encoded)
        seq_len = int(rng.integers(longest, longest + 40))
        packed, batch = logits(docs, seq_len, int(rng.integers(1, 4)))
        assert int((batch.doc_ids > 0).sum()) == sum(len(e) for e in encoded)  # nothing lost or doubled
        for doc, enc in zip(docs, encoded):
            alone, _ = logits([doc], seq_len, 1)
            matches = [
                (row, number) for row in range(batch.input_ids.shape[0]) for number in batch.doc_ids[row].unique().tolist()
                if number > 0 and torch.equal(batch.input_ids[row][batch.doc_ids[row] == number], torch.as_tensor(enc.ids))
            ]
            assert matches, f"document {doc.key} is not in the packed batch whole"
            row, number = matches[0]
            torch.testing.assert_close(packed[row][batch.doc_ids[row] == number], alone[0][: len(enc)], rtol=0, atol=1e-4)
