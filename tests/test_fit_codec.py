"""``unimodal data fit-codec``: a codec refit on other media uses more of its codes, gets a new
fingerprint, and what the old codec made (shards, a model's code rows, an export) refuses it."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from unimodal.checkpoints.export import write_export
from unimodal.checkpoints.load import ExportError, load_exported
from unimodal.cli import main
from unimodal.data.datamodule import UnimodalDataModule
from unimodal.data.media import MediaBytes
from unimodal.data.pre_encode import encode_shards
from unimodal.data.shards import write_documents
from unimodal.modalities.digit_audio import DigitAudioCodec, DigitAudioConfig
from unimodal.modalities.loading import load_codec
from unimodal.modalities.vocab import VocabLayout
from unimodal.models.backbone import BackboneConfig
from unimodal.models.build import build_model
from unimodal.models.lora import LoraSettings
from unimodal.schema import Document, Part
from unimodal.training.module import UnimodalModule

from conftest import TINY_LLAMA

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "demo-export-a96b9df" / "tokenizer.model"  # 512 pieces
RATE = 16000
# the digits speech codec, shrunk: 125 frames/s, 16 mel bands, 2 RVQ layers of 32
SMALL = DigitAudioConfig(n_fft=256, hop=128, n_mels=16, layers=2, codebook_size=32, kmeans_iters=5, griffin_lim_iters=1)
CODES = {"audio": SMALL.codebook_size * SMALL.layers}
AUDIO_SPEC = "unimodal.modalities.DigitAudioCodec"


def world_voice(i: int) -> np.ndarray:
    """What the codec was fitted on: low harmonic hums, like the world's synthetic voices."""
    t = np.arange(int(0.6 * RATE)) / RATE
    f0 = 110 + 15 * i
    return sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 4)).astype(np.float32) * 0.3


def user_voice(i: int) -> np.ndarray:
    """The user's media, of another kind: bright chirps over hiss."""
    rng = np.random.default_rng(i)
    t = np.arange(int(0.6 * RATE)) / RATE
    sweep = np.sin(2 * np.pi * (1500 + 300 * i) * t + 2 * np.pi * 2500 * t**2)
    return (0.5 * sweep + 0.3 * rng.standard_normal(len(t))).astype(np.float32)


def wav(waveform: np.ndarray) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, waveform, RATE, format="WAV")
    return out.getvalue()


@pytest.fixture(scope="module")
def made(tmp_path_factory, one_thread_module) -> dict:
    """The old codec, the user's media (WAV files and raw shards of them), and the refit run."""
    root = tmp_path_factory.mktemp("fit-codec")
    old = DigitAudioCodec(config=SMALL).fit([(world_voice(i), RATE) for i in range(8)])
    old.save(root / "old")
    (root / "media" / "deep").mkdir(parents=True)
    for i in range(8):
        (root / "media" / ("deep" if i % 2 else "") / f"clip{i}.wav").write_bytes(wav(user_voice(i)))
    docs = [Document([Part("text", text="say"), Part("audio", media=0, data=MediaBytes("wav", wav(user_voice(i))))], key=f"d{i}")
            for i in range(8)]
    write_documents(docs, root / "raw")
    return {"root": root, "old": DigitAudioCodec(str(root / "old"))}


@pytest.fixture(scope="module")
def one_thread_module():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def refit(made, tmp_path_factory) -> dict:
    """``unimodal data fit-codec MEDIA --codec OLD --out NEW``, run once: its printed line and codec."""
    out = tmp_path_factory.mktemp("refit") / "audio"
    capture = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.stdout", capture)
        root = made["root"]
        assert main(["data", "fit-codec", str(root / "media"), "--codec", str(root / "old"), "--out", str(out)]) == 0
    return {"line": capture.getvalue(), "dir": out, "codec": load_codec("audio", out)}


