"""The package's imports run one way: no cycle, no module importing a package of a higher layer or of
the same layer (moetune.LAYERS), no import of a moetune module inside a function (outside the CLI; in the
CLI only of modules that load torch, transformers or datasets; nowhere of a module its own module already
loads), a torch-free `--help`, and a README layout map that lists every module on its layer.

The import graph is read from the source with `ast` (module-level and in-function imports alike),
so a cycle hidden behind an import inside a function fails here too.
"""
from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest

import moetune
from conftest import repo_env

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


@functools.cache
def _statements(module: str) -> tuple[tuple[str, tuple[str, ...], int, bool], ...]:
    """(module named, dotted names it may bring in, line, inside a function) for each import in `module`'s
    source, relative imports made absolute: `import a.b` is (a.b, (a.b,)), `from a.b import c, d` is
    (a.b, (a.b.c, a.b.d)), where each of c and d is a submodule or a name defined in a.b."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found: list[tuple[str, tuple[str, ...], int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, (a.name,), child.lineno, inside) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the importing module's package
                    pkg = _package_of(module).split(".")
                    base = ".".join(pkg[: len(pkg) - child.level + 1] + ([base] if base else []))
                if base:
                    found.append((base, tuple(f"{base}.{a.name}" for a in child.names), child.lineno, inside))
            visit(child, inside)

    visit(tree, False)
    return tuple(found)


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported moetune module, line, inside a function) for each import in `module`'s source."""
    found = [(_resolve(n), line, inside) for _, names, line, inside in _statements(module) for n in names
             if n == "moetune" or n.startswith("moetune.")]
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
    """The name LAYERS lists a module under: its sub-package, or itself for a top-level module (None for the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _home(module: str) -> str:
    """The package a module belongs to for the layering: its sub-package (`moetune.core`), or the root
    package for the top-level modules (`moetune.__main__`)."""
    parts = module.split(".")
    inside = len(parts) > 2 or (len(parts) == 2 and MODULES[module].name == "__init__.py")
    return ".".join(parts[:2]) if inside else "moetune"


LAYER_OF = moetune.LAYERS


def test_cycle_finder_finds_a_cycle_and_accepts_a_dag():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_sees_in_function_imports():
    # cli imports its stage modules inside the command functions: the graph must still see them.
    found = {(t, inside) for t, _, inside in _imports("moetune.cli.train_cmds")}
    assert ("moetune.commands.stages", True) in found and ("moetune.core.errors", False) in found
    assert "moetune.commands.stages" in _graph()["moetune.cli.train_cmds"]


def test_no_import_cycle():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer():
    keys = {_layer_key(m) for m in MODULES} - {None}
    missing = sorted(keys - set(LAYER_OF))
    assert not missing, f"modules without a layer in moetune.LAYERS: {missing}"
    assert not sorted(set(LAYER_OF) - keys), "moetune.LAYERS names modules that do not exist"


def _allowed(module: str, target: str) -> bool:
    """May `module` import `target`? Within its own package freely (the cycle test still applies); across
    packages only downwards, so two packages on one layer never import each other (the packages form a DAG)."""
    if _layer_key(target) is None or _home(target) == _home(module):
        return True
    return LAYER_OF[_layer_key(target)] < LAYER_OF[_layer_key(module)]


def test_layering_rule_rejects_an_upward_and_a_sideways_import():
    assert _allowed("moetune.train.loop", "moetune.train.loss") and _allowed("moetune.eval.evaluate", "moetune.train.loss")
    assert _allowed("moetune.__main__", "moetune.cli") and _allowed("moetune.experts.mole", "moetune.experts")
    assert not _allowed("moetune.train.loss", "moetune.eval.evaluate")    # upward
    assert not _allowed("moetune.train.loop", "moetune.run.session")      # sideways: both on layer 5
    assert not _allowed("moetune.models.load", "moetune.data.rows")       # sideways: both on layer 2


def test_no_module_imports_a_higher_or_sideways_package():
    bad = [f"{MODULES[m].relative_to(REPO)}:{line} ({m}, layer {LAYER_OF[_layer_key(m)]}) imports "
           f"{target} (layer {LAYER_OF[_layer_key(target)]})"
           for m in MODULES if _layer_key(m) is not None
           for target, line, _ in _imports(m) if not _allowed(m, target)]
    assert not bad, "\n".join(bad)


def test_moetune_imports_inside_functions_only_in_the_cli():
    # The CLI imports each command's torch-heavy module when the command runs (keeps --help torch-free);
    # anywhere else an import of a moetune module inside a function would only dodge a cycle.
    bad = [f"{MODULES[m].relative_to(REPO)}:{line} imports {target} inside a function"
           for m in MODULES if _layer_key(m) != "cli"
           for target, line, inside in _imports(m) if inside]
    assert not bad, "\n".join(bad)


HEAVY = ("torch", "transformers", "datasets")  # what `moetune --help` must not wait for


def _external_imports(module: str) -> list[tuple[str, int, bool]]:
    """(module, line, inside a function) for each import of a module outside moetune (`from a.b import c`: a.b)."""
    return [(named, line, inside) for named, _, line, inside in _statements(module)
            if named.split(".")[0] not in ("moetune", "__future__")]


@functools.cache
def _loaded_on_import(module: str) -> frozenset[str]:
    """The modules outside moetune that importing `module` imports, read from the source: the module-level
    imports of `module`, of the moetune modules it imports at module level, transitively, and of the __init__
    of every package above each of those."""
    seen, todo, loaded = set(), [module], set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        loaded |= {name for name, _, inside in _external_imports(m) if not inside}
        for target, _, inside in _imports(m):
            if not inside:  # a.b.c runs a's and a.b's __init__ first
                todo += [".".join(target.split(".")[:i]) for i in range(1, target.count(".") + 2)]
    return frozenset(loaded)  # cached: a caller must not change it


def _heavy_on_import(module: str) -> set[str]:
    return {m.split(".")[0] for m in _loaded_on_import(module)} & set(HEAVY)


def test_no_function_imports_a_package_its_module_already_loads():
    # An import inside a function is for a heavy package the module can be imported without (bitsandbytes,
    # matplotlib, sklearn, wandb, ...); importing inside a function what the module loads anyway only hides it.
    assert "transformers" in _loaded_on_import("moetune.train.loop")
    assert "torch" not in _loaded_on_import("moetune.cli.train_cmds")
    late = [f"{MODULES[m].relative_to(REPO)}:{line} imports {name} inside a function; importing the module loads it anyway"
            for m in MODULES for name, line, inside in _external_imports(m) if inside and name in _loaded_on_import(m)]
    assert not late, "\n".join(late)


def test_the_cli_imports_inside_functions_only_what_loads_torch_transformers_or_datasets():
    # moetune/cli/__init__.py: an import inside a command function is there to keep `--help` fast, so it must
    # name a module that loads a heavy package; a light one (json, rich, the recipe, `moetune runs`) goes at the top.
    assert _heavy_on_import("moetune.commands.stages") >= {"torch", "transformers"}
    assert not _heavy_on_import("moetune.commands.runs") and not _heavy_on_import("moetune.cli")
    cli = [m for m in MODULES if _layer_key(m) == "cli"]
    light = [f"{MODULES[m].relative_to(REPO)}:{line} imports {target} inside a function, and it loads none of "
             f"{', '.join(HEAVY)}" for m in cli for target, line, inside in _imports(m)
             if inside and not _heavy_on_import(target)]
    assert not light, "\n".join(light)


def test_expert_schema_and_registry_agree():
    from moetune.experts import REGISTRY
    from moetune.recipe.experts import EXPERT_CONFIGS, MERGEABLE
    assert list(REGISTRY) == list(EXPERT_CONFIGS)
    for name, layer in REGISTRY.items():
        assert layer.config_cls is EXPERT_CONFIGS[name], name
        assert layer.mergeable == (name in MERGEABLE), name


def _docstring_only(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)


def _readme_layout() -> tuple[list[tuple[int, str | None]], dict[str, tuple[int, str | None]]]:
    """The README's "Layout" map: [(layer, package dir or None)] per header line, and
    module path -> (layer, package dir of its header) per module line."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    headers: list[tuple[int, str | None]] = []
    listed: dict[str, tuple[int, str | None]] = {}
    for line in section.splitlines():
        if h := re.match(r"    layer (\d+): (moetune/\w+/)?", line):
            headers.append((int(h.group(1)), h.group(2)))
        elif m := re.match(r"    (moetune/\S+\.py)\s", line):
            assert headers, f"README layout: {m.group(1)} is listed before any 'layer N:' line"
            assert m.group(1) not in listed, f"README layout lists {m.group(1)} twice"
            listed[m.group(1)] = headers[-1]
    return headers, listed


