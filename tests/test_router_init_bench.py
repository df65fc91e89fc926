"""benchmarks/router_init_cost.py (`make bench-router-init`) on a tiny model, so the benchmark never rots: both
runs train, the clustering's cost and the peaks are recorded, and the cluster report is the run's own."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, repo_env


@pytest.mark.slow
def test_router_init_cost_benchmark_runs_end_to_end(tiny_llama, tiny_data, tmp_path):
    out = tmp_path / "cost.json"
    proc = subprocess.run([sys.executable, "benchmarks/router_init_cost.py", "--data", str(tiny_data["train"].parent),
                           "--experts", "2", "--max-rows", "40", "--out", str(out), f"model.path={tiny_llama}",
                           "model.device=cpu", "router.init_embedder=tfidf"],
                          cwd=ROOT, capture_output=True, text=True, env=repo_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["overrides"][0] == f"model.path={tiny_llama}" and r["experts"] == 2 and r["max_rows"] == 40
    for name in ("random", "clusters"):
        assert r["runs"][name]["seconds"] > 0 and r["runs"][name]["peak_rss_gb"] > 0
    assert r["clustering_seconds"] == pytest.approx(r["runs"]["clusters"]["seconds"] - r["runs"]["random"]["seconds"],
                                                    abs=0.11)
    init = r["router_init"]
    assert init["settings"]["k"] == 2 and init["settings"]["embedder"] == "tfidf" and init["settings"]["max_rows"] == 40
    assert init["rows"] == sum(init["sizes"]) == 40 and len(init["sizes"]) == 2 and -1 <= init["ari_vs_domain"] <= 1
    assert 0 <= init["fit_accuracy_min"] <= init["fit_accuracy_mean"] <= 1
    assert f"written {out}" in proc.stdout
