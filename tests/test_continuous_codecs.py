"""Continuous image codecs: patch layout, the resize/crop transform, VAE and Chameleon VQ features,
and corrupt input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from test_reliability import _Payload
from unimodal.data.datamodule import StreamConfig
from unimodal.data.processor import Processor
from unimodal.schema import Document, DocumentError, Part
from unimodal.data.media import MediaBytes
from unimodal.data.shards import BadSamplePolicy
from unimodal.modalities.image_continuous import (
    ChameleonVQCodec,
    ImageTransform,
    PixelPatchCodec,
    VAECodec,
    load_image,
    patchify,
    unpatchify,
)
from unimodal.modalities.vocab import VocabLayout


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_patchify_layout_and_round_trip():
    grid = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    tokens = patchify(grid, 2)
    assert tokens.shape == (2, 4, 12)
    # token 1 is the top-right 2x2 patch; values ordered (row, column, channel)
    assert tokens[0, 1, :3].tolist() == grid[0, :, 0, 2].tolist()
    torch.testing.assert_close(unpatchify(tokens, 2, 3), grid)
    with pytest.raises(ValueError, match="does not split"):
        patchify(torch.zeros(1, 3, 5, 4), 2)


def test_transform_resizes_the_short_side_and_centre_crops():
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, 10:30] = 255  # a white band in the middle third of a wide image
    pixels = ImageTransform(8)(image)
    assert pixels.shape == (3, 8, 8) and pixels.min() >= -1 and pixels.max() <= 1
    # 20x40 -> 8x16, crop columns 4..12: the band (columns 4..12 after resizing) fills the crop
    assert pixels.mean() > 0.9


def test_pixel_codec_round_trip():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    codec = PixelPatchCodec(size=16, patch=4)
    features = codec.encode(Part("image", media=0, data=image))
    assert features.shape == (16, 48) and features.dtype == np.float32
    assert codec.slots == 16 and codec.feature_dim == 48
    np.testing.assert_array_equal(codec.decode(features), image)
    # encoded PNG bytes give the same features as the decoded array
    from_bytes = codec.encode(Part("image", media=0, data=MediaBytes("png", png_bytes(image))))
    np.testing.assert_allclose(from_bytes, features)


def test_grey_pixel_codec_keeps_one_channel():
    grey = np.random.default_rng(1).integers(0, 256, size=(16, 16), dtype=np.uint8)
    codec = PixelPatchCodec(size=16, patch=8, grey=True)
    features = codec.encode(Part("image", media=0, data=np.stack([grey] * 3, axis=-1)))
    assert features.shape == (4, 64) and codec.slots == 4 and codec.feature_dim == 64
    np.testing.assert_array_equal(codec.decode(features), np.stack([grey] * 3, axis=-1))
    assert codec.fingerprint() != PixelPatchCodec(size=16, patch=8).fingerprint()


@pytest.mark.parametrize(("size", "patch"), [(16, 0), (16, 32), (10**6, 8), (0, 0)])
def test_patch_sizes_a_codec_file_could_hold_are_bounded(size, patch):
    """A patch VQ's codec.json gives these: 0 divided by zero, 10**6 resized every image to 12 TB."""
    with pytest.raises(ValueError, match=rf"image size {size} and patch {patch}: need 1 <= patch <= size <= 4096"):
        PixelPatchCodec(size=size, patch=patch)