def test_readme_layout_lists_every_module_on_its_layer():
    headers, listed = _readme_layout()
    # every module but the root __init__ and the sub-packages' docstring-only __init__ files, and nothing more
    files = {str(p.relative_to(REPO)): m for m, p in MODULES.items()
             if m != "moetune" and not (p.name == "__init__.py" and _docstring_only(p))}
    assert sorted(set(files) - set(listed)) == [], "modules missing from the README's Layout section"
    assert sorted(set(listed) - set(files)) == [], "the README's Layout section lists files that do not exist"
    for path, (layer, package) in listed.items():
        key = _layer_key(files[path])
        assert layer == LAYER_OF[key], f"README layout: {path} on layer {layer}, moetune.LAYERS[{key!r}] = {LAYER_OF[key]}"
        if package is None:
            assert path.count("/") == 1, f"README layout: {path} is listed under a header without its package"
        else:
            assert path.startswith(package), f"README layout: {path} is listed under {package}"
    # one header per sub-package, on its LAYERS layer, from the top layer down
    packages = [(pkg.split("/")[1], layer) for layer, pkg in headers if pkg]
    assert len(dict(packages)) == len(packages), f"README layout: a package has two headers: {packages}"
    assert dict(packages) == {k: v for k, v in LAYER_OF.items() if (ROOT / k).is_dir()}
    layers = [layer for layer, _ in headers]
    assert layers == sorted(layers, reverse=True), f"README layout: layers not listed top down: {layers}"


