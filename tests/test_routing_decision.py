"""scripts/routing_decision.py: README's pre-registered rules for issue 25 (the aim per type, the
balance_scope default from the micro/global twins) on hand-made comparison.json documents."""
from __future__ import annotations

import json
from pathlib import Path

from scripts_loader import load_script

rd = load_script("routing_decision")


def _doc(variants: dict[str, tuple[list[float], list[float], tuple[float, float, float]]], interim=None) -> dict:
    """name -> (EM per seed, specialisation per seed, (EM diff, low, high) against lora)."""
    doc = {"reference": "lora", "variants": {"lora": {"metrics": {"exact_match": {"mean": 0.9, "per_seed": {}}}}},
           "paired": {}}
    for name, (em, spec, (d, lo, hi)) in variants.items():
        ps = lambda xs: {"mean": sum(xs) / len(xs), "per_seed": {str(i): x for i, x in enumerate(xs)}}
        doc["variants"][name] = {"metrics": {"exact_match": ps(em), "specialisation": ps(spec)}}
        doc["paired"][name] = {"exact_match": {"difference": d, "low": lo, "high": hi, "seeds": len(em)}}
    if interim:
        doc["interim"] = interim
    return doc


def _reports(tmp_path: Path, docs: dict[str, dict]) -> list[str]:
    """Each data set's document as routing-balance-<data set>/comparison.json; their paths, in DATA_SETS order."""
    for k, doc in docs.items():
        (tmp_path / f"routing-balance-{k}").mkdir()
        (tmp_path / f"routing-balance-{k}" / "comparison.json").write_text(json.dumps(doc))
    return [str(tmp_path / f"routing-balance-{k}" / "comparison.json") for k in rd.DATA_SETS]


def _twins(em_micro: float, em_global: float, spec_more: int) -> dict:
    """Every twin of both types; global's EM is em_global at each seed, and specialises more in spec_more twins."""
    out = {}
    for t in rd.TYPES:
        for i, rest in enumerate(rd.TWINS):
            out[f"{t}-micro{rest}"] = ([em_micro] * 3, [0.001] * 3, (0.0, -0.05, 0.05))
            out[f"{t}-global{rest}"] = ([em_global] * 3, [0.002 if i < spec_more else 0.0005] * 3, (0.0, -0.05, 0.05))
    return out


def test_the_aim_needs_both_halves_and_the_best_em_wins():
    doc = _doc({"hydralora-a": ([0.9] * 3, [0.06] * 3, (0.02, -0.004, 0.05)),     # meets
                "hydralora-b": ([0.9] * 3, [0.08] * 3, (0.03, -0.001, 0.06)),     # meets, larger difference
                "hydralora-c": ([0.9] * 3, [0.049] * 3, (0.05, 0.01, 0.09)),      # EM half only
                "molora-a": ([0.9] * 3, [0.10] * 3, (0.02, -0.02, 0.07)),         # spec half only
                "molora-b": ([0.9] * 3, [0.07] * 3, (0.03, -0.03, 0.08)),         # spec half, lower low end
                "molora-c": ([0.9] * 3, [0.01] * 3, (0.06, 0.02, 0.1))})
    a = rd.aim(doc)
    assert {r["variant"]: r["meets"] for r in a["variants"]} == {
        "hydralora-a": True, "hydralora-b": True, "hydralora-c": False, "molora-a": False, "molora-b": False,
        "molora-c": False}
    assert a["types"] == {"hydralora": {"winner": "hydralora-b", "closest": None},
                          "molora": {"winner": None, "closest": "molora-a"}}
    # none reaching 0.05: the closest is the one that specialises most
    low = _doc({"molora-x": ([0.9] * 3, [0.02] * 3, (0.05, 0.01, 0.09)), "molora-y": ([0.9] * 3, [0.03] * 3, (0.0, -0.1, 0.1))})
    assert rd.aim(low)["types"]["molora"] == {"winner": None, "closest": "molora-y"}


