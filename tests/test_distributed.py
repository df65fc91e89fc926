"""Data-parallel training through torchrun/accelerate: 2 CPU processes (gloo) == 1 process."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from conftest import tiny_overrides, train_default


def _train(port, tiny_llama, tiny_data, out, batch, *extra):
    """A tiny run's adapter and train summary: on 2 processes at master `port`, or 1 (None)."""
    train_default(tiny_overrides(tiny_llama, tiny_data, out, f"train.batch_size={batch}", "stages=[train]",
                                 "train.eval_before=false", "expert.dropout=0.0", *extra), port)
    summary = json.loads((out / "summary.json").read_text())
    return load_file(str(out / "adapter" / "adapter_model.safetensors")), summary["train"]


def test_two_processes_match_one_with_same_global_batch(tiny_llama, tiny_data, tmp_path):
    one, t1 = _train(None, tiny_llama, tiny_data, tmp_path / "one", batch=4)
    two, t2 = _train(29517, tiny_llama, tiny_data, tmp_path / "two", batch=2)
    assert (t1["processes"], t2["processes"]) == (1, 2)
    assert t1["global_batch"] == t2["global_batch"] == 4
    assert any(v.abs().max() > 1e-3 for v in one.values())  # trained, not a fresh adapter
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-4)
    # Only the main process wrote the run files: one set of metrics lines per step.
    steps = [json.loads(x)["step"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, 7))


def test_token_budget_packing_two_processes_match_one(tiny_llama, tiny_data, tmp_path):
    """data.packing=dataset (issue 26): the packed rows of a step split over 2 processes (row i to process
    i % 2) give the updates of 1 process with the same global batch of rows."""
    extra = ("data.packing=dataset", "data.max_length=96", "train.max_steps=4")
    one, t1 = _train(None, tiny_llama, tiny_data, tmp_path / "one", 4, *extra)
    two, t2 = _train(29519, tiny_llama, tiny_data, tmp_path / "two", 2, *extra)
    assert (t1["processes"], t2["processes"], t1["global_batch"], t2["global_batch"]) == (1, 2, 4, 4)
    assert any(v.abs().max() > 1e-3 for v in one.values())
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-4)
