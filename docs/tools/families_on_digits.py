"""The table of docs/families-on-digits.md: each family's --tiny recipes trained on the digits
world and scored by the digits suite.

    make families        # or: .venv/bin/python docs/tools/families_on_digits.py [--families mio seed] [--steps 20 --limit 5]

For every family it runs ``recipes/pipelines/digits-FAMILY.yaml --tiny`` under ``ROOT/FAMILY``
(finished stages are skipped when run again, as with any pipeline), scores the last stage's
export with the suite of ``unimodal eval --suite digits`` (``ROOT/FAMILY/scoreboard.json``),
writes ``ROOT/scoreboard.json`` (families run before and not this time keep their rows) and prints
the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from unimodal.errors import UserError
from unimodal.training.pipeline import PipelineError, run_pipeline
from unimodal.worlds import resolve
from unimodal.worlds.digits_suite import PHRASINGS, TASK_GOALS, TASKS, evaluate, metric

FAMILIES = ("orthus", "llamafusion", "mio", "seed")
PIPELINES = Path(__file__).resolve().parents[2] / "recipes" / "pipelines"
TITLES = {"caption": "caption", "transcribe": "transcribe", "draw": "draw", "speak": "speak", "story": "interleaved"}
# the families' bars (docs/families-on-digits.md); the demo's caption goal is 0.97
BARS = {**TASK_GOALS, "caption": 0.95}
# every task's score on seen and on held-out phrasings, then the image codec's round trip
METRICS = [metric(task, phrasing) for task in TASKS for phrasing in PHRASINGS] + ["image_codec_roundtrip_acc"]


def score_family(family: str, root: Path, limit: int | None = None, steps: int | None = None) -> dict[str, Any]:
    """Train (or finish) the family's digits pipeline, then score its final model; ``steps``
    replaces every stage's step count (a smoke run)."""
    path = PIPELINES / f"digits-{family}.yaml"
    started = time.perf_counter()
    results = run_pipeline(path, tiny=True, root=root / family, every_stage=None if steps is None else {"trainer.max_steps": steps},
                           resolve_path=resolve)
    trained_s = time.perf_counter() - started
    model = Path(results[-1].output)
    report = evaluate(model, root / family / "scoreboard.json", limit=limit)
    return {
        "family": family,
        "pipeline": str(path.relative_to(PIPELINES.parents[1])),
        "stages": [{"name": r.name, "status": r.status, "steps": r.steps, "wall_s": round(r.wall_s, 1)} for r in results],
        "steps": sum(r.steps or 0 for r in results),
        "train_wall_s": round(trained_s, 1),
        **{key: report.get(key) for key in METRICS},
        "skipped": report.get("skipped", {}),
        "model": str(model),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    """One cell per task, ``seen / held-out``; a score under its bar in bold."""

    def shown(row: dict[str, Any], task: str, phrasing: str) -> str:
        value = row[metric(task, phrasing)]
        if value is None:
            return "n/a"
        return f"{value:.3f}" if value >= BARS[task] else f"**{value:.3f}**"

    head = ["family", "steps", "train min", *(f"{TITLES[t]} (seen / held-out)" for t in TASKS), "image codec round trip"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["family"], str(row["steps"]), f"{row['train_wall_s'] / 60:.1f}"]
        cells += [" / ".join(shown(row, task, p) for p in PHRASINGS).replace("n/a / n/a", "n/a") for task in TASKS]
        codec = row["image_codec_roundtrip_acc"]
        cells.append("n/a" if codec is None else f"{codec:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--root", type=Path, help="the pipelines' runs and the scoreboards (default runs/families, "
                        "or runs/families-smoke with --steps, so that a smoke run never leaves stages `make families` would refuse)")
    parser.add_argument("--limit", type=int, help="at most this many questions per task (a quick look)")
    parser.add_argument("--steps", type=int, help="train every stage this many steps instead (a smoke run)")
    args = parser.parse_args(argv)
    args.root = args.root or Path("runs/families-smoke" if args.steps else "runs/families")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        rows = [score_family(family, args.root, args.limit, args.steps) for family in args.families]
    except (PipelineError, UserError) as err:  # a stage finished with another configuration, a missing file: one line
        raise SystemExit(f"families_on_digits.py: error: {err}") from None
    board = args.root / "scoreboard.json"
    scored = {row["family"] for row in rows}
    earlier = json.loads(board.read_text()) if board.is_file() else []  # families not run this time keep their rows
    rows = sorted([row for row in earlier if row["family"] not in scored] + rows, key=lambda row: FAMILIES.index(row["family"]))
    board.write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows))
    print(f"wrote {args.root / 'scoreboard.json'}")


if __name__ == "__main__":
    main()
