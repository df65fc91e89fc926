#!/usr/bin/env python
"""Do routers specialise, and does it pay? LoRA vs routed types, default vs with routing levers.

For each data set (the default 5-domain data, and data/multidomain: 8 domains, see
scripts/gen_multidomain.py) every method trains the same optimizer steps with the data set's
recipe settings (recipes/default.yaml: batch 8, lr 2e-3, cosine; PROTOCOL below: 60 steps, warmup 5)
and only its `expert:`/`router:` keys changed, then is scored on the first 160 test rows (greedy,
8 new tokens): exact match overall and per domain, loss, the routing specialisation (mean over
layers of I(domain; expert) / H(domain), from the eval stage's routing report; at most
log 4 / log 8 = 0.67 for 8 domains on 4 experts), and the training speed (median over steps of
the logged tokens per second; `step_ms` in the JSON is the train stage's seconds / steps, which
includes one final validation pass). The committed results ran two methods at a time, one
thread each, on a 2-core CPU: their speeds compare methods only roughly.
Trainable parameters are measured. HydraLoRA and MoLoRA use 4 experts at about LoRA rank 16's
parameter budget: molora 4 x rank 4 (= rank 16, plus the routers), hydralora rank 6 with 4 heads
(6 * (d_in + 4 d_out) ~ 16 * (d_in + d_out) on square layers). MoLE has one expert per domain
(see METHODS) and its gates read all N expert outputs, so its gates alone are N^2 d_out per place.

Levers (recipe keys in `router:`, see `moetune explain`):
    +seq     level=sequence (gates from the prompt's mean, shared by its tokens)
    +anneal  temperature 2 -> 0.5 over training, lr_multiplier 5 for the routers
    +sup     domain_loss_weight 0.1: weak supervision from the domain column (imposed, not learned)
    +levers  +seq, +anneal and the switch balance loss together (no supervision)
    +sup10   domain_loss_weight 1.0 and lr_multiplier 10: supervision strong enough to move the routers
    +seqsup  +seq and +sup10: one gate vector per prompt, supervised by its domain

The protocol of the committed table (3 seeds, both data sets, PROTOCOL_METHODS, plus hydralora+levers
on multidomain; about 2 hours on a 2-core CPU as two one-thread processes, e.g. one per data set,
each with its own --out, then --merge; results merge into --out, so runs can be split):
    python scripts/compare_routing.py --threads 1
    python scripts/compare_routing.py --threads 1 --data multidomain --methods hydralora+levers
    python scripts/compare_routing.py --table
Other methods: --methods ...; other settings: --steps N and recipe overrides after the options.
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
SUP10 = ["router.domain_loss_weight=1.0", "router.lr_multiplier=10"]
HYDRA = ["expert.type=hydralora", "expert.rank=6", "expert.alpha=12", "expert.num_experts=4"]
MOLORA = ["expert.type=molora", "expert.rank=4", "expert.alpha=8", "expert.num_experts=4"]
METHODS: dict[str, list[str]] = {
    "lora": ["expert.type=lora", "expert.rank=16", "expert.alpha=32"],
    "hydralora": [*HYDRA, *BALANCE],
    "hydralora+seq": [*HYDRA, *BALANCE, *SEQ],
    "hydralora+anneal": [*HYDRA, *BALANCE, *ANNEAL],
    "hydralora+sup": [*HYDRA, *BALANCE, *SUP],
    "hydralora+levers": [*HYDRA, *BALANCE, *SEQ, *ANNEAL],
    "hydralora+sup10": [*HYDRA, *BALANCE, *SUP10],
    "hydralora+seqsup": [*HYDRA, *BALANCE, *SEQ, *SUP10],
    "molora": [*MOLORA, *BALANCE],
    "molora_top2": [*MOLORA, *BALANCE, "router.type=top_k", "router.top_k=2"],
    "molora+levers": [*MOLORA, *BALANCE, *SEQ, *ANNEAL],
    "molora+sup": [*MOLORA, *BALANCE, *SUP],
    "molora+seqsup": [*MOLORA, *BALANCE, *SEQ, *SUP10],
    # MoLE (recipes/mole.yaml): one LoRA per domain first, then the gates; as many experts as domains.
    # At LoRA's budget: each domain LoRA has rank 16 // domains and trains steps / domains steps on its
    # domain (together: the rows LoRA sees); then the gates train `steps` steps. The variants reuse the
    # domain LoRAs of the plain `mole` run of the same data and seed.
    "mole": ["expert.type=mole"],
    "mole+anneal": ["expert.type=mole", "router.lr_multiplier=5"],
    "mole+seqsup": ["expert.type=mole", *SEQ, *SUP10],
}


def data_overrides(name: str) -> list[str]:
    d = DATA[name]
    return [f"data.train={d}/train.jsonl", f"data.validation={d}/validation.jsonl", f"data.test={d}/test.jsonl"]


PROTOCOL = ["train.warmup_steps=5", "eval.max_examples=160", "eval.max_new_tokens=8"]
PROTOCOL_METHODS = ["lora", "hydralora", "hydralora+seqsup", "molora", "molora+seqsup", "mole", "mole+seqsup"]


def domains(data: str) -> list[str]:
    rows = (ROOT / DATA[data] / "train.jsonl").read_text().splitlines()
    return sorted({json.loads(r)["domain"] for r in rows if r.strip()})


def mole_overrides(data: str, method: str, seed: int, steps: int, runs: Path) -> list[str]:
    """MoLE at LoRA rank 16's budget (see METHODS); variants reuse the `mole` run's domain LoRAs (whose
    files give the gates their ranks: expert.rank and alpha only shape the LoRAs `per_domain` trains)."""
    base = runs / data / f"mole-s{seed}" / "experts" / "experts.json"
    if method != "mole":
        if not base.is_file():
            raise SystemExit(f"{method} reuses the domain LoRAs of the `mole` run: run --methods mole first ({base}).")
        info = json.loads(base.read_text())
        return ["expert.experts_from=list", "expert.experts=[" + ",".join(info[d]["adapter"] for d in sorted(info)) + "]",
                "expert.names=[" + ",".join(sorted(info)) + "]"]
    n = len(domains(data))
    rank = max(1, 16 // n)
    return [f"expert.rank={rank}", f"expert.alpha={2 * rank}", f"expert.expert_max_steps={-(-steps // n)}"]


def run_method(data: str, method: str, seed: int, steps: int, runs: Path, extra: list[str]) -> dict:
    from moetune.commands.stages import run_recipe
    from moetune.recipe import load_recipe
    recipe = ROOT / "recipes" / ("mole.yaml" if method.startswith("mole") else "default.yaml")
    out = runs / data / f"{method}-s{seed}"
    over = [*METHODS[method], *data_overrides(data), f"train.seed={seed}", f"train.max_steps={steps}",
            f"output_dir={out}", "stages=[train,eval]", "train.eval_before=false", "train.save_every=0",
            "train.eval_every=0", "train.log_every=1", *extra]
    if method.startswith("mole"):
        over += mole_overrides(data, method, seed, steps, runs)
    t0 = time.time()
    s = run_recipe(load_recipe(recipe, over))
    seconds = time.time() - t0
    params = s["train"]["trainable_parameters"]
    if method.startswith("mole"):  # the budget: the domain LoRAs plus the gates
        experts = json.loads((runs / data / f"mole-s{seed}" / "experts" / "experts.json").read_text())
        params += sum(json.loads((Path(e["adapter"]).parent / "summary.json").read_text())["train"]
                      ["trainable_parameters"] for e in experts.values())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tps = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s") and "loss" in r]
    routing = (s.get("eval") or {}).get("routing") or {}
    return {"exact_match": s["after"]["exact_match"], "loss": s["after"]["loss"],
            "params": params, "per_domain": s["after"]["per_domain"],
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
    """One markdown table per data set: method, params, seeds, EM (mean ± sd over seeds), EM minus LoRA's of
    the same seed (mean ± sd of the paired differences), loss, specialisation, training throughput
    (median over steps of the logged tokens/s; the same seed feeds every method the same batches, so it
    compares step times), EM per domain."""
    out = []
    for data, by_method in results.items():
        domains = sorted({d for m in by_method.values() for r in m.values() for d in r["per_domain"]})
        lora = by_method.get("lora", {})
        head = ["method", "params", "seeds", "test EM", "EM - LoRA (paired)", "test loss", "specialisation", "train tok/s",
                *[f"EM {d}" for d in domains]]
        lines = [f"**{data}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method in METHODS:
            runs = by_method.get(method)
            if not runs:
                continue
            rs = list(runs.values())
            cells = [method, f"{rs[0]['params']:,}", ",".join(sorted(runs)), _ms([r["exact_match"] for r in rs]),
                     "–" if method == "lora" else _ms([r["exact_match"] - lora[k]["exact_match"]
                                                        for k, r in runs.items() if k in lora]),
                     _ms([r["loss"] for r in rs]), _ms([r["specialisation"] for r in rs], 4),
                     _ms([r.get("median_tokens_per_s") for r in rs], 1),
                     *[_ms([r["per_domain"].get(d, {}).get("exact_match") for r in rs]) for d in domains]]
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def merge_into(out: Path, results: dict, runs: list[str]) -> None:
    """Add results (data set -> method -> seed -> result; a seed already there is replaced) and their
    commands to the file `out`."""
    doc = json.loads(out.read_text()) if out.is_file() else {"results": {}, "runs": []}
    for data, by_method in results.items():
        for method, by_seed in by_method.items():
            doc["results"].setdefault(data, {}).setdefault(method, {}).update(by_seed)
    doc["runs"] += runs
    doc["methods"] = METHODS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", default=list(DATA), choices=list(DATA))
    p.add_argument("--methods", nargs="+", default=PROTOCOL_METHODS, choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--runs-dir", type=Path, default=Path("runs/compare_routing"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compare_routing.json")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--table", action="store_true", help="only print the tables from --out")
    p.add_argument("--merge", nargs="+", type=Path, default=None,
                   help="merge these result files (e.g. of runs in parallel) into --out, then print the tables")
    p.add_argument("overrides", nargs="*", help="recipe overrides for every run, after PROTOCOL's (e.g. eval.max_examples=200)")
    a = p.parse_args()
    if a.merge:
        for f in a.merge:
            part = json.loads(f.read_text())
            merge_into(a.out, part["results"], part.get("runs", []))
        a.table = True
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
                res = run_method(data, method, seed, a.steps, a.runs_dir, [*PROTOCOL, *a.overrides])
                res["steps"], res["overrides"] = a.steps, [*PROTOCOL, *a.overrides]
                merge_into(a.out, {data: {method: {str(seed): res}}},
                           ["python " + " ".join(sys.argv) + f"  # {data} {method} seed {seed}"])
                print(f"{data} {method} seed {seed}: EM {res['exact_match']:.3f} spec "
                      f"{res['specialisation'] if res['specialisation'] is not None else '-'} "
                      f"({res['params']:,} params, {res['seconds']:.0f} s)", flush=True)
    print(table(json.loads(a.out.read_text())["results"]))


if __name__ == "__main__":
    main()
