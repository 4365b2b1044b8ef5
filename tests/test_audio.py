"""RVQ audio codecs: one interface over EnCodec, Mimi and DAC; waveform -> codes -> ids -> codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from unimodal.data.processor import Processor
from unimodal.schema import Document, Part
from unimodal.inference.constraints import extract_spans
from unimodal.modalities.audio import HFAudioCodec, load_audio_codec, resample, to_mono
from unimodal.modalities.base import AudioTooLong
from unimodal.modalities.vocab import VocabLayout

RATE = 16000
CODECS = {
    "encodec": {"model_type": "encodec", "sampling_rate": RATE, "audio_channels": 1, "hidden_size": 16, "num_filters": 4,
                "num_residual_layers": 1, "upsampling_ratios": [8, 5, 4, 2], "codebook_size": 64, "codebook_dim": 16,
                "target_bandwidths": [0.3, 0.6, 1.2], "num_lstm_layers": 1},
    "mimi": {"model_type": "mimi", "sampling_rate": RATE, "hidden_size": 16, "num_filters": 4, "upsampling_ratios": [5, 4, 4],
             "codebook_size": 32, "codebook_dim": 16, "num_quantizers": 4, "vector_quantization_hidden_dimension": 16,
             "upsample_groups": 16, "num_hidden_layers": 1, "intermediate_size": 32, "num_attention_heads": 2,
             "num_key_value_heads": 2, "sliding_window": 32, "max_position_embeddings": 1000},
    "dac": {"model_type": "dac", "encoder_hidden_size": 4, "downsampling_ratios": [2, 4, 5], "decoder_hidden_size": 16,
            "n_codebooks": 3, "codebook_size": 32, "codebook_dim": 4, "hidden_size": 16, "sampling_rate": RATE},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def speech(seconds: float = 0.5, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(0)
    return (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t) + 0.05 * rng.normal(size=len(t))).astype(np.float32)


def test_resampling_keeps_the_band_and_removes_aliases():
    t = np.arange(44100) / 44100
    tone = resample(np.sin(2 * np.pi * 440 * t).astype(np.float32), 44100, RATE)
    assert len(tone) == RATE
    want = np.sin(2 * np.pi * 440 * np.arange(RATE) / RATE)
    assert np.abs(tone - want)[200:-200].max() < 1e-3
    above_nyquist = np.sin(2 * np.pi * 7000 * np.arange(RATE) / RATE).astype(np.float32)
    assert np.abs(resample(above_nyquist, RATE, 8000))[100:-100].max() < 1e-2


def test_stereo_is_averaged():
    stereo = np.stack([np.ones(4), np.zeros(4)], axis=1)
    assert to_mono(stereo).tolist() == [0.5] * 4
    with pytest.raises(ValueError, match="expected"):
        to_mono(np.zeros((2, 2, 2)))


@pytest.mark.parametrize("kind", list(CODECS))
def test_waveform_codes_ids_codes_round_trip(kind, char_tokenizer):
    codec = HFAudioCodec.from_config(CODECS[kind])
    codes = codec.encode_waveform(speech(), RATE)
    assert codes.shape == (codec.layers, round(0.5 * codec.frame_rate))
    assert all(len(np.unique(layer)) > 2 for layer in codes)  # codebooks filled: not all-zero codes
    layout = VocabLayout(char_tokenizer.vocab_size, code_ranges={"audio": codec.codebook_size * codec.layers}, code_layers={"audio": codec.layers})
    doc = Document([Part("text", text="say it"), Part("audio", media=0, data=(speech(), RATE))], key="k")
    ids = Processor(char_tokenizer, layout, codecs={"audio": codec}).encode(doc).ids
    (span,) = extract_spans(ids, layout, {"audio": {"layers": codec.layers}})
    np.testing.assert_array_equal(span.codes, codes)
    waveform, rate = codec.decode(codes)
    assert rate == RATE and abs(len(waveform) - 0.5 * RATE) < 0.02 * RATE


def test_rates_channels_and_layers_are_normalised():
    codec = HFAudioCodec.from_config(CODECS["encodec"], layers=2)
    mono = codec.encode_waveform(speech(), RATE)
    assert mono.shape[0] == 2
    stereo = np.stack([speech(), speech()], axis=1)
    np.testing.assert_array_equal(codec.encode_waveform(stereo, RATE), mono)
    slower = codec.encode_waveform(speech(rate=8000), 8000)
    assert slower.shape == mono.shape
    with pytest.raises(ValueError, match="has 4 RVQ layers; asked for 5"):
        HFAudioCodec.from_config(CODECS["encodec"], layers=5)


def test_too_long_audio_is_a_clear_error():
    codec = HFAudioCodec.from_config(CODECS["dac"], max_seconds=0.25)
    with pytest.raises(AudioTooLong, match=r"0.5 s is longer than the dac codec's max_seconds=0.25"):
        codec.encode_waveform(speech(), RATE)


def test_local_directory_and_fingerprint(tmp_path):
    codec = HFAudioCodec.from_config(CODECS["mimi"], layers=3)
    codec.model.save_pretrained(tmp_path / "mimi")
    loaded = load_audio_codec(tmp_path / "mimi", layers=3)
    assert loaded.fingerprint() == codec.fingerprint()
    np.testing.assert_array_equal(loaded.encode_waveform(speech(), RATE), codec.encode_waveform(speech(), RATE))
    other = HFAudioCodec.from_config(CODECS["mimi"], layers=3, seed=1)
    assert other.fingerprint()["checksum"] != codec.fingerprint()["checksum"]
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_audio_codec(tmp_path / "nothing")


def test_weights_that_do_not_fill_the_codec_are_one_line(tmp_path):
    """EnCodec would start the missing tensor afresh with only a warning: codes of a random codec."""
    from safetensors.torch import load_file, save_file

    HFAudioCodec.from_config(CODECS["encodec"]).model.save_pretrained(tmp_path / "encodec")
    weights = load_file(str(tmp_path / "encodec" / "model.safetensors"))
    del weights["decoder.layers.0.conv.bias"]
    save_file(weights, str(tmp_path / "encodec" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"do not fill the EncodecModel .*decoder.layers.0.conv.bias"):
        load_audio_codec(tmp_path / "encodec")


@pytest.mark.parametrize(
    ("kind", "changes", "needle"),
    [
        # transformers would build 10**6 layers for hours, or allocate what the weights lack until memory ran out
        ("encodec", {"num_lstm_layers": 10**6}, r"config.json declares a model of at least [\d,]+ parameters .* but its weights hold"),
        ("mimi", {"num_hidden_layers": 10**6}, r"config.json declares a model of at least"),
        ("mimi", {"hidden_size": 10**6}, r"config.json declares a model of at least"),
        ("dac", {"n_codebooks": 10**6}, r"config.json declares a model of at least"),
        ("dac", {"codebook_size": 2**30}, r"config.json declares a model of at least"),
        ("encodec", {"dtype": "evil"}, r"encodec/config.json: dtype is 'evil', not a torch dtype"),
        ("encodec", {"codebook_size": 1000}, r"encodec/config.json: a value the model cannot be built from \(ValueError: The codebook_size must be a power of 2"),
    ],
)
def test_a_codec_config_it_cannot_be_built_from_is_one_line(tmp_path, kind, changes, needle):
    HFAudioCodec.from_config(CODECS[kind]).model.save_pretrained(tmp_path / kind)
    file = tmp_path / kind / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))
    with pytest.raises(ValueError, match=needle) as caught:
        load_audio_codec(tmp_path / kind)
    assert "\n" not in str(caught.value)


def test_loud_garbage_and_tiny_clips():
    codec = HFAudioCodec.from_config(CODECS["encodec"])
    with pytest.raises(ValueError, match=r"peaks at 1e\+30; samples belong in \[-1, 1\]"):
        codec.encode_waveform(np.full(RATE, 1e30, np.float32), RATE)
    assert codec.encode_waveform(speech() * 3, RATE).shape == (codec.layers, 25)  # overshoot is still audio
    dac = HFAudioCodec.from_config(CODECS["dac"])
    assert dac.encode_waveform(np.full(1, 0.1, np.float32), RATE).shape == (dac.layers, 1)


def test_a_directory_of_another_model_is_named_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="config.json: neither an HF codec"):
        load_audio_codec(tmp_path)


def test_a_clip_the_codec_refuses_is_one_bad_sample_not_the_end_of_training(char_tokenizer):
    """A shard clip longer than the codec's max_seconds (or NaN, or silent) is skipped and counted;
    raised as it was, it ended the run, and --resume auto came back to the same clip."""
    from unimodal.data.datamodule import StreamConfig
    from unimodal.data.shards import BadSamplePolicy

    codec = HFAudioCodec.from_config(CODECS["encodec"], max_seconds=1.0)
    layout = VocabLayout(char_tokenizer.vocab_size, code_ranges={"audio": codec.codebook_size * codec.layers}, code_layers={"audio": codec.layers})
    processor = Processor(char_tokenizer, layout, codecs={"audio": codec})
    nan = speech()
    nan[3] = np.nan
    docs = [Document([Part("text", text="say it"), Part("audio", media=0, data=(clip, RATE))], key=key)
            for key, clip in (("long", speech(3.0)), ("nan", nan), ("fine", speech()))]
    docs.append(Document([Part("text", text="x"), Part("image", media=0, data=np.array(1.5, dtype=np.float32))], key="scalar"))
    docs += [Document([Part("text", text="x"), Part("image", media=0, data=np.zeros(shape, np.float32))], key=f"empty {shape}")
             for shape in ((0,), (5, 0))]
    policy = BadSamplePolicy(max_bad_fraction=1.0)
    batches = list(StreamConfig(processor, seq_len=256, batch_size=4).batches(docs, policy))
    assert policy.skipped == 5 and policy.seen == 6
    (batch,) = batches
    assert int(batch.doc_ids.max()) == 1 and int(batch.samples_skipped) == 5  # the one good document, and the count


def test_a_speechtokenizer_checkpoint_is_read_weights_only_and_sized_first(tmp_path, monkeypatch):
    """The speechtokenizer package's load_from_checkpoint calls torch.load with its defaults, which
    unpickle (and run) anything before torch 2.6: the codec builds the model and reads the .pt
    itself, weights only, after sizing the config against it."""
    import sys
    import types

    import torch

    from unimodal.modalities.audio import SpeechTokenizerCodec

    class Stub(torch.nn.Module):  # the package's constructor takes the config dict
        def __init__(self, config):
            super().__init__()
            self.encoder = torch.nn.Linear(1, config["dimension"])

        @classmethod
        def load_from_checkpoint(cls, *args):
            raise AssertionError("the package's loader unpickles with torch.load's defaults")

    package = types.ModuleType("speechtokenizer")
    package.SpeechTokenizer = Stub
    monkeypatch.setitem(sys.modules, "speechtokenizer", package)
    config = {"n_q": 2, "sample_rate": 16000, "strides": [8, 5, 4, 2], "codebook_size": 16, "dimension": 4}

    def checkpoint(name: str, weights: object, **changes: object) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps({**config, **changes}))
        torch.save(weights, directory / "SpeechTokenizer.pt")
        return directory

    good = Stub(config).state_dict()
    codec = SpeechTokenizerCodec(checkpoint("good", good))
    assert torch.equal(codec.model.encoder.weight, good["encoder.weight"]) and codec.layers == 2

    class RunsCode:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "ran",))

    with pytest.raises(ValueError, match="SpeechTokenizer.pt is not a whole weights-only file; pickled code is never run"):
        SpeechTokenizerCodec(checkpoint("code", {"encoder.weight": RunsCode()}))
    assert not (tmp_path / "ran").exists()
    with pytest.raises(ValueError, match=r"declares a SpeechTokenizer of at least [\d,]+ parameters .* but SpeechTokenizer.pt holds 8 "):
        SpeechTokenizerCodec(checkpoint("huge", good, dimension=10**7))
    with pytest.raises(ValueError, match="does not fill the SpeechTokenizer"):
        SpeechTokenizerCodec(checkpoint("other", {"encoder.weight": torch.zeros(3, 1)}))
