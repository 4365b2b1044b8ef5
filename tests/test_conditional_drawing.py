"""Every continuous-image path draws the digit its prompt asks for.

A tiny model is trained for a few hundred CPU steps on chat-form draws of the digits world
("USER: draw 7" -> a 16x16 picture, vicuna template, so an end-of-sequence token and a newline
follow each picture), then asked for each digit four times, each picture from its own starting
noise; the independent image judge must read the requested digit in at least 24 of the 40. This
is the check that LlamaFusion's prompt-blind drawing slipped past: a model that ignores its prompt
is read right about 1 time in 10, and one that draws the same few digits at most 3 in 10.

One picture per digit is too few to judge by: the same Orthus model reads 6 to 10 of 10 from one
starting noise to the next. Over six training seeds, 40 pictures each, Orthus reads 31-38 of 40
at its learning rate here (22-37 at the Transfusion paths' 3e-3); the Transfusion paths read
37-40 over two seeds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_LLAMA, CharTokenizer
from unimodal.data.packing import Packer, collate
from unimodal.data.processor import Processor
from unimodal.data.templates import get_template
from unimodal.inference.chat import Assistant
from unimodal.modalities.image_continuous import PixelPatchCodec
from unimodal.modalities.vocab import VocabLayout
from unimodal.models.backbone import BackboneConfig, load_backbone
from unimodal.models.continuous import TokenDiffusionImage, TransfusionImage
from unimodal.models.diffusion import ScheduleConfig
from unimodal.models.routing import add_modality_experts
from unimodal.models.unified import UnifiedModel
from unimodal.schema import Document, Part
from unimodal.worlds.digits import digit_images
from unimodal.worlds.judges import image_judge

CODEC = PixelPatchCodec(size=16, patch=4, grey=True)  # a digit = 16 slots of 4x4 grey pixels
BATCH = 32
# a few hundred steps each, so that each path stays under a minute
STEPS = {"orthus": 600, "transfusion-linear": 600, "transfusion-unet": 500}
LR = {"orthus": 1e-3, "transfusion-linear": 3e-3, "transfusion-unet": 3e-3}
PICTURES_PER_DIGIT = 4
# Transfusion's schedule (cosine betas, T = 1000, DDIM) predicting v, as the digits pipelines do
# (docs/llamafusion.md: why not epsilon at this scale)
TRANSFUSION = ScheduleConfig(prediction="v_prediction", beta_schedule="squaredcos_cap_v2", zero_terminal_snr=False,
                             timestep_spacing="leading", sample_steps=20)


def build(path: str) -> tuple[UnifiedModel, Processor]:
    torch.manual_seed(0)
    orthus = path == "orthus"
    layout = VocabLayout(CharTokenizer.vocab_size, code_ranges={"image": 64} if orthus else {})
    backbone = load_backbone(BackboneConfig(config=dict(TINY_LLAMA), attention="sdpa"), layout.size)
    hidden, routing = TINY_LLAMA["hidden_size"], None
    if orthus:  # per-token head on the hidden state before each slot, soft-VQ input, Orthus's schedule
        image = TokenDiffusionImage(hidden, feature_dim=CODEC.feature_dim, slots_per_item=CODEC.slots, codebook_size=64,
                                    head_width=64, head_depth=2, batch_mul=4, latent_scale=1.0,
                                    schedule=ScheduleConfig(sample_steps=20), cond_dropout=0.1)
    else:  # LlamaFusion: image experts in every layer, bidirectional patch diffusion
        patchify = path.removeprefix("transfusion-")
        image = TransfusionImage(hidden, feature_dim=CODEC.feature_dim, slots_per_item=CODEC.slots, patchify=patchify,
                                 patch=4, unet_channels=[16, 16, 16], norm_groups=4, schedule=TRANSFUSION, cond_dropout=0.1)
        routing = add_modality_experts(backbone, ["image"])
    model = UnifiedModel(backbone, layout, {"image": image}, routing=routing)
    processor = Processor(CharTokenizer(), layout, CODEC.feature_dim, bidirectional=() if orthus else ("image",),
                          codecs={"image": CODEC}, chat_template=get_template("vicuna"))
    return model, processor


def train(model: UnifiedModel, processor: Processor, steps: int, lr: float) -> None:
    draws = [
        processor.encode(Document([Part("text", text=f"draw {im.digit}", role="user"),
                                   Part("image", media=0, data=im.rgb(), role="assistant")], key=str(i)))
        for i, im in enumerate(digit_images("train"))
    ]
    rng = np.random.default_rng(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        docs = [draws[i] for i in rng.choice(len(draws), BATCH, replace=False)]
        batch = collate(list(Packer(seq_len=64, pad_id=0, feature_dim=CODEC.feature_dim).pack(docs)))
        losses = model(batch)
        text, image = losses["ce/text"], losses["diffusion/image"]
        loss = text.total / text.count + 5.0 * image.total / image.count
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()


def drawn_digits(model: UnifiedModel, processor: Processor) -> list[int]:
    """What the judge reads in the pictures drawn for "draw 0" ... "draw 9", PICTURES_PER_DIGIT
    rounds of them, in one batch whose row ``i`` starts from seed ``i``."""
    asks = [[{"role": "user", "content": f"draw {digit}"}] for _ in range(PICTURES_PER_DIGIT) for digit in range(10)]
    replies = Assistant(model, processor).generate(asks, start_with="image", seed=0, image={"cfg_scale": 3.0},
                                                    max_new_tokens=CODEC.slots + 2)
    return image_judge().predict([reply.images[0] for reply in replies])


@pytest.mark.parametrize("path", ["orthus", "transfusion-linear", "transfusion-unet"])
def test_the_picture_follows_the_prompt(path):
    model, processor = build(path)
    train(model, processor, STEPS[path], LR[path])
    read = drawn_digits(model, processor)
    right = sum(int(r == i % 10) for i, r in enumerate(read))
    rounds = [read[i : i + 10] for i in range(0, len(read), 10)]
    assert right >= 24, f"{path}: asked for 0..9 {PICTURES_PER_DIGIT} times, the judge read {rounds} ({right}/{len(read)})"
