#!/usr/bin/env python
"""Quality of LoRA vs routed experts on the default multi-domain data, several seeds.

Every method trains the same number of optimizer steps on the same data with the same
optimiser settings as `recipes/default.yaml` (only the `expert:`/`router:` settings differ)
and is scored on the held-out test split: exact match and loss, overall and per domain,
plus the final validation loss. Trainable parameter counts are measured, not assumed.

Methods (HydraLoRA paper, Tian et al. 2024, Table 2 baselines; MoLoRA/MoV, Zadouri et al. 2023):
- lora          one LoRA of rank 16 on every linear layer (the default recipe)
- lora_split    the rank is split into one smaller LoRA per domain (rank 16 // n_domains),
                each trained only on its domain for steps // n_domains steps and scored
                on its own domain (oracle routing by the `domain` field: an upper bound
                on what routing could give these small LoRAs)
- hydralora     shared A of rank 8, 3 routed B heads (recipes/hydralora.yaml)
- molora_soft   4 routed LoRA experts of rank 4, soft gates (recipes/molora.yaml)
- molora_top2   the same with top-2 gates
- mov           10 routed (IA)^3 vectors on k, v and the FFN input (far fewer parameters:
                (IA)^3 cannot be scaled up to match)

Results merge into --out (JSON, keyed method -> seed) so runs can be added later;
`--table` prints the markdown table from that file only.

    python scripts/compare_methods.py --seeds 0 1 --out benchmarks/results/compare_default.json
    python scripts/compare_methods.py --table --out benchmarks/results/compare_default.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

ROUTER = ["router.type=soft", "router.balance_loss=switch", "router.balance_weight=0.01"]
METHODS: dict[str, list[str]] = {
    "lora": ["expert.type=lora", "expert.rank=16", "expert.alpha=32"],
    "lora_split": ["expert.type=lora"],  # rank and data set per domain below
    "hydralora": ["expert.type=hydralora", "expert.rank=8", "expert.alpha=16", "expert.num_experts=3", *ROUTER],
    "molora_soft": ["expert.type=molora", "expert.rank=4", "expert.alpha=8", "expert.num_experts=4", *ROUTER],
    "molora_top2": ["expert.type=molora", "expert.rank=4", "expert.alpha=8", "expert.num_experts=4",
                    *ROUTER, "router.type=top_k", "router.top_k=2"],
    "mov": ["expert.type=mov", "expert.num_experts=10", "expert.target_modules=[k_proj,v_proj,down_proj]", *ROUTER],
}


def _run(base: Path, overrides: list[str], out_dir: Path) -> dict:
    from moetune.commands.stages import run_recipe
    from moetune.recipe import load_recipe
    rc = load_recipe(base, [*overrides, f"output_dir={out_dir}", "stages=[train,eval]",
                            "train.eval_before=false", "train.save_every=0"])
    t0 = time.time()
    s = run_recipe(rc)
    return {"summary": s, "seconds": time.time() - t0}


def _domain_files(train: Path, validation: Path, test: Path, root: Path) -> dict[str, dict[str, Path]]:
    """Split the three JSONL files by `domain` into root/<domain>/<split>.jsonl."""
    rows: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for split, path in (("train", train), ("validation", validation), ("test", test)):
        for line in path.read_text().splitlines():
            if line.strip():
                rows[json.loads(line)["domain"]][split].append(line)
    out = {}
    for d, splits in sorted(rows.items()):
        (root / d).mkdir(parents=True, exist_ok=True)
        out[d] = {}
        for split, lines in splits.items():
            p = root / d / f"{split}.jsonl"
            p.write_text("\n".join(lines) + "\n")
            out[d][split] = p
    return out


def run_method(method: str, seed: int, base: Path, steps: int, runs: Path, extra: list[str]) -> dict:
    common = [f"train.seed={seed}", f"train.max_steps={steps}", *extra]
    if method != "lora_split":
        r = _run(base, [*METHODS[method], *common], runs / f"{method}-s{seed}")
        s = r["summary"]
        return {"exact_match": s["after"]["exact_match"], "loss": s["after"]["loss"],
                "val_loss": s["train"]["val_loss"], "params": s["train"]["trainable_parameters"],
                "per_domain": s["after"]["per_domain"], "seconds": round(r["seconds"], 1),
                "specialisation": ((s.get("eval") or {}).get("routing") or {}).get("specialisation")}
    from moetune.recipe import load_recipe
    rc = load_recipe(base, extra)
    files = _domain_files(Path(rc.data.train), Path(rc.data.validation), Path(rc.data.test), runs / "split-data")
    rank = max(1, 16 // len(files))  # the lora method's rank, split over the domains
    per_domain, params, seconds, em_hits, loss_sum, val_sum, n = {}, 0, 0.0, 0.0, 0.0, 0.0, 0
    for d, f in files.items():
        over = [*METHODS["lora"], f"expert.rank={rank}", f"expert.alpha={2 * rank}", *common,
                f"train.max_steps={max(1, steps // len(files))}",
                f"data.train={f['train']}", f"data.validation={f['validation']}", f"data.test={f['test']}"]
        r = _run(base, over, runs / f"lora_split-s{seed}" / d)
        s = r["summary"]
        k = s["after"]["n"]
        per_domain[d] = s["after"]["per_domain"][d]
        params += s["train"]["trainable_parameters"]
        seconds += r["seconds"]
        em_hits += s["after"]["exact_match"] * k
        loss_sum += s["after"]["loss"] * k  # token-weighted within a domain; example-weighted across
        val_sum += s["train"]["val_loss"] * k
        n += k
    return {"exact_match": em_hits / n, "loss": loss_sum / n, "val_loss": val_sum / n, "params": params,
            "per_domain": per_domain, "seconds": round(seconds, 1), "rank_per_domain": rank}


def table(results: dict) -> str:
    def ms(xs):
        xs = [x for x in xs if x is not None]
        if not xs:
            return "–"
        return f"{statistics.mean(xs):.3f}" + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")
    domains = sorted({d for m in results.values() for r in m.values() for d in r["per_domain"]})
    head = ["method", "trainable params", "seeds", "test EM", "test loss", "val loss", "specialisation",
            *[f"EM {d}" for d in domains]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in METHODS:
        runs = results.get(method)
        if not runs:
            continue
        rs = list(runs.values())
        cells = [method, f"{rs[0]['params']:,}", ",".join(sorted(runs)), ms([r["exact_match"] for r in rs]),
                 ms([r["loss"] for r in rs]), ms([r["val_loss"] for r in rs]),
                 ms([r.get("specialisation") for r in rs]),  # mean I(domain; expert) / H(domain) over layers
                 *[ms([r["per_domain"].get(d, {}).get("exact_match") for r in rs]) for d in domains]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def protocol_commands(old_protocol: dict) -> list[str]:
    """The commands that wrote a results file: those its protocol lists (or its older single
    'command'), then this invocation's, each once."""
    commands = old_protocol.get("commands") or [c for c in [old_protocol.get("command")] if c]
    this = "python " + " ".join(sys.argv)
    return commands + ([this] if this not in commands else [])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=120, help="optimizer steps per method (default recipe: 120)")
    p.add_argument("--recipe", type=Path, default=Path("recipes/default.yaml"))
    p.add_argument("--runs-dir", type=Path, default=Path("runs/compare"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/compare_default.json"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--table", action="store_true", help="only print the table from --out")
    p.add_argument("overrides", nargs="*", help="extra recipe overrides for every run (e.g. eval.max_examples=100)")
    a = p.parse_args()
    doc = json.loads(a.out.read_text()) if a.out.is_file() else {"results": {}}
    if a.table:
        print(table(doc["results"]))
        return
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for seed in a.seeds:
        for method in a.methods:
            res = run_method(method, seed, a.recipe, a.steps, a.runs_dir, list(a.overrides))
            res["steps"], res["overrides"] = a.steps, list(a.overrides)
            doc = json.loads(a.out.read_text()) if a.out.is_file() else {"results": {}}
            doc["results"].setdefault(method, {})[str(seed)] = res
            doc["protocol"] = {"recipe": str(a.recipe), "steps": a.steps, "methods": METHODS,
                               "commands": protocol_commands(doc.get("protocol", {}))}
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(doc, indent=1))
            print(f"{method} seed {seed}: EM {res['exact_match']:.3f} loss {res['loss']:.4f} "
                  f"({res['params']:,} params, {res['seconds']:.0f} s)", flush=True)
    print(table(doc["results"]))


if __name__ == "__main__":
    main()
