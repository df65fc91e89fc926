"""`make bench-router-init`: what `router.init: clusters` costs before training starts, measured in one run.

Two one-step `moetune train` runs of the same routed recipe (default: recipes/hydralora.yaml on
data/multidomain with 4 experts, SmolLM2-135M), each in its own process:
- `clusters`: router.init=clusters (embed the training prompts, K-means, fit every routed projection's router
  on the loaded base: moetune/commands/router_clusters.py);
- `random`: the recipe's own random router init.
For each: wall time of the whole command and its peak RSS (the child's ru_maxrss, read by a wrapper process
that runs only that child, so one run's peak never hides the other's). The difference of the wall times is
the clustering's cost; the peaks say whether it raises the run's memory. The `clusters` run's
router_init.json gives the cluster sizes, the adjusted Rand index against the domain column and the fit.
Results: benchmarks/results/router_init_cost.json.

    python benchmarks/router_init_cost.py                        # the default above, 1 thread
    python benchmarks/router_init_cost.py --threads 2 --max-rows 400
    python benchmarks/router_init_cost.py model.path=/my/model router.init_embedder=tfidf   # recipe overrides
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WRAP = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def measure(args: list[str], threads: int, log: Path) -> dict:
    """Wall seconds and peak RSS (GB) of `moetune train ARGS` in a process of its own."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-c", WRAP, sys.executable, "-m", "moetune", "train", *args]
    t0 = time.perf_counter()
    with log.open("w") as f:
        p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=f, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"moetune train failed (exit {p.returncode}); its output: {log}")
    peak_kb = int(p.stdout.strip().splitlines()[-1])                  # Linux: kilobytes
    return {"seconds": round(wall, 1), "peak_rss_gb": round(peak_kb / 1024 ** 2, 2)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="recipes/hydralora.yaml")
    ap.add_argument("--data", default="data/multidomain", help="a folder with train/validation/test.jsonl")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-rows", type=int, default=2000, help="router.init_max_rows")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "router_init_cost.json")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides for both runs")
    a = ap.parse_args(argv)
    common = [a.recipe, f"data.train={a.data}/train.jsonl", f"data.validation={a.data}/validation.jsonl",
              f"data.test={a.data}/test.jsonl", f"expert.num_experts={a.experts}", "train.max_steps=1",
              "train.eval_every=0", "train.save_every=0", "stages=[train]", *a.overrides]
    with tempfile.TemporaryDirectory(prefix="router-init-") as tmp:
        runs = {}
        for name, extra in (("random", []), ("clusters", ["router.init=clusters", f"router.init_max_rows={a.max_rows}"])):
            run_dir = Path(tmp) / name
            runs[name] = measure([*common, *extra, f"output_dir={run_dir}"], a.threads, Path(tmp) / f"{name}.log")
            print(f"{name}: {runs[name]['seconds']} s, peak RSS {runs[name]['peak_rss_gb']} GB", flush=True)
        init = json.loads((Path(tmp) / "clusters" / "router_init.json").read_text())
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {a.threads} thread(s)",
        "command": " ".join(["python benchmarks/router_init_cost.py", *(argv if argv is not None else sys.argv[1:])]),
        "recipe": a.recipe, "data": a.data, "experts": a.experts, "max_rows": a.max_rows, "overrides": a.overrides,
        "runs": runs,
        "clustering_seconds": round(runs["clusters"]["seconds"] - runs["random"]["seconds"], 1),
        "peak_ratio": round(runs["clusters"]["peak_rss_gb"] / runs["random"]["peak_rss_gb"], 3),
        "router_init": {**{k: v for k, v in init.items() if k != "train_accuracy"},
                        "fit_accuracy_min": min(init["train_accuracy"].values()),
                        "fit_accuracy_mean": sum(init["train_accuracy"].values()) / len(init["train_accuracy"])},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(f"clustering adds {result['clustering_seconds']} s; peak RSS x{result['peak_ratio']}; written {a.out}")
    return result


if __name__ == "__main__":
    main()