def test_global_becomes_the_default_only_when_every_type_passes_on_both_data_sets(tmp_path, capsys):
    good = _doc(_twins(0.90, 0.897, 3))                    # -0.003 >= -0.005, more in 3 of 4
    assert rd.decide({"multidomain": good, "disjoint": good})["balance_scope_default"] == "global"
    worse = _doc(_twins(0.90, 0.894, 4))                   # -0.006 on one data set
    assert rd.decide({"multidomain": good, "disjoint": worse})["balance_scope_default"] == "micro"
    flat = _doc(_twins(0.90, 0.95, 2))                     # better EM, but more specialised in 2 of 4 only
    d = rd.decide({"multidomain": flat, "disjoint": good})
    assert d["balance_scope_default"] == "micro" and d["scope"]["multidomain"]["hydralora"]["global_specialises_more"] == 2
    assert d["scope"]["multidomain"]["molora"]["mean_em_diff"] == 0.95 - 0.90
    # a twin without runs, or one data set only: no decision
    part = _doc({k: v for k, v in _twins(0.9, 0.9, 4).items() if k != "molora-global+seq"})
    assert rd.decide({"multidomain": part, "disjoint": good})["balance_scope_default"] is None
    assert rd.decide({"multidomain": good})["balance_scope_default"] is None
    # through the command line: a running study's report makes the verdict provisional, said first
    running = _doc(_twins(0.90, 0.897, 3), interim={"finished": 40, "planned": 66})
    paths = _reports(tmp_path, {k: running for k in rd.DATA_SETS})
    assert rd.main(paths + ["--json", str(tmp_path / "d.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("**Provisional** (studies still running: multidomain 40 of 66 runs, disjoint 40 of 66 runs)")
    assert "**router.balance_scope default: global** (provisional)." in out
    assert json.loads((tmp_path / "d.json").read_text())["provisional"] is True


def test_a_finished_data_set_where_a_type_fails_settles_micro_while_the_other_study_runs(tmp_path, capsys):
    running = {"finished": 42, "planned": 66}
    good_running = _doc(_twins(0.90, 0.897, 4), interim=running)      # would pass so far
    fails = _doc(_twins(0.90, 0.894, 4))                               # finished: -0.006 < -0.005 for both types
    d = rd.decide({"multidomain": good_running, "disjoint": fails})
    assert d["provisional"] is True and d["balance_scope_default"] == "micro" and d["scope_settled"] is True
    assert d["scope_settled_by"] == [{"data_set": "disjoint", "type": t} for t in rd.TYPES]
    # the same failing numbers in a study still running settle nothing: the verdict stays provisional
    d = rd.decide({"multidomain": good_running, "disjoint": _doc(_twins(0.90, 0.894, 4), interim=running)})
    assert d["balance_scope_default"] == "micro" and d["scope_settled"] is False and d["scope_settled_by"] == []
    # a finished study that passes leaves the decision to the running one: global, provisional
    d = rd.decide({"multidomain": good_running, "disjoint": _doc(_twins(0.90, 0.897, 4))})
    assert d["balance_scope_default"] == "global" and d["scope_settled"] is False
    # a type with a twin missing settles nothing: the missing twin could still lift its mean
    holed = _doc({k: v for k, v in _twins(0.90, 0.894, 4).items() if k != "molora-global+seq"})
    d = rd.decide({"multidomain": good_running, "disjoint": holed})
    assert d["scope_settled_by"] == [{"data_set": "disjoint", "type": "hydralora"}]
    # through the command line: said on the first and the last line
    assert rd.main(_reports(tmp_path, {"multidomain": good_running, "disjoint": fails})) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("except the balance_scope default, which is settled (last line).")
    assert ("**router.balance_scope default: micro** (settled: disjoint has finished and hydralora and molora do not "
            "pass there;") in out and "(provisional)" not in out.split("balance_scope default:")[-1]
