"""Rewrite imports and module paths from moetune's old flat layout to its sub-packages.

For a branch written against the flat layout (`moetune/models.py`, `moetune/stages.py`, ...), on the
files it added or changed (`git diff --name-only main...BRANCH`; old paths quoted on purpose, such as a
benchmark's historical `git show`, are rewritten too, so not the whole tree):
    python scripts/migrate_layout.py FILE_OR_DIR ...     # rewrites .py and .md files in place
A file that contains the words 'migrate_layout: leave this file' is skipped (its own test's fixtures).
It rewrites
- `from moetune.X import a, b` (and `from moetune import X [as Y]`) to the new module, splitting the
  statement where a name moved to another module (`decoder_layers`, `layer_index`, `routed_layers`,
  `Run`, `model_with_adapter`);
- dotted names elsewhere (`import moetune.X as Y`, `moetune.X.f`, strings, docstrings) and paths
  (`moetune/X.py`).
It is idempotent: names already in the new layout are left alone (a bare `moetune.data`, `moetune.models`,
`moetune.train` or `moetune.adapters` outside an import is too: the package or the old module, it cannot
tell). Prints the files it changed. Tests: tests/test_migrate_layout.py.
"""
from __future__ import annotations

import ast
import re
import sys
import textwrap
from pathlib import Path

SKIP = "migrate_layout: " + "leave this file"  # split, so this file does not carry the marker itself

# old module (below moetune) -> new module (below moetune)
MOVED = {
    "errors": "core.errors", "schema": "core.schema", "ui": "core.ui", "checkpoint": "core.checkpoint",
    "recompute": "core.recompute", "adapter_files": "core.adapter_files",
    "recipe_sections": "recipe.sections", "expert_configs": "recipe.experts",
    "models": "models.load", "quant": "models.quant",
    "data": "data.rows", "sources": "data.sources", "pipeline": "data.pipeline", "packing": "data.packing",
    "datagen": "data.datagen",
    "routing": "experts.routing",
    "inject": "adapters.inject", "adapters": "adapters.io",
    "train": "train.loop", "loss": "train.loss", "loggers": "train.loggers", "curves": "train.curves",
    "fsdp": "train.fsdp", "router_fit": "train.router_fit", "checkpointing": "train.activation_checkpointing",
    "rundir": "run.rundir",
    "evaluate": "eval.evaluate", "generation": "eval.generation", "report": "eval.report", "mmlu": "eval.mmlu",
    "merge": "export.merge", "multimerge": "export.multimerge", "collapse": "export.collapse",
    "stock": "export.stock",
    "stages": "commands.stages", "validate": "commands.validate", "cluster": "commands.cluster",
    "domain_experts": "commands.domain_experts", "chat": "commands.chat", "runs": "commands.runs",
    "inspect_data": "commands.inspect_data",
}
# (new module, name) -> the module that holds the name now
NAMES = {
    ("experts.calm_bridge", "decoder_layers"): "models.layers",
    ("eval.report", "layer_index"): "models.layers",
    ("eval.report", "routed_layers"): "adapters.inject",
    ("commands.stages", "Run"): "run.session",
    ("commands.stages", "model_with_adapter"): "run.session",
}
# new package -> its modules named above: `moetune.data.rows` continues into one, so it is new already
NEW_SUBMODULES: dict[str, set[str]] = {}
for _new in [*MOVED.values(), *NAMES.values()]:
    NEW_SUBMODULES.setdefault(_new.split(".")[0], set()).add(_new.split(".")[1])

_DOTTED = re.compile(r"\bmoetune\.(" + "|".join(sorted(MOVED, key=len, reverse=True)) + r")\b(?:\.(\w+))?")
_PATH = re.compile(r"\bmoetune/(" + "|".join(sorted(MOVED, key=len, reverse=True)) + r")\.py\b")


# old module names that are package names now: a bare `moetune.data` may mean either, so prose keeps it
AMBIGUOUS = {old for old in MOVED if old in NEW_SUBMODULES}


def _dotted(m: re.Match, bare: bool = False) -> str:
    old, rest = m.group(1), m.group(2)
    if rest is not None and rest in NEW_SUBMODULES.get(old, ()):
        return m.group(0)  # already the new layout (moetune.models.load, moetune.data.rows, ...)
    if rest is None and old in AMBIGUOUS and not bare:
        return m.group(0)  # `moetune.data`: the package or the old module; left as it is
    return "moetune." + MOVED[old] + (f".{rest}" if rest is not None else "")