def test_corrupt_image_is_a_clear_error_and_a_counted_skip(char_tokenizer):
    codec = PixelPatchCodec(size=16, patch=4)
    with pytest.raises(DocumentError, match="not a readable image"):
        codec.encode(Part("image", media=3, data=MediaBytes("png", b"\x89PNG not really")))
    with pytest.raises(DocumentError, match="uint8 array"):
        codec.encode(Part("image", media=0, data=np.zeros((4, 4, 3), np.float64).astype(np.int16)))
    good = Document([Part("text", text="ok"), Part("image", media=0, data=np.zeros((16, 16, 3), np.uint8))], key="good")
    bad = Document([Part("text", text="no"), Part("image", media=0, data=MediaBytes("png", b"garbage"))], key="bad")
    processor = Processor(char_tokenizer, VocabLayout(char_tokenizer.vocab_size), feature_dim=48, codecs={"image": codec})
    config = StreamConfig(processor, seq_len=64, batch_size=2)
    policy = BadSamplePolicy(max_bad_fraction=1.0)
    batches = list(config.batches([good, bad], policy))
    assert policy.skipped == 1 and policy.examples[0].key == "bad"
    assert batches[0].features.shape == (16, 48)


def tiny_vae_dir(tmp_path, scaling: float = 0.5, shift: float = 0.25):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=scaling, shift_factor=shift,
    )
    vae.save_pretrained(tmp_path / "vae")
    return tmp_path / "vae", vae


def test_vae_codec_scales_latents_and_decodes(tmp_path):
    path, vae = tiny_vae_dir(tmp_path)
    codec = VAECodec(str(path), size=16, patch=2)
    image = np.random.default_rng(0).integers(0, 256, size=(24, 16, 3), dtype=np.uint8)
    features = codec.encode(Part("image", media=0, data=image))
    assert features.shape == (16, 16) and codec.feature_dim == 16  # 8x8x4 latents in 2x2 patches
    with torch.no_grad():
        latent = vae.encode(ImageTransform(16)(image)[None]).latent_dist.mean
    expected = patchify((latent - 0.25) * 0.5, 2)[0].numpy()
    np.testing.assert_allclose(features, expected, atol=1e-5)
    assert codec.decode(features).shape == (16, 16, 3)
    assert codec.fingerprint()["scale"] == 0.5
    with pytest.raises(FileNotFoundError, match="no config.json"):
        VAECodec(str(tmp_path / "missing"))


@pytest.mark.parametrize("kind", ["vae", "chameleon_vq"])
def test_weights_changed_in_place_change_the_fingerprint(tmp_path, kind):
    """A codec fine-tuned in place keeps its config files; its features are other features, so
    shards and models made with the old weights must not pass as made with the new."""
    from safetensors.torch import load_file, save_file

    path, load = _tiny_pretrained(kind, tmp_path)
    before = load(path).fingerprint()
    assert load(path).fingerprint() == before  # loading again: the same weights
    configs = {f.name: f.read_bytes() for f in path.glob("*.json")}
    (file,) = path.glob("*.safetensors")
    weights = load_file(str(file))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.01
    save_file(weights, str(file), metadata={"format": "pt"})
    assert {f.name: f.read_bytes() for f in path.glob("*.json")} == configs
    after = load(path).fingerprint()
    assert after != before and after["checksum"] != before["checksum"]


def test_chameleon_vq_codec_skips_the_quantiser(tmp_path):
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    torch.manual_seed(0)
    config = ChameleonVQVAEConfig(embed_dim=8, num_embeddings=16, latent_channels=8, resolution=16,
                                  base_channels=32, channel_multiplier=[1, 1], num_res_blocks=1)
    ChameleonVQVAE(config).save_pretrained(tmp_path / "vq")
    codec = ChameleonVQCodec(str(tmp_path / "vq"), size=16)
    image = np.random.default_rng(1).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    features = codec.encode(Part("image", media=0, data=image))
    assert features.shape == (64, 8) and codec.feature_dim == 8
    # unquantised: the features are not codebook rows
    codebook = codec.vq.quantize.embedding.weight.detach().numpy()
    nearest = ((features[:, None] - codebook[None]) ** 2).sum(-1).min(1)
    assert nearest.min() > 1e-6
    with pytest.raises(NotImplementedError, match="only the Chameleon VQ-VAE encoder"):
        codec.decode(features)
    # a VQ-VAE saved in bf16 (Orthus's conversion keeps the checkpoint's dtype) reads fp32 pixels
    ChameleonVQVAE(config).to(torch.bfloat16).save_pretrained(tmp_path / "vq-bf16")
    assert ChameleonVQCodec(str(tmp_path / "vq-bf16"), size=16).encode(Part("image", media=0, data=image)).shape == (64, 8)
    with pytest.raises(ValueError, match="is neither a Chameleon VQ-VAE"):
        tiny_dir, _ = tiny_vae_dir(tmp_path)
        ChameleonVQCodec(str(tiny_dir))


