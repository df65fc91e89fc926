"""`moetune compare` end to end on a tiny model: sized variants trained at two seeds, an interrupted comparison
resumed (finished runs reused, the interrupted run continued from its checkpoint to the uninterrupted run's
adapter), the statistics read back from the runs, `moetune runs` on the comparison, an existing --out refused or
moved aside, and --jobs with worker processes (CPU; and several processes on one GPU where there is one)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import cli, tiny_overrides
from moetune.recipe import recipe_from_dict

torch.set_num_threads(1)
METHODS = "lora,hydralora,mole"


@pytest.fixture()
def recipe(tiny_llama, tiny_data, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("expert: {type: lora, rank: 16, alpha: 32}\ntrain: {save_every: 1, max_steps: 4}\n")
    over = [o for o in tiny_overrides(tiny_llama, tiny_data, tmp_path / "unused")
            if not o.startswith(("expert.rank=", "output_dir=", "train.max_steps="))]
    return path, over


def _json(p: Path) -> dict:
    return json.loads(p.read_text())


def _spy_on_runs(monkeypatch):
    """Record (run, resume, overwrite) of every run_recipe call of the comparison; returns (calls, the real one)."""
    from moetune.commands import compare_jobs
    calls, real = [], compare_jobs.run_recipe

    def spy(rc, resume=False, overwrite=False):
        calls.append((Path(rc.output_dir).name, resume, overwrite))
        return real(rc, resume=resume, overwrite=overwrite)
    monkeypatch.setattr(compare_jobs, "run_recipe", spy)
    return calls, real


def test_interrupted_comparison_resumes_and_reuses_finished_runs(recipe, tmp_path, monkeypatch, capsys):
    from moetune.train.loop import Trainer
    path, over = recipe
    out = tmp_path / "cmp"
    args = ["compare", path, *over, "--methods", METHODS, "--seeds", "2", "--out", out, "--bootstrap", "2000"]
    original = Trainer.evaluate_and_checkpoint

    def interrupted(self, done, end, result, progress):
        original(self, done, end, result, progress)
        if self.run_dir.name == "hydralora-s1" and done == 2:   # after its step-2 checkpoint
            raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "evaluate_and_checkpoint", interrupted)
    assert cli(monkeypatch, *args) == 130
    runs = out / "runs"
    finished = ["lora-s0", "hydralora-s0", "mole-s0", "lora-s1"]
    stamps = {r: (runs / r / "eval.json").stat().st_mtime_ns for r in finished}
    assert not (runs / "hydralora-s1" / "eval.json").exists() and not (runs / "mole-s1").exists()
    monkeypatch.setattr(Trainer, "evaluate_and_checkpoint", original)

    # the same command again: refused, as `train` refuses a run directory
    assert cli(monkeypatch, *args) == 2
    assert "already holds a comparison (4 of 6 runs finished)" in capsys.readouterr().err

    # --report: the table so far, each variant paired with the reference at the seeds both finished; trains nothing
    assert cli(monkeypatch, *args, "--report") in (0, None)
    assert not (runs / "hydralora-s1" / "eval.json").exists() and not (runs / "mole-s1").exists()
    doc = _json(out / "comparison.json")
    assert doc["interim"] == {"finished": 4, "planned": 6, "seeds": {"lora": 2, "hydralora": 1, "mole": 1},
                              "pending": []}
    assert doc["variants"]["lora"]["seeds"] == [0, 1] and doc["variants"]["hydralora"]["seeds"] == [0]
    correct = {r: np.frombuffer(_json(runs / r / "eval.json")["per_example"]["correct"].encode(), np.uint8) - 48
               for r in finished}
    assert doc["variants"]["lora"]["metrics"]["exact_match"]["mean"] == pytest.approx(
        (correct["lora-s0"].mean() + correct["lora-s1"].mean()) / 2)
    from moetune.eval import paired as P
    draws = P.draws(1, 16, 2000, seed=0)
    for name in ("hydralora", "mole"):
        got, want = doc["paired"][name]["exact_match"], P.mean_difference(
            correct[f"{name}-s0"][None].astype(float), correct["lora-s0"][None].astype(float), *draws)
        assert got["difference"] == pytest.approx(correct[f"{name}-s0"].mean() - correct["lora-s0"].mean())
        assert (got["low"], got["high"], got["seeds"]) == pytest.approx((want["low"], want["high"], 1))
    assert all(c.endswith("(paired at 1 of 2 seeds)") for c in doc["conclusions"])
    md = (out / "comparison.md").read_text()
    assert "**Interim** (`--report`): 4 of 6 runs finished" in md and "| variant | seeds | trainable |" in md
    assert "at a time" not in md  # --report ran nothing

    # --reference: the same finished runs paired with another variant, in files of their own
    before = (out / "comparison.json").read_bytes()
    assert cli(monkeypatch, *args, "--report", "--reference", "hydralora") in (0, None)
    vs = _json(out / "comparison-vs-hydralora.json")
    assert (out / "comparison.json").read_bytes() == before and (out / "comparison-vs-hydralora.png").is_file()
    assert vs["reference"] == "hydralora" and vs["planned_reference"] == "lora"
    assert list(vs["variants"]) == ["hydralora", "lora", "mole"] and vs["interim"]["seeds"]["lora"] == 1
    for name in ("lora", "mole"):   # paired at seed 0, the only one hydralora finished
        got = vs["paired"][name]["exact_match"]
        want = P.mean_difference(correct[f"{name}-s0"][None].astype(float), correct["hydralora-s0"][None].astype(float), *draws)
        assert got["difference"] == pytest.approx(correct[f"{name}-s0"].mean() - correct["hydralora-s0"].mean())
        assert (got["low"], got["high"]) == pytest.approx((want["low"], want["high"]))
    assert "**Paired with hydralora** (`--reference`)" in (out / "comparison-vs-hydralora.md").read_text()
    capsys.readouterr()
    assert cli(monkeypatch, *args, "--report", "--reference", "hydralor") == 2
    err = capsys.readouterr().err
    assert "--reference 'hydralor' is not a variant of this comparison. Did you mean 'hydralora'?" in err
    assert "Allowed: lora, hydralora, mole." in err and "Traceback" not in err

    calls, real = _spy_on_runs(monkeypatch)
    assert cli(monkeypatch, *args, "--resume") in (0, None)
    assert calls == [("hydralora-s1", True, False), ("mole-s1", False, False)]
    assert {r: (runs / r / "eval.json").stat().st_mtime_ns for r in finished} == stamps
    events = [json.loads(x).get("event") for x in (runs / "hydralora-s1" / "metrics.jsonl").read_text().splitlines()]
    assert "resume" in events

    # the resumed run ends with the adapter of the same run uninterrupted
    plan = _json(out / "plan.json")["runs"]
    fresh = recipe_from_dict({**plan["hydralora-s1"]["job"]["recipe"], "output_dir": str(tmp_path / "fresh")})
    real(fresh)
    a = load_file(runs / "hydralora-s1" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "fresh" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    doc = _json(out / "comparison.json")
    assert doc["reference"] == "lora" and list(doc["variants"]) == ["lora", "hydralora", "mole"]
    assert sorted(doc["reused"]) == sorted(finished)
    for name, v in doc["variants"].items():
        summaries = [_json(runs / f"{name}-s{s}" / "summary.json") for s in (0, 1)]
        ems = [s["after"]["exact_match"] for s in summaries]
        assert v["metrics"]["exact_match"]["mean"] == pytest.approx(sum(ems) / 2)
        assert v["metrics"]["loss"]["per_seed"] == {str(s): summaries[s]["after"]["loss"] for s in (0, 1)}
        # the budget counted on the meta device is what the runs trained (MoLE: its per-domain LoRAs + gates)
        trained = summaries[0]["train"]["trainable_parameters"] + sum(
            _json(p)["train"]["trainable_parameters"] for p in (runs / f"{name}-s0").glob("experts/*/summary.json"))
        assert v["trainable"] == trained
        assert abs(v["trainable"] / doc["variants"]["lora"]["trainable"] - 1) <= 0.05
        assert set(v["per_domain"]) == {"add", "shout"}
        ev = _json(runs / f"{name}-s0" / "eval.json")["per_example"]
        assert len(ev["correct"]) == ev["n"] == 16 and sum(ev["tokens"]) > 0
    assert doc["variants"]["mole"]["metrics"]["specialisation"]["n"] == 2
    for name in ("hydralora", "mole"):
        p = doc["paired"][name]
        assert p["exact_match"]["low"] <= p["exact_match"]["difference"] <= p["exact_match"]["high"]
        assert p["loss"]["seeds"] == 2 and p["loss"]["examples"] == 16
        assert set(p["per_domain"]) == {"add", "shout"}
    assert len(doc["conclusions"]) == 2 and all("lora" in c for c in doc["conclusions"])
    md = (out / "comparison.md").read_text()
    assert "| hydralora |" in md and "## Conclusions" in md and (out / "comparison.png").stat().st_size > 5000
    assert "## Exact match per seed" in md and "| lora | " in md.split("## Exact match per seed")[1]

    capsys.readouterr()
    assert cli(monkeypatch, "runs", out, "--json") in (0, None)
    listed = {Path(r["run"]).name for r in json.loads(capsys.readouterr().out)}
    assert listed == {f"{m}-s{s}" for m in METHODS.split(",") for s in (0, 1)}


def test_a_comparison_named_with_relative_paths_resumes_its_interrupted_run(recipe, tmp_path, monkeypatch):
    """Data named relative to the working directory (as the committed studies do): the run records the paths
    absolute, as `train` does, and --resume continues it instead of refusing a 'changed' recipe."""
    import shutil
    from moetune.train.loop import Trainer
    path, over = recipe
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    rel = []
    for o in over:
        key, _, value = o.partition("=")
        if key in ("data.train", "data.validation", "data.test"):
            shutil.copy(value, work / "data" / Path(value).name)
            o = f"{key}=data/{Path(value).name}"
        rel.append(o)
    monkeypatch.chdir(work)
    args = ["compare", path, *rel, "--methods", "lora", "--seeds", "1", "--out", "cmp", "--bootstrap", "200"]
    original = Trainer.evaluate_and_checkpoint

    def interrupted(self, done, end, result, progress):
        original(self, done, end, result, progress)
        if done == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "evaluate_and_checkpoint", interrupted)
    assert cli(monkeypatch, *args) == 130
    run = work / "cmp" / "runs" / "lora-s0"
    assert f"train: {work / 'data' / 'train.jsonl'}" in (run / "recipe.yaml").read_text()
    monkeypatch.setattr(Trainer, "evaluate_and_checkpoint", original)
    calls, real = _spy_on_runs(monkeypatch)
    assert cli(monkeypatch, *args, "--resume") in (0, None)
    assert calls == [("lora-s0", True, False)]
    assert _json(run / "summary.json")["train"]["steps"] == 4 and (run / "eval.json").is_file()


def test_existing_comparison_is_moved_aside_with_overwrite(recipe, tmp_path, monkeypatch, capsys):
    from moetune.commands import compare
    path, over = recipe
    out = tmp_path / "cmp"
    seen = []

    def no_runs(jobs, n, o):   # the budget table is out before any run starts
        seen.append(capsys.readouterr().out)
        return {}
    monkeypatch.setattr(compare, "run_all", no_runs)
    monkeypatch.setattr(compare, "report", lambda *a: {})
    args = ["compare", path, *over, "--methods", "lora,hydralora", "--out", out]
    assert cli(monkeypatch, *args) in (0, None)
    assert "budgets (equal-params" in seen[0] and "hydralora" in seen[0] and "sized" in seen[0]
    first = (out / "plan.json").read_text()
    assert cli(monkeypatch, *args) == 2
    assert "Nothing was changed" in capsys.readouterr().err
    assert cli(monkeypatch, *args, "--overwrite") in (0, None)
    aside = list(tmp_path.glob("cmp.old-*"))
    assert len(aside) == 1 and (aside[0] / "plan.json").read_text() == first and (out / "plan.json").is_file()
    assert cli(monkeypatch, *args, "--resume", "--overwrite") == 2


@pytest.mark.slow
def test_ctrl_c_stops_the_parallel_runs_at_a_checkpoint_and_starts_no_more(recipe, tmp_path, monkeypatch, capsys):
    """The first SIGINT reaches the workers once, through the parent: each stops at a step boundary with a
    checkpoint (not at once), no queued run starts, and the parent exits 130 saying --resume continues."""
    import os
    import signal
    import threading
    import time
    from moetune.commands.compare_jobs import Job, state
    path, over = recipe
    out = tmp_path / "stop"
    first = ("lora-s0", "hydralora-s0")

    def interrupt():  # once both first runs have written a checkpoint
        deadline = time.time() + 300
        while time.time() < deadline:
            if all(any((out / "runs" / r / "checkpoints").glob("step-*")) for r in first):
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.1)
    threading.Thread(target=interrupt, daemon=True).start()
    assert cli(monkeypatch, "compare", path, *over, "train.max_steps=2000", "--methods", "lora,hydralora",
               "--seeds", "2", "--jobs", "2", "--out", out, "--bootstrap", "200") == 130
    said = " ".join(capsys.readouterr().err.split())
    assert "no new run starts" in said and "0 of 4 runs finished" in said and "--resume" in said
    assert not (out / "runs" / "lora-s1").exists() and not (out / "runs" / "hydralora-s1").exists()
    plan = _json(out / "plan.json")["runs"]
    for r in first:
        log = " ".join((out / "logs" / f"{r}.log").read_text().split())
        assert "stops after the current step" in log, log[-2000:]
        assert state(Job(**plan[r]["job"])) == "partial"
        steps = sorted(int(p.name.split("-")[1]) for p in (out / "runs" / r / "checkpoints").glob("step-*"))
        # stopped at a step boundary with its checkpoint there (a second signal would stop without one)
        assert 0 < steps[-1] < 2000 and f"training stopped after step {steps[-1]} of 2000" in log, log[-2000:]


def _parallel(recipe, tmp_path, monkeypatch, *extra):
    path, over = recipe
    out = tmp_path / "par"
    assert cli(monkeypatch, "compare", path, *over, *extra, "--methods", "lora,hydralora", "--jobs", "2",
               "--out", out, "--bootstrap", "500") in (0, None)
    doc = _json(out / "comparison.json")
    assert doc["jobs"] == 2 and set(doc["variants"]) == {"lora", "hydralora"}
    for name in ("lora", "hydralora"):
        log = (out / "logs" / f"{name}-s0.log").read_text()
        assert "Adapter saved" in log, log[-2000:]
    return doc


@pytest.mark.slow
def test_jobs_run_variants_in_worker_processes(recipe, tmp_path, monkeypatch):
    doc = _parallel(recipe, tmp_path, monkeypatch)
    assert "CPU" in doc["machine"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: several compare workers sharing one GPU")
def test_jobs_share_one_gpu(recipe, tmp_path, monkeypatch):
    doc = _parallel(recipe, tmp_path, monkeypatch, "model.device=cuda")
    assert "CPU" not in doc["machine"]
