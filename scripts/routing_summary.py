#!/usr/bin/env python
"""One line per run of how its routers split the eval split's domains, from each RUN's eval.json `routing`.

The eval stage's routing report (moetune/eval/report.py) keeps, per routed module, the normalised mutual
information I(domain; expert) / H(domain) of the soft gates (`mi_norm_gates`) and of each token's argmax
expert (`mi_norm_assignments`), the gates' mean entropy and the expert slots whose load is under
dead_threshold / N. This prints, per run, a markdown row of

  spec         the report's specialisation, what studies report: the mean over modules of mi_norm_gates
               for soft routers, of mi_norm_assignments for top-k ones (the `measure` column);
  assignments  the mean over modules of mi_norm_assignments: the specialisation of the hard partition the
               gates approach as they are sharpened (temperature -> 0);
  entropy      the mean over modules of the gates' entropy (nats; max ln N: uniform gates);
  dead         dead expert slots over all modules, of modules x N.

It is how benchmarks/RESULTS.md's one-step probe table ("What a router's specialisation at init is made of")
is made: `make probe-routing-init` trains the probes and runs this on them.

    python scripts/routing_summary.py runs/probes/init-* --json summary.json
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def summary(routing: dict) -> dict:
    """The four numbers of one eval.json `routing` section (see the module docstring)."""
    layers = list(routing["layers"].values())
    if not layers:
        raise ValueError("the routing report has no modules")
    n = int(routing["num_experts"])
    return {"specialisation": float(routing["specialisation"]),
            "measure": str(routing.get("specialisation_measure", "gates")),
            "assignments": statistics.fmean(float(v["mi_norm_assignments"]) for v in layers),
            "entropy": statistics.fmean(float(v["entropy"]) for v in layers),
            "max_entropy": float(routing["max_entropy"]),
            "dead": sum(len(v["dead"]) for v in layers), "slots": len(layers) * n,
            "modules": len(layers), "num_experts": n, "tokens": int(routing["tokens"])}


def read(run: Path) -> dict:
    """`summary` of RUN/eval.json; SystemExit naming the file when it has no routing report."""
    path = run / "eval.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (has the run's eval stage finished?)")
    routing = json.loads(path.read_text()).get("routing")
    if not isinstance(routing, dict) or not routing.get("layers"):
        raise SystemExit(f"{path}: no routing report (a routed adapter's eval writes one)")
    return summary(routing)


def markdown(rows: dict[str, dict]) -> str:
    """The rows as a markdown table, one per run, in the order given."""
    lines = ["| run | spec | measure | assignments | entropy | dead |", "|---|---:|---|---:|---:|---:|"]
    for name, s in rows.items():
        lines.append(f"| {name} | {s['specialisation']:.4f} | {s['measure']} | {s['assignments']:.3f} | {s['entropy']:.3f} "
                     f"| {s['dead']} of {s['slots']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories with an eval.json")
    p.add_argument("--json", type=Path, help="also write {run name: numbers} here")
    a = p.parse_args(argv)
    rows = {run.name: read(run) for run in a.runs}
    print(markdown(rows))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