def _tiny_pretrained(kind: str, tmp_path):
    """A saved model directory of each library a codec or encoder loads from, and its loader."""
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig, CLIPVisionConfig, CLIPVisionModel

    from unimodal.modalities.seed_tokenizer import EncoderSpec, load_encoder

    torch.manual_seed(0)
    if kind == "vae":  # diffusers
        return tiny_vae_dir(tmp_path)[0], lambda path: VAECodec(str(path), size=16)
    if kind == "chameleon_vq":
        ChameleonVQVAE(ChameleonVQVAEConfig(embed_dim=8, num_embeddings=16, latent_channels=8, resolution=16, base_channels=32,
                                            channel_multiplier=[1, 1], num_res_blocks=1)).save_pretrained(tmp_path / kind)
        return tmp_path / kind, lambda path: ChameleonVQCodec(str(path), size=16)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=16, patch_size=8)).save_pretrained(tmp_path / kind)
    return tmp_path / kind, lambda path: load_encoder(EncoderSpec(path=str(path)))


def _first_tensor_dropped(path) -> None:
    from safetensors.torch import load_file, save_file

    (file,) = path.glob("*.safetensors")
    weights = load_file(str(file))
    del weights[sorted(weights)[0]]
    save_file(weights, str(file), metadata={"format": "pt"})


def _pickled(path, marker) -> None:
    """The weights as the ``.bin`` pickle the loader falls back to, with a payload that touches ``marker``."""
    from safetensors.torch import load_file

    (file,) = path.glob("*.safetensors")
    weights = load_file(str(file))
    file.unlink()
    torch.save({**weights, "payload": _Payload(marker)}, path / ("pytorch_model.bin" if file.name == "model.safetensors" else file.stem + ".bin"))


@pytest.mark.parametrize("kind", ["vae", "chameleon_vq", "clip"])
@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda path, _: [f.write_bytes(f.read_bytes()[:3000]) for f in path.glob("*.safetensors")], r"the weights in .* cannot be read"),
        (_pickled, r"the weights in .* cannot be read"),
        # the libraries would start a missing tensor afresh with only a warning: a codec of random weights
        (lambda path, _: _first_tensor_dropped(path), r"do not fill the \w+ its config.json describes \(1 parameters missing"),
    ],
)
def test_a_damaged_pretrained_directory_is_one_line_and_runs_no_code(tmp_path, kind, damage, needle):
    path, load = _tiny_pretrained(kind, tmp_path)
    marker = tmp_path / "ran"
    damage(path, marker)
    with pytest.raises(ValueError, match=needle):
        load(path)
    assert not marker.exists()


def _config_edited(path, **changes) -> None:
    file = path / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def _as_pickle(path) -> None:
    """The weights as the plain ``.bin`` of tensors that older model directories hold, named as the
    library reads it (``pytorch_model.bin``, ``diffusion_pytorch_model.bin``)."""
    from safetensors.torch import load_file

    (file,) = path.glob("*.safetensors")
    pickled = "diffusion_pytorch_model.bin" if file.name.startswith("diffusion_") else "pytorch_model.bin"
    torch.save(load_file(str(file)), path / pickled)
    file.unlink()


