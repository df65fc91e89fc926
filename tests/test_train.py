"""The training loop: learns, resumes exactly, accumulates exactly, checkpoints atomically."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from moetune.commands.stages import run_recipe
from moetune.core import checkpoint as ckpt
from moetune.recipe import load_recipe

torch.set_num_threads(1)


def _run(tiny_llama, tiny_data, out, *extra, resume=False):
    return run_recipe(load_recipe(None, tiny_overrides(tiny_llama, tiny_data, out, *extra)), resume=resume)


def _adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_training_lowers_held_out_loss_and_writes_run_files(tiny_llama, tiny_data, tmp_path):
    out = tmp_path / "run"
    s = _run(tiny_llama, tiny_data, out, "train.max_steps=40", "train.lr=1e-2", "expert.rank=8",
             "stages=[train,eval]", "eval.generation=false")
    assert s["after"]["loss"] < s["before"]["loss"] - 0.5
    assert set(s["after"]["per_domain"]) == {"add", "shout"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 41))
    assert all(r["tokens_per_s"] > 0 and r["lr"] >= 0 for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert any(r.get("split") == "validation" for r in rows)
    assert (out / "recipe.yaml").is_file() and (out / "eval.json").is_file()


def test_resume_matches_uninterrupted_run(tiny_llama, tiny_data, tmp_path):
    common = ("train.max_steps=8", "expert.dropout=0.2", "stages=[train]", "train.eval_before=false",
              "train.save_every=2", "train.grad_accum=2", "train.batch_size=2")
    _run(tiny_llama, tiny_data, tmp_path / "full", *common)
    s = _run(tiny_llama, tiny_data, tmp_path / "split", *common, "train.stop_after=5")
    assert s["train"]["stopped"] and s["train"]["steps"] == 5
    first = _adapter(tmp_path / "split")
    s = _run(tiny_llama, tiny_data, tmp_path / "split", *common, resume=True)
    assert s["train"]["steps"] == 8 and not s["train"]["stopped"]
    full, resumed = _adapter(tmp_path / "full"), _adapter(tmp_path / "split")
    assert any((first[k] - full[k]).abs().max() > 1e-4 for k in full)  # the stop really was part-way
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], atol=1e-6, rtol=1e-5)
    rows = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resume" and r["step"] == 5 for r in rows)


def test_gradient_accumulation_matches_large_batch(tiny_llama, tiny_data, tmp_path):
    common = ("train.max_steps=4", "stages=[train]", "train.eval_before=false")
    _run(tiny_llama, tiny_data, tmp_path / "big", *common, "train.batch_size=4", "train.grad_accum=1")
    _run(tiny_llama, tiny_data, tmp_path / "acc", *common, "train.batch_size=2", "train.grad_accum=2")
    a, b = _adapter(tmp_path / "big"), _adapter(tmp_path / "acc")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_failed_checkpoint_write_keeps_earlier_checkpoint(tiny_llama, tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}
    real = ckpt.save_file

    def flaky(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # first file of the second checkpoint
            real(tensors, path, *a, **k)
            raise OSError("disk full")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", flaky)
    with pytest.raises(OSError, match="disk full"):
        _run(tiny_llama, tiny_data, out, "train.max_steps=6", "train.save_every=2", "stages=[train]",
             "train.eval_before=false")
    latest = ckpt.latest_checkpoint(out)
    assert latest is not None and latest.name == "step-0000002"
    state = ckpt.load_checkpoint(latest)
    assert state["step"] == 2 and state["adapter"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no half-written dir


def test_checkpoint_holds_full_state(tiny_llama, tiny_data, tmp_path):
    out = tmp_path / "run"
    _run(tiny_llama, tiny_data, out, "train.max_steps=3", "stages=[train]", "train.eval_before=false")
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(out))
    assert state["step"] == 3 and state["position"]["examples_seen"] == 12
    assert state["optimizer"]["state"] and "exp_avg" in state["optimizer"]["state"][0]
    assert state["scheduler"]["last_epoch"] == 3
    assert "torch" in state["rng"][0] and state["rng"][1]["python"]
    # No pickles anywhere in a run directory.
    assert not [p for p in out.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl")]
