#!/usr/bin/env python
"""Do routers specialise, and does it pay? LoRA vs routed types, default vs with routing levers.

For each data set (the default 5-domain data, and data/multidomain: 8 domains, see
scripts/gen_multidomain.py) every method trains the same optimizer steps with the data set's
recipe settings (recipes/default.yaml: batch 8, lr 2e-3, cosine, warmup 10) and only its
`expert:`/`router:` keys changed, then is scored on the test split: exact match overall and per
domain, loss, the routing specialisation (mean over layers of I(domain; expert) / H(domain), from
the eval stage's routing report; at most log 4 / log 8 = 0.67 for 8 domains on 4 experts), and the
training speed (median over steps of the logged tokens per second; `step_ms` in the JSON is the train
stage's seconds / steps, which includes one final validation pass).
Trainable parameters are measured. All routed types use 4 experts and about LoRA rank 16's
parameter budget: molora 4 x rank 4 (= rank 16, plus the routers), hydralora rank 6 with 4 heads
(6 * (d_in + 4 d_out) ~ 16 * (d_in + d_out) on square layers).

Levers (recipe keys in `router:`, see `moetune explain`):
    +seq     level=sequence (gates from the prompt's mean, shared by its tokens)
    +anneal  temperature 2 -> 0.5 over training, lr_multiplier 5 for the routers
    +sup     domain_loss_weight 0.1: weak supervision from the domain column (imposed, not learned)
    +levers  +seq, +anneal and the switch balance loss together (no supervision)
    +sup10   domain_loss_weight 1.0 and lr_multiplier 10: supervision strong enough to move the routers

The full protocol (3 seeds, 120 steps, both data sets, every method):
    python scripts/compare_routing.py --seeds 0 1 2 --steps 120
A reduced run (what fits a shared CPU) and the table:
    nice -n 10 python scripts/compare_routing.py --data multidomain --seeds 0 --steps 60 \
        --methods lora hydralora hydralora+levers hydralora+sup eval.max_examples=200
    python scripts/compare_routing.py --table
Results merge into --out (data set -> method -> seed), so runs can be added later.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

DATA = {"default": "data/default", "multidomain": "data/multidomain"}
BALANCE = ["router.balance_loss=switch", "router.balance_weight=0.01"]
SEQ = ["router.level=sequence"]
ANNEAL = ["router.temperature=2.0", "router.temperature_end=0.5", "router.lr_multiplier=5"]
SUP = ["router.domain_loss_weight=0.1"]
HYDRA = ["expert.type=hydralora", "expert.rank=6", "expert.alpha=12", "expert.num_experts=4"]
MOLORA = ["expert.type=molora", "expert.rank=4", "expert.alpha=8", "expert.num_experts=4"]
METHODS: dict[str, list[str]] = {
    "lora": ["expert.type=lora", "expert.rank=16", "expert.alpha=32"],
    "hydralora": [*HYDRA, *BALANCE],
    "hydralora+seq": [*HYDRA, *BALANCE, *SEQ],
    "hydralora+anneal": [*HYDRA, *BALANCE, *ANNEAL],
    "hydralora+sup": [*HYDRA, *BALANCE, *SUP],
    "hydralora+levers": [*HYDRA, *BALANCE, *SEQ, *ANNEAL],
    "hydralora+sup10": [*HYDRA, *BALANCE, "router.domain_loss_weight=1.0", "router.lr_multiplier=10"],
    "molora": [*MOLORA, *BALANCE],
    "molora_top2": [*MOLORA, *BALANCE, "router.type=top_k", "router.top_k=2"],
    "molora+levers": [*MOLORA, *BALANCE, *SEQ, *ANNEAL],
    "molora+sup": [*MOLORA, *BALANCE, *SUP],
    # MoLE: one LoRA per domain trained first (recipes/mole.yaml), then the gates; as many experts as domains
    "mole": ["expert.type=mole"],
    "mole+anneal": ["expert.type=mole", "router.lr_multiplier=5"],
}


def data_overrides(name: str) -> list[str]:
    d = DATA[name]
    return [f"data.train={d}/train.jsonl", f"data.validation={d}/validation.jsonl", f"data.test={d}/test.jsonl"]


def run_method(data: str, method: str, seed: int, steps: int, runs: Path, extra: list[str]) -> dict:
    from moetune.recipe import load_recipe
    from moetune.stages import run_recipe
    recipe = ROOT / "recipes" / ("mole.yaml" if method.startswith("mole") else "default.yaml")
    out = runs / data / f"{method}-s{seed}"
    over = [*METHODS[method], *data_overrides(data), f"train.seed={seed}", f"train.max_steps={steps}",
            f"output_dir={out}", "stages=[train,eval]", "train.eval_before=false", "train.save_every=0",
            "train.eval_every=0", "train.log_every=1", *extra]
    if method.startswith("mole"):
        over.append(f"expert.expert_max_steps={steps}")
    t0 = time.time()
    s = run_recipe(load_recipe(recipe, over))
    seconds = time.time() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tps = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s") and "loss" in r]
    routing = (s.get("eval") or {}).get("routing") or {}
    return {"exact_match": s["after"]["exact_match"], "loss": s["after"]["loss"],
            "params": s["train"]["trainable_parameters"], "per_domain": s["after"]["per_domain"],
            "specialisation": routing.get("specialisation"), "domain_expert": routing.get("domain_expert"),
            "train_seconds": s["train"].get("seconds"), "seconds": round(seconds, 1),
            "step_ms": round(1000 * s["train"]["seconds"] / max(s["train"]["steps"], 1), 1)
            if s["train"].get("seconds") else None,
            "median_tokens_per_s": statistics.median(tps) if tps else None}


def _ms(xs, digits: int = 3) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    return f"{statistics.mean(xs):.{digits}f}" + (f" ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else "")


def table(results: dict) -> str:
    """One markdown table per data set: method, params, seeds, EM, loss, specialisation, training throughput
    (median over steps of the logged tokens/s; the same seed feeds every method the same batches, so it
    compares step times), EM per domain."""
    out = []
    for data, by_method in results.items():
        domains = sorted({d for m in by_method.values() for r in m.values() for d in r["per_domain"]})
        head = ["method", "params", "seeds", "test EM", "test loss", "specialisation", "train tok/s",
                *[f"EM {d}" for d in domains]]
        lines = [f"**{data}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method in METHODS:
            runs = by_method.get(method)
            if not runs:
                continue
            rs = list(runs.values())
            cells = [method, f"{rs[0]['params']:,}", ",".join(sorted(runs)), _ms([r["exact_match"] for r in rs]),
                     _ms([r["loss"] for r in rs]), _ms([r["specialisation"] for r in rs], 4),
                     _ms([r.get("median_tokens_per_s") for r in rs], 1),
                     *[_ms([r["per_domain"].get(d, {}).get("exact_match") for r in rs]) for d in domains]]
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", default=list(DATA), choices=list(DATA))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--runs-dir", type=Path, default=Path("runs/compare_routing"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compare_routing.json")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--table", action="store_true", help="only print the tables from --out")
    p.add_argument("overrides", nargs="*", help="extra recipe overrides for every run (e.g. eval.max_examples=100)")
    a = p.parse_args()
    if a.table:
        print(table(json.loads(a.out.read_text())["results"]))
        return
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for seed in a.seeds:
        for data in a.data:
            for method in a.methods:
                res = run_method(data, method, seed, a.steps, a.runs_dir, list(a.overrides))
                res["steps"], res["overrides"] = a.steps, list(a.overrides)
                doc = json.loads(a.out.read_text()) if a.out.is_file() else {"results": {}, "runs": []}
                doc["results"].setdefault(data, {}).setdefault(method, {})[str(seed)] = res
                doc["runs"].append("python " + " ".join(sys.argv) + f"  # {data} {method} seed {seed}")
                doc["methods"] = METHODS
                a.out.parent.mkdir(parents=True, exist_ok=True)
                a.out.write_text(json.dumps(doc, indent=1))
                print(f"{data} {method} seed {seed}: EM {res['exact_match']:.3f} spec "
                      f"{res['specialisation'] if res['specialisation'] is not None else '-'} "
                      f"({res['params']:,} params, {res['seconds']:.0f} s)", flush=True)
    print(table(json.loads(a.out.read_text())["results"]))


if __name__ == "__main__":
    main()
