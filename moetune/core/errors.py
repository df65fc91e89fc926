"""The error types a user must act on; the CLI prints them as one paragraph and exits 2.

This module imports nothing of moetune, so every layer may raise these errors.
"""
from __future__ import annotations


class RecipeError(ValueError):
    """A recipe problem a user must fix; the CLI prints it without a traceback (exit 2)."""


class DataError(RecipeError):
    """Bad data: the message names the file and the line (or row)."""
