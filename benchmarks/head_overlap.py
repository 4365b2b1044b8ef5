"""Could the per-token diffusion head use a second CPU core? Its sampling beside the backbone's steps.

A server batch steps every row together, so while picture rows wait for the diffusion head
(``sample_next``: a sampler of ``--steps`` head calls per slot), every other row waits too, though
it needs nothing from the head. This times the two pieces of work that could overlap: the
backbone stepping ``--rows`` text rows ``--backbone_steps`` times, and ``--slots`` head calls for
``--pictures`` guided picture rows. Baseline: one after the other, as the engine runs them now.
Against it: the head in a Python thread of the same process, and in a worker process (fork, the
rows' generator states sent with each call, so its draws are the ones made in-process; checked).
Every side runs torch with one thread: on the 2-core CPU a second intra-op thread made these
small ops slower, not faster. The sizes are the demo model's (hidden 128 x 4 layers, head 256 x 3,
64 features, 25 flow steps), built at random: no export needed.

    python benchmarks/head_overlap.py [--rows 5] [--backbone_steps 40] [--pictures 3] [--slots 4] [--rounds 5]
"""

from __future__ import annotations

import argparse
import multiprocessing
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import numpy as np
import torch

from unimodal.models.backbone import cache_keyword
from unimodal.inference.head_worker import generator_states, restore_states
from unimodal.models.continuous import TokenDiffusionImage
from unimodal.models.diffusion import ScheduleConfig


def build(hidden: int, layers: int, steps: int) -> tuple[torch.nn.Module, TokenDiffusionImage]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1600, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=352, max_position_embeddings=512)
    backbone = LlamaForCausalLM(config).eval()
    schedule = ScheduleConfig(prediction="flow", sampler="flow", zero_terminal_snr=False, sample_steps=steps)
    head = TokenDiffusionImage(hidden, feature_dim=64, slots_per_item=4, codebook_size=16, head_width=256, head_depth=3, schedule=schedule).eval()
    return backbone, head


def step_backbone(backbone: torch.nn.Module, rows: int, steps: int) -> None:
    """A 20-token prefill, then ``steps`` one-token steps on the KV cache, each with its logits."""
    from transformers import DynamicCache

    decoder, cache = backbone.get_decoder(), DynamicCache()
    keyword = cache_keyword(type(decoder))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        tokens = torch.randint(0, 1000, (rows, 20), generator=generator)
        for _ in range(steps + 1):
            hidden = decoder(input_ids=tokens, use_cache=True, **{keyword: cache}).last_hidden_state
            backbone.lm_head(hidden[:, -1])
            tokens = torch.randint(0, 1000, (rows, 1), generator=generator)


def draw(head: TokenDiffusionImage, hidden: np.ndarray, states: list[bytes]) -> tuple[np.ndarray, list[bytes]]:
    """One slot for every picture row (guided: ``hidden`` has a conditional and an unconditional
    row each), from the rows' generator states; returns the features and the states after. Arrays
    and bytes, not tensors, cross the pipe: torch would pass tensors through shared memory, a
    file each, which cost milliseconds a call."""
    generators = [torch.Generator() for _ in states]
    restore_states(generators, states)
    with torch.no_grad():
        features = head.sample_next(torch.from_numpy(hidden), cfg_scale=2.0, generator=generators)
    return features.numpy(), generator_states(generators)


def head_worker(head: TokenDiffusionImage, conn: Connection) -> None:
    torch.set_num_threads(1)
    while (request := conn.recv()) is not None:
        conn.send(draw(head, *request))


def slots(call: Callable[[np.ndarray, list], tuple[np.ndarray, list]], hiddens: list[np.ndarray], pictures: int) -> list[np.ndarray]:
    """The picture rows' slots one after another, each call continuing the generators of the last."""
    states = generator_states(torch.Generator().manual_seed(row) for row in range(pictures))
    drawn = []
    for hidden in hiddens:
        features, states = call(hidden, states)
        drawn.append(features)
    return drawn


def best_ms(run: Callable[[], object], rounds: int) -> float:
    run()  # first-call costs are not counted
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times) * 1e3


def beside(background: Callable[[], object], foreground: Callable[[], object]) -> Callable[[], None]:
    """Both at once: ``background`` on a thread of this process, ``foreground`` on this one."""

    def run() -> None:
        thread = threading.Thread(target=background)
        thread.start()
        foreground()
        thread.join()

    return run


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5, help="text rows the backbone steps")
    parser.add_argument("--backbone_steps", type=int, default=40)
    parser.add_argument("--pictures", type=int, default=3, help="guided picture rows the head draws for")
    parser.add_argument("--slots", type=int, default=4, help="head calls, one per slot")
    parser.add_argument("--steps", type=int, default=25, help="sampler steps per head call")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if min(args.rows, args.backbone_steps, args.pictures, args.slots, args.steps, args.rounds) < 1:
        parser.error("every count must be >= 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return measure(args)
    finally:
        torch.set_num_threads(threads)


def measure(args: argparse.Namespace) -> dict[str, float]:
    backbone, head = build(args.hidden, args.layers, args.steps)
    hiddens = [torch.randn(2 * args.pictures, args.hidden, generator=torch.Generator().manual_seed(slot)).numpy()
               for slot in range(args.slots)]

    def steps() -> None:
        step_backbone(backbone, args.rows, args.backbone_steps)

    def local() -> list[np.ndarray]:
        return slots(lambda hidden, states: draw(head, hidden, states), hiddens, args.pictures)

    parent, child = multiprocessing.Pipe()
    worker = multiprocessing.get_context("fork").Process(target=head_worker, args=(head, child), daemon=True)
    worker.start()

    def remote() -> list[np.ndarray]:
        def call(hidden: np.ndarray, states: list) -> tuple[np.ndarray, list]:
            parent.send((hidden, states))
            if not parent.poll(60):
                raise TimeoutError("the head worker process gave no answer in 60 s")
            return parent.recv()

        return slots(call, hiddens, args.pictures)

    try:
        same = all(np.array_equal(a, b) for a, b in zip(local(), remote()))
        if not same:
            raise AssertionError("the worker process drew other features than this process from the same states")
        figures = {
            "backbone steps": best_ms(steps, args.rounds),
            "head calls": best_ms(local, args.rounds),
            "head calls in the worker": best_ms(remote, args.rounds),
            "one after the other": best_ms(lambda: (steps(), local()), args.rounds),
            "head in a thread": best_ms(beside(local, steps), args.rounds),
            "head in the worker process": best_ms(beside(remote, steps), args.rounds),
        }
    finally:
        parent.send(None)
        worker.join(10)
    baseline = figures["one after the other"]
    print(f"{args.rows} text rows x {args.backbone_steps} backbone steps; {args.pictures} guided picture rows x "
          f"{args.slots} head calls of {args.steps} sampler steps (best of {args.rounds}, one torch thread each)")
    for name, ms in figures.items():
        ratio = f"  {baseline / ms:.2f}x" if name in ("head in a thread", "head in the worker process") else ""
        print(f"{name:<28}{ms:9.1f} ms{ratio}")
    ideal = baseline / max(figures["backbone steps"], figures["head calls"])
    print(f"the worker's draws equal this process's: {same}; a perfect overlap would be {ideal:.2f}x")
    return figures


if __name__ == "__main__":
    main()
