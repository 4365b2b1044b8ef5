"""Errors a user can fix: the CLI prints them as one line (no traceback) and exits with ``exit_code``."""

from __future__ import annotations


class UserError(Exception):
    """Bad input, a missing file, a refused request: one line says what to change."""

    exit_code = 2
