"""TokenDiffusionImage (Orthus) and TransfusionImage (Transfusion/LlamaFusion) inside the UnifiedModel:
what the losses condition on, noise limiting, conditioning dropout, per-image attention modes,
ZeRO-3 safety on batches without images, and the generation-engine interface."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from unimodal.data.processor import Processor
from unimodal.data.packing import Packer, collate
from unimodal.schema import Document, Part
from unimodal.modalities.image_continuous import PixelPatchCodec
from unimodal.modalities.vocab import VocabLayout
from unimodal.schema import MODALITY_IDS
from unimodal.models.backbone import BackboneConfig, load_backbone
from unimodal.models.continuous import TokenDiffusionImage, TransfusionImage, image_spans
from unimodal.models.unified import UnifiedModel

CODEC = PixelPatchCodec(size=8, patch=4)  # 4 slots of 48 values per image
SLOTS, DIM, HIDDEN = 4, 48, 64


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)


def documents() -> list[Document]:
    """Caption then image (generated); image then caption (understood); an input image (no loss)
    before a question; two images in one document."""
    return [
        Document([Part("text", text="draw a cat"), Part("image", media=0, data=image(0))], key="t2i"),
        Document([Part("image", media=0, data=image(1)), Part("text", text="a dog on grass")], key="i2t"),
        Document([Part("image", media=0, data=image(2), loss=False), Part("text", text="what is it?")], key="input"),
        Document([Part("text", text="one"), Part("image", media=0, data=image(3)), Part("text", text="two"),
                  Part("image", media=1, data=image(4))], key="two"),
    ]


def build(kind: str, tokenizer, tiny_llama_config, **kwargs) -> tuple[UnifiedModel, object]:
    torch.manual_seed(0)
    layout = VocabLayout(tokenizer.vocab_size, code_ranges={"image": 16} if kind == "orthus" else {})
    backbone = load_backbone(BackboneConfig(config=tiny_llama_config, attention="sdpa"), layout.size)
    if kind == "orthus":
        modality = TokenDiffusionImage(HIDDEN, feature_dim=DIM, slots_per_item=SLOTS, codebook_size=16, head_width=32,
                                  head_depth=2, batch_mul=3, latent_scale=1.0, **kwargs)
    else:
        modality = TransfusionImage(HIDDEN, feature_dim=DIM, slots_per_item=SLOTS, patchify="unet", patch=4,
                                    unet_channels=[8, 8, 8], norm_groups=4, **kwargs)
    model = UnifiedModel(backbone, layout, {"image": modality})
    encoder = Processor(tokenizer, layout, DIM, bidirectional=() if kind == "orthus" else ("image",),
                              codecs={"image": CODEC})
    packer = Packer(seq_len=160, pad_id=0, feature_dim=DIM, open_sequences=1)
    batch = collate(list(packer.pack([encoder.encode(d) for d in documents()])))
    return model, batch


def image_positions(batch) -> torch.Tensor:
    return (batch.continuous_mask & (batch.modality_ids == MODALITY_IDS["image"])).nonzero()


def test_orthus_head_sees_the_hidden_state_before_each_target_slot(char_tokenizer, tiny_llama_config):
    model, batch = build("orthus", char_tokenizer, tiny_llama_config)
    seen = {}

    def capture(module, args):
        seen["x"], seen["t"], seen["cond"] = args

    model.continuous["image"].head.register_forward_pre_hook(capture)
    hidden = model.hidden_states(batch)
    losses = model(batch)
    positions = image_positions(batch)
    target = batch.target_mask[positions[:, 0], positions[:, 1]]
    assert int(target.sum()) == 4 * SLOTS  # the input image (loss false) is not a target
    assert int(losses["diffusion/image"].count) == 4 * SLOTS
    expected = hidden[positions[target, 0], positions[target, 1] - 1]
    assert seen["cond"].shape == (3 * 4 * SLOTS, HIDDEN)  # batch multiplier 3
    torch.testing.assert_close(seen["cond"][: 4 * SLOTS], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen["cond"][4 * SLOTS : 8 * SLOTS], expected, atol=1e-5, rtol=1e-5)
    assert not torch.equal(seen["t"][: 4 * SLOTS], seen["t"][4 * SLOTS : 8 * SLOTS])  # independent noise


@pytest.mark.parametrize("kind", ["orthus", "transfusion"])
def test_loss_is_fp32_under_bf16_autocast(kind, char_tokenizer, tiny_llama_config):
    model, batch = build(kind, char_tokenizer, tiny_llama_config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        term = model(batch)["diffusion/image"]
    assert term.total.dtype == torch.float32 and torch.isfinite(term.total)


@pytest.mark.parametrize("kind", ["orthus", "transfusion"])
def test_a_batch_without_images_still_runs_every_module(kind, char_tokenizer, tiny_llama_config):
    """ZeRO-3: the head and adapters must take part in every step on every rank."""
    model, _ = build(kind, char_tokenizer, tiny_llama_config)
    layout = model.layout
    encoder = Processor(char_tokenizer, layout, DIM)
    batch = collate(list(Packer(32, 0, DIM).pack([encoder.encode(Document([Part("text", text="just text")], key="x"))])))
    losses = model(batch)
    term = losses["diffusion/image"]
    assert int(term.count) == 0 and float(term.total.detach()) == 0.0
    (losses["ce/text"].total + term.total).backward()
    added = [p for n, p in model.continuous.named_parameters()]
    assert all(p.grad is not None for p in added)


def test_transfusion_noise_limit_and_clean_input_images(char_tokenizer, tiny_llama_config):
    model, batch = build("transfusion", char_tokenizer, tiny_llama_config, noise_limit=500)
    modality = model.continuous["image"]
    spans = image_spans(image_positions(batch))
    keys = ["t2i", "i2t", "input", "two-a", "two-b"]
    ts = []
    for seed in range(12):
        torch.manual_seed(seed)
        _, states = model.embed(batch)
        x0, noise, t, target, *_ = states["image"]
        ts.append(t)
    t = torch.stack(ts)
    by_key = dict(zip(keys, t.T))
    assert by_key["i2t"].max() <= 500  # it opens its document and a caption follows it
    # a prompt comes before the others: text after "two-a" (the story goes on) is no caption
    assert by_key["t2i"].max() > 500 and by_key["two-a"].max() > 500 and by_key["two-b"].max() > 500
    assert (by_key["input"] == 0).all()  # input images go in clean
    assert len(spans) == 5 and target.tolist() == [True, True, False, True, True]
    # the clean input image is embedded exactly as embed_clean embeds it
    embeds, _ = model.embed(batch)
    rows = image_positions(batch)[2 * SLOTS : 3 * SLOTS]
    clean = modality.embed_clean(batch.features[2 * SLOTS : 3 * SLOTS])
    torch.testing.assert_close(embeds[rows[:, 0], rows[:, 1]], clean)


@pytest.mark.parametrize("kind", ["orthus", "transfusion"])
def test_conditioning_dropout_cuts_generated_images_off_their_prompt(kind, char_tokenizer, tiny_llama_config):
    model, batch = build(kind, char_tokenizer, tiny_llama_config, cond_dropout=0.999999)
    modality = model.continuous["image"]
    spans = image_spans(image_positions(batch))
    dropped = modality.train().prepare(batch)
    row = spans.row
    changed = [bool((dropped.doc_ids[r, s - 1 : e + 2] != batch.doc_ids[r, s - 1 : e + 2]).all())
               for r, s, e in zip(row.tolist(), spans.start.tolist(), spans.end.tolist())]
    # generated: t2i and both images of "two"; kept: the captioned one and the input
    assert changed == [True, False, False, True, True]
    first = spans.start[0]
    assert len(set(dropped.doc_ids[0, first - 1 : spans.end[0] + 2].tolist())) == 1
    assert modality.eval().prepare(batch) is batch


@pytest.mark.parametrize("kind", ["orthus", "transfusion"])
def test_attention_inside_images_and_never_to_a_later_image(kind, char_tokenizer, tiny_llama_config):
    model, batch = build(kind, char_tokenizer, tiny_llama_config)
    model.eval()
    positions = image_positions(batch)
    spans = image_spans(positions)
    a, b = 3, 4  # the two images of document "two"
    slots_a = positions[spans.index == a]
    with torch.no_grad():
        torch.manual_seed(0)  # the same diffusion noise in every run
        base = model.hidden_states(batch)

        def perturbed(feature_rows: torch.Tensor) -> torch.Tensor:
            features = batch.features.clone()
            features[feature_rows] += 1.0
            torch.manual_seed(0)
            return model.hidden_states(replace(batch, features=features))

        last_of_a = perturbed((spans.index == a).nonzero()[-1])
        later_image = perturbed((spans.index == b).nonzero()[:, 0])
    first_slot = tuple(slots_a[0].tolist())
    moved = not torch.allclose(last_of_a[first_slot], base[first_slot], atol=1e-6)
    assert moved == (kind == "transfusion")  # bidirectional inside the image, causal otherwise
    rows_a = (slots_a[:, 0], slots_a[:, 1])
    torch.testing.assert_close(later_image[rows_a], base[rows_a], atol=1e-6, rtol=0)
    slots_b = positions[spans.index == b]
    assert not torch.allclose(last_of_a[slots_b[:, 0], slots_b[:, 1]], base[slots_b[:, 0], slots_b[:, 1]])


def test_orthus_generation_interface(char_tokenizer, tiny_llama_config):
    model, _ = build("orthus", char_tokenizer, tiny_llama_config)
    modality = model.continuous["image"].eval()
    assert (modality.attention, modality.slots_per_item, modality.feature_dim) == ("causal", SLOTS, DIM)
    hidden = torch.randn(4, HIDDEN)
    out = modality.sample_next(hidden, cfg_scale=3.0, steps=4, generator=torch.Generator().manual_seed(0))
    again = modality.sample_next(hidden, cfg_scale=3.0, steps=4, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, DIM) and torch.equal(out, again)
    assert modality.sample_next(hidden, steps=4).shape == (4, DIM)
    with pytest.raises(ValueError, match="2B"):
        modality.sample_next(hidden[:3], cfg_scale=2.0)
    assert modality.embed_clean(out).shape == (2, HIDDEN)


def test_transfusion_generation_interface(char_tokenizer, tiny_llama_config):
    model, _ = build("transfusion", char_tokenizer, tiny_llama_config)
    modality = model.continuous["image"].eval()
    assert (modality.attention, modality.slots_per_item, modality.feature_dim) == ("bidirectional", SLOTS, DIM)
    seen = []

    def run_backbone(embeds: torch.Tensor) -> torch.Tensor:
        seen.append(embeds.shape)
        return torch.tanh(embeds)

    out = modality.denoise_block(run_backbone, 3, cfg_scale=4.0, steps=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, SLOTS, DIM)
    assert seen == [(6, SLOTS, HIDDEN)] * 5  # conditional and unconditional rows in one call
    assert modality.embed_clean(out.reshape(-1, DIM)).shape == (3 * SLOTS, HIDDEN)
    with pytest.raises(ValueError, match="whole images"):
        modality.embed_clean(torch.zeros(SLOTS + 1, DIM))


def test_added_modules_load_strictly(tmp_path, char_tokenizer, tiny_llama_config):
    from safetensors.torch import save_file

    model, _ = build("orthus", char_tokenizer, tiny_llama_config)
    state = {k: v.contiguous() for k, v in model.continuous["image"].state_dict().items()}
    save_file(state, str(tmp_path / "ok.safetensors"))
    loaded = TokenDiffusionImage(HIDDEN, feature_dim=DIM, slots_per_item=SLOTS, codebook_size=16, head_width=32,
                            head_depth=2, init_from=str(tmp_path / "ok.safetensors"))
    torch.testing.assert_close(loaded.soft_vq.codebook, state["soft_vq.codebook"])
    with pytest.raises(ValueError, match=r"init_from: .*ok\.safetensors lacks weights of this model: head\.blocks\.2\."):
        TokenDiffusionImage(HIDDEN, feature_dim=DIM, slots_per_item=SLOTS, codebook_size=16, head_width=32,
                       head_depth=3, init_from=str(tmp_path / "ok.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "ok.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"init_from: .*cut\.safetensors cannot be read \(Error while deserializing header"):
        TokenDiffusionImage(HIDDEN, feature_dim=DIM, slots_per_item=SLOTS, codebook_size=16, head_width=32,
                            head_depth=2, init_from=str(tmp_path / "cut.safetensors"))


def test_soft_vq_rows_must_exist(char_tokenizer, tiny_llama_config):
    layout = VocabLayout(char_tokenizer.vocab_size)  # no image code range
    backbone = load_backbone(BackboneConfig(config=tiny_llama_config, attention="sdpa"), layout.size)
    modality = TokenDiffusionImage(HIDDEN, feature_dim=DIM, slots_per_item=SLOTS, codebook_size=16, head_width=32)
    UnifiedModel(backbone, layout, {"image": modality})
    with pytest.raises(ValueError, match="code_ranges: {image: 16}"):
        modality.embed_clean(torch.zeros(1, DIM))


@pytest.mark.xformers
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_xformers_matches_sdpa_with_image_blocks(char_tokenizer, tiny_llama_config):
    pytest.importorskip("xformers")
    outputs = {}
    for backend in ("sdpa", "xformers"):
        torch.manual_seed(0)
        layout = VocabLayout(char_tokenizer.vocab_size)
        backbone = load_backbone(BackboneConfig(config=tiny_llama_config, attention=backend), layout.size)
        modality = TransfusionImage(HIDDEN, feature_dim=DIM, slots_per_item=SLOTS, patchify="linear", patch=4)
        model = UnifiedModel(backbone, layout, {"image": modality}).cuda().eval()
        _, batch = build("transfusion", char_tokenizer, tiny_llama_config)
        with torch.no_grad():
            outputs[backend] = model.hidden_states(batch.to("cuda")).float().cpu()
    torch.testing.assert_close(outputs["xformers"], outputs["sdpa"], atol=2e-3, rtol=2e-3)