def test_a_refit_on_other_media_uses_more_of_the_first_layer(refit, made):
    line = refit["line"]
    assert line.count("\n") == 1, line
    used = re.search(r"first-layer codes used (\d+) -> (\d+) of 32", line)
    assert used, line
    before, after = map(int, used.groups())
    assert "on 8 clips of" in line and after > 2 * before, line  # the hums' centroids cover little of the chirps

    # the same count, on the codes the two codecs give the user's media
    codes = lambda codec: {int(c) for i in range(8) for c in codec.encode_waveform(user_voice(i), RATE)[0]}  # noqa: E731
    assert (len(codes(made["old"])), len(codes(refit["codec"]))) == (before, after)


def test_a_fit_shows_its_k_means_steps_and_fits_what_a_silent_one_fits(capsys):
    """A refit on a large media set runs k-means for minutes: a bar counts each layer's seeding and
    Lloyd steps. Watching it changes nothing fitted."""
    clips = [(world_voice(i), RATE) for i in range(8)]
    quiet = DigitAudioCodec(config=SMALL).fit(clips)
    capsys.readouterr()
    shown = DigitAudioCodec(config=SMALL).fit(clips, progress=True)
    steps = SMALL.layers * (SMALL.kmeans_iters + 1)
    assert re.search(rf"fitting: +\d+%.*\d+/{steps} ", capsys.readouterr().err)
    assert torch.equal(shown.codebooks, quiet.codebooks)


def test_the_refit_codec_loads_like_the_original_with_a_new_fingerprint(refit, made):
    old, new = made["old"].fingerprint(), refit["codec"].fingerprint()
    assert {k: v for k, v in new.items() if k != "checksum"} == {k: v for k, v in old.items() if k != "checksum"}
    assert new["checksum"] != old["checksum"] and f"{old['checksum']} -> {new['checksum']}" in refit["line"]
    assert refit["codec"].config == SMALL and DigitAudioCodec(str(refit["dir"])).fingerprint() == new
    assert refit["codec"].decode_codes(refit["codec"].encode_waveform(user_voice(0), RATE)).shape == (len(user_voice(0)),)


def test_shards_encoded_with_the_old_codec_are_refused_in_one_line(refit, made, tmp_path):
    encode_shards(made["root"] / "raw", tmp_path / "encoded", {"audio": made["old"]}, progress=False)
    data = UnimodalDataModule(datasets=[str(tmp_path / "encoded")], tokenizer=str(TOKENIZER), code_ranges=CODES,
                              code_layers={"audio": 2}, codecs={"audio": refit["codec"]})
    with pytest.raises(ValueError) as refused:
        data.layout
    message = str(refused.value)
    assert "\n" not in message and "unimodal data encode" in message
    assert made["old"].fingerprint()["checksum"] in message and refit["codec"].fingerprint()["checksum"] in message


def layout(codec: DigitAudioCodec) -> VocabLayout:
    return VocabLayout(512, code_ranges=dict(CODES), code_layers={"audio": 2}, code_sources={"audio": codec.fingerprint()})


def export(model, out: Path, codec_dir: Path) -> Path:
    """Write ``model`` as a run with ``codec_dir`` as its audio codec would be exported."""
    codecs = {"audio": {"class_path": AUDIO_SPEC, "init_args": {"path": str(codec_dir)}}}
    write_export(model, out, spec={"backbone": {"config": dict(TINY_LLAMA)}}, merge_lora=False,
                 data={"tokenizer": str(TOKENIZER), "codecs": codecs, "code_ranges": dict(CODES), "code_layers": {"audio": 2}})
    return out


@pytest.fixture(scope="module")
def old_export(made, tmp_path_factory) -> Path:
    """A tiny model whose audio rows were trained on the old codec's codes."""
    torch.manual_seed(0)
    model = build_model(BackboneConfig(config=dict(TINY_LLAMA), attention="sdpa"), layout(made["old"]))
    return export(model, tmp_path_factory.mktemp("old-export") / "export", made["root"] / "old")


def fine_tune(old_export: Path, codec: DigitAudioCodec, **options) -> UnimodalModule:
    module = UnimodalModule(BackboneConfig(config=dict(TINY_LLAMA), attention="sdpa"), vocab=layout(codec).to_dict(),
                            init_from=str(old_export), **options)
    module.configure_model()
    return module


