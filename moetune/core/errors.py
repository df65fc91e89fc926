"""The error types a user must act on; the CLI prints them as one paragraph and exits 2.

This module imports nothing of moetune, so every layer may raise these errors.
"""
from __future__ import annotations


class RecipeError(ValueError):
    """A recipe problem a user must fix; the CLI prints it without a traceback (exit 2)."""


class DataError(RecipeError):
    """Bad data: the message names the file and the line (or row)."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread by the CLI's handler as Ctrl-C raises KeyboardInterrupt (a
    BaseException, so that no `except Exception` swallows it)."""

    def __init__(self, signum: int = 15) -> None:
        super().__init__(signum)
        self.signum = signum


class Interrupted(Exception):
    """A run stopped by a signal (Ctrl-C: SIGINT; SIGTERM). `message` says what was kept and where; `resumable`:
    a checkpoint is there for --resume. The CLI prints it and exits 128 + signum (130, 143)."""

    def __init__(self, signum: int, message: str = "", step: int | None = None, resumable: bool = False) -> None:
        super().__init__(message)
        self.signum, self.message, self.step, self.resumable = signum, message, step, resumable
