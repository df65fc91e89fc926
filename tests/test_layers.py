"""The package's imports run one way: no cycle, no module importing a higher layer (moetune.LAYERS),
no import of a moetune module inside a function (outside the CLI), and a torch-free `--help`.

The import graph is read from the source with `ast` (module-level and in-function imports alike),
so a cycle hidden behind an import inside a function fails here too.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import moetune

ROOT = Path(moetune.__file__).parent
REPO = ROOT.parent


def _modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file of the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    """The module a dotted import name refers to: itself, or the longest module prefix (a class or function)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported moetune module, line, inside a function) for each import in `module`'s source."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the importing module's package
                    pkg = _package_of(module).split(".")
                    base = ".".join(pkg[: len(pkg) - child.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in child.names] if base else []
            for n in names:
                if n == "moetune" or n.startswith("moetune."):
                    found.append((_resolve(n), child.lineno, inside))
            visit(child, inside)

    visit(tree, False)
    return list(dict.fromkeys(found))  # `from m import a, b` is one import of m


def _graph() -> dict[str, set[str]]:
    """module -> modules it imports. Importing `a.b.c` from outside package `a.b` also runs `a.b`'s
    __init__, so that edge is added too (not for the root package, whose __init__ imports nothing)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _, _ in _imports(m):
            graph[m].add(target)
            parent = target.rpartition(".")[0]
            while parent and parent != "moetune":
                if not (m == parent or m.startswith(parent + ".")):
                    graph[m].add(parent)
                parent = parent.rpartition(".")[0]
        graph[m].discard(m)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def dfs(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                cycle = dfs(n)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = dfs(m)
            if cycle:
                return cycle
    return None


def _layer_key(module: str) -> str | None:
    """The name LAYERS lists a module under: its first component below `moetune` (None for the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


LAYER_OF = {name: rank for rank, names in moetune.LAYERS.items() for name in names}


def test_cycle_finder_finds_a_cycle_and_accepts_a_dag():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_sees_in_function_imports():
    # cli imports its stage modules inside the command functions: the graph must still see them.
    found = {(t, inside) for t, _, inside in _imports("moetune.cli")}
    assert ("moetune.stages", True) in found and ("moetune.errors", False) in found
    assert "moetune.stages" in _graph()["moetune.cli"]


def test_no_import_cycle():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer():
    keys = {_layer_key(m) for m in MODULES} - {None}
    missing = sorted(keys - set(LAYER_OF))
    assert not missing, f"modules without a layer in moetune.LAYERS: {missing}"
    assert not sorted(set(LAYER_OF) - keys), "moetune.LAYERS names modules that do not exist"


def test_no_module_imports_a_higher_layer():
    bad = []
    for m in MODULES:
        if _layer_key(m) is None:
            continue
        for target, line, _ in _imports(m):
            if _layer_key(target) is not None and LAYER_OF[_layer_key(target)] > LAYER_OF[_layer_key(m)]:
                bad.append(f"{MODULES[m].relative_to(REPO)}:{line} ({m}, layer {LAYER_OF[_layer_key(m)]}) imports "
                           f"{target} (layer {LAYER_OF[_layer_key(target)]})")
    assert not bad, "\n".join(bad)


def test_moetune_imports_inside_functions_only_in_the_cli():
    # The CLI imports each command's torch-heavy module when the command runs (keeps --help torch-free);
    # anywhere else an import of a moetune module inside a function would only dodge a cycle.
    bad = [f"{MODULES[m].relative_to(REPO)}:{line} imports {target} inside a function"
           for m in MODULES if m not in ("moetune.cli",)
           for target, line, inside in _imports(m) if inside]
    assert not bad, "\n".join(bad)


def test_expert_schema_and_registry_agree():
    from moetune.expert_configs import EXPERT_CONFIGS, MERGEABLE
    from moetune.experts import REGISTRY
    assert list(REGISTRY) == list(EXPERT_CONFIGS)
    for name, layer in REGISTRY.items():
        assert layer.config_cls is EXPERT_CONFIGS[name], name
        assert layer.mergeable == (name in MERGEABLE), name


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_cli_import_and_recipe_loading_leave_torch_out():
    code = ("import sys\nimport moetune.cli\nfrom moetune.recipe import explain, load_recipe\n"
            "r = load_recipe('recipes/molora.yaml', ['expert.num_experts=5'])\nassert len(explain()) > 1000\n"
            "print(r.expert.num_experts, sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[0] == "5 []"


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["merge-lora", "--help"], ["data", "make", "--help"]])
def test_help_exits_0_without_torch(argv):
    code = ("import sys\nfrom moetune.cli import main\n"
            f"sys.argv = ['moetune', *{argv!r}]\n"
            "try:\n    main()\n    code = 0\nexcept SystemExit as e:\n    code = e.code or 0\n"
            "print('EXIT', code, sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert "Usage" in res.stdout
    assert res.stdout.strip().splitlines()[-1] == "EXIT 0 []"
