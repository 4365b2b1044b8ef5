"""The SEED tokenizer: causal queries, VQ with straight-through, strict files, and its two training stages."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from unimodal.cli import main as unimodal_main
from unimodal.schema import Part
from unimodal.modalities.seed_tokenizer import CONFIG_FILE, WEIGHTS_FILE, SeedImageCodec, SeedTokenizer, VectorQuantizer, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def image(seed: int, size: int = 20) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size + 4, 3), dtype=np.uint8)


def test_vq_is_nearest_with_straight_through_gradient():
    vq = VectorQuantizer(16, 4, beta=0.25)
    z = torch.randn(3, 5, 4, requires_grad=True)
    codes, quantized, loss = vq(z)
    book = torch.nn.functional.normalize(vq.codebook.weight, dim=-1)
    cosine = torch.nn.functional.normalize(z, dim=-1) @ book.t()
    assert torch.equal(codes, cosine.argmax(-1))
    assert torch.allclose(quantized, book[codes], atol=1e-6)
    (quantized.sum() + loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # gradient reaches the encoder side
    assert vq.codebook.weight.grad.abs().sum() > 0  # and the codebook, through the VQ loss


def test_queries_are_causal_among_themselves():
    tokenizer = tiny_tokenizer().eval()
    features = torch.randn(2, 17, tokenizer.config.vision_dim)
    before = tokenizer.qformer(features)
    with torch.no_grad():
        tokenizer.qformer.queries[5] += 1.0
    after = tokenizer.qformer(features)
    assert torch.allclose(before[:, :5], after[:, :5], atol=1e-6)
    assert not torch.allclose(before[:, 5:], after[:, 5:])


def test_codec_round_trip_and_strict_files(tmp_path):
    tokenizer = tiny_tokenizer().eval()
    codes = tokenizer.encode(Part("image", media=0, data=image(0)))
    assert codes.shape == (8,) and codes.dtype == np.int64 and codes.max() < 64
    assert tokenizer.decode(codes).shape == (16, 16, 3)
    np.testing.assert_array_equal(tokenizer.encode_batch([Part("image", data=image(s)) for s in (0, 1)])[0], codes)
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = SeedTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.fingerprint() == tokenizer.fingerprint()
    np.testing.assert_array_equal(loaded.encode(Part("image", media=0, data=image(0))), codes)
    from safetensors.torch import load_file, save_file

    codec = SeedImageCodec(str(tmp_path / "tok"))  # the form a recipe's codecs: entry names
    assert codec.fingerprint() == tokenizer.fingerprint()
    np.testing.assert_array_equal(codec.encode(Part("image", media=0, data=image(0))), codes)
    np.testing.assert_array_equal(codec.decode(codes), tokenizer.decode(codes))
    weights = load_file(str(tmp_path / "tok" / WEIGHTS_FILE))
    weights.pop("decoder.to_embedding.weight")
    save_file(weights, str(tmp_path / "tok" / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="missing .*decoder.to_embedding.weight"):
        SeedTokenizer.from_pretrained(tmp_path / "tok")


def edit_config(directory: Path, **changes: object) -> None:
    saved = json.loads((directory / CONFIG_FILE).read_text())
    saved["config"].update(changes)
    (directory / CONFIG_FILE).write_text(json.dumps(saved))


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: (d / CONFIG_FILE).write_text('{"config": {'), r"seed_tokenizer.json is not valid JSON"),
    (lambda d: (d / CONFIG_FILE).write_text('{"config": {"widht": 8}}'), r"'config' must be an object of SeedConfig's fields"),
    (lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:100]), r"the weights in .*tok cannot be read"),
    # sizes that would allocate before the weights are compared: a probe of 10**6 x 10**6 pixels, 10**6 blocks
    (lambda d: edit_config(d, image_size=10**6, vision_dim=0), r"seed_tokenizer.json: a saved SEED tokenizer names its vision_dim"),
    (lambda d: edit_config(d, image_size=10**6), r"seed_tokenizer.json: image_size=1000000; it must be an integer in \[1, 4096\]"),
    (lambda d: edit_config(d, depth=10**6), r"seed_tokenizer.json declares a tokenizer of at least [\d,]+ parameters .* but seed_tokenizer.safetensors holds"),
    # values the modules cannot be built from, or weights of other shapes: torch's assertions and size mismatches
    (lambda d: edit_config(d, heads=3), r"seed_tokenizer.json: SEED tokenizer config: width 32 is not a multiple of heads 3"),
    (lambda d: edit_config(d, num_queries=-1), r"seed_tokenizer.json: SEED tokenizer config: num_queries=-1; it must be an integer >= 1"),
    (lambda d: edit_config(d, mean=[0.5]), r"seed_tokenizer.json: SEED tokenizer config: mean \[0.5\] and std .* must be 3 finite numbers"),
    (lambda d: edit_config(d, codebook_size=65), r"the weights in .*tok do not have the shapes .*size mismatch for quantizer"),
])
def test_a_damaged_seed_tokenizer_is_one_line_naming_it(tmp_path, damage, message):
    """Its own files were read bare: a cut copy was a JSONDecodeError, a SafetensorError or a
    TypeError from SeedConfig, naming no file (stage 2's init_from reads it directly)."""
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    damage(tmp_path / "tok")
    with pytest.raises(ValueError, match=message) as caught:
        SeedTokenizer.from_pretrained(tmp_path / "tok")
    assert "\n" not in str(caught.value) and str(tmp_path / "tok") in str(caught.value)


def test_a_tokenizer_whose_vision_tower_was_saved_in_bf16_reads_fp32_pixels(tmp_path):
    """The encoders load in the dtype their folders record; the Q-Former and the pixels are fp32."""
    tokenizer = tiny_tokenizer()
    codes = tokenizer.encode(Part("image", media=0, data=image(0)))
    tokenizer.vision.to(torch.bfloat16)
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = SeedTokenizer.from_pretrained(tmp_path / "tok")
    assert next(loaded.vision.parameters()).dtype == torch.float32
    assert loaded.encode(Part("image", media=0, data=image(0))).shape == codes.shape


def tiny_unclip_pipeline(out: Path, embed_dim: int) -> Path:
    """A random ``StableUnCLIPImg2ImgPipeline`` of a few thousand parameters, saved as diffusers
    saves the real one (stable-diffusion-2-1-unclip): a folder per component beside model_index.json."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    vocab = out.parent / "clip-vocab"
    vocab.mkdir(parents=True)
    (vocab / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "a": 3}))
    (vocab / "merges.txt").write_text("#version: 0.2\n")
    clip = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(size=16, crop_size=16),
        image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(**clip, image_size=16, patch_size=8, projection_dim=embed_dim)),
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=embed_dim),
        image_noising_scheduler=DDPMScheduler(),
        tokenizer=CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), model_max_length=8),
        text_encoder=CLIPTextModel(CLIPTextConfig(**clip, vocab_size=4, max_position_embeddings=8, projection_dim=16)),
        unet=UNet2DConditionModel(
            # per-block head sizes, as stable-diffusion-2-1-unclip's [5, 10, 20, 20] (config.json holds a list)
            sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=(2, 2),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16, class_embed_type="projection", projection_class_embeddings_input_dim=2 * embed_dim,
        ),
        scheduler=DDIMScheduler(),
        vae=AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=4, sample_size=16,
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    ).save_pretrained(out)
    return out


def test_an_attached_unclip_pipeline_draws_the_tokenizers_codes(tmp_path, capfd, monkeypatch):
    """SEED's own pixel decoder at full scale: the codes' image embedding drawn by unCLIP, without
    the libraries' loading bars (on, as in a fresh Python session) or diffusers' notes on the
    components it is handed."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    hf_logging.enable_progress_bar()
    diffusers_logging.enable_progress_bar()
    tokenizer = tiny_tokenizer().eval()
    codes = tokenizer.encode(Part("image", media=0, data=image(0)))
    small = tokenizer.decode(codes)
    pipeline = tiny_unclip_pipeline(tmp_path / "unclip", tokenizer.config.embed_dim)
    capfd.readouterr()
    tokenizer.attach_unclip(pipeline, steps=2)
    drawn = tokenizer.decode(codes)
    assert drawn.shape == (16, 16, 3) and drawn.dtype == np.uint8 and not np.array_equal(drawn, small)
    shown = capfd.readouterr().err
    assert "Loading" not in shown and "cannot verify" not in shown and "it/s" not in shown, shown
    with pytest.raises(ValueError, match=r"draws from 5-wide image embeddings, and this tokenizer decodes codes to \d+-wide"):
        tokenizer.attach_unclip(tiny_unclip_pipeline(tmp_path / "other" / "unclip", 5))


def _unet_config(path: Path, **changes) -> None:
    file = path / "unet" / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def _unet_pickled(path: Path, marker: Path) -> None:
    from safetensors.torch import load_file
    from test_reliability import _Payload

    (file,) = (path / "unet").glob("*.safetensors")
    torch.save({**load_file(str(file)), "payload": _Payload(marker)}, path / "unet" / "diffusion_pytorch_model.bin")
    file.unlink()


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d, _: (d / "model_index.json").unlink(), r"is not a diffusers pipeline directory \(no model_index.json\)"),
    (lambda d, _: [f.write_bytes(f.read_bytes()[:3000]) for f in (d / "unet").glob("*.safetensors")], r"the weights in .*unet cannot be read"),
    (_unet_pickled, r"the weights in .*unet cannot be read"),
    # diffusers would build 10**6 blocks for hours before finding the weights do not fill them
    (lambda d, _: _unet_config(d, layers_per_block=10**6), r"unet/config.json declares a model of at least [\d,]+ parameters"),
    (lambda d, _: _unet_config(d, layers_per_block="2"), r"unet/config.json: .*layers_per_block is '2', where UNet2DConditionModel takes int"),
])
def test_a_damaged_unclip_pipeline_is_one_line_and_runs_no_code(tmp_path, damage, message):
    tokenizer = tiny_tokenizer().eval()
    pipeline = tiny_unclip_pipeline(tmp_path / "unclip", tokenizer.config.embed_dim)
    marker = tmp_path / "ran"
    damage(pipeline, marker)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as caught:
        tokenizer.attach_unclip(pipeline)
    assert "\n" not in str(caught.value) and not marker.exists() and tokenizer.unclip is None