def _new_module(module: str) -> str:
    """'moetune.models' -> 'moetune.models.load' (an import names the old module); new names unchanged."""
    return _DOTTED.sub(lambda m: _dotted(m, bare=True), module)


def _alias(a: ast.alias) -> str:
    return f"{a.name} as {a.asname}" if a.asname else a.name


def _from_lines(node: ast.ImportFrom, indent: str) -> list[str]:
    """The statements that replace one `from moetune... import ...`."""
    groups: dict[str, list[str]] = {}
    pkg = node.module.removeprefix("moetune").removeprefix(".")
    for a in node.names:
        if node.module == "moetune" and a.name in MOVED:  # from moetune import X [as Y]
            parent, _, sub = MOVED[a.name].rpartition(".")
            groups.setdefault(f"moetune.{parent}", []).append(f"{sub} as {a.asname}" if a.asname else sub)
        elif node.module == "moetune" or a.name in NEW_SUBMODULES.get(pkg, ()):  # new already
            groups.setdefault(node.module, []).append(_alias(a))
        else:
            module = _new_module(node.module)
            target = NAMES.get((module.removeprefix("moetune."), a.name))
            groups.setdefault(f"moetune.{target}" if target else module, []).append(_alias(a))
    return [_statement(indent, mod, names) for mod, names in groups.items()]


def _statement(indent: str, module: str, names: list[str]) -> str:
    """`from module import a, b`, wrapped in parentheses (continuation lines under the first name) past 118."""
    line = f"{indent}from {module} import {', '.join(names)}"
    if len(line) > 118:
        head = f"{indent}from {module} import ("
        line = textwrap.fill(", ".join(names) + ")", width=118, initial_indent=head,
                             subsequent_indent=" " * len(head), break_on_hyphens=False)
    return line


def _import_line(node: ast.Import, indent: str) -> list[str]:
    return [indent + "import " + ", ".join(
        _new_module(a.name) + (f" as {a.asname}" if a.asname else "") for a in node.names)]


def _unchanged(node: ast.ImportFrom | ast.Import, indent: str) -> list[str]:
    """The statement as written above if nothing in it had moved."""
    if isinstance(node, ast.Import):
        return [indent + "import " + ", ".join(_alias(a) for a in node.names)]
    return [_statement(indent, node.module, [_alias(a) for a in node.names])]


def _moetune(name: str | None) -> bool:
    return bool(name) and (name == "moetune" or name.startswith("moetune."))


def _prose(line: str) -> str:
    return _PATH.sub(lambda m: f"moetune/{MOVED[m.group(1)].replace('.', '/')}.py", _DOTTED.sub(_dotted, line))


def rewrite_python(text: str) -> str:
    lines = text.splitlines(keepends=True)
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return "".join(_prose(line) for line in lines)
    edits, in_import = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and _moetune(node.module):
            make = _from_lines
        elif isinstance(node, ast.Import) and any(_moetune(a.name) for a in node.names):
            make = _import_line
        else:
            continue
        first, last = node.lineno - 1, node.end_lineno - 1
        in_import.update(range(first, last + 1))  # imports are rewritten here, never as prose below
        indent = re.match(r"\s*", lines[first]).group(0)
        new = make(node, indent)
        if new == _unchanged(node, indent):
            continue  # new layout already: the statement keeps its own formatting
        comments = [c for c in (re.search(r"#.*", line) for line in lines[first:last + 1]) if c]
        if comments:  # `# noqa: ...` and the like, kept on the first line of the new statement
            head, nl, rest = new[0].partition("\n")
            new[0] = head + "  " + "  ".join(dict.fromkeys(c.group(0) for c in comments)) + nl + rest
        old = "".join(lines[first:last + 1])
        edits.append((first, last, "\n".join(new) + ("\n" if old.endswith("\n") else "")))
    lines = [line if i in in_import else _prose(line) for i, line in enumerate(lines)]
    for first, last, replacement in sorted(edits, reverse=True):
        lines[first:last + 1] = [replacement]
    return "".join(lines)


def rewrite_text(text: str) -> str:
    return "".join(_prose(line) for line in text.splitlines(keepends=True))


def main(args: list[str]) -> int:
    files: list[Path] = []
    for a in args or ["."]:
        p = Path(a)
        files += sorted(q for q in p.rglob("*") if q.suffix in (".py", ".md") and ".venv" not in q.parts
                        and ".git" not in q.parts) if p.is_dir() else [p]
    for f in files:
        text = f.read_text()
        if f.resolve() == Path(__file__).resolve() or SKIP in text:
            continue
        new = rewrite_python(text) if f.suffix == ".py" else rewrite_text(text)
        if new != text:
            f.write_text(new)
            print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
