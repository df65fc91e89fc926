"""Clutter papercuts of a newcomer's first hour (issue 28): the results table's `all` row once, the routing
table in a file with a one-line digest, "1 example" (plurals everywhere), readable usage text (no `<bool>`,
`{recipe}`, `<list[Path]>`), `moetune --version`."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import moetune
from conftest import tiny_overrides
from moetune.core.ui import plural
from moetune.recipe import load_recipe
from cli_main import run_main as _main

torch.set_num_threads(1)
ROOT = Path(moetune.__file__).parent



# ------------------------------------------------------------------ results table


def _summary_run(tmp_path, per_domain_before: dict, per_domain_after: dict):
    summary = {"before": {"loss": 2.0, "exact_match": 0.1, "per_domain": per_domain_before},
               "after": {"loss": 1.0, "exact_match": 0.5, "per_domain": per_domain_after}}
    return SimpleNamespace(main=True, summary=lambda: summary, recipe=load_recipe(None, []), dir=tmp_path,
                           summary_path=tmp_path / "summary.json")


def _table_labels(text: str) -> list[str]:
    return [line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│")]


def test_results_table_shows_all_once_without_a_domain_column(tmp_path, capsys):
    from moetune.commands.stages import print_summary
    one = {"loss": 1.0, "exact_match": 0.5}
    print_summary(_summary_run(tmp_path, {"all": {"loss": 2.0, "exact_match": 0.1}}, {"all": one}))
    assert _table_labels(capsys.readouterr().err) == ["all"]
    print_summary(_summary_run(tmp_path, {"math": {"loss": 2.0, "exact_match": 0.1}}, {"math": one}))
    assert _table_labels(capsys.readouterr().err) == ["all (math)"]
    print_summary(_summary_run(tmp_path, {}, {"a": one, "b": one}))
    assert _table_labels(capsys.readouterr().err) == ["all", "a", "b"]


# ------------------------------------------------------------------ routing report


def test_routing_table_goes_to_a_file_and_the_console_gets_one_line(tiny_llama, tiny_data, tmp_path, capsys):
    from moetune.commands.stages import run_recipe
    from moetune.eval.report import table_rows
    out = tmp_path / "run"
    run_recipe(load_recipe(None, tiny_overrides(tiny_llama, tiny_data, out, "expert.type=hydralora",
                                                "expert.num_experts=2", "stages=[train,eval]", "train.max_steps=2",
                                                "train.eval_before=false", "eval.generation=false")))
    err = capsys.readouterr().err
    import json
    report = json.loads((out / "eval.json").read_text())["routing"]
    md = (out / "routing.md").read_text()
    for label, *_ in table_rows(report):
        assert f"| {label} |" in md, label
        assert label not in err, label                 # the per-layer rows are not printed
    assert "load min" in md and "load min" not in err
    digest = [line for line in err.splitlines() if line.startswith("routing:")]
    assert len(digest) == 1, err
    assert "routing.md" in digest[0] and "routing.png" in digest[0] and "dead" in digest[0]
    assert report["table"] == str(out / "routing.md")
    # the summary table comes last but for the digest, which follows it
    assert err.rindex("routing:") > err.rindex("before vs after")


# ------------------------------------------------------------------ plurals


def test_plural():
    assert plural(1, "example") == "1 example"
    assert plural(0, "example") == "0 examples"
    assert plural(1500, "row") == "1,500 rows"
    assert plural(2, "entry", "entries") == "2 entries"


COUNT_NOUNS = ("examples|rows|steps|experts|tokens|runs|files|domains|modules|adapters|checkpoints|layers|prompts|"
               "sources|clusters|epochs|batches|parameters|splits|shards|processes|names|projections|compositions|"
               "heads|subjects|questions|entries|turns|lines|items")
COUNTED = re.compile(r"\{[^{}]*\}(?: [a-z-]+)? (" + COUNT_NOUNS + r")\b")


def test_no_count_is_followed_by_a_fixed_plural():
    """An f-string never writes `{n} examples` (which reads "1 examples"): counts go through core.ui.plural.
    Read from the source: the literal parts of every f-string, with each formatted value as {...}."""
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "{...}" for v in node.values)
            elif (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) and isinstance(node.right, ast.Constant)
                  and isinstance(node.right.value, str)):  # str(n) + " rows"
                text = "{...}" + node.right.value
            else:
                continue
            if COUNTED.search(text):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text[:90]}")
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------ usage text, --version


def _commands():
    from moetune.cli import app
    import typer.main
    group = typer.main.get_command(app)
    out = []
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            out += [[name, sub] for sub in cmd.commands]
        else:
            out.append([name])
    return out


def test_usage_text_is_readable(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")
    for argv in [[]] + _commands():
        code, out, err = _main(monkeypatch, capsys, *argv, "--help")
        assert code == 0, (argv, err)
        for ugly in ("<bool>", "<list[", "<path>", "<str>", "<int>", "<float>", "{"):
            assert ugly not in out, (argv, ugly, out)
    code, out, _ = _main(monkeypatch, capsys, "train", "--help")
    assert "moetune train [OPTIONS] RECIPE [KEY=VALUE]..." in out
    code, out, _ = _main(monkeypatch, capsys, "cluster-heads", "--help")
    assert re.search(r"--min\s+N\s", out) and re.search(r"--out\s+PATH\s", out)
    assert re.search(r"--force\s+Replace", out)         # a flag takes no value: nothing between name and help
    code, out, _ = _main(monkeypatch, capsys, "runs", "--help")
    assert "moetune runs [OPTIONS] [DIR]..." in out


def test_version(monkeypatch, capsys):
    code, out, err = _main(monkeypatch, capsys, "--version")
    assert code == 0, err
    assert out.startswith(f"moetune {moetune.__version__}")
    assert "torch" in out and "transformers" in out and "python" in out


def test_version_imports_no_torch():
    code = ("import sys\nfrom moetune.cli import main\nsys.argv = ['moetune', '--version']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "print('EXIT', code, sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent)
    assert "EXIT 0 []" in r.stdout, r.stdout + r.stderr


# ------------------------------------------------------------------ make clean keeps the user's runs


def test_make_clean_removes_only_what_setup_built():
    """`make clean` once also removed runs/: every trained run, checkpoint and export. `make -n` prints the
    commands without running them."""
    p = subprocess.run(["make", "-n", "clean"], cwd=ROOT.parent, capture_output=True, text=True, check=True)
    removed = [w for line in p.stdout.splitlines() if line.startswith("rm ") for w in line.split()[2:]]
    assert ".venv" in removed and "*.egg-info" in removed, p.stdout
    assert not any(w.rstrip("/").split("/")[-1] in ("runs", "data", "recipes") for w in removed), p.stdout
