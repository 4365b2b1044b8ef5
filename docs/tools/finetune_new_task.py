"""A new skill for the digits model, for docs/finetune.md: adding two digits ("What is two plus
three?" -> "Five."), which the demo knows only as "What is two plus three?" -> "Adding three to
two gives five." (the digits world's arithmetic chats).

    python docs/tools/finetune_new_task.py data --out data/plus           # data/plus/plus.jsonl
    python docs/tools/finetune_new_task.py score runs/demo/model          # held-out and seen phrasings

``data`` writes one chat per (sum, training phrasing): the 30 sums ``a + b <= 9`` with ``a <= b``,
each asked in every training phrasing (in either order). ``score`` asks every sum greedily, in
phrasings that share no sentence frame with the training ones and in the training phrasings, and
counts a reply right when the first number word in it is the sum. Both are the same as a user's own JSONL and judge would be; nothing here is built in.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TRAIN = [
    "What is {a} plus {b}?",
    "Add {a} and {b}.",
    "{a} plus {b} makes what?",
    "Please add {a} to {b}.",
    "what's {a} + {b}",
    "Tell me the sum of {a} and {b}.",
]
HELD_OUT = [
    "If I have {a} and get {b} more, how many do I have?",
    "Compute {a} added to {b}.",
    "How much is {a} together with {b}?",
]
ANSWERS = ["{s}.", "It is {s}.", "That makes {s}."]


def sums() -> list[tuple[int, int]]:
    return [(a, b) for a in range(10) for b in range(10) if a <= b and a + b <= 9]


def write_data(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "plus.jsonl"
    with path.open("w") as f:
        for i, (a, b) in enumerate(sums()):
            for j, template in enumerate(TRAIN):
                x, y = (a, b) if (i + j) % 2 else (b, a)
                answer = ANSWERS[(i + j) % len(ANSWERS)].format(s=WORDS[a + b]).capitalize()
                messages = [{"role": "user", "content": template.format(a=WORDS[x], b=WORDS[y])},
                            {"role": "assistant", "content": answer}]
                f.write(json.dumps({"key": f"plus-{a}-{b}-{j}", "messages": messages}) + "\n")
    return path


def first_number(text: str) -> int | None:
    found = re.findall(r"\b(" + "|".join(WORDS) + r")\b", text.lower())
    return WORDS.index(found[0]) if found else None


def score(export: Path, templates: list[str]) -> float:
    import unimodal

    assistant = unimodal.load(export, device="cpu")
    questions = [(t.format(a=WORDS[a], b=WORDS[b]), a + b) for a, b in sums() for t in templates]
    right = 0
    for start in range(0, len(questions), 32):
        batch = questions[start : start + 32]
        replies = assistant.generate([[{"role": "user", "content": q}] for q, _ in batch], temperature=0, max_new_tokens=16, max_media=0)
        right += sum(first_number(r.text) == answer for r, (_, answer) in zip(replies, batch))
    return right / len(questions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="write the training chats")
    data.add_argument("--out", type=Path, default=Path("data/plus"))
    judge = sub.add_parser("score", help="accuracy on held-out phrasings")
    judge.add_argument("export", type=Path)
    args = parser.parse_args()
    if args.command == "data":
        print(f"wrote {write_data(args.out)} ({len(sums()) * len(TRAIN)} chats)")
    else:
        if not (args.export / "unimodal.json").is_file():
            parser.error(f"{args.export} is not an export directory (unimodal export writes one)")
        for name, templates in (("held-out", HELD_OUT), ("seen", TRAIN)):
            print(f"plus ({name} phrasings, {len(sums()) * len(templates)} questions): {score(args.export, templates):.3f}")


if __name__ == "__main__":
    main()
