"""The pictures of docs/first-hour.md, from a finished `make demo` (or any digits pipeline root).

    pip install -e '.[docs]'          # matplotlib, for the loss plot
    python docs/tools/digits_figures.py runs/demo --out docs/images

Writes ``digits-draw.png`` (what the model draws when asked for each digit, several seeds, next
to real held-out digits), ``digits-count.png`` (its answers to "count from A to B with pictures")
and ``digits-losses.png`` (the training losses of every stage, from the stages' CSV logs).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from unimodal.worlds.digits import digit_images

SCALE = 4  # pixels per image pixel in the pictures


def _grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L").resize((16 * SCALE, 16 * SCALE), Image.Resampling.NEAREST))


def _grid(rows: list[list[np.ndarray]], gap: int = 2) -> Image.Image:
    side = 16 * SCALE
    width = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (side + gap) + gap, width * (side + gap) + gap), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            canvas[gap + i * (side + gap) : gap + i * (side + gap) + side, gap + j * (side + gap) : gap + j * (side + gap) + side] = tile
    return Image.fromarray(canvas)


def draw_figures(model_dir: Path, out: Path, seeds: int = 4) -> None:
    import unimodal

    bot = unimodal.load(model_dir)
    real = {d: next(im for im in digit_images("test") if im.digit == d) for d in range(10)}
    rows = [[_grey(Image.fromarray(real[d].rgb())) for d in range(10)]]
    blank = np.zeros((16 * SCALE, 16 * SCALE), np.uint8)
    for seed in range(seeds):
        replies = bot.generate([[{"role": "user", "content": f"Draw the digit {d}."}] for d in range(10)], seed=seed)
        rows.append([next((_grey(p.image) for p in r.parts if p.type == "image"), blank) for r in replies])
    _grid(rows).save(out / "digits-draw.png")

    ranges = [(0, 3), (2, 5), (6, 9)]
    replies = bot.generate([[{"role": "user", "content": f"Count from {a} to {b} with pictures."}] for a, b in ranges], seed=0)
    _grid([[_grey(p.image) for p in r.parts if p.type == "image"] for r in replies]).save(out / "digits-count.png")


def _losses(stage_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    logs = sorted((stage_dir / "logs").glob("version_*/metrics.csv"))
    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in csv.DictReader(logs[-1].open()) if logs else []:
        for key, value in row.items():
            if key.startswith("train/") and key != "train/tokens_per_s" and value:
                steps, values = series.setdefault(key[len("train/") :], ([], []))
                steps.append(int(row["step"]))
                values.append(float(value))
    return series


def loss_figure(root: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    offset = 0
    for stage_dir in sorted((p.parent for p in root.glob("*/stage.json")), key=lambda p: p.stat().st_mtime):
        series = _losses(stage_dir)
        for i, (name, (steps, values)) in enumerate(sorted(series.items())):
            ax.plot([s + offset for s in steps], values, color=f"C{i}", label=name if offset == 0 else None)
        if offset:
            ax.axvline(offset, color="grey", linestyle=":")
        ax.text(offset + 2, 0.02, stage_dir.name, transform=ax.get_xaxis_transform(), color="grey")
        offset += max((max(s) for s, _ in series.values()), default=0) + 1
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (log scale)")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(out / "digits-losses.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the pipeline root, e.g. runs/demo")
    parser.add_argument("--model", type=Path, help="the exported model (default ROOT/model)")
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args()
    if importlib.util.find_spec("matplotlib") is None:  # before minutes of drawing, not after
        raise SystemExit("the loss plot needs matplotlib: pip install -e '.[docs]' (or .venv/bin/pip install matplotlib)")
    args.out.mkdir(parents=True, exist_ok=True)
    draw_figures(args.model or args.root / "model", args.out)
    loss_figure(args.root, args.out)
    print(f"wrote {args.out}/digits-draw.png, digits-count.png, digits-losses.png")


if __name__ == "__main__":
    main()
