#!/usr/bin/env python
"""MMLU subject groups (medical, law, math; HydraLoRA paper, Tian et al. 2024, Table 1) after
training each method of `scripts/compare_methods.py` on the default multi-domain data.

Every adapter is the one `compare_methods.py` trained (runs/compare/<method>-s<seed>/adapter:
same steps, data, optimiser, matched parameters); a missing one is trained first with the same
protocol. `lora_split` has one small LoRA per default-data domain and MMLU has none of those
domains, so it is scored as their uniform mixture: `moetune merge-lora --method cat` with
weights 1/N (exactly the mean of their deltas, what a router stuck at uniform gates gives).
`base` is the model without adapter.

Scoring is zero-shot MMLU cloze (`moetune.eval.mmlu`, the SmolLM2 model cards' formulation: answer
text log-likelihood per character, options not shown, no chat template), on a seeded sample of
--per-subject questions from each subject of the groups. The prompt is run once per question
and the four answers after its KV cache. The interval of the base row is a 95% Wilson interval;
method rows give mean ± sd over seeds.

    python scripts/compare_mmlu_groups.py --seeds 0 1 --per-subject 6
    python scripts/compare_mmlu_groups.py --table
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

GROUPS = ("medical", "law", "math")


def mmlu_rows(groups: list[str], per_subject: int, seed: int) -> list[dict]:
    from moetune.eval.mmlu import load_mmlu, subsample_per_subject
    rows = [r for r in load_mmlu() if r["group"] in groups]
    return subsample_per_subject(rows, per_subject, seed)


def adapter_for(method: str, seed: int, runs: Path, recipe: Path, steps: int) -> Path | None:
    """The trained adapter of (method, seed); trains it with compare_methods' protocol if absent."""
    if method == "base":
        return None
    from compare_methods import run_method
    if method == "lora_split":
        mixed = runs / f"lora_split-s{seed}" / "uniform-cat"
        if not (mixed / "adapter_config.json").is_file():
            parts = sorted(runs.glob(f"lora_split-s{seed}/*/adapter"))
            if not parts:
                run_method(method, seed, recipe, steps, runs, [])
                parts = sorted(runs.glob(f"lora_split-s{seed}/*/adapter"))
            from moetune.export.multimerge import merge_command
            merge_command(parts, "cat", mixed)
        return mixed
    path = runs / f"{method}-s{seed}" / "adapter"
    if not path.is_dir():
        run_method(method, seed, recipe, steps, runs, [])
    return path


def score(recipe: Path, adapter: Path | None, rows: list[dict], batch_size: int) -> dict:
    from moetune.adapters.io import load_adapter
    from moetune.eval.mmlu import score_multiple_choice
    from moetune.models.load import load_model, load_tokenizer
    from moetune.recipe import load_recipe
    rc = load_recipe(recipe, [])
    tok = load_tokenizer(rc.model, log=lambda *_: None)
    model = load_model(rc.model, "cpu", log=lambda *_: None)
    if adapter is not None:
        load_adapter(model, adapter)
    t0 = time.time()
    res = score_multiple_choice(model, tok, rows, batch_size=batch_size, mode="cloze")
    return {"accuracy": res["accuracy"], "n": res["n"], "per_group": res["per_group"],
            "accuracy_unnormalized": res["accuracy_unnormalized"], "seconds": round(time.time() - t0, 1)}


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def table(doc: dict) -> str:
    res = doc["results"]
    groups = doc["protocol"]["groups"]
    ns = {g: next(iter(res["base"].values()))["per_group"][g]["n"] for g in groups} if "base" in res else {}
    head = ["method", "seeds", *[f"{g} (n={ns.get(g, '?')})" for g in groups], "all three"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(vals: list[float], n: int | None = None) -> str:
        m = statistics.mean(vals)
        if len(vals) > 1:
            return f"{m:.3f} ± {statistics.stdev(vals):.3f}"
        if n:
            lo, hi = wilson(m, n)
            return f"{m:.3f} [{lo:.2f}, {hi:.2f}]"
        return f"{m:.3f}"
    for method, by_seed in res.items():
        rs = list(by_seed.values())
        seeds = ",".join(sorted(by_seed)) if method != "base" else "-"
        cells = [cell([r["per_group"][g]["accuracy"] for r in rs], rs[0]["per_group"][g]["n"]) for g in groups]
        lines.append("| " + " | ".join([method, seeds, *cells, cell([r["accuracy"] for r in rs], rs[0]["n"])]) + " |")
    return "\n".join(lines)


def main() -> None:
    from compare_methods import METHODS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=["base", *METHODS], choices=["base", *METHODS])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--groups", nargs="+", default=list(GROUPS))
    p.add_argument("--per-subject", type=int, default=15, help="questions per MMLU subject (seeded sample)")
    p.add_argument("--steps", type=int, default=120, help="training steps of an adapter that must be trained")
    p.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "default.yaml")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "compare")
    p.add_argument("--batch-size", type=int, default=8, help="questions per forward pass")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compare_mmlu_groups.json")
    p.add_argument("--table", action="store_true", help="only print the table from --out")
    a = p.parse_args()
    if a.table:
        print(table(json.loads(a.out.read_text())))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = mmlu_rows(a.groups, a.per_subject, seed=0)
    protocol = {"groups": a.groups, "per_subject": a.per_subject, "questions": len(rows), "format": "cloze",
                "chat_template": False}
    doc = json.loads(a.out.read_text()) if a.out.is_file() else {"results": {}}
    if doc.get("protocol", {}).get("questions") not in (None, len(rows)):
        doc = {"results": {}}  # a different question sample: start over
    from compare_methods import protocol_commands
    protocol["commands"] = protocol_commands(doc.get("protocol", {}))  # every run that added results to this file
    doc["protocol"] = protocol
    for method in a.methods:
        for seed in ([0] if method == "base" else a.seeds):
            r = score(a.recipe, adapter_for(method, seed, a.runs_dir, a.recipe, a.steps), rows, a.batch_size)
            doc["results"].setdefault(method, {})[str(seed)] = r
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(doc, indent=1))
            print(f"{method} seed {seed}: {r['accuracy']:.3f} "
                  + " ".join(f"{g} {v['accuracy']:.3f}" for g, v in r["per_group"].items())
                  + f" ({r['seconds']:.0f} s)", flush=True)
    print(table(doc))


if __name__ == "__main__":
    main()