def metric(run: Path, name: str) -> list[float]:
    (metrics,) = run.glob("logs/version_*/metrics.csv")
    with metrics.open() as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


def train(recipe: str, run: Path, *extra: str) -> None:
    args = ["train", str(ROOT / "recipes" / "seed" / recipe), "--tiny", f"--trainer.default_root_dir={run}",
            "--trainer.enable_progress_bar=false", "--trainer.max_steps=16", *extra]
    assert unimodal_main(args) == 0


def falls(values: list[float]) -> bool:
    return np.mean(values[-4:]) < 0.8 * np.mean(values[:4])


def test_stage1_then_stage2_train_and_export(data_home, tmp_path):
    train("tokenizer_stage1.yaml", tmp_path / "s1")
    assert falls(metric(tmp_path / "s1", "train/loss"))
    exported = tmp_path / "s1" / "tokenizer"
    assert json.loads((exported / "seed_tokenizer.json").read_text())["config"]["num_queries"] == 8
    # `unimodal export` of the stage's checkpoint writes the same tokenizer
    assert unimodal_main(["export", str(tmp_path / "s1"), "--out", str(tmp_path / "s1-export")]) == 0
    for name, value in SeedTokenizer.from_pretrained(exported).state_dict().items():
        assert torch.equal(value, SeedTokenizer.from_pretrained(tmp_path / "s1-export").state_dict()[name]), name
    train("tokenizer_stage2.yaml", tmp_path / "s2", f"--model.init_args.init_from={exported}")
    assert falls(metric(tmp_path / "s2", "train/loss"))
    stage1, stage2 = SeedTokenizer.from_pretrained(exported), SeedTokenizer.from_pretrained(tmp_path / "s2" / "tokenizer")
    for name, value in stage1.qformer.state_dict().items():  # the Q-Former stayed frozen in stage 2
        assert torch.equal(value, stage2.qformer.state_dict()[name]), name
    assert not torch.equal(stage1.quantizer.codebook.weight, stage2.quantizer.codebook.weight)
    assert all(torch.equal(v, stage2.vision.state_dict()[k]) for k, v in stage1.vision.state_dict().items())

    # train_vision: the same run, seeded alike, with the random vision encoder learning too
    train("tokenizer_stage1.yaml", tmp_path / "s1v", "--model.init_args.train_vision=true")
    trained = SeedTokenizer.from_pretrained(tmp_path / "s1v" / "tokenizer").vision.state_dict()
    changed = [k for k, v in stage1.vision.state_dict().items() if not torch.equal(v, trained[k])]
    assert "embeddings.patch_embeddings.projection.weight" in changed and len(changed) > len(trained) // 2


