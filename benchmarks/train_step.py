"""Training-step throughput: the framework against bare loops, in the same process.

Two workloads, each timed after ``--warmup`` steps (trainer start-up and compiles excluded), with
data loading excluded (``benchmarks/data_pipeline.py`` measures the data module):

- ``--recipe R`` (the default, ``recipes/text/tiny.yaml``): the recipe's model and its own packed
  batches; ``Trainer.fit`` with the recipe's loggers against a bare PyTorch loop with the same
  AdamW and schedule. Runs alternate bare/framework to cancel drift.
- ``--model 0.9b`` (GPU): a 0.9B Llama (hidden 2048, 16 layers, 16/8 heads, MLP 5632, vocabulary
  32k) on packed synthetic documents of 64-2048 tokens, every third holding a 256-token
  bidirectional image block, in bf16 autocast with fused AdamW. Rows:
  the framework (``Trainer.fit`` of ``UnimodalModule``, FlexAttention);
  a bare Hugging Face loop with the same attention and levers;
  the bare loop on the dense ``L x L`` mask with SDPA (the attention code before FlexAttention);
  the bare loop on causal SDPA without the document mask (wrong, a speed reference);
  with ``--family``, the framework on the Transfusion recipe's image modality (continuous
  image slots, a U-Net diffusion head). ``--model tiny`` runs the same rows on a CPU.

MFU counts 6N FLOPs per token, N every parameter but the input embedding (the LM head counts),
against 989 TFLOP/s (H100/H200 dense bf16); the second figure adds attention FLOPs over the pairs
the mask allows (12 x layers x width per pair, forward and backward).

    python benchmarks/train_step.py [--recipe R] [--steps 30] [--rounds 2]
    python benchmarks/train_step.py --model 0.9b --seq-len 4096 --batch 4 --family
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import tempfile
import time
import warnings
from collections.abc import Callable

import lightning as L
import numpy as np
import torch

from unimodal.batch import IGNORE_INDEX, PackedBatch
from unimodal.data.packing import Packer, collate
from unimodal.data.processor import EncodedDocument
from unimodal.modalities.vocab import SPAN_MARKERS, VocabLayout
from unimodal.models.attention import decoder_mask, resolve_backend
from unimodal.models.backbone import BackboneConfig, compile_layers, enable_activation_checkpointing
from unimodal.models.continuous import TransfusionImage
from unimodal.schema import MODALITY_IDS
from unimodal.training.module import UnimodalModule
from unimodal.training.optim import OptimizerConfig, build_optimizer
from unimodal.training.recipes import UnimodalCLI, make_cli
from unimodal.worlds import resolve

PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16
MODELS = {
    "0.9b": {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16,
             "num_key_value_heads": 8, "intermediate_size": 5632, "max_position_embeddings": 8192,
             "tie_word_embeddings": False, "vocab": 32000},
    "tiny": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 1024,
             "tie_word_embeddings": False, "vocab": 512},
}
# the Transfusion recipe's image modality (recipes/llamafusion/pretrain.yaml)
IMAGE = functools.partial(TransfusionImage, feature_dim=16, slots_per_item=256, patchify="unet", patch=2,
                          unet_channels=[256, 512], norm_groups=32, noise_limit=500, cond_dropout=0.1)
IMAGE_SLOTS = 256


# --- the recipe workload ---------------------------------------------------------------------


def instantiate(recipe: str, root: str) -> UnimodalCLI:
    return make_cli([recipe, f"--trainer.default_root_dir={root}"], resolve_path=resolve, save_config_callback=None)


def take_batches(cli: UnimodalCLI, count: int) -> list[PackedBatch]:
    cli.datamodule.setup("fit")
    batches, loader = [], iter(cli.datamodule.train_dataloader())
    while len(batches) < count:
        batches.append(next(loader))
    return batches


class ListLoader(torch.utils.data.Dataset):
    def __init__(self, batches: list[PackedBatch]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> PackedBatch:
        return self.batches[i]


class StepClock(L.Callback):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())


def framework_loop(module: L.LightningModule, batches: list[PackedBatch], root: str, device: str = "cpu",
                   precision: str = "32-true") -> list[float]:
    """``Trainer.fit`` with CSV and TensorBoard loggers, as ``unimodal train`` runs it."""
    clock = StepClock()
    trainer = L.Trainer(
        accelerator=device, devices=1, precision=precision, max_steps=len(batches), logger=[
            L.pytorch.loggers.CSVLogger(root, name="bench"), L.pytorch.loggers.TensorBoardLogger(root, name="bench_tb")
        ], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=5,
        callbacks=[clock],
    )
    loader = torch.utils.data.DataLoader(ListLoader(batches), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return clock.stamps


def bare_loop(module: UnimodalModule, batches: list[PackedBatch], device: str, dtype: torch.dtype | None,
              causal_only: bool = False) -> list[float]:
    """The reference: the Hugging Face decoder, the model's own cross-entropy on target positions,
    the same AdamW and schedule; no Lightning. ``causal_only`` drops the document mask (the
    speed reference)."""
    model = module.model.to(device)
    backbone = model.backbone
    opt = build_optimizer(model, module.optimizer_config, len(batches))
    optimizer, schedule = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    implementation = backbone.config._attn_implementation
    decoder = backbone.get_decoder()
    stamps = []
    for cpu_batch in batches:
        batch = cpu_batch.to(device)
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            mask = {} if causal_only else decoder_mask(implementation, batch.doc_ids, batch.block_ids)
            hidden = decoder(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **mask).last_hidden_state
            selected = batch.labels != IGNORE_INDEX
            per_token = model.token_losses(hidden[selected], batch.labels[selected])
        per_token.mean().backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    return stamps


def recipe_report(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as root:
        cli = instantiate(args.recipe, root)
        batches = take_batches(cli, args.steps)
        tokens = sum(int((b.doc_ids > 0).sum()) for b in batches[args.warmup :])
        template = cli.model
        template.configure_model()
        initial = copy.deepcopy(template)
        times = {"bare": [], "framework": []}
        for _ in range(args.rounds):
            stamps = bare_loop(copy.deepcopy(initial), batches, "cpu", None)
            times["bare"].append(stamps[-1] - stamps[args.warmup - 1])
            stamps = framework_loop(copy.deepcopy(initial), batches, root)
            times["framework"].append(stamps[-1] - stamps[args.warmup - 1])
    bare, framework = min(times["bare"]), min(times["framework"])
    timed = args.steps - args.warmup
    print(f"recipe {args.recipe}: {timed} timed steps after {args.warmup} warm-up, {tokens} tokens, best of {args.rounds}")
    print(f"  bare PyTorch loop : {bare:7.2f} s  {tokens / bare:9.0f} tokens/s")
    print(f"  unimodal Trainer  : {framework:7.2f} s  {tokens / framework:9.0f} tokens/s")
    print(f"  ratio framework/bare throughput: {bare / framework:.3f}  (goal >= 0.97)")


# --- the synthetic GPU workload --------------------------------------------------------------


def synthetic_documents(layout: VocabLayout, count: int, seq_len: int, images: bool, seed: int = 0) -> list[EncodedDocument]:
    """Documents of 64-2048 tokens (at most ``seq_len``); every third holds a 256-position
    bidirectional block: random text ids, or with ``images`` an image span of continuous slots
    that is a generation target, as the processor encodes it."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(count):
        n = int(rng.integers(64, min(2048, seq_len) + 1))
        ids = rng.integers(0, layout.text_size, n).astype(np.int64)
        modality = np.zeros(n, np.int8)
        block = np.full(n, -1, np.int32)
        continuous = np.zeros(n, bool)
        features = np.zeros((0, 16), np.float32)
        if i % 3 == 2 and n >= IMAGE_SLOTS + 8:
            start = int(rng.integers(1, n - IMAGE_SLOTS - 2))
            slots = slice(start + 1, start + 1 + IMAGE_SLOTS)
            block[slots] = 0
            if images:
                begin, end = SPAN_MARKERS["image"]
                modality[start : slots.stop + 1] = MODALITY_IDS["image"]
                ids[start], ids[slots.stop] = layout.special_id(begin), layout.special_id(end)
                ids[slots] = layout.special_id("<|media|>")
                continuous[slots] = True
                features = rng.standard_normal((IMAGE_SLOTS, 16)).astype(np.float32)
        target = np.ones(n, bool)
        target[0] = False
        docs.append(EncodedDocument(ids, modality, target, block, continuous, features, key=str(i)))
    return docs


