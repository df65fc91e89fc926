"""`moetune runs`: the comparison table over run directories, and the routed model card's collapse note."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import cli, tiny_overrides
from moetune.commands.runs import find_runs, run_row, sort_rows
from moetune.recipe import load_recipe

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def runs_dir(tiny_llama, tiny_data, tmp_path_factory):
    from moetune.commands.stages import run_recipe
    root = tmp_path_factory.mktemp("runs")
    for name, extra in (("lora", ["train.max_steps=8"]),
                        ("hydra", ["expert.type=hydralora", "expert.num_experts=2", "train.max_steps=4"])):
        run_recipe(load_recipe(None, tiny_overrides(tiny_llama, tiny_data, root / name, "stages=[train,eval]", *extra)))
    return root


def test_runs_json_rows_read_the_run_files(runs_dir, monkeypatch, capsys):
    assert cli(monkeypatch, "runs", runs_dir, "--json") in (0, None)
    rows = {r["type"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"lora", "hydralora"}
    for etype, r in rows.items():
        s = json.loads((runs_dir / ("lora" if etype == "lora" else "hydra") / "summary.json").read_text())
        assert r["trainable"] == s["train"]["trainable_parameters"] > 0
        assert r["steps"] == s["train"]["steps"] and r["train_loss"] == s["train"]["final_train_loss"]
        assert r["val_loss"] == s["train"]["val_loss"]
        assert (r["em_before"], r["em_after"]) == (s["before"]["exact_match"], s["after"]["exact_match"])
        assert set(r["per_domain"]) == {"add", "shout"} and r["tokens_per_s"] > 0
    assert rows["lora"]["steps"] == 8 and rows["hydralora"]["steps"] == 4
    assert rows["lora"]["collapsed"] is None and rows["hydralora"]["collapsed"] == "no"
    # the export directory inside a run (recipe.yaml, no summary.json) is not a run
    assert cli(monkeypatch, "export", runs_dir / "lora") in (0, None)
    assert find_runs([runs_dir]) == [runs_dir / "hydra", runs_dir / "lora"]


def test_runs_finds_the_runs_of_a_comparison_four_levels_down(tmp_path):
    """`moetune runs` with no argument searches runs/: a comparison's runs (runs/compare/<recipe>/runs/<v>-s0) are
    listed, a run's own subfolders and folders deeper than four levels are not searched."""
    def run(d: Path) -> Path:
        d.mkdir(parents=True)
        (d / "recipe.yaml").write_text("expert: {type: lora}\n")
        (d / "summary.json").write_text("{}")
        return d
    compared = run(tmp_path / "compare" / "mine" / "runs" / "lora-s0")
    run(compared / "nested")                                                     # inside a run: not searched
    run(tmp_path / "a" / "b" / "c" / "d" / "too-deep")
    assert find_runs([tmp_path]) == [compared]


def test_runs_table_sorts_and_shows_domains(runs_dir, monkeypatch, capsys):
    rows = [run_row(d) for d in find_runs([runs_dir])]
    assert [r["steps"] for r in sort_rows(rows, "steps")] == [8, 4]
    assert [r["type"] for r in sort_rows(rows, "type")] == ["hydralora", "lora"]
    assert cli(monkeypatch, "runs", runs_dir, "--sort", "steps", "--domains", "--markdown") in (0, None)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| run | type |") and "EM add" in out[0] and "EM shout" in out[0]
    assert "lora" in out[2] and "hydra" in out[3] and " -> " in out[2]
    assert cli(monkeypatch, "runs", runs_dir, "--sort", "speed") == 2
    assert "allowed: run, type" in capsys.readouterr().err


def test_collapsed_export_shows_in_runs_and_model_card(runs_dir, monkeypatch, capsys):
    hydra = runs_dir / "hydra"
    assert cli(monkeypatch, "export", hydra) in (0, None)
    assert "No collapsed export yet" in (hydra / "export" / "README.md").read_text()
    assert cli(monkeypatch, "export", hydra, "--collapse", "mean") in (0, None)
    kl = json.loads((hydra / "collapsed-mean" / "collapse.json").read_text())["adapters"]["mean"]["fidelity"]["kl"]
    row = run_row(hydra)
    assert row["collapsed"].startswith(f"mean: KL {kl:.4f}")
    assert cli(monkeypatch, "export", hydra) in (0, None)
    card = (hydra / "export" / "README.md").read_text()
    assert "## Collapsed export" in card and f"| mean | 1 | {kl:.4f} |" in card
