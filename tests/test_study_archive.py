"""scripts/study_archive.py: a comparison's finished runs saved into the repository and put back on a new machine,
where `compare --resume` takes them as finished and expert_diversity reads their kept row; nothing overwritten."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moetune.commands.compare_jobs import Job, state
from scripts_loader import load_script

sa, ed = load_script("study_archive"), load_script("expert_diversity")


def _run(out: Path, name: str, finished: bool, routed: bool = True, em: float = 0.5) -> Path:
    """A run directory as compare leaves it: scores only when `finished`, an adapter (routed or LoRA), a checkpoint."""
    run = out / "runs" / name
    (run / "adapter").mkdir(parents=True)
    (run / "checkpoints" / "step-4").mkdir(parents=True)
    (run / "checkpoints" / "step-4" / "optimizer.safetensors").write_bytes(b"x" * 1000)
    (run / "recipe.yaml").write_text(f"seed: 0\nname: {name}\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 4, "loss": 1.5}) + "\n")
    g = torch.Generator().manual_seed(len(name))
    b = torch.randn(3, 8, 4, generator=g) if routed else torch.randn(8, 4, generator=g)
    save_file({"model.layers.0.self_attn.q_proj.lora_A": torch.randn(4, 6, generator=g),
               "model.layers.0.self_attn.q_proj.lora_B": b}, str(run / "adapter" / "adapter_model.safetensors"))
    if finished:
        (run / "eval.json").write_text(json.dumps({"per_example": [{"correct": True}], "exact_match": em,
                                                   "routing": {"specialisation": 0.01}}))
        (run / "summary.json").write_text(json.dumps({"after": {"exact_match": em}, "train": {"steps": 4}}))
    else:
        (run / "summary.json").write_text(json.dumps({"train": {"steps": 2, "stopped": True}}))
    return run


def _job(run: Path) -> Job:
    return Job(id=run.name, variant=run.name[:-3], seed=0, kind="type", run_dir=str(run), recipe={})


def test_save_keeps_finished_runs_small_and_restore_makes_them_finished_again(tmp_path):
    out, archive, fresh = tmp_path / "out", tmp_path / "archive", tmp_path / "fresh"
    hydra = _run(out, "hydralora-s0", finished=True)
    _run(out, "lora-s0", finished=True, routed=False)
    _run(out, "molora-s0", finished=False)                           # still training: not kept
    _run(out, "hydralora-s1.old-20261205T000000", finished=True)      # moved aside by a restart: not kept
    (out / "plan.json").write_text(json.dumps({"runs": {"hydralora-s0": {}}}))

    assert sa.main(["save", str(out), str(archive)]) == ["hydralora-s0", "lora-s0"]
    assert sorted(p.name for p in (archive / "runs").iterdir()) == ["hydralora-s0.tar.xz", "lora-s0.tar.xz"]
    with tarfile.open(archive / "runs" / "hydralora-s0.tar.xz") as tar:             # no adapter, no checkpoint
        assert sorted(tar.getnames()) == [f"hydralora-s0/{n}" for n in ("diversity.json", "eval.json",
                                                                          "metrics.jsonl", "recipe.yaml", "summary.json")]
    with tarfile.open(archive / "runs" / "lora-s0.tar.xz") as tar:                  # LoRA: no experts to compare
        assert "lora-s0/diversity.json" not in tar.getnames()
    assert sa.main(["save", str(out), str(archive)]) == []                     # nothing new: nothing written
    (out / "plan.json").write_text(json.dumps({"runs": {"hydralora-s0": {}, "molora-s0": {}}}))
    sa.save(out, archive)                                                      # a grown plan is kept
    assert (archive / "plan.json").read_bytes() == (out / "plan.json").read_bytes()

    assert sa.main(["restore", str(archive), str(fresh)]) == ["hydralora-s0", "lora-s0"]
    back = fresh / "runs" / "hydralora-s0"
    for name in ("eval.json", "summary.json", "metrics.jsonl", "recipe.yaml"):
        assert (back / name).read_bytes() == (hydra / name).read_bytes()
    assert json.loads((back / "diversity.json").read_text()) == ed.run_diversity(hydra)
    assert not (back / "adapter").exists() and not (back / "checkpoints").exists()
    assert state(_job(back)) == "done" and state(_job(fresh / "runs" / "molora-s0")) == "empty"
    assert (fresh / "plan.json").read_bytes() == (out / "plan.json").read_bytes()
    # expert_diversity reads the kept row where the adapter is gone
    assert ed.main([str(back)]) == [ed.run_diversity(hydra)]
    assert sa.main(["restore", str(archive), str(fresh)]) == []                # already there


def test_restore_never_overwrites_a_run_and_save_refreshes_a_rescored_one(tmp_path):
    out, archive = tmp_path / "out", tmp_path / "archive"
    _run(out, "hydralora-s0", finished=True, em=0.5)
    sa.save(out, archive)
    other = tmp_path / "other"
    mine = _run(other, "hydralora-s0", finished=True, em=0.9)                 # a run the machine already has
    before = {p.name: p.read_bytes() for p in mine.iterdir() if p.is_file()}
    assert sa.restore(archive, other) == []
    assert {p.name: p.read_bytes() for p in mine.iterdir() if p.is_file()} == before

    (out / "runs" / "hydralora-s0" / "eval.json").write_text(json.dumps({"per_example": [], "exact_match": 0.7}))
    assert sa.save(out, archive) == ["hydralora-s0"]
    again = tmp_path / "again"
    assert sa.restore(archive, again) == ["hydralora-s0"]
    assert json.loads((again / "runs" / "hydralora-s0" / "eval.json").read_text())["exact_match"] == 0.7
    assert not list(archive.rglob("*.tmp")) and not list(other.rglob("*.restoring"))


def test_verify_finds_a_rerun_that_moves_the_last_digit_in_directories_and_in_archives(tmp_path):
    out, archive = tmp_path / "out", tmp_path / "archive"
    for name, em in (("hydralora-s0", 0.5), ("hydralora-s1", 0.625), ("lora-s2", 0.75)):
        run = _run(out, name, finished=True, em=em)
        (run / "summary.json").write_text(json.dumps({"after": {"exact_match": em, "loss": 0.1 + em}}))
    _run(out, "molora-s0", finished=False)                                    # still training: not checked
    sa.save(out, archive)

    def report(loss_s1: float) -> Path:
        per_seed = lambda em, loss: {"exact_match": {"per_seed": em}, "loss": {"per_seed": loss}}  # noqa: E731
        path = tmp_path / "comparison.json"
        path.write_text(json.dumps({"variants": {
            "hydralora": {"runs": ["x/runs/hydralora-s0", "x/runs/hydralora-s1"], "seeds": [0, 1],
                          "metrics": per_seed({"0": 0.5, "1": 0.625}, {"0": 0.1 + 0.5, "1": loss_s1})},
            "molora": {"runs": ["x/runs/molora-s0"], "seeds": [0],
                       "metrics": per_seed({"0": 0.5}, {"0": 0.3})}}}))
        return path

    for runs in (out / "runs", archive / "runs"):
        assert sa.verify(report(0.1 + 0.625), runs) == (["hydralora-s0", "hydralora-s1"], [], ["lora-s2"])
        moved = 0.1 + 0.625 + 1e-16 * 8                                       # the last digit, not the first
        assert moved != 0.1 + 0.625 and abs(moved - (0.1 + 0.625)) < 1e-14
        assert sa.verify(report(moved), runs) == (["hydralora-s0"], ["hydralora-s1"], ["lora-s2"])
    with pytest.raises(SystemExit) as stop:
        sa.main(["verify", str(report(moved)), str(archive / "runs")])
    assert stop.value.code == 1
    assert sa.main(["verify", str(report(0.1 + 0.625)), str(archive / "runs")]) == ["hydralora-s0", "hydralora-s1"]