def synthetic_batches(layout: VocabLayout, steps: int, seq_len: int, batch: int, images: bool) -> list[PackedBatch]:
    packer = Packer(seq_len=seq_len, pad_id=0, feature_dim=16 if images else 0)
    rows = list(packer.pack(synthetic_documents(layout, steps * batch * seq_len // 700 + 64, seq_len, images)))
    if len(rows) < steps * batch:
        raise RuntimeError(f"synthetic data packed into {len(rows)} rows, fewer than {steps * batch}")
    out = []
    for i in range(steps):
        packed = collate(rows[i * batch : (i + 1) * batch])
        packed.window_label_tokens = torch.tensor(packed.num_label_tokens)
        out.append(packed)
    return out


def flops_per_token(backbone: torch.nn.Module) -> float:
    """6N, N = every parameter but the input embedding (an untied LM head counts)."""
    embed = backbone.get_input_embeddings().weight
    head = backbone.get_output_embeddings().weight
    total = sum(p.numel() for p in backbone.parameters()) - embed.numel()
    return 6.0 * (total + (head.numel() if head is embed else 0))


def attention_pairs(batch: PackedBatch) -> int:
    """Query-key pairs the packing mask allows, over real positions: causal within a document
    plus the upper half of each bidirectional block."""
    pairs = 0
    for row_docs, row_blocks in zip(batch.doc_ids.tolist(), batch.block_ids.tolist()):
        docs, blocks = np.asarray(row_docs), np.asarray(row_blocks)
        for doc in np.unique(docs[docs > 0]):
            n = int((docs == doc).sum())
            pairs += n * (n + 1) // 2
            in_doc = blocks[docs == doc]
            for b in np.unique(in_doc[in_doc >= 0]):
                size = int((in_doc == b).sum())
                pairs += size * (size - 1) // 2
    return pairs


def make_module(config: dict, layout: VocabLayout, attention: str, args: argparse.Namespace,
                images: bool) -> UnimodalModule:
    backbone = BackboneConfig(config={k: v for k, v in config.items() if k != "vocab"}, attention=attention,
                              ce_chunk=args.ce_chunk)
    module = UnimodalModule(
        backbone=backbone, vocab=layout.to_dict(), continuous={"image": IMAGE} if images else None,
        optimizer=OptimizerConfig(lr=1e-4, warmup_steps=0),
    )
    torch.manual_seed(0)
    with torch.device(args.device):  # a 0.9B initialisation takes seconds on the GPU, a minute on the CPU
        module.configure_model()
    return module


def apply_levers(module: UnimodalModule, args: argparse.Namespace) -> UnimodalModule:
    if args.checkpointing:
        enable_activation_checkpointing(module.model.backbone)
    if args.compile:
        compile_layers(module.model.backbone)
    return module


def timed(run: Callable[[], list[float]], warmup: int, device: str) -> tuple[float, float]:
    """Seconds over the steps after ``warmup``, and the peak GPU memory in GiB."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    stamps = run()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return stamps[-1] - stamps[warmup - 1], peak


def mask_cost(batches: list[PackedBatch], device: str) -> float:
    """Mean seconds to build one batch's FlexAttention BlockMask (after the first, compiled)."""
    implementation = resolve_backend("flex")
    cost = []
    for batch in batches[:6]:
        doc_ids, block_ids = batch.doc_ids.to(device), batch.block_ids.to(device)
        start = time.perf_counter()
        decoder_mask(implementation, doc_ids, block_ids)
        if device == "cuda":
            torch.cuda.synchronize()
        cost.append(time.perf_counter() - start)
    return float(np.mean(cost[1:])) if len(cost) > 1 else cost[0]


def synthetic_report(args: argparse.Namespace) -> None:
    device = args.device
    precision, dtype = ("bf16-mixed", torch.bfloat16) if device == "cuda" else ("32-true", None)
    config = MODELS[args.model]
    layout = VocabLayout(text_size=config["vocab"])
    steps = args.steps
    timed_batches = slice(args.warmup, steps)
    print(f"model {args.model}, {args.seq_len} x {args.batch}, {steps - args.warmup} timed steps after {args.warmup}, "
          f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, {precision}, "
          f"compile={args.compile} checkpointing={args.checkpointing} ce_chunk={args.ce_chunk}")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for images in (False, True) if args.family else (False,):
            batches = synthetic_batches(layout, steps, args.seq_len, args.batch, images)
            tokens = sum(int((b.doc_ids > 0).sum()) for b in batches[timed_batches])
            pairs = sum(attention_pairs(b) for b in batches[timed_batches])
            fast = "flex" if device == "cuda" else "sdpa"  # torch has no FlexAttention backward on CPU
            variants: list[tuple[str, str, Callable[[UnimodalModule], list[float]]]] = [
                ("framework", fast, lambda m: framework_loop(m, batches, root, device, precision)),
            ]
            if not images:
                variants += [
                    ("bare loop", fast, lambda m: bare_loop(m, batches, device, dtype)),
                    ("bare loop, dense mask", "sdpa", lambda m: bare_loop(m, batches, device, dtype)),
                    ("bare loop, causal only (wrong)", "sdpa", lambda m: bare_loop(m, batches, device, dtype, causal_only=True)),
                ]
            for label, attention, run in variants:
                module = apply_levers(make_module(config, layout, attention, args, images), args)
                n_flops = flops_per_token(module.model.backbone)
                seconds, peak = timed(functools.partial(run, module), args.warmup, device)
                del module
                name = f"{label} [{attention}]" + (" Transfusion images" if images else "")
                rows.append((name, tokens / seconds, n_flops * tokens / seconds / PEAK_FLOPS,
                             (n_flops * tokens + 12 * config["num_hidden_layers"] * config["hidden_size"] * pairs) / seconds / PEAK_FLOPS,
                             peak))
        mask_seconds = mask_cost(batches, device) if device == "cuda" else float("nan")
    print(f"{'':44s} {'tokens/s':>10s} {'MFU 6N':>7s} {'+attn':>7s} {'peak GiB':>9s}")
    for name, rate, mfu, mfu_attn, peak in rows:
        print(f"  {name:42s} {rate:10.0f} {mfu:7.1%} {mfu_attn:7.1%} {peak:9.1f}")
    by_name = {name: rate for name, rate, *_ in rows}
    fast = "flex" if device == "cuda" else "sdpa"
    print(f"  framework / bare loop: {by_name[f'framework [{fast}]'] / by_name[f'bare loop [{fast}]']:.3f}  (goal >= 0.97)")
    print(f"  {fast} / dense mask: {by_name[f'bare loop [{fast}]'] / by_name['bare loop, dense mask [sdpa]']:.2f}x  "
          "(goals on a GPU: >= 1.3x at 4k, >= 1.6x at 8k)")
    if device == "cuda":
        step = args.batch * args.seq_len / by_name[f"framework [{fast}]"]
        print(f"  BlockMask build: {mask_seconds * 1e3:.1f} ms per batch, {mask_seconds / step:.1%} of a framework step")


def main(argv: list[str] | None = None) -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # start-up banners, once per variant
    warnings.filterwarnings("ignore", message=".*(LeafSpec|val_dataloader|does not have many workers).*")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/text/tiny.yaml")
    parser.add_argument("--model", choices=sorted(MODELS), help="the synthetic workload (instead of --recipe)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--family", action="store_true", help="also run the framework on the Transfusion image recipe")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (backbone.compile)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing (backbone.gradient_checkpointing)")
    parser.add_argument("--ce-chunk", type=int, default=0, help="chunked cross-entropy (backbone.ce_chunk)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    # the clock starts at the end of the last warm-up step, so there must be one, and a step after it
    if not 1 <= args.warmup < args.steps or args.rounds < 1:
        parser.error(f"need 1 <= --warmup < --steps and --rounds >= 1 (got {args.warmup}, {args.steps}, {args.rounds})")
    if args.model:
        synthetic_report(args)
    else:
        recipe_report(args)


if __name__ == "__main__":
    main()
