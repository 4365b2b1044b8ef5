"""Generation speed: the engine against transformers' generate() and against a reference image loop.

Text: greedy decoding of the same prompts on the same random backbone, by
``model.backbone.generate()`` and by the engine, timed alternately in one process (median of
``--rounds``). End-of-sequence is made unreachable on both sides so both write exactly
``--new-tokens`` tokens; the ratio is engine tokens/s over transformers tokens/s (goal >= 1.0).

Images: the straightforward reference loop makes one image at a time, one slot at a time, with
unbatched guidance (separate KV caches and decoder calls for the conditional and unconditional
prompt) and 100 sampler steps. The engine makes ``--images`` images in one batch with the
guidance pair batched into the same cache, at 100 steps and at fewer steps. Quality: the
sampler is DDIM (deterministic given its starting noise), so for the same hidden states and noise
a run with fewer steps approximates the 100-step result; the table gives the relative L2
deviation from it, measured on the reference run's hidden states. Families: ``orthus`` (causal,
per-slot diffusion head) and ``transfusion`` (bidirectional block denoising). The backbones and
heads are random and small (CPU-sized); on a GPU pass ``--device cuda`` and larger sizes.

    python benchmarks/generation.py [--device cpu] [--rounds 3] [--new-tokens 128] [--images 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from transformers import DynamicCache

from unimodal.data.processor import EncodedDocument
from unimodal.inference.engine import Engine
from unimodal.modalities.vocab import VocabLayout
from unimodal.models.backbone import BackboneConfig, cache_keyword, load_backbone
from unimodal.models.generation import GenerationSettings
from unimodal.models.unified import UnifiedModel


class IdTokenizer:
    """Token ids only (the benchmark never reads text); end-of-sequence is an id the engine never
    writes in text mode, so replies run to their length limit."""

    pad_id, bos_id = 0, 1

    def __init__(self, eos_id: int):
        self.eos_id = eos_id

    def decode(self, ids: list[int]) -> str:
        return ""


def backbone_config(hidden: int, layers: int) -> dict:
    return {
        "model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": max(4, hidden // 64),
        "num_key_value_heads": max(2, hidden // 128), "intermediate_size": hidden * 8 // 3, "max_position_embeddings": 4096,
    }


def prompt_doc(ids: list[int]) -> EncodedDocument:
    n = len(ids)
    return EncodedDocument(
        ids=np.asarray(ids, np.int64), modality=np.zeros(n, np.int8), target=np.zeros(n, bool),
        block=np.full(n, -1, np.int32), continuous=np.zeros(n, bool), features=np.zeros((0, 0), np.float32),
    )


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# text


def bench_text(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    layout = VocabLayout(text_size=args.vocab)
    backbone = load_backbone(BackboneConfig(config=backbone_config(args.hidden, args.layers), attention="sdpa"), layout.size)
    model = UnifiedModel(backbone, layout).to(args.device).eval()
    backbone.generation_config.eos_token_id = None
    backbone.generation_config.pad_token_id = 0
    engine = Engine(model, IdTokenizer(eos_id=layout.special_id("<|media|>")), max_length=4096)
    settings = GenerationSettings(text={"temperature": 0}, max_new_tokens=args.new_tokens)
    print(f"text: llama hidden {args.hidden}, {args.layers} layers, vocab {layout.size}, prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens, greedy, {args.device}")
    print(f"{'batch':>5}  {'transformers tok/s':>18}  {'engine tok/s':>12}  {'ratio':>5}")
    for batch in args.text_batches:
        ids = torch.randint(3, args.vocab, (batch, args.prompt_tokens), generator=torch.Generator().manual_seed(batch))
        docs = [prompt_doc(row.tolist()) for row in ids]
        inputs = ids.to(args.device)

        def with_transformers() -> None:
            with torch.inference_mode():
                out = backbone.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=args.new_tokens, do_sample=False)
            assert out.shape[1] - inputs.shape[1] == args.new_tokens

        def with_engine() -> None:
            out = engine.generate(docs, settings)
            assert all(g.completion_tokens == args.new_tokens for g in out)

        with_transformers(), with_engine()  # warm-up
        hf, ours = [], []
        for _ in range(args.rounds):
            hf.append(timed(with_transformers))
            ours.append(timed(with_engine))
        tokens = batch * args.new_tokens
        hf_rate, our_rate = tokens / statistics.median(hf), tokens / statistics.median(ours)
        print(f"{batch:>5}  {hf_rate:>18.1f}  {our_rate:>12.1f}  {our_rate / hf_rate:>5.2f}")


# ----------------------------------------------------------------------------------------------
# images


def image_model(family: str, args: argparse.Namespace) -> UnifiedModel:
    from unimodal.models.continuous import TokenDiffusionImage, TransfusionImage

    torch.manual_seed(0)
    codes = {"image": args.codebook} if family == "orthus" else {}
    layout = VocabLayout(text_size=args.vocab, code_ranges=codes)
    backbone = load_backbone(BackboneConfig(config=backbone_config(args.image_hidden, args.image_layers), attention="sdpa"), layout.size)
    hidden = backbone.config.hidden_size
    if family == "orthus":
        image = TokenDiffusionImage(hidden, feature_dim=args.feature_dim, slots_per_item=args.slots, codebook_size=args.codebook,
                               head_width=args.head_width, head_depth=3)
    else:
        image = TransfusionImage(hidden, feature_dim=args.feature_dim, slots_per_item=args.slots, patchify="linear")
    return UnifiedModel(backbone, layout, {"image": image}).to(args.device).eval()


class Reference:
    """One image at a time, one slot (or one denoising step) at a time, guidance unbatched."""

    def __init__(self, model: UnifiedModel, cfg_scale: float):
        self.model, self.cfg_scale = model, cfg_scale
        self.decoder = model.backbone.get_decoder()
        self.cache_argument = cache_keyword(type(self.decoder))
        self.embed = model.backbone.get_input_embeddings()
        self.image = model.continuous["image"]
        self.boi = model.layout.special_id("<|boi|>")
        self.hiddens: list[torch.Tensor] = []  # conditional and unconditional states, for the quality check

    def _run(self, cache: DynamicCache, embeds: torch.Tensor, bidirectional: bool = False) -> torch.Tensor:
        past, q = cache.get_seq_length(), embeds.shape[1]
        mask = torch.ones(1, 1, q, past + q, dtype=torch.bool, device=embeds.device)
        if not bidirectional:
            mask[..., past:] = torch.tril(mask[..., past:])
        positions = torch.arange(past, past + q, device=embeds.device)[None]
        cached = {self.cache_argument: cache}
        return self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, **cached).last_hidden_state

    @torch.inference_mode()
    def image_for(self, prompt: list[int], steps: int, generator: torch.Generator) -> torch.Tensor:
        device = self.embed.weight.device
        caches = DynamicCache(), DynamicCache()
        starts = [torch.tensor([prompt + [self.boi]], device=device), torch.tensor([[self.boi]], device=device)]
        last = [self._run(c, self.embed(ids))[:, -1] for c, ids in zip(caches, starts)]
        if self.image.attention == "causal":
            slots = []
            for _ in range(self.image.slots_per_item):
                self.hiddens.append(torch.cat(last))
                x = self.image.sample_next(torch.cat(last), cfg_scale=self.cfg_scale, steps=steps, generator=generator)
                slots.append(x)
                clean = self.image.embed_clean(x)[:, None]
                last = [self._run(c, clean)[:, -1] for c in caches]
            return torch.cat(slots)

        def run_backbone(embeds: torch.Tensor) -> torch.Tensor:
            out = [self._run(c, e[None], bidirectional=True) for c, e in zip(caches, embeds)]
            for c in caches:
                c.crop(-embeds.shape[1])
            return torch.cat(out)

        x = self.image.denoise_block(run_backbone, 1, cfg_scale=self.cfg_scale, steps=steps, generator=generator)
        clean = self.image.embed_clean(x[0])[None]
        for c in caches:
            self._run(c, clean, bidirectional=True)
        return x[0]


def bench_images(family: str, args: argparse.Namespace) -> None:
    model = image_model(family, args)
    layout = model.layout
    boi = layout.special_id("<|boi|>")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, args.vocab, args.image_prompt_tokens).tolist() for _ in range(args.images)]
    reference = Reference(model, args.cfg_scale)
    engine = Engine(model, IdTokenizer(eos_id=layout.special_id("<|media|>")), max_length=4096)
    empty = prompt_doc([])
    docs = [prompt_doc(p + [boi]) for p in prompts]
    device = torch.device(args.device)

    def with_reference(steps: int = 100) -> None:
        generator = torch.Generator(device).manual_seed(0)
        for p in prompts[: args.reference_images]:
            reference.image_for(p, steps, generator)

    def with_engine(steps: int) -> None:
        settings = GenerationSettings(image={"cfg_scale": args.cfg_scale, "steps": steps}, max_new_tokens=args.slots + 1, seed=0)
        out = engine.generate(docs, settings, unconditional=empty)
        assert all(g.segments and g.segments[0].data.shape[0] == args.slots for g in out)

    attention = model.continuous["image"].attention
    print(f"\nimages ({family}: {attention} attention): {args.slots} slots of {args.feature_dim} values, llama hidden {args.image_hidden}, "
          f"{args.image_layers} layers, cfg {args.cfg_scale}, prompt {args.image_prompt_tokens} tokens, {args.device}")
    with_reference(2), with_engine(2)  # warm-up
    seconds: dict[str, list[float]] = {"reference": [], **{str(steps): [] for steps in args.steps}}
    for _ in range(args.rounds):  # alternate, so that a change in machine load hits every run alike
        seconds["reference"].append(timed(with_reference))
        for steps in args.steps:
            seconds[str(steps)].append(timed(lambda: with_engine(steps)))
    ref_rate = args.reference_images / statistics.median(seconds["reference"])
    print(f"{'run':<36} {'images/s':>9} {'speed-up':>8} {'deviation from 100 steps':>25}")
    print(f"{'reference (1 image, unbatched cfg, 100)':<36} {ref_rate:>9.3f} {1.0:>8.2f} {'-':>25}")
    for steps in args.steps:
        rate = args.images / statistics.median(seconds[str(steps)])
        label = f"engine ({args.images} images, batched cfg, {steps})"
        print(f"{label:<36} {rate:>9.3f} {rate / ref_rate:>8.2f} {deviation(model, reference, steps, args):>25}")


@torch.inference_mode()
def deviation(model: UnifiedModel, reference: Reference, steps: int, args: argparse.Namespace) -> str:
    """Relative L2 distance of the ``steps``-step sample from the 100-step one, same inputs and noise."""
    if steps == 100:
        return "0 (same sampler)"
    image = model.continuous["image"]
    if image.attention == "causal":
        hidden = torch.stack(reference.hiddens[: 4 * args.slots])  # [N, 2, H]: conditional, unconditional
        rows = torch.cat([hidden[:, 0], hidden[:, 1]])

        def sample(n: int) -> torch.Tensor:
            return image.sample_next(rows, cfg_scale=args.cfg_scale, steps=n, generator=torch.Generator(rows.device).manual_seed(1))
    else:  # a whole image, denoised from the same noise
        prompt = np.random.default_rng(1).integers(3, args.vocab, args.image_prompt_tokens).tolist()

        def sample(n: int) -> torch.Tensor:
            return reference.image_for(prompt, n, torch.Generator(model.backbone.device).manual_seed(1))
    full, short = sample(100), sample(steps)
    return f"{float((short - full).norm() / full.norm()):.4f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--text-batches", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--families", nargs="*", default=["orthus", "transfusion"])
    parser.add_argument("--images", type=int, default=8, help="images the engine makes in one batch")
    parser.add_argument("--reference-images", type=int, default=2, help="images the reference loop makes (it is slow)")
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--feature-dim", type=int, default=16)
    parser.add_argument("--codebook", type=int, default=256)
    parser.add_argument("--head-width", type=int, default=256)
    parser.add_argument("--image-hidden", type=int, default=256)
    parser.add_argument("--image-layers", type=int, default=4)
    parser.add_argument("--image-prompt-tokens", type=int, default=32)
    parser.add_argument("--cfg-scale", type=float, default=3.0)
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 50, 25])
    args = parser.parse_args(argv)
    # the reference's rate divides by --reference-images, drawn from the engine's --images prompts
    if args.rounds < 1 or not 1 <= args.reference_images <= args.images:
        parser.error("need --rounds >= 1 and 1 <= --reference-images <= --images")
    if args.text_batches:
        bench_text(args)
    for family in args.families:
        bench_images(family, args)


if __name__ == "__main__":
    main()
