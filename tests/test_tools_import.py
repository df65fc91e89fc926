"""Every file under benchmarks/ and scripts/ still imports against the package: most of them have no test of
their own (a benchmark is run by `make bench-*`, not by the suite), so a renamed or moved moetune symbol would
otherwise surface only when someone next measures. One subprocess, each file loaded as its own module with
its folder first on sys.path, as `python benchmarks/x.py` runs it; nothing's main() is called. Many of them
import moetune inside a function (a worker process's own imports), so every `from moetune.X import Y` in a
file, at any depth, is also checked: X imports and has Y."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, repo_env

CHECK = """
import ast, importlib, importlib.util, json, sys
from pathlib import Path
failed = {}
names = 0
for folder in ("benchmarks", "scripts"):
    sys.path.insert(0, str(Path(folder).resolve()))
    for path in sorted(Path(folder).glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"_tool_{folder}_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module                     # dataclasses look their module up here
        try:
            spec.loader.exec_module(module)
        except BaseException as e:
            failed[str(path)] = f"{type(e).__name__}: {e}"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "moetune":
                for alias in node.names:
                    names += 1
                    where = f"{path}:{node.lineno}"
                    try:
                        mod = importlib.import_module(node.module)
                    except BaseException as e:
                        failed[where] = f"{node.module}: {type(e).__name__}: {e}"
                        continue
                    sub = hasattr(mod, "__path__") and importlib.util.find_spec(f"{node.module}.{alias.name}")
                    if not hasattr(mod, alias.name) and not sub:
                        failed[where] = f"{node.module} has no {alias.name!r}"
print(json.dumps({"failed": failed, "names": names, "files": sorted(str(p) for f in ("benchmarks", "scripts")
                                                      for p in Path(f).glob("*.py"))}))
"""


def test_every_benchmark_and_script_imports():
    res = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, env=repo_env(OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.splitlines()[-1])
    assert out["failed"] == {}
    assert out["names"] > 50                                           # the in-function imports were read
    assert {"benchmarks/bench.py", "benchmarks/packing_speed.py", "benchmarks/qlora_memory.py",
            "scripts/mmlu_smollm2.py", "scripts/study_archive.py"} <= set(out["files"])
