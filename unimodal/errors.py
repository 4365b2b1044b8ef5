"""Errors a user can fix: the CLI prints them as one line (no traceback) and exits with ``exit_code``."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Bad input, a missing file, a refused request: one line says what to change."""

    exit_code = 2


def refuse_nonempty(out: Path, hint: str) -> None:
    """Commands that write a directory never write into one that already holds something: the user
    keeps what is there. Checked before any work, so a refusal costs nothing."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; {hint}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; {hint}")