def test_every_package_says_what_it_offers():
    missing = [str(p.relative_to(REPO)) for p in MODULES.values()
               if p.name == "__init__.py" and not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"package __init__ files without a docstring: {missing}"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=repo_env(), capture_output=True, text=True,
                          timeout=120)


def test_cli_import_and_recipe_loading_leave_torch_out():
    code = ("import sys\nimport moetune.cli\nfrom moetune.recipe import explain, load_recipe\n"
            "r = load_recipe('recipes/molora.yaml', ['expert.num_experts=5'])\nassert len(explain()) > 1000\n"
            "print(r.expert.num_experts, sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[0] == "5 []"


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["merge-lora", "--help"], ["data", "make", "--help"],
                                  ["serve", "--help"]])
def test_help_exits_0_without_torch(argv):
    code = ("import sys\nfrom moetune.cli import main\n"
            f"sys.argv = ['moetune', *{argv!r}]\n"
            "try:\n    main()\n    code = 0\nexcept SystemExit as e:\n    code = e.code or 0\n"
            "print('EXIT', code, sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert "Usage" in res.stdout
    assert res.stdout.strip().splitlines()[-1] == "EXIT 0 []"


# Modules that import no torch (the recipe schema, the CLI, `moetune runs`, `moetune data make`, small helpers):
# importing one must not pull torch in through a package's __init__.
TORCH_FREE = ("moetune.cli", "moetune.recipe", "moetune.recipe.sections", "moetune.recipe.experts",
              "moetune.core.errors", "moetune.core.schema", "moetune.core.ui", "moetune.core.recompute",
              "moetune.core.adapter_files", "moetune.core.files", "moetune.recipe.paths", "moetune.data.datagen",
              "moetune.commands.runs", "moetune.train.curves", "moetune.eval.mc_prompts")


def test_torch_free_modules_import_without_torch():
    code = (f"import importlib, sys\nfor m in {TORCH_FREE!r}:\n    importlib.import_module(m)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