def test_fine_tuning_an_export_with_the_refit_codec_is_refused_in_one_line(refit, made, old_export):
    with pytest.raises(ExportError) as refused:
        fine_tune(old_export, refit["codec"])
    message = str(refused.value)
    assert "\n" not in message and "--model.init_args.reinit_codes=[audio]" in message
    assert made["old"].fingerprint()["checksum"] in message and refit["codec"].fingerprint()["checksum"] in message
    fine_tune(old_export, made["old"])  # the codec the export was trained with still fine-tunes


def test_reinit_codes_restarts_the_audio_rows_and_the_export_carries_the_refit_codec(refit, old_export, tmp_path):
    trained = load_exported(old_export).model.backbone.get_input_embeddings().weight
    model = fine_tune(old_export, refit["codec"], reinit_codes=["audio"]).model
    rows = model.backbone.get_input_embeddings().weight.detach()
    start = 512 + 5  # after the text pieces and the five special tokens
    audio = slice(start, start + CODES["audio"])
    torch.testing.assert_close(rows[:start], trained[:start])  # text and special rows kept
    assert not torch.isclose(rows[audio], trained[audio]).any()  # every audio row restarted
    torch.testing.assert_close(rows[audio].mean(0), rows[:512].mean(0), atol=1e-2, rtol=0)  # at the text rows' mean
    assert rows[audio].std(0).min() > 0  # and apart from each other

    exported = load_exported(export(model, tmp_path / "refit-export", refit["dir"]))
    assert (tmp_path / "refit-export" / "codecs" / "audio" / "codebooks.npy").is_file()
    assert exported.processor.codecs["audio"].fingerprint() == refit["codec"].fingerprint()
    assert exported.processor.layout.code_sources["audio"] == refit["codec"].fingerprint()


def test_restarted_rows_must_train(refit, old_export):
    frozen = LoraSettings(r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"does not train the embeddings: set --model.init_args.lora.train_new_tokens=true"):
        fine_tune(old_export, refit["codec"], reinit_codes=["audio"], lora=frozen)
    trained = LoraSettings(r=2, target_modules=["q_proj"], train_new_tokens=True)
    fine_tune(old_export, refit["codec"], reinit_codes=["audio"], lora=trained)


def test_a_refit_codec_put_into_an_old_export_is_refused_in_one_line(refit, made, old_export, tmp_path):
    swapped = shutil.copytree(old_export, tmp_path / "swapped")
    shutil.rmtree(swapped / "codecs" / "audio")
    shutil.copytree(refit["dir"], swapped / "codecs" / "audio")
    with pytest.raises(ValueError) as refused:
        load_exported(swapped)
    message = str(refused.value)
    assert "\n" not in message and "reinit_codes=[audio]" in message
    assert made["old"].fingerprint()["checksum"] in message and refit["codec"].fingerprint()["checksum"] in message


