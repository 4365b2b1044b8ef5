"""`unimodal data encode`, tokenizer fingerprints in shards and layouts, and Chameleon's VQ-VAE codes."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch

from unimodal.cli import main as unimodal_main
from unimodal.data.datamodule import UnimodalDataModule
from unimodal.data.pre_encode import JOB_FILE, EncodeInterrupted, encode_shards, read_code_sources
from unimodal.schema import Document, DocumentError, Part
from unimodal.data.media import MediaBytes
from unimodal.data.shards import read_documents, write_documents
from unimodal.modalities.audio import HFAudioCodec
from unimodal.modalities.seed_tokenizer import tiny_tokenizer
from unimodal.worlds import resolve

ENCODEC = {"model_type": "encodec", "sampling_rate": 16000, "audio_channels": 1, "hidden_size": 16, "num_filters": 4,
           "num_residual_layers": 1, "upsampling_ratios": [8, 5, 4, 2], "codebook_size": 64, "codebook_dim": 16,
           "target_bandwidths": [0.3, 0.6, 1.2], "num_lstm_layers": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


def png(seed: int) -> MediaBytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, format="png")
    return MediaBytes("png", buffer.getvalue())


def flac(seconds: float, rate: int = 16000) -> MediaBytes:
    import soundfile

    buffer = io.BytesIO()
    wave = 0.3 * np.sin(2 * np.pi * 220 * np.arange(int(seconds * rate)) / rate)
    soundfile.write(buffer, np.stack([wave, wave], axis=1), rate, format="FLAC")  # stereo on purpose
    return MediaBytes("flac", buffer.getvalue())


@pytest.fixture(scope="module")
def raw_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    docs = []
    for i in range(12):
        parts = [Part("text", text=f"picture {i}"), Part("image", media=0, data=png(i))]
        if i % 3 == 0:
            parts.append(Part("audio", media=1, data=flac(0.3)))
        docs.append(Document(parts, key=f"doc{i:03d}"))
    write_documents(docs, root / "raw", max_docs_per_shard=5)
    return root / "raw"


@pytest.fixture(scope="module")
def codecs():
    return {"image": tiny_tokenizer(seed=0).eval(), "audio": HFAudioCodec.from_config(ENCODEC, layers=2)}


@pytest.fixture(scope="module")
def encoded(raw_shards, codecs, tmp_path_factory):
    out = tmp_path_factory.mktemp("enc") / "codes"
    encode_shards(raw_shards, out, codecs, progress=False, batch_size=4)
    return out


def test_encoded_shards_hold_codes_and_name_their_tokenizers(encoded, codecs):
    docs = list(read_documents(encoded))
    assert len(docs) == 12
    image = docs[0].parts[1].data
    assert image.dtype == np.int32 and image.shape == (8,)
    audio = docs[0].parts[2].data
    assert audio.shape == (2, 15)  # 0.3 s at 50 frames/s, 2 layers
    sources = read_code_sources(encoded)
    assert sources == {"image": codecs["image"].fingerprint(), "audio": codecs["audio"].fingerprint()}
    assert sources["image"]["name"] == "seed" and sources["audio"]["layers"] == 2
    assert json.loads((encoded / "stats.json").read_text())["documents"] == 12


def test_pairs_can_be_flipped_and_codes_are_not_encoded_twice(raw_shards, encoded, codecs, tmp_path):
    encode_shards(raw_shards, tmp_path / "flipped", {"image": codecs["image"]}, flip_pairs=1.0, progress=False)
    orders = [[p.type for p in d.parts] for d in read_documents(tmp_path / "flipped")]
    assert orders[1] == ["image", "text"] and orders[0] == ["text", "image", "audio"]  # only 1-image-1-text documents
    with pytest.raises(ValueError, match="already holds audio, image codes"):
        encode_shards(encoded, tmp_path / "again", codecs, progress=False)


def test_a_flipped_pair_keeps_its_loss_on_the_second_part_and_chats_are_never_flipped(codecs, tmp_path):
    caption = Document([Part("image", media=0, data=png(0), loss=False), Part("text", text="a zero")], key="caption")
    chat = Document([Part("text", text="Draw a zero.", role="user", loss=False),
                     Part("image", media=0, data=png(1), role="assistant")], key="chat")
    write_documents([caption, chat], tmp_path / "raw")
    encode_shards(tmp_path / "raw", tmp_path / "flipped", {"image": codecs["image"]}, flip_pairs=1.0, progress=False)
    flipped = {d.key: [(p.type, p.role, p.loss) for p in d.parts] for d in read_documents(tmp_path / "flipped")}
    assert flipped["caption"] == [("text", None, False), ("image", None, True)]  # the generation direction
    assert flipped["chat"] == [("text", "user", False), ("image", "assistant", True)]


class StopsAfter:
    """An image codec that is interrupted (Ctrl-C) after ``batches`` calls and counts what it encodes."""

    def __init__(self, codec, batches: int | None = None):
        self.codec, self.batches, self.calls, self.images = codec, batches, 0, 0

    def fingerprint(self) -> dict:
        return self.codec.fingerprint()

    def encode_batch(self, parts: list) -> list:
        if self.batches is not None and self.calls == self.batches:
            raise KeyboardInterrupt
        self.calls, self.images = self.calls + 1, self.images + len(parts)
        return self.codec.encode_batch(parts)


def test_an_interrupted_encode_resumes_after_its_complete_shards_to_the_same_bytes(raw_shards, codecs, tmp_path):
    settings = {"max_docs_per_shard": 3, "batch_size": 3, "flip_pairs": 0.5, "progress": False}
    whole = tmp_path / "whole"
    encode_shards(raw_shards, whole, {"image": codecs["image"]}, **settings)
    out = tmp_path / "out"
    with pytest.raises(EncodeInterrupted, match=r"^interrupted \(Ctrl-C\); 1 complete shard kept in .*out: run the same command with --resume"):
        encode_shards(raw_shards, out, {"image": StopsAfter(codecs["image"], batches=2)}, **settings)
    # the shard open at Ctrl-C is removed; a shard a kill cut off is removed too, even one cut
    # between two documents (a whole tar, but not full)
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar"] and not (out / "stats.json").exists()
    # read as raw shards, the unfinished set would train on a part of the data with unchecked codes
    with pytest.raises(FileNotFoundError, match=r"out: the command that wrote these shards did not finish \(.writing and no stats.json\); .*--resume"):
        read_code_sources(out)
    cut = tmp_path / "cut"
    write_documents(list(read_documents(whole / "shard-000001.tar", decode=False))[:1], cut)
    (cut / "shard-000000.tar").rename(out / "shard-000001.tar")
    with pytest.raises(FileExistsError, match="holds an interrupted encode .*add --resume"):
        encode_shards(raw_shards, out, {"image": codecs["image"]}, **settings)
    with pytest.raises(ValueError, match="other settings \\(max_docs_per_shard differ\\)"):
        encode_shards(raw_shards, out, {"image": codecs["image"]}, resume=True, **(settings | {"max_docs_per_shard": 4}))
    job = json.loads((out / JOB_FILE).read_text())
    (out / JOB_FILE).write_text(json.dumps(job | {"source": os.path.relpath(raw_shards)}))  # as typed, by earlier versions
    finishing = StopsAfter(codecs["image"])
    encode_shards(raw_shards, out, {"image": finishing}, resume=True, **settings)
    assert finishing.images == 9  # the 3 documents of the kept shard are not encoded again
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in whole.iterdir())
    for shard in whole.iterdir():
        assert (out / shard.name).read_bytes() == shard.read_bytes(), shard.name
    assert not (out / JOB_FILE).exists()
    with pytest.raises(FileExistsError, match=r"already holds shards \(shard-000000\.tar, \.\.\.\); write to an empty directory"):
        encode_shards(raw_shards, out, {"image": codecs["image"]}, **settings)


def test_a_bad_medium_keeps_the_complete_shards_and_says_how_to_go_on(raw_shards, codecs, tmp_path):
    class FailsOnThird(StopsAfter):
        def encode_batch(self, parts: list) -> list:
            if self.calls == 2:
                raise ValueError("a bad image")
            return super().encode_batch(parts)

    out = tmp_path / "out"
    with pytest.raises(DocumentError, match=r"a bad image.*; 1 complete shard kept in .*out: fix it and run the same command with --resume"):
        encode_shards(raw_shards, out, {"image": FailsOnThird(codecs["image"])}, max_docs_per_shard=3, batch_size=3, progress=False)
    # with nothing kept, no job record is left to refuse a plain new start
    class FailsAtOnce(StopsAfter):
        def encode_batch(self, parts: list) -> list:
            raise ValueError("a bad image")

    early = tmp_path / "early"
    with pytest.raises(DocumentError, match="a bad image"):
        encode_shards(raw_shards, early, {"image": FailsAtOnce(codecs["image"])}, max_docs_per_shard=3, batch_size=3, progress=False)
    assert not list(early.iterdir())
    encode_shards(raw_shards, early, {"image": codecs["image"]}, max_docs_per_shard=3, batch_size=3, progress=False)
    # a kill after stats.json was written, before the job record went: finished, nothing removed
    (early / JOB_FILE).write_text("{}")
    before = sorted(p.name for p in early.iterdir() if p.name != JOB_FILE)
    with pytest.raises(FileExistsError, match="holds a finished encode .*nothing to resume"):
        encode_shards(raw_shards, early, {"image": codecs["image"]}, max_docs_per_shard=3, batch_size=3, resume=True, progress=False)
    assert sorted(p.name for p in early.iterdir()) == before
    for bad, message in (({"max_docs_per_shard": 0}, "must be at least 1"), ({"flip_pairs": 2.0}, "a probability")):
        with pytest.raises(ValueError, match=message):
            encode_shards(raw_shards, tmp_path / "bad", {"image": codecs["image"]}, **({"progress": False} | bad))
    assert not (tmp_path / "bad").exists()


def test_resume_starts_afresh_where_nothing_was_begun_and_refuses_a_changed_source(raw_shards, codecs, tmp_path):
    out = tmp_path / "out"
    encode_shards(raw_shards, out, {"image": codecs["image"]}, resume=True, progress=False)
    assert json.loads((out / "stats.json").read_text())["documents"] == 12
    other = tmp_path / "other"
    write_documents([Document([Part("text", text="x"), Part("image", media=0, data=png(i))], key=f"other{i}") for i in range(6)],
                    other, max_docs_per_shard=3)
    begun = tmp_path / "begun"
    with pytest.raises(EncodeInterrupted):
        encode_shards(other, begun, {"image": StopsAfter(codecs["image"], batches=2)}, max_docs_per_shard=1, batch_size=1,
                      progress=False)
    job = json.loads((begun / JOB_FILE).read_text())
    (begun / JOB_FILE).write_text(json.dumps(job | {"source": str(raw_shards)}))  # the same job, pointed at other data
    with pytest.raises(ValueError, match="changed since .* was begun"):
        encode_shards(raw_shards, begun, {"image": codecs["image"]}, max_docs_per_shard=1, batch_size=1, resume=True,
                      progress=False)
    (begun / JOB_FILE).write_text("[]")  # a job file that is JSON but not a job
    with pytest.raises(ValueError, match=r"holds a JSON list, not an object; encode into an empty directory"):
        encode_shards(other, begun, {"image": codecs["image"]}, max_docs_per_shard=1, batch_size=1, resume=True, progress=False)


def module(*paths, **kwargs) -> UnimodalDataModule:
    args = {"seq_len": 64, "batch_size": 2, "steps_per_epoch": 2, "shuffle_buffer": 1,
            "code_ranges": {"image": 64, "audio": 128}, "code_layers": {"audio": 2}} | kwargs
    return UnimodalDataModule([{"path": str(p)} for p in paths], resolve("builtin:codes/tokenizer.model"), **args)


def test_the_layout_records_the_tokenizers_and_batches_use_their_ranges(data_home, encoded, codecs):
    dm = module(encoded)
    assert dm.layout.code_sources["image"] == codecs["image"].fingerprint()
    batch = next(iter(dm.make_train_dataloader()))
    image = (batch.input_ids >= dm.layout.range_offset("image")) & (batch.input_ids < dm.layout.range_offset("audio"))
    assert image.sum() > 0 and int(batch.input_ids.max()) < dm.layout.used_size


def test_codes_of_another_tokenizer_are_refused(data_home, raw_shards, encoded, codecs, tmp_path):
    other = tmp_path / "other"
    encode_shards(raw_shards, other, {"image": tiny_tokenizer(seed=1).eval()}, progress=False)
    with pytest.raises(ValueError, match="codes from different tokenizers is refused"):
        _ = module(encoded, other).layout
    with pytest.raises(ValueError, match="the configured image codec is"):
        _ = module(encoded, codecs={"image": tiny_tokenizer(seed=1)}).layout
    with pytest.raises(ValueError, match=r"code_ranges.image=32"):
        _ = module(encoded, code_ranges={"image": 32, "audio": 128}).layout


def test_a_codec_encoding_on_the_fly_must_fill_its_code_range(data_home, raw_shards, codecs):
    """Raw shards encoded as they are read: a smaller range drops every image document one warning
    at a time, a larger one leaves rows a model can write but the codec cannot decode."""
    for size in (32, 128):
        with pytest.raises(ValueError, match=rf"configured image codec gives image codes of 1 layer x 64 .*code_ranges.image={size}"):
            _ = module(raw_shards, codecs={"image": codecs["image"]}, code_ranges={"image": size}, code_layers={}).layout
    assert module(raw_shards, codecs={"image": codecs["image"]}, code_ranges={"image": 64}, code_layers={}).layout.code_sources


def test_resuming_with_data_of_another_layout_is_refused(data_home, encoded, raw_shards, tmp_path):
    other = tmp_path / "other"
    encode_shards(raw_shards, other, {"image": tiny_tokenizer(seed=1).eval()}, progress=False)
    saved = module(other, code_ranges={"image": 64}, code_layers={}).layout.to_dict()
    dm = module(encoded)
    with pytest.raises(ValueError, match="vocabulary layout mismatch with the data in code_ranges, code_layers, code_sources"):
        dm.load_state_dict({"epoch": 0, "batches": 3, "vocab_layout": saved})
    dm.load_state_dict({"epoch": 0, "batches": 3, "vocab_layout": dm.layout.to_dict()})


def test_cli_encodes_with_a_builtin_tokenizer(data_home, raw_shards, tmp_path, capsys):
    out = tmp_path / "cli"
    assert unimodal_main(["data", "encode", str(raw_shards), "--out", str(out), "--image_tokenizer", "builtin:seed_tokenizer/tiny"]) == 0
    assert "wrote 12 documents" in capsys.readouterr().out
    assert read_code_sources(out)["image"]["tokens_per_item"] == 8
    assert unimodal_main(["data", "encode", str(out), "--out", str(tmp_path / "x"), "--image_tokenizer", "builtin:seed_tokenizer/tiny"]) == 2
    assert "already holds image codes" in capsys.readouterr().err


def test_cli_refuses_bad_options_and_sources_before_any_codec_loads(raw_shards, tmp_path, monkeypatch, capsys):
    from unimodal.modalities import loading

    def no_load(*args, **kwargs):
        raise AssertionError("a codec loaded before the cheap checks")

    monkeypatch.setattr(loading, "load_codec", no_load)
    cases = [
        ([str(raw_shards), "--flip_pairs", "5"], "--flip_pairs is a probability"),
        ([str(raw_shards), "--max_docs_per_shard", "0"], "--max_docs_per_shard and --batch_size must be at least 1"),
        ([str(tmp_path / "missing")], "missing"),
    ]
    for args, reason in cases:
        assert unimodal_main(["data", "encode", *args, "--out", str(tmp_path / "o"), "--image_tokenizer", "SEED_DIR"]) == 2
        assert reason in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_chameleon_vqvae_codes(tmp_path):
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration, ChameleonVQVAE, ChameleonVQVAEConfig

    from unimodal.modalities.image_discrete import ChameleonImageTokenizer

    vq = {"embed_dim": 8, "num_embeddings": 32, "latent_channels": 8, "resolution": 16, "base_channels": 32,
          "channel_multiplier": [1, 1, 2], "num_res_blocks": 1}
    torch.manual_seed(0)
    ChameleonVQVAE(ChameleonVQVAEConfig(**vq)).save_pretrained(tmp_path / "vq")
    tokenizer = ChameleonImageTokenizer.from_pretrained(tmp_path / "vq")
    codes = tokenizer.encode(Part("image", media=0, data=np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)))
    assert codes.shape == (4, 4) and codes.dtype == np.int64 and codes.max() < 32
    assert tokenizer.fingerprint()["tokens_per_item"] == 16
    full = ChameleonConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                           intermediate_size=64, vq_config=vq, vocabulary_map={"<image>": 3})
    ChameleonForConditionalGeneration(full).save_pretrained(tmp_path / "full")
    from_full = ChameleonImageTokenizer.from_pretrained(tmp_path / "full")
    assert from_full.grid == 4 and from_full.codebook_size == 32
    with pytest.raises(NotImplementedError, match="no pixel decoder"):
        tokenizer.decode(codes)