@pytest.mark.parametrize(
    ("kind", "changes"),
    [("vae", {"layers_per_block": 10**6}), ("vae", {"latent_channels": 10**6}), ("chameleon_vq", {"num_res_blocks": 10**6}),
     ("chameleon_vq", {"num_embeddings": 10**9}), ("clip", {"num_hidden_layers": 10**6}), ("clip", {"hidden_size": 10**6})],
)
@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_a_config_declaring_far_more_than_its_weights_is_refused_unbuilt(tmp_path, kind, changes, weights):
    """The libraries would build 10**6 layers for hours, or allocate what the weights lack until memory ran out."""
    path, load = _tiny_pretrained(kind, tmp_path)
    if weights == "bin":
        _as_pickle(path)
    _config_edited(path, **changes)
    with pytest.raises(ValueError, match=r"config.json declares a model of at least [\d,]+ parameters .* but its weights hold [\d,]+ "):
        load(path)


def test_the_size_check_counts_only_the_parameters_its_own_thread_builds():
    """torch's registration hook is process-wide: a model another thread builds meanwhile (a server
    loading beside a check) must neither count against the budget nor be stopped."""
    import threading

    from unimodal.modalities.base import Stored, built_within

    checking, elsewhere_built = threading.Event(), threading.Event()
    elsewhere: list[torch.nn.Module] = []

    def build_elsewhere():
        checking.wait(10)
        elsewhere.append(torch.nn.Linear(1000, 1000))
        elsewhere_built.set()

    def build_here():
        checking.set()
        elsewhere_built.wait(10)
        return torch.nn.Linear(10, 10)

    thread = threading.Thread(target=build_elsewhere)
    thread.start()
    assert built_within(build_here, Stored(values=200, tensors=4)) is None
    thread.join()
    assert elsewhere and elsewhere[0].weight.shape == (1000, 1000)
    assert built_within(lambda: torch.nn.Linear(100, 100), Stored(values=200, tensors=4)) == Stored(10_000, 1)


@pytest.mark.parametrize(
    ("kind", "changes", "needle"),
    [
        ("vae", {"latent_channels": "4"}, r"vae/config.json: .*latent_channels is '4', where AutoencoderKL takes int"),
        ("vae", {"down_block_types": ["NoSuchBlock2D"] * 2}, r"vae/config.json: a value the model cannot be built from \(ValueError: NoSuchBlock2D"),
        ("vae", {"dtype": "evil"}, r"vae/config.json: dtype is 'evil', not a torch dtype"),
        ("chameleon_vq", {"torch_dtype": "evil"}, r"chameleon_vq/config.json: torch_dtype is 'evil', not a torch dtype"),
        ("clip", {"dtype": 16}, r"clip/config.json: dtype is 16, not a torch dtype"),
        ("clip", {"hidden_act": "evil"}, r"clip/config.json: a value the model cannot be built from \(KeyError: 'evil'\)"),
        ("clip", {"num_attention_heads": 0}, r"clip/config.json: a value the model cannot be built from \(ZeroDivisionError"),
    ],
)
def test_a_config_value_the_model_cannot_be_built_from_is_one_line(tmp_path, kind, changes, needle):
    """The libraries take these values unchecked and fail deep inside torch."""
    path, load = _tiny_pretrained(kind, tmp_path)
    _config_edited(path, **changes)
    with pytest.raises(ValueError, match=needle) as caught:
        load(path)
    assert "\n" not in str(caught.value)


def test_sixteen_bit_and_exif_rotated_images_decode_as_a_viewer_shows_them():
    from PIL import Image

    from unimodal.data.media import decode_media

    ramp = np.linspace(0, 65535, 256).astype(np.uint16)[None].repeat(4, 0)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    for decoded in (decode_media(MediaBytes("png", buffer.getvalue()), "image"), np.asarray(ImageTransform(4)(buffer.getvalue()))):
        assert decoded.min() < decoded.max()  # a grey ramp, not clipped to white
    np.testing.assert_array_equal(decode_media(MediaBytes("png", buffer.getvalue()), "image")[0, :, 0], ramp[0] >> 8)

    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown turned 90 degrees clockwise
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20)).save(buffer, format="JPEG", exif=exif)
    assert decode_media(MediaBytes("jpg", buffer.getvalue()), "image").shape == (30, 20, 3)


