"""scripts/routing_summary.py: the numbers of RESULTS' one-step probe table, from a routing report written by
the eval stage's own code (moetune.eval.report) on hand-made gates, and from a hand-written report."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from scripts_loader import load_script

rs = load_script("routing_summary")


def _report(tmp_path: Path, layers: dict, spec: float = 0.25, measure: str = "gates") -> Path:
    run = tmp_path / "run-a"
    run.mkdir()
    routing = {"specialisation": spec, "specialisation_measure": measure, "num_experts": 4,
               "max_entropy": math.log(4), "tokens": 100, "layers": layers}
    (run / "eval.json").write_text(json.dumps({"scores": {}, "routing": routing}))
    return run


def test_means_over_modules_and_dead_slots(tmp_path, capsys):
    layers = {"m.layers.0.q_proj": {"entropy": 1.2, "dead": [], "mi_norm_assignments": 0.5},
              "m.layers.0.v_proj": {"entropy": 0.6, "dead": [1, 3], "mi_norm_assignments": 0.2},
              "m.layers.1.q_proj": {"entropy": 0.3, "dead": [0], "mi_norm_assignments": 0.8}}
    run = _report(tmp_path, layers, spec=0.125, measure="assignments")
    s = rs.read(run)
    assert s["specialisation"] == 0.125 and s["measure"] == "assignments"
    assert s["assignments"] == pytest.approx(0.5) and s["entropy"] == pytest.approx(0.7)
    assert (s["dead"], s["slots"], s["modules"]) == (3, 12, 3)
    rs.main([str(run), "--json", str(tmp_path / "out" / "s.json")])
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "| run-a | 0.1250 | assignments | 0.500 | 0.700 | 3 of 12 |"
    assert json.loads((tmp_path / "out" / "s.json").read_text())["run-a"]["dead"] == 3


def test_numbers_of_a_report_the_eval_stage_writes(tmp_path):
    """Two domains of 10 tokens, two modules, N = 4, through moetune.eval.report.routing_report:
    module 0 gates 0.7 on expert d for domain d (0.1 elsewhere), argmax partition perfect (MI/H = 1);
    module 1 gates (0.5, 0.5, 0, 0) for both domains, every argmax expert 0 (MI 0), experts 2-3 dead."""
    import torch
    from moetune.eval import report

    tokens = torch.tensor([10.0, 10.0])                                           # (D,)
    g0 = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]])                # (D, N) module 0
    g1 = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])                # (D, N) module 1
    a0, a1 = torch.eye(2, 4), torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])        # argmax one-hots
    h0, h1 = -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1)), math.log(2)          # gate entropies
    sums = report.GateSums(names=["m.layers.0.q_proj", "m.layers.1.q_proj"], domains=["a", "b"],
                           gate=torch.stack([g0, g1], 1).double() * 10,             # (D, L, N)
                           entropy=torch.tensor([[h0, h1], [h0, h1]]).double() * 10,  # (D, L)
                           tokens=tokens.double(), assign=torch.stack([a0, a1], 1).double() * 10)
    run = _report(tmp_path, {})
    (run / "eval.json").write_text(json.dumps({"routing": report.routing_report(sums)}))
    s = rs.read(run)
    assert s["assignments"] == pytest.approx(0.5)                                  # (1 + 0) / 2
    assert s["entropy"] == pytest.approx((h0 + h1) / 2)
    assert (s["dead"], s["slots"], s["measure"]) == (2, 8, "gates")
    mi0 = 0.7 * math.log(0.7 / 0.4) + 0.1 * math.log(0.1 / 0.4)                     # I(D; E), module 0
    assert s["specialisation"] == pytest.approx((mi0 / math.log(2) + 0.0) / 2)     # soft gates carry less


def test_a_run_without_a_routing_report_is_named(tmp_path):
    run = tmp_path / "plain"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps({"scores": {"exact_match": 0.5}}))
    with pytest.raises(SystemExit, match=r"plain/eval.json: no routing report"):
        rs.read(run)
    with pytest.raises(SystemExit, match="not found"):
        rs.read(tmp_path / "missing")