def test_stage2_alone_starts_from_the_builtin_tokenizer(data_home, tmp_path):
    train("tokenizer_stage2.yaml", tmp_path / "s2")
    losses = metric(tmp_path / "s2", "train/loss")
    assert falls(losses) and len(losses) == 16
    assert metric(tmp_path / "s2", "train/distillation")


def test_stage2_trains_its_modules_in_train_mode(tmp_path):
    """The tokenizer stage 1 wrote comes back from disk in eval mode, which Lightning keeps: stage 2
    trained its quantizer and decoders in eval mode (its summary: 0 modules in train mode)."""
    from unimodal.training.seed_tokenizer_stages import SeedTokenizerStage2

    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    stage = SeedTokenizerStage2(init_from=str(tmp_path / "tok"), vocab={"text_size": 64})
    stage.configure_model()
    tokenizer = stage.tokenizer
    assert tokenizer.decoder.training and tokenizer.quantizer.training and tokenizer.pixel_decoder.training
    assert not tokenizer.qformer.training and not tokenizer.vision.training  # frozen


def test_an_export_dir_holding_other_files_is_refused_before_training(tmp_path):
    """The tokenizer written at the end of fit replaces export_dir whole: a directory of the user's
    own files given by mistake would have been deleted after the run."""
    from unimodal.training.seed_tokenizer_stages import SeedTokenizerStage2

    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    for taken in ("mine", "file"):
        with pytest.raises(FileExistsError, match=rf"model.export_dir {tmp_path / taken} holds something other than a SEED tokenizer"):
            SeedTokenizerStage2(init_from=str(tmp_path / "tok"), vocab={"text_size": 64}, export_dir=str(tmp_path / taken))
    assert (tmp_path / "mine" / "keep.txt").read_text() == "mine"
    for fine in ("tok", "empty", "new"):  # an earlier tokenizer (a stage run again), an empty or a new directory
        (tmp_path / "empty").mkdir(exist_ok=True)
        SeedTokenizerStage2(init_from=str(tmp_path / "tok"), vocab={"text_size": 64}, export_dir=str(tmp_path / fine))


