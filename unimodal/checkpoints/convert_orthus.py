"""``unimodal convert orthus``: the Orthus-base initialisation from a Chameleon checkpoint.

Writes into ``OUT``:

- ``backbone/``: the Chameleon model and its tokenizer files (``backbone.path`` and
  ``data.tokenizer`` of ``recipes/orthus/base.yaml``);
- ``vqvae/``: Chameleon's VQ-VAE alone, for :class:`ChameleonVQCodec` (encoder features without
  quantisation);
- ``orthus_modules.safetensors``: the state dict of a :class:`TokenDiffusionImage` whose soft-VQ
  codebook is Chameleon's VQ codebook, whose ``token_ids`` are the vocabulary rows of Chameleon's
  image tokens (code ``k`` -> its BPE id), and whose diffusion head is freshly initialised
  (adaLN-zero: it predicts 0 until trained); read by the modality's ``init_from``;
- ``orthus.json``: the ``TokenDiffusionImage`` arguments this file was built with.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from unimodal.checkpoints.files import staged_directory
from unimodal.errors import refuse_nonempty
from unimodal.modalities.base import model_config
from unimodal.modalities.image_continuous import latent_side
from unimodal.models.backbone import causal_lm_from_pretrained
from unimodal.models.continuous import TokenDiffusionImage
from unimodal.models.heads import check_head_size

ORTHUS_MODULES_FILE = "orthus_modules.safetensors"
log = logging.getLogger("unimodal.convert")

TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "chat_template*", "added_tokens.json")


def convert_orthus(chameleon_dir: str | Path, out_dir: str | Path, head_width: int = 1536, head_depth: int = 3) -> Path:
    from safetensors.torch import save_file

    check_head_size(head_width, head_depth)  # before the model loads
    src, out = Path(chameleon_dir), Path(out_dir)
    config = model_config(src, "Chameleon")
    if config.get("model_type") != "chameleon":
        raise ValueError(f"{src}: model_type {config.get('model_type')!r}, expected 'chameleon'")
    refuse_nonempty(out, "convert into a new directory")
    copied = [file for pattern in TOKENIZER_FILES for file in sorted(src.glob(pattern))]
    for file in copied:
        if not file.is_file():
            raise FileNotFoundError(f"{file} is a broken link or not a file; copy Chameleon's tokenizer files into {src} again")
    model = causal_lm_from_pretrained(src, whole=True, dtype="auto")  # the VQ-VAE too: its codebook is converted
    vq = model.model.vqmodel
    mapping = model.model.vocabulary_mapping.img2bpe
    codebook = vq.quantize.embedding.weight.detach().float()
    if sorted(mapping) != list(range(len(codebook))):
        raise ValueError(f"{src}: the vocabulary map names {len(mapping)} image tokens for a {len(codebook)}-entry VQ codebook")
    side = latent_side(vq.config)
    args = {
        "feature_dim": int(vq.config.embed_dim),
        "slots_per_item": side * side,
        "codebook_size": len(codebook),
        "head_width": head_width,
        "head_depth": head_depth,
    }
    modality = TokenDiffusionImage(model.config.hidden_size, **args)
    with torch.no_grad():
        modality.soft_vq.codebook.copy_(codebook)
        modality.token_ids.copy_(torch.tensor([mapping[k] for k in range(len(codebook))]))

    with staged_directory(out, replace=False) as staging:  # a crash midway leaves no partial directory
        model.save_pretrained(staging / "backbone")
        for file in copied:
            shutil.copy2(file, staging / "backbone" / file.name)
        if not any(file.name.startswith("tokenizer") for file in copied):
            log.warning("%s holds no tokenizer files (tokenizer.json, tokenizer_config.json, ...), so %s has none: "
                        "recipes/orthus/base.yaml reads data.init_args.tokenizer from there; copy Chameleon's tokenizer "
                        "files into it, or set that key", src, out / "backbone")
        vq.save_pretrained(staging / "vqvae")
        save_file({k: v.contiguous() for k, v in modality.state_dict().items()}, str(staging / ORTHUS_MODULES_FILE))
        (staging / "orthus.json").write_text(json.dumps({"hidden_size": model.config.hidden_size, **args}, indent=2) + "\n")
    return out
