"""Sampling one image slot with the per-token diffusion head: planned against plain.

``TokenDiffusionImage.sample_next`` runs the sampler through ``DiffusionHead.conditioned``, which
projects the hidden states once and makes each step's modulations, ``PLAN_CHUNK`` steps at a
time, one call per layer (docs/continuous-images.md). The baseline is the same sampler calling the head
itself at every step. Both sample the same rows from the same seeds and must agree. The default
sizes are the demo model's (``recipes/digits``: hidden 128, head 256 x 3, 64 features, flow
sampler, 25 steps); ``--rows 3`` guided rows stand for three drawing requests in one server batch.

    python benchmarks/diffusion_head.py [--rows 3] [--steps 25] [--width 256] [--hidden 128] [--repeats 50]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from unimodal.models.continuous import TokenDiffusionImage
from unimodal.models.diffusion import ScheduleConfig


def best_ms(run: Callable[[], torch.Tensor], repeats: int, rounds: int = 3) -> float:
    """The best of ``rounds`` mean times of ``repeats`` calls, after a few uncounted ones."""
    for _ in range(3):
        run()
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            run()
        best = min(best, (time.perf_counter() - started) / repeats)
    return best * 1e3


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3, help="image rows, each guided (cfg_scale 2): twice as many head rows")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    if min(args.rows, args.steps, args.repeats) < 1:
        parser.error("--rows, --steps and --repeats must be >= 1")
    torch.manual_seed(0)
    schedule = ScheduleConfig(prediction="flow", sampler="flow", zero_terminal_snr=False, sample_steps=args.steps)
    image = TokenDiffusionImage(args.hidden, feature_dim=args.features, codebook_size=16, head_width=args.width,
                                head_depth=args.depth, latent_scale=1.0, schedule=schedule)
    for parameter in image.head.parameters():  # past adaLN-zero, as a trained head is
        torch.nn.init.normal_(parameter, std=0.02)
    image.eval()
    hidden = torch.randn(2 * args.rows, args.hidden)

    def generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(row) for row in range(args.rows)]

    def planned() -> torch.Tensor:
        return image.sample_next(hidden, cfg_scale=2.0, generator=generators())

    def plain() -> torch.Tensor:
        return image.schedule.sample(lambda x, t: image.head(x, t, hidden), (args.rows, args.features), cfg_scale=2.0, generator=generators())

    with torch.inference_mode():
        torch.testing.assert_close(planned(), plain(), atol=1e-4, rtol=1e-4)
        timings = {"plain": best_ms(plain, args.repeats), "planned": best_ms(planned, args.repeats)}
    ratio = timings["plain"] / timings["planned"]
    print(f"one image slot, {args.rows} guided rows x {args.steps} steps, head {args.width} x {args.depth}, "
          f"{torch.get_num_threads()} threads: plain {timings['plain']:.2f} ms, planned {timings['planned']:.2f} ms; "
          f"planned/plain speed {ratio:.2f}x")
    return ratio


if __name__ == "__main__":
    main()