def test_pairs_without_raw_images_fail_instead_of_hanging(char_tokenizer):
    """The pair stream draws documents forever: a text-only (or pre-encoded) set would hang the run."""
    from types import SimpleNamespace

    from unimodal.data.pairs import PairStream
    from unimodal.schema import Document

    text_only = (Document([Part("text", text="a caption")]) for _ in range(5000))
    stream = SimpleNamespace(batches=1, documents=lambda worker, workers: text_only, config=SimpleNamespace(max_bad_fraction=0.01))
    with pytest.raises(ValueError, match="no raw image"):
        next(iter(PairStream(stream, char_tokenizer, image_size=16, max_text_tokens=8, batch_size=2)))


def test_pair_batches_carry_their_bad_samples_to_the_runs_limit(char_tokenizer):
    """The SEED tokenizer stages read shards as the model's stages do: their batches carry the
    samples read and skipped, and the training process stops the run past ``max_bad_fraction``."""
    from types import SimpleNamespace

    from unimodal.data.pairs import PairStream
    from unimodal.data.shards import TooManyBadSamples
    from unimodal.schema import Document, DocumentError
    from unimodal.training.bad_samples import BadSampleTally

    picture = Document([Part("image", data=np.zeros((16, 16, 3), np.uint8)), Part("text", text="a caption")])

    def documents(worker, workers):  # one broken image for every eight good ones: 11% bad
        for n in range(10_000):
            if n % 8 == 7:
                stream.policy.skip(DocumentError("unreadable image"), f"doc{n}", "bad.tar")
            yield picture

    stream = SimpleNamespace(batches=100, documents=documents, config=SimpleNamespace(max_bad_fraction=0.1))
    batches = iter(PairStream(stream, char_tokenizer, image_size=16, max_text_tokens=8, batch_size=4))
    first = next(batches)
    assert (first["samples_read"], first["samples_skipped"], first["skipped_from"]) == (4, 0, "")
    second = next(batches)
    assert (second["samples_read"], second["samples_skipped"], second["skipped_from"]) == (5, 1, "bad.tar")
    tally = BadSampleTally(0.1)
    with pytest.raises(TooManyBadSamples, match=r"too many bad samples: \d+ of \d+ skipped .*max_bad_fraction=0\.1; the last on this rank in bad\.tar"):
        for batch in batches:
            tally.add(batch, torch.device("cpu"))


def test_a_resumed_stage_sees_the_batches_an_uninterrupted_one_would(data_home, tmp_path):
    """The pair data module saves its position: resuming mid-epoch does not replay the epoch's first batches."""
    steps = ["--trainer.max_steps=6", "--data.init_args.steps_per_epoch=6", "--checkpoint_every_n_steps=3"]
    train("tokenizer_stage1.yaml", tmp_path / "whole", *steps)
    (middle,) = (tmp_path / "whole" / "checkpoints").glob("*step=3.ckpt")
    train("tokenizer_stage1.yaml", tmp_path / "resumed", *steps, f"--ckpt_path={middle}")
    np.testing.assert_allclose(metric(tmp_path / "resumed", "train/loss"), metric(tmp_path / "whole", "train/loss")[3:], rtol=1e-5)

    # a run that died after its last step, before it wrote the tokenizer: resumed, it trains no
    # more and writes it (Lightning skips on_train_end there)
    written = (tmp_path / "whole" / "tokenizer" / "seed_tokenizer.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "whole" / "tokenizer")
    train("tokenizer_stage1.yaml", tmp_path / "whole", *steps, "--resume=auto")
    assert (tmp_path / "whole" / "tokenizer" / "seed_tokenizer.safetensors").read_bytes() == written
