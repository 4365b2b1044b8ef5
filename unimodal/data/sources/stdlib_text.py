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
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        seen: set[int] = set()
        objects = [(module_name, module)] + [
            (f"{module_name}.{name}", obj)
            for name, obj in sorted(vars(module).items())
            if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
            and getattr(obj, "__module__", "") == module.__name__
        ]
        for qualname, obj in objects:
            doc = inspect.getdoc(obj)
            if doc and len(doc) >= min_chars and id(doc) not in seen:
                seen.add(id(doc))
                yield qualname, doc


def write_corpus(out_jsonl: str | Path, min_chars: int = 200) -> int:
    """Write one text document per docstring; returns the number of documents."""
    out = Path(out_jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with out.open("w") as f:
        for qualname, doc in _docstrings(min_chars):
            key = qualname.replace(".", "_")
            record = {"key": key, "parts": [{"type": "text", "text": doc}], "meta": {"source": qualname}}
            f.write(json.dumps(record) + "\n")
            count += 1
    return count
