"""Set keys in a recipe's YAML text and keep the rest as the user wrote it: comments, blank lines, key order,
flow lists (`target_modules: [q_proj, v_proj]`) and flow sections (`router: {type: soft}`). `moetune
cluster-heads` writes its new recipe with it (issue 28: it used to write the recipe afresh, without the
user's comments and with every list in block layout).

A key is a top-level key (`stages`) or a key of a section (`expert.num_experts`); the line that holds it
gets the new value, keeping its indentation and its trailing comment at the same column; a key not yet
there is added as the last key of its section (a missing section is added at the end). A flow section's
line is written again with the key set. Anything else (a deeper key such as `data.mix[0].path`, anchors,
a value spread over several lines that is not a block list) is beyond this editor: `set_keys` returns
None and the caller writes the recipe afresh. The result is checked: it must parse to the original with
the changes applied (a mismatch also gives None).
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from omegaconf import OmegaConf

KEY_LINE = re.compile(r"^(?P<indent>[ ]*)(?P<key>[A-Za-z_][\w-]*):(?P<rest>.*)$")
PLAIN = re.compile(r"^[A-Za-z0-9_./~][A-Za-z0-9_./~+@:-]*$")


def parse(text: str) -> dict:
    """The YAML text as plain containers (interpolations unresolved)."""
    return OmegaConf.to_container(OmegaConf.create(text or "{}")) or {}  # type: ignore[return-value]


def flow(value: Any) -> str:
    """`value` as one line of YAML (flow style) that parses back to it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
        text = repr(value)
        mantissa, _, exponent = text.partition("e")
        return text if not exponent or "." in mantissa else f"{mantissa}.0e{exponent}"  # YAML 1.1 floats
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {flow(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if PLAIN.match(text):
        try:
            if parse(f"x: {text}")["x"] == text:
                return text
        except Exception:  # noqa: BLE001 - anything YAML would misread is quoted
            pass
    return json.dumps(text)  # a JSON string is a YAML double-quoted scalar


def _split_comment(rest: str) -> tuple[str, str]:
    """(value text, comment from its '#') of what follows 'key:' on a line; quotes respected."""
    quote = None
    for i, c in enumerate(rest):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or rest[i - 1] in " \t"):
            return rest[:i].strip(), rest[i:]
    return rest.strip(), ""


def _with_comment(prefix: str, comment: str, column: int) -> str:
    """`prefix` and the comment at its old column (one space further out when the value got longer)."""
    if not comment:
        return prefix
    return prefix + " " * max(column - len(prefix), 1) + comment


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_content(line: str) -> bool:
    return bool(line.strip()) and not line.lstrip().startswith("#")


def _set_line(lines: list[str], i: int, indent: str, key: str, value: Any) -> list[str]:
    """Set the value of the key on line i; a block value under it (deeper lines, or '- ' items at its own
    indentation) is replaced by the flow value."""
    m = KEY_LINE.match(lines[i])
    old, comment = _split_comment(m["rest"])
    column = len(lines[i]) - len(comment) if comment else 0
    j = i + 1
    if not old:  # a block value follows: drop its lines, keep the comments among them
        while j < len(lines) and (not _is_content(lines[j]) or _indent(lines[j]) > len(indent)
                                  or lines[j].startswith(indent + "- ")):
            j += 1
        while j > i + 1 and not _is_content(lines[j - 1]):  # trailing blank/comment lines stay where they are
            j -= 1
    kept = [line for line in lines[i + 1:j] if line.strip() and not _is_content(line)]
    new = _with_comment(f"{indent}{key}: {flow(value)}", comment, column)
    return lines[:i] + [new] + kept + lines[j:]


def _find(lines: list[str], start: int, stop: int, indent: str, key: str) -> int | None:
    for i in range(start, stop):
        m = KEY_LINE.match(lines[i])
        if m and m["indent"] == indent and m["key"] == key:
            return i
    return None


def _section_end(lines: list[str], header: int) -> int:
    """The index after the last content line of the block section starting at `header`."""
    end = header + 1
    for j in range(header + 1, len(lines)):
        if _is_content(lines[j]):
            if _indent(lines[j]) == 0:
                break
            end = j + 1
    return end


def _set_top(lines: list[str], key: str, value: Any) -> list[str] | None:
    i = _find(lines, 0, len(lines), "", key)
    if i is None:
        return lines + [f"{key}: {flow(value)}"]
    return _set_line(lines, i, "", key, value)


def _set_in_section(lines: list[str], section: str, key: str, value: Any) -> list[str] | None:
    h = _find(lines, 0, len(lines), "", section)
    if h is None:
        return lines + [f"{section}:", f"  {key}: {flow(value)}"]
    old, comment = _split_comment(KEY_LINE.match(lines[h])["rest"])
    if old:  # a flow section on one line: write that line again with the key set
        body = parse(f"x: {old}")["x"] if old != "null" else {}
        if not isinstance(body, dict):
            return None
        column = len(lines[h]) - len(comment) if comment else 0
        new = _with_comment(f"{section}: {flow({**body, key: value})}", comment, column)
        return lines[:h] + [new] + lines[h + 1:]
    end = _section_end(lines, h)
    body = [line for line in lines[h + 1:end] if _is_content(line)]
    indent = " " * (_indent(body[0]) if body else 2)
    i = _find(lines, h + 1, end, indent, key)
    if i is None:
        return lines[:end] + [f"{indent}{key}: {flow(value)}"] + lines[end:]
    return _set_line(lines, i, indent, key, value)


def flatten(changes: dict) -> dict[str, Any]:
    """Nested changes ({'train': {'max_steps': 9}}) -> dotted keys of depth 1 or 2 ({'train.max_steps': 9})."""
    out: dict[str, Any] = {}
    for k, v in changes.items():
        if isinstance(v, dict) and v:
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[str(k)] = v
    return out


def set_keys(text: str, changes: dict) -> str | None:
    """`text` with the (nested) `changes` set in place, or None when its layout is beyond this editor."""
    try:
        lines = text.splitlines()
        for key, value in flatten(changes).items():
            parts = key.split(".")
            if len(parts) == 1:
                lines = _set_top(lines, parts[0], value)
            elif len(parts) == 2 and all(KEY_LINE.match(f"{p}:") for p in parts):
                lines = _set_in_section(lines, parts[0], parts[1], value)
            else:
                return None
            if lines is None:
                return None
        new = "\n".join(lines) + "\n"
        expected = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(text or "{}"), OmegaConf.create(changes)))
        return new if parse(new) == expected else None
    except Exception:  # noqa: BLE001 - YAML this editor misreads: the caller writes the recipe afresh
        return None
