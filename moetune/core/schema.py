"""Tiny helpers for typed recipe sections: per-field constraints and per-field docstrings.

A recipe section is a plain dataclass. Each field may carry constraints in its
`metadata` (`choices`, `min`, `max`, `min_exclusive`) and is documented by the string
literal that follows it in the class body (litgpt style). `field_docs` reads those
strings back with `ast`, so the docstrings are the documentation, the CLI help and
the text of error messages alike.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from functools import lru_cache
from typing import Any


def opt(default: Any = dataclasses.MISSING, *, choices: tuple | None = None, min: float | None = None,
        max: float | None = None, min_exclusive: bool = False, factory: Any = None) -> Any:
    """A dataclass field with optional constraints checked by `check_constraints`."""
    meta = {"choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Map field name -> the docstring written under it, for `cls` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def allowed_text(f: dataclasses.Field) -> str:
    """Human description of what a field accepts, from its metadata."""
    m = f.metadata or {}
    if m.get("choices"):
        return "one of " + ", ".join(repr(c) for c in m["choices"])
    lo, hi = m.get("min"), m.get("max")
    if lo is not None and hi is not None:
        return f"a number {'>' if m.get('min_exclusive') else '>='} {lo} and <= {hi}"
    if lo is not None:
        return f"a number {'>' if m.get('min_exclusive') else '>='} {lo}"
    if hi is not None:
        return f"a number <= {hi}"
    return ""


def check_value(f: dataclasses.Field, value: Any) -> bool:
    """True when `value` satisfies the field's constraints (None passes: optional fields)."""
    m = f.metadata or {}
    if value is None:
        return True
    if m.get("choices") is not None:
        items = value if isinstance(value, (list, tuple)) else [value]
        return all(v in m["choices"] for v in items)
    if m.get("min") is not None:
        if value < m["min"] or (m.get("min_exclusive") and value == m["min"]):
            return False
    if m.get("max") is not None and value > m["max"]:
        return False
    return True


def walk(obj: Any, prefix: str = ""):
    """Yield (dotted key, field, value) for every field of a nested dataclass instance."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from walk(value, key + ".")
        else:
            yield key, f, value


def schema_keys(cls: type) -> dict[str, Any]:
    """Field name -> nested dataclass type (or None for leaf fields)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name] if dataclasses.is_dataclass(hints[f.name]) else None)
            for f in dataclasses.fields(cls)}
