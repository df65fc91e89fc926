"""train.report_to (tensorboard event files), routing rows in metrics.jsonl and curves.png."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from conftest import tiny_overrides
from moetune.experts.routing import entropy, load
from moetune.recipe import RecipeError, load_recipe
from moetune.train.curves import curve_series, read_metrics
from moetune.train.loggers import routing_row

torch.set_num_threads(1)


def _run(tiny_llama, tiny_data, out, *extra):
    from moetune.commands.stages import run_recipe
    run_recipe(load_recipe(None, tiny_overrides(tiny_llama, tiny_data, out, "stages=[train]", "train.eval_before=false",
                                                "train.eval_every=2", *extra)))
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_hold_the_metrics_of_a_routed_run(tiny_llama, tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    rows = _run(tiny_llama, tiny_data, tmp_path, "expert.type=hydralora", "expert.num_experts=3",
                "router.balance_loss=switch", "router.balance_weight=0.01", "train.report_to=[tensorboard]")
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "validation/loss", "aux/balance",
            "routing/entropy", "routing/entropy/block_0", "routing/entropy/block_1",
            "routing/load/block_1/expert_2"} <= tags
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if r.get("split") == "validation"]
    assert [e.step for e in acc.Scalars("train/loss")] == [r["step"] for r in train] == list(range(1, 7))
    for key, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm")):
        assert [e.value for e in acc.Scalars(tag)] == pytest.approx([r[key] for r in train], rel=1e-6)
    assert [e.value for e in acc.Scalars("aux/balance")] == pytest.approx([r["aux"]["balance"] for r in train], rel=1e-6)
    assert [e.value for e in acc.Scalars("validation/loss")] == pytest.approx([r["val_loss"] for r in val], rel=1e-6)
    assert [e.step for e in acc.Scalars("validation/loss")] == [2, 4, 6]
    for r in train:   # routing numbers are entropies and loads of 3 experts
        rt = r["routing"]
        assert 0 < rt["entropy"] <= math.log(3) + 1e-6
        assert all(sum(v) == pytest.approx(1, abs=1e-3) for v in rt["load_by_block"].values())
        assert rt["entropy"] == pytest.approx(sum(rt["entropy_by_block"].values()) / 2, abs=1e-4)
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    s = curve_series(read_metrics(tmp_path / "metrics.jsonl"))
    assert {"train", "validation", "aux/balance", "routing", "routing_min", "routing_max"} <= set(s)


def test_plain_lora_run_logs_no_routing_and_draws_curves(tiny_llama, tiny_data, tmp_path):
    rows = _run(tiny_llama, tiny_data, tmp_path)
    assert rows and not any("routing" in r for r in rows)
    assert not (tmp_path / "tensorboard").exists()
    s = curve_series(rows)
    assert set(s) == {"train", "validation"} and len(s["train"]) == 6
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_routing_row_masks_padding_and_groups_blocks(monkeypatch):
    from moetune.experts.routing import Router

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router = Router(4, 3)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.ModuleDict({"q": Layer(), "v": Layer()}) for _ in range(2)])

    import moetune.train.loggers as L
    model = Model()
    layers = {f"layers.{i}.{k}": model.layers[i][k] for i in range(2) for k in ("q", "v")}
    monkeypatch.setattr(L, "routed_layers", lambda m: layers)
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])                          # (B, T)
    with torch.no_grad():
        ws = {name: m.router(torch.randn(2, 4, 4, generator=g) * 5) for name, m in layers.items()}  # (B, T, N)
    r = routing_row(model, mask)
    for b in ("0", "1"):
        names = [f"layers.{b}.q", f"layers.{b}.v"]
        assert r["entropy_by_block"][b] == pytest.approx(
            sum(float(entropy(ws[n], mask)) for n in names) / 2, abs=1e-5)
        assert r["load_by_block"][b] == pytest.approx(
            ((load(ws[names[0]], mask) + load(ws[names[1]], mask)) / 2).tolist(), abs=1e-5)
    unmasked = sum(float(entropy(ws[n])) for n in layers) / 4
    assert r["entropy"] != pytest.approx(unmasked, abs=1e-4)              # padding really left out


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_missing_tracker_is_a_clear_error_before_training(tiny_llama, tiny_data, tmp_path):
    from moetune.commands.stages import run_recipe
    with pytest.raises(RecipeError, match=r"train.report_to.*'wandb'.*pip install wandb"):
        run_recipe(load_recipe(None, tiny_overrides(tiny_llama, tiny_data, tmp_path, "stages=[train]",
                                                    "train.report_to=[wandb]")))
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "summary.json").exists()
    with pytest.raises(RecipeError, match="report_to"):
        load_recipe(None, ["train.report_to=[neptune]"])
