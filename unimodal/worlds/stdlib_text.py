"""A small English text corpus built offline from the Python standard library's docstrings.

Real prose, present on every machine that runs unimodal, deterministic for a given Python
version: enough for the text-only smoke recipe and tokenizer training without any download.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Iterator
from pathlib import Path

MODULES = (
    "abc argparse ast asyncio base64 bisect calendar collections configparser contextlib copy csv "
    "dataclasses datetime decimal difflib email enum fractions ftplib functools glob gzip hashlib heapq "
    "hmac html http.client imaplib inspect io ipaddress itertools json logging mailbox mimetypes "
    "multiprocessing numbers operator optparse os pathlib pickle pprint queue random re sched "
    "secrets selectors shelve shlex shutil signal smtplib socket sqlite3 statistics string struct "
    "subprocess tarfile tempfile textwrap threading time timeit tokenize traceback typing unittest "
    "urllib.parse uuid warnings weakref xml.dom.minidom zipfile zlib"
).split()


def _docstrings(min_chars: int) -> Iterator[tuple[str, str]]:
    """Each docstring once, under the first name that has it: ``inspect.getdoc`` hands a subclass
    its base's text (and an alias its target's), and one text in both splits would leak."""
    seen: set[str] = set()
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        objects = [(module_name, module)] + [
            (f"{module_name}.{name}", obj)
            for name, obj in sorted(vars(module).items())
            if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
            and getattr(obj, "__module__", "") == module.__name__
        ]
        for qualname, obj in objects:
            doc = inspect.getdoc(obj)
            if doc and len(doc) >= min_chars and doc not in seen:
                seen.add(doc)
                yield qualname, doc


def write_corpus(out_dir: str | Path, min_chars: int = 200, val_every: int = 10) -> tuple[int, int]:
    """Write ``train.jsonl`` and ``val.jsonl`` (every ``val_every``-th docstring), one document
    per docstring; returns the two document counts. Files of those names already there are the
    user's: refused, not overwritten."""
    out = Path(out_dir)
    held = next((out / name for name in ("train.jsonl", "val.jsonl") if (out / name).exists()), None)
    if held is not None:
        raise FileExistsError(f"{held} exists; write the corpus to another directory, or move it away first")
    out.mkdir(parents=True, exist_ok=True)
    counts = [0, 0]
    with (out / "train.jsonl").open("w") as train, (out / "val.jsonl").open("w") as val:
        for index, (qualname, doc) in enumerate(_docstrings(min_chars)):
            key = qualname.replace(".", "_")
            record = {"key": key, "parts": [{"type": "text", "text": doc}], "meta": {"source": qualname}}
            held_out = index % val_every == val_every - 1
            (val if held_out else train).write(json.dumps(record) + "\n")
            counts[held_out] += 1
    return counts[0], counts[1]
