"""Usage text people can read (issue 28): `moetune train [OPTIONS] RECIPE [KEY=VALUE]...` instead of typer's
`{recipe} [overrides]...`, no `<bool>` after a flag (it takes no value), `N`, `X`, `TEXT`, `PATH` instead of
`<int>`, `<float>`, `<str>`, `<path>`, no type column after an argument (its name says it: RECIPE,
RUN_DIR, DIR...), and docstrings reflowed to the terminal's width. Torch-free: the CLI builds its commands with these classes at import.

`Typer` is typer's app whose commands default to `Command` and whose groups to `Group`; both give their
parameters readable metavars when click asks for them (`get_params`), so help, usage and error messages
agree. `version_text` is what `moetune --version` prints.
"""
from __future__ import annotations

import inspect
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from moetune import __version__

VERSIONS = ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes")
"""The packages `moetune --version` names beside moetune (read from their metadata: nothing is imported)."""

METAVARS = {"int": "N", "float": "X", "str": "TEXT", "Path": "PATH", "bool": "BOOL"}
"""An option's Python type -> its metavar (a flag has none; a repeatable list[T] option T's)."""


class _Argument(TyperArgument):
    """An argument shown by its metavar alone: `RECIPE` in the usage line and the help table."""

    def display_type_rich(self, ctx) -> str | None:
        return None

    def _usage_display_name(self) -> str:
        name = self.metavar or self.name.upper()
        name = name if self.required else f"[{name}]"
        return name + ("..." if self.nargs != 1 else "")


def readable(params: list) -> list:
    """Give every parameter a metavar people read (in place; idempotent) and return the list."""
    for p in params:
        if isinstance(p, TyperArgument):
            if p.metavar is None:
                p.metavar = (p.name or "").upper()
            if type(p) is TyperArgument:
                p.__class__ = _Argument  # same state, readable display (typer builds the parameters itself)
        elif isinstance(p, TyperOption) and p.metavar is None:
            kind = p.bare_type().removeprefix("list[").removesuffix("]")
            p.metavar = "" if p.is_flag else METAVARS.get(kind, "VALUE")
    return params


def reflow(text: str | None) -> str | None:
    """A docstring's paragraphs each on one line, so that help wraps them at the terminal's width (typer's rich
    help keeps a docstring's single line breaks: `moetune --help` showed half-lines)."""
    if not text:
        return text
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(text).split("\n\n"))


class Command(TyperCommand):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["help"] = reflow(kwargs.get("help"))
        super().__init__(*args, **kwargs)

    def get_params(self, ctx) -> list:
        return readable(super().get_params(ctx))


class Group(TyperGroup):
    def get_params(self, ctx) -> list:
        return readable(super().get_params(ctx))


class Typer(typer.Typer):
    """typer.Typer with readable usage text for its commands and groups."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("cls", Group)
        super().__init__(**kwargs)

    def command(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("cls", Command)
        return super().command(*args, **kwargs)


def version_text() -> str:
    """'moetune 0.1.0 (torch ..., transformers ..., ...; python 3.11.7)', without importing any of them."""
    def ver(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"
    deps = ", ".join(f"{name} {ver(name)}" for name in VERSIONS)
    return f"moetune {__version__} ({deps}; python {sys.version.split()[0]})"