def test_transparent_pixels_decode_over_white_as_a_viewer_shows_them():
    """A drawing with a transparent background often stores black under it: dropping the alpha
    channel would turn a black digit on nothing into black on black."""
    from PIL import Image

    from unimodal.data.media import decode_media

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:6, 3:5, 3] = 255  # an opaque black stroke; the rest black and fully transparent
    half = rgba.copy()
    half[0, 0] = (0, 0, 0, 128)
    palette = Image.fromarray((rgba[..., 3] > 0).astype(np.uint8), mode="P")
    palette.putpalette([0, 0, 0] * 2)  # two black entries; entry 0 is transparent (PNG tRNS)
    for name, image, options in (("RGBA", Image.fromarray(rgba), {}), ("LA", Image.fromarray(rgba[..., [0, 3]]), {}),
                                 ("P", palette, {"transparency": 0})):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", **options)
        decoded = decode_media(MediaBytes("png", buffer.getvalue()), "image")
        assert (decoded[2:6, 3:5] == 0).all() and (decoded[0] == 255).all(), name
    np.testing.assert_array_equal(np.asarray(load_image(half))[0, 0], [127, 127, 127])
    assert (np.asarray(load_image(rgba))[0] == 255).all()


def test_features_of_a_replaced_vae_are_refused_where_a_model_learned_them(tmp_path):
    """A VAE too large to copy into an export is named by its path, where it could be replaced.
    The layout pins the fingerprint of the codec whose features the model learned, so loading the
    export, fine-tuning it and resuming its run with another VAE's latents are each refused."""
    from safetensors.torch import load_file, save_file

    from unimodal.checkpoints.load import ExportError, check_extends
    from unimodal.data.datamodule import UnimodalDataModule
    from unimodal.worlds import resolve

    path, _ = tiny_vae_dir(tmp_path)
    tokenizer = Path(resolve("builtin:text/tokenizer.model"))

    def data() -> UnimodalDataModule:
        return UnimodalDataModule([resolve("builtin:text/train")], str(tokenizer), feature_dim=16,
                                  codecs={"image": VAECodec(str(path), size=16, patch=2)})

    trained = data()
    before = trained.codecs["image"].fingerprint()
    assert trained.layout.feature_sources == {"image": before} and trained.layout.code_sources == {}
    check_extends(trained.layout, data().layout, "the export")  # the same VAE: nothing to refuse

    (file,) = path.glob("*.safetensors")
    weights = load_file(str(file))
    weights = {name: tensor + 0.01 for name, tensor in weights.items()}
    save_file(weights, str(file), metadata={"format": "pt"})
    replaced = data()
    after = replaced.codecs["image"].fingerprint()
    assert after["checksum"] != before["checksum"]

    with pytest.raises(ExportError) as refused:
        check_extends(trained.layout, replaced.layout, "the export")
    assert "learned its image features from" in str(refused.value)
    processor_json = {"tokenizer": tokenizer.name, "layout": trained.layout.to_dict(), "feature_dim": 16,
                      "codecs": {"image": {"class_path": "unimodal.modalities.VAECodec",
                                           "init_args": {"path": str(path), "size": 16, "patch": 2}}}}
    with pytest.raises(ValueError) as refused:
        Processor.from_json(processor_json, tokenizer.parent)
    message = str(refused.value)
    assert "\n" not in message and before["checksum"] in message and after["checksum"] in message
    with pytest.raises(ValueError, match="vocabulary layout mismatch with the data in feature_sources"):
        replaced.load_state_dict({"vocab_layout": trained.layout.to_dict(), "epoch": 0, "batches": 3})
    # a layout saved before continuous codecs were pinned resumes
    unpinned = {k: v for k, v in trained.layout.to_dict().items() if k != "feature_sources"}
    replaced.load_state_dict({"vocab_layout": unpinned, "epoch": 0, "batches": 3})
