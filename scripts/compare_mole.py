#!/usr/bin/env python
"""MoLE vs multi-LoRA merges vs single LoRAs on the mixed test split, per domain (issue 4's evidence).

For each seed, on the recipe's data (default: the embedded multi-domain data and model):
  1. `recipes/mole.yaml` (experts_from: per_domain, granularity layer): one LoRA per domain, then
     MoLE gates over them                                                   -> mole_layer
  2. MoLE gates at granularity network and block over the same frozen LoRAs -> mole_network, mole_block
  3. one LoRA of the same rank on all the data, for the sum of the domain LoRAs' steps -> lora_all
  4. the domain LoRAs merged with `moetune merge-lora --adapters`: linear, cat, ties, dare_linear,
     dare_ties (density 0.5, default weights: 1/N for the sums, 1 for the TIES means)
  5. each single domain LoRA                                                -> lora_<domain>
Every model is scored on the test split (loss and greedy exact match, overall and per domain).
Results merge into --out (JSON, method -> seed -> scores); --table prints the markdown table
(mean, and sd over seeds when there are several).

    python scripts/compare_mole.py --seeds 0 1 2 --out benchmarks/results/compare_mole.json
    python scripts/compare_mole.py --table --out benchmarks/results/compare_mole.json
Extra key=value arguments override every recipe (e.g. model.path=DIR train.max_steps=20).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MERGES = ("linear", "cat", "ties", "dare_linear", "dare_ties")


def score(rc, adapter: Path) -> dict:
    """Test-split loss and exact match of base + adapter, overall and per domain."""
    import torch
    from moetune.adapters.io import load_adapter
    from moetune.eval.evaluate import evaluate
    from moetune.eval.report import collect_gates, routing_report
    from moetune.models.load import load_model
    from moetune.run.session import Run
    run = Run(rc)
    model = load_model(rc.model, run.device, log=lambda *_: None)
    load_adapter(model, adapter)
    with torch.no_grad():
        s = evaluate(model, run.tokenizer, run.held_out(), rc, run.device, show=False)
        sums = collect_gates(model, run.held_out(), run.tokenizer.pad_token_id, rc.eval.batch_size, run.device)
    return {"loss": s["loss"], "exact_match": s.get("exact_match"),
            "specialisation": routing_report(sums)["specialisation"] if sums is not None else None,
            "per_domain": {d: {k: v.get(k) for k in ("loss", "exact_match")} for d, v in s["per_domain"].items()}}


def one_seed(seed: int, work: Path, overrides: list[str]) -> dict:
    from moetune.commands.stages import run_recipe
    from moetune.experts import ExpertConfig
    from moetune.export.multimerge import merge_command
    from moetune.recipe import load_recipe
    common = [f"train.seed={seed}", "train.eval_before=false", "eval.split=test", *overrides]
    mole = work / f"seed{seed}" / "mole_layer"
    rc = load_recipe(ROOT / "recipes" / "mole.yaml", [f"output_dir={mole}", "stages=[train]", *common])
    run_recipe(rc)
    info = json.loads((mole / "experts" / "experts.json").read_text())
    domains = sorted(info)
    experts = [info[d]["adapter"] for d in domains]
    adapters = {"mole_layer": mole / "adapter"}
    for gran in ("network", "block"):
        out = work / f"seed{seed}" / f"mole_{gran}"
        listed = [f"expert.experts=[{','.join(experts)}]", f"expert.names=[{','.join(domains)}]"]
        run_recipe(load_recipe(ROOT / "recipes" / "mole.yaml", [f"output_dir={out}", "stages=[train]",
                                                               "expert.experts_from=list", *listed,
                                                               f"expert.granularity={gran}", *common]))
        adapters[f"mole_{gran}"] = out / "adapter"
    steps = sum(v["steps"] for v in info.values())
    lora_all = work / f"seed{seed}" / "lora_all"
    lora_keys = {f"expert.{f.name}" for f in dataclasses.fields(ExpertConfig)}
    plain = [o for o in common if not o.startswith("expert.") or o.split("=", 1)[0] in lora_keys]
    run_recipe(load_recipe(ROOT / "recipes" / "default.yaml", [
        f"output_dir={lora_all}", "stages=[train]", f"expert.rank={rc.expert.rank}", f"expert.alpha={rc.expert.alpha}",
        f"train.lr={rc.expert.expert_lr or rc.train.lr}", *plain, f"train.max_steps={steps}"]))
    adapters["lora_all"] = lora_all / "adapter"
    for method in MERGES:
        out = work / f"seed{seed}" / f"merge_{method}"
        merge_command([Path(e) for e in experts], method, out, seed=seed)
        adapters[f"merge_{method}"] = out
    for d, e in zip(domains, experts):
        adapters[f"lora_{d}"] = Path(e)
    return {name: score(rc, path) for name, path in adapters.items()}


def table(results: dict) -> str:
    """Markdown: one row per method; exact match overall and per domain, test loss (mean [sd])."""
    domains = sorted({d for m in results.values() for s in m.values() for d in s["per_domain"]})

    def cell(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "-"
        sd = f" ±{statistics.stdev(vals):.3f}" if len(vals) > 1 else ""
        return f"{statistics.mean(vals):.3f}{sd}"
    head = ["method", "seeds", "EM all", *[f"EM {d}" for d in domains], "loss all", "specialisation"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, by_seed in results.items():
        s = list(by_seed.values())
        rows.append("| " + " | ".join([name, str(len(s)), cell([x["exact_match"] for x in s]),
                                        *[cell([x["per_domain"].get(d, {}).get("exact_match") for x in s])
                                          for d in domains],
                                        cell([x["loss"] for x in s]),
                                        cell([x.get("specialisation") for x in s])]) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compare_mole.json")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "compare_mole")
    ap.add_argument("--table", action="store_true", help="Only print the table from --out.")
    args, overrides = ap.parse_known_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if not args.table:
        for seed in args.seeds:
            for name, s in one_seed(seed, args.work, overrides).items():
                results.setdefault(name, {})[str(seed)] = s
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
