"""The digits world's instructions: many phrasings per task, and a set held out from training.

A user instruction is a *verb phrase* of its task ("draw {obj}", "transcribe this speech") put
into a *sentence frame* ("Please {vp}.", "Can you {vp} for me?", the bare "{vp}"). Objects
vary too ("{ref}", "a {ref}", "the digit {ref}"), and ``{ref}`` is a numeral or a word. Every
combination of a task's verb phrases and frames is a template.

Some (verb phrase, frame) pairs are *held out*: no training document uses them, so a held-out
template differs from every training template in its verb or in its frame. The model has seen
each verb and each frame, only never together; the suite asks every task in seen and in held-out
phrasings, so a model that learned the instruction rather than the string scores the same on
both. The phrasings a first user tried on the demo ("Please draw a 7.", "draw 7", "Can you draw
four for me?") are held out. A training template whose text could contain a held-out question
(``"Draw 7."`` contains ``"draw 7"``) is dropped as well, so no held-out question appears in any
shard or in the tokenizer's text (``tests/test_digits_world.py`` scans them), not even with
its case or punctuation changed (``"Could you write 7 by hand, please?"`` would teach the
held-out ``"Write 7 by hand, please."``).
"""

from __future__ import annotations

import re
from functools import lru_cache

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# verb phrases per task; ``{obj}`` takes one of the task's objects
VERBS: dict[str, tuple[str, ...]] = {
    "draw": (
        "draw {obj}", "sketch {obj}", "write {obj} by hand", "make a picture of {obj}",
        "show me {obj}", "give me an image of {obj}",
    ),
    "speak": (
        "say {obj}", "speak {obj}", "pronounce {obj}", "let me hear {obj}",
        "give me a recording of {obj}", "read {obj} out loud",
    ),
    "caption": (
        "tell me which digit this is", "read this handwritten digit", "name the digit in this picture",
        "identify the number shown", "work out which digit is written here", "look at this image and name the number",
    ),
    "transcribe": (
        "transcribe this speech", "tell me which digit is spoken", "name the number in this recording",
        "identify the spoken digit", "work out which number is said here", "listen to this clip and name the number",
    ),
    "story": (
        "count from {first} to {last} with pictures", "draw the numbers from {first} to {last}, a picture for each",
        "show me every digit from {first} to {last} as a picture", "make pictures of the numbers {first} to {last}",
        "illustrate the count from {first} to {last}", "sketch each number from {first} up to {last}",
    ),
}  # fmt: skip
OBJECTS: dict[str, tuple[str, ...]] = {
    "draw": ("{ref}", "a {ref}", "the digit {ref}", "the number {ref}", "a handwritten {ref}"),
    "speak": ("{ref}", "the number {ref}", "the word {word}", "the digit {ref}"),
}
# sentence frames; a capitalised ``{VP}`` starts the sentence
FRAMES = (
    "{VP}.", "{vp}", "Please {vp}.", "Can you {vp} for me?", "Could you {vp}, please?", "I would like you to {vp}.",
    "{VP}, please.", "Would you {vp}?", "Go ahead and {vp}.", "Your task: {vp}.", "Hey, {vp}!", "I need you to {vp}.",
)  # fmt: skip
# the bare verb phrase and the plain sentence differ only in case and a full stop: one frame, held
# out only where a quoted phrasing needs it (its text is a part of every other frame's)
PLAIN = (FRAMES.index("{vp}"), FRAMES.index("{VP}."))
# held out besides the pattern of pairs below: the frames of the phrasings a first user tried on
# the demo with "draw" ("Please draw a 7.", "draw 7", "Can you draw four for me?")
QUOTED = {("draw", 0): (*PLAIN, FRAMES.index("Please {vp}."), FRAMES.index("Can you {vp} for me?"))}
HOLD_OUT_EVERY = 4  # about a quarter of the pairs, spread so that every verb and every frame stays seen


def _held_out_pair(task: str, verb: int, frame: int) -> bool:
    return frame in QUOTED.get((task, verb), ()) or (frame not in PLAIN and (verb + frame) % HOLD_OUT_EVERY == 0)


def _sentence(frame: str, verb_phrase: str) -> str:
    return frame.replace("{VP}", verb_phrase[0].upper() + verb_phrase[1:]).replace("{vp}", verb_phrase)


def _expand(task: str, held_out: bool) -> list[str]:
    """The templates of the seen or held-out pairs. A held-out pair in a plain frame asks with the
    bare object only ("draw 7"): its other objects would make every longer sentence with the verb
    contain a held-out question, and the verb could then be taught nowhere."""
    out = []
    for v, verb in enumerate(VERBS[task]):
        for f, frame in enumerate(FRAMES):
            if _held_out_pair(task, v, f) != held_out:
                continue
            objects = OBJECTS.get(task, ("",))
            if held_out and f in PLAIN and task in OBJECTS:
                objects = objects[:1]
            out += [_sentence(frame, verb.replace("{obj}", obj) if obj else verb) for obj in objects]
    return out


def normal(text: str) -> str:
    """``text`` as phrasings are compared: lower case, words and numerals only, one space apart,
    padded with a space each side so that ``normal(a) in normal(b)`` matches whole words."""
    return f" {' '.join(re.findall(r'[a-z0-9]+', text.lower()))} "


def _fills(template: str, digit: int) -> list[str]:
    """A draw/speak template filled for ``digit`` with a numeral and with a word (lower case)."""
    return [template.format(ref=ref, word=WORDS[digit]).lower() for ref in (str(digit), WORDS[digit])]


@lru_cache(maxsize=None)
def templates(task: str, held_out: bool = False) -> tuple[str, ...]:
    """The user-message templates of ``task`` (without media fields), seen or held out.

    Seen templates whose text, filled in, would contain a held-out question (compared in
    :func:`normal` form) are left out.
    """
    if task not in VERBS:
        raise ValueError(f"no phrasings for task {task!r}; known: {sorted(VERBS)}")
    held = _expand(task, True)
    if held_out:
        return tuple(held)
    if task not in OBJECTS:  # the digits in a story's question are the same fields on both sides
        return tuple(s for s in _expand(task, False) if not any(normal(h) in normal(s) for h in held))
    questions = [{normal(h) for t in held for h in _fills(t, d)} for d in range(10)]
    return tuple(
        s
        for s in _expand(task, False)
        if not any(h in normal(filled) for d in range(10) for filled in _fills(s, d) for h in questions[d])
    )


def held_out_questions(task: str) -> list[str]:
    """Every held-out question of ``task`` as text (filled for each digit), lower case: what no
    training text may contain."""
    out = []
    for template in templates(task, held_out=True):
        if task in OBJECTS:
            out += [f for d in range(10) for f in _fills(template, d)]
        elif task == "story":
            out += [template.format(first=ref(a), last=ref(b)).lower()
                    for ref in (str, WORDS.__getitem__) for a in range(10) for b in range(a + 1, 10)]
        else:
            out.append(template.lower())
    return out