@pytest.mark.parametrize(
    ("codec", "expected"),
    [
        ("builtin:seed_tokenizer/tiny", "recipes/seed/tokenizer_stage2.yaml"),
        ("no-such-codec", "neither a fitted codec directory"),
    ],
)
def test_codecs_it_cannot_refit_are_refused_in_one_line(codec, expected, made, tmp_path, capsys):
    assert main(["data", "fit-codec", str(made["root"] / "media"), "--codec", codec, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("unimodal data fit-codec: error: ") and expected in err


def test_a_file_as_out_and_a_limit_below_one_are_refused_before_any_media_is_read(made, tmp_path, capsys):
    occupied = tmp_path / "notes.txt"
    occupied.write_text("mine")
    base = ["data", "fit-codec", str(tmp_path / "nothing-read"), "--codec", str(made["root"] / "old")]
    assert main([*base, "--out", str(occupied)]) == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"{occupied} is a file; write the refit codec to a new directory")
    assert main([*base, "--out", str(tmp_path / "out"), "--limit", "0"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith("--limit must be at least 1 (clips or images to fit on), got 0")
    assert occupied.read_text() == "mine"


def test_a_media_folder_that_is_not_there_is_named(made, tmp_path, capsys):
    missing = tmp_path / "novoices"
    assert main(["data", "fit-codec", str(missing), "--codec", str(made["root"] / "old"), "--out", str(tmp_path / "out")]) == 2
    # the one line alone, without an empty "reading" bar drawn before it
    assert capsys.readouterr().err == f"unimodal data fit-codec: error: {missing} does not exist (a folder of audio files, or shards)\n"
    (tmp_path / "empty").mkdir()
    assert main(["data", "fit-codec", str(tmp_path / "empty"), "--codec", str(made["root"] / "old"), "--out", str(tmp_path / "out")]) == 2
    # the reading bar is cleared ("\r", blanks, "\r") before the line, so a terminal shows that line alone
    shown = capsys.readouterr().err.split("\r")[-1]
    assert shown.startswith(f"unimodal data fit-codec: error: {tmp_path / 'empty'}: no audio media to fit the audio codec on") and shown.count("\n") == 1


def test_a_folder_named_like_media_is_skipped_and_an_unreadable_file_is_named(made, tmp_path, capsys, monkeypatch):
    media = tmp_path / "voices"
    media.mkdir()
    clips = sorted((made["root"] / "media").rglob("*.wav"))[:3]
    for clip in clips:
        (media / clip.name).write_bytes(clip.read_bytes())
    (media / "takes.wav").mkdir()  # a folder, not a clip: left out
    from unimodal.data.fit_codec import _media

    assert sorted(Path(where).name for where, _ in _media(str(media), "audio")) == sorted(c.name for c in clips)
    read_bytes = Path.read_bytes

    def denied(path: Path) -> bytes:
        if path.name == clips[0].name:
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", denied)
    assert main(["data", "fit-codec", str(media), "--codec", str(made["root"] / "old"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"unimodal data fit-codec: error: {media}: audio file {str(media / clips[0].name)!r} cannot be read (Permission denied)")


def test_the_docs_voices_are_what_refit_codec_md_says(tmp_path, capsys, monkeypatch):
    """docs/tools/synthetic_voices.py: seeded 22.05 kHz clips of 1-1.8 s, which the world's codec
    puts on few first-layer codes, and its usage count is the one fit-codec reports."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("synthetic_voices", ROOT / "docs" / "tools" / "synthetic_voices.py")
    voices = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(voices)
    for run in ("a", "b"):
        monkeypatch.setattr(sys, "argv", ["synthetic_voices.py", "make", "--out", str(tmp_path / run), "--count", "6"])
        voices.main()
    files = sorted((tmp_path / "a").iterdir())
    assert [f.name for f in files] == [f"voice-{i:03d}.wav" for i in range(6)]
    assert all(f.read_bytes() == (tmp_path / "b" / f.name).read_bytes() for f in files)  # seeded
    for f in files:
        waveform, rate = soundfile.read(f)
        assert rate == 22050 and 1.0 <= len(waveform) / rate <= 1.8 and 0.5 < np.abs(waveform).max() <= 0.81
    codec = DigitAudioCodec(config=SMALL).fit([(world_voice(i), RATE) for i in range(8)], seed=0)
    codec.save(tmp_path / "codec")
    counts = {}
    for skip in (0, 2):
        monkeypatch.setattr(sys, "argv", ["synthetic_voices.py", "usage", str(tmp_path / "codec"), str(tmp_path / "a"), "--skip", str(skip)])
        voices.main()
        line = capsys.readouterr().out.splitlines()[-1]
        counted = re.fullmatch(rf"{tmp_path / 'codec'} on (\d) clips of {tmp_path / 'a'}: first-layer codes used (\d+) of 32", line)
        assert counted and int(counted[1]) == 6 - skip, line
        counts[skip] = int(counted[2])
    assert main(["data", "fit-codec", str(tmp_path / "a"), "--codec", str(tmp_path / "codec"), "--out", str(tmp_path / "refit")]) == 0
    before = int(re.search(r"codes used (\d+) -> (\d+) of 32", capsys.readouterr().out)[1])
    assert counts[2] <= counts[0] == before < 16  # fit-codec's own count; few codes for these voices
