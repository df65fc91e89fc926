#!/usr/bin/env python
"""Draw how routing evolved over training, from the `val_routing` rows of runs' metrics.jsonl.

A routed adapter's training logs, at every validation point (train.eval_every and the end; see
moetune/train/routing_log.py), the per-module I(domain; expert) / H(domain) and gate histograms on the
validation split. For each RUN directory this writes `routing_curves.png` into it (or into --out, named
after the run) with four panels:

  1. MI / H(domain) per transformer block vs step (one line per block, dark = early blocks), mean in black
  2. the distribution of gate values (all experts, all modules) vs step: a heatmap, one column per
     validation point; uniform routing is a bright band at 1/N, sharp routing bright at 0 and 1
  3. the same for each token's LARGEST gate (1/N: no preference; 1: one expert takes the token)
  4. the final per-block MI (the last validation point) next to the eval stage's (eval.json `routing`)

and `routing_curves.json` beside it: the summary below plus the curves drawn (per validation step: the mean
MI / H, the per-block MI / H, the gate histograms averaged over blocks). It prints one markdown row per run:
specialisation at the first and last validation point, its maximum, and the block with the highest final MI. With --overlay FILE it also draws the mean MI vs step
of every run in one plot (one line per run, labelled by directory name), to set variants side by side. A run
that has not finished training (no `train` section in its summary.json: still running, or killed) is labelled
'NAME (training, step K)' in the figures and the table, and dashed in the overlay.

    python scripts/routing_curves.py runs/studies/routing-global-multidomain/*-s0 --overlay spec.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from moetune.core.files import read_json_object, save_figure  # noqa: E402
from moetune.models.layers import layer_index  # noqa: E402
from moetune.train.curves import read_metrics  # noqa: E402


def snapshots(run: Path) -> list[tuple[int, dict]]:
    """(step, val_routing) of every validation row of `run` that has one, by step (a step logged twice, as a
    resumed run may, keeps its last row)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    found = {r["step"]: r["val_routing"] for r in read_metrics(path)
             if r.get("split") == "validation" and isinstance(r.get("val_routing"), dict) and isinstance(r.get("step"), int)}
    return sorted(found.items())


def block_mi(snap: dict) -> dict[str, float]:
    """Mean MI / H(domain) over the modules of each transformer block (block label -> value), model order."""
    out: dict[str, list[float]] = {}
    for name, v in zip(snap["names"], snap["mi_norm"]):
        k = layer_index(name)
        out.setdefault(str(k) if k is not None else name, []).append(v)
    return {b: sum(v) / len(v) for b, v in out.items()}


def _total(hists: dict[str, list[float]]) -> list[float]:
    """The blocks' histograms (each sums to 1 over its tokens x experts) averaged into one."""
    rows = list(hists.values())
    return [sum(r[i] for r in rows) / len(rows) for i in range(len(rows[0]))]


def trained(run: Path) -> bool:
    """Whether `run` finished training: its summary.json has the `train` section the end of training writes
    (a run still training, or killed, has none, and its curves stop at its last validation point)."""
    return "train" in read_json_object(run / "summary.json")


def label(run: Path, snaps: list[tuple[int, dict]]) -> str:
    """The run's name, with '(training, step K)' for a run that has not finished training."""
    return run.name if trained(run) else f"{run.name} (training, step {snaps[-1][0]})"


def summary(run: Path, snaps: list[tuple[int, dict]]) -> dict:
    spec = [s["specialisation"] for _, s in snaps]
    final = block_mi(snaps[-1][1])
    top = max(final, key=final.get)
    return {"run": run.name, "label": label(run, snaps), "trained": trained(run), "points": len(snaps),
            "first": spec[0], "last": spec[-1], "max": max(spec), "best_block": top, "best_block_mi": final[top],
            "steps": [s for s, _ in snaps]}


def curves(snaps: list[tuple[int, dict]]) -> dict:
    """The numbers the figure draws, per validation step (JSON-ready)."""
    return {"steps": [s for s, _ in snaps], "specialisation": [x["specialisation"] for _, x in snaps],
            "block_mi": [block_mi(x) for _, x in snaps], "hist": [_total(x["hist"]) for _, x in snaps],
            "top_share": [_total(x["top_share"]) for _, x in snaps], "num_experts": snaps[-1][1]["num_experts"],
            "bins": snaps[-1][1]["bins"]}


def draw(run: Path, snaps: list[tuple[int, dict]], path: Path) -> Path:
    """The four-panel figure of one run (module docstring), written to `path`."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    steps = [s for s, _ in snaps]
    per_block = [block_mi(s) for _, s in snaps]
    blocks = list(per_block[-1])
    n, bins = snaps[-1][1]["num_experts"], snaps[-1][1]["bins"]
    fig = Figure(figsize=(15, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots(1, 4)
    cmap = colormaps["viridis"]
    for i, b in enumerate(blocks):
        ax[0].plot(steps, [pb.get(b, float("nan")) for pb in per_block], color=cmap(i / max(len(blocks) - 1, 1)), lw=0.8)
    ax[0].plot(steps, [s["specialisation"] for _, s in snaps], color="black", lw=2, label="mean over modules")
    ax[0].set(title="I(domain; expert) / H(domain) per block", xlabel="step")
    ax[0].legend(fontsize=7)
    extent = [-0.5, len(steps) - 0.5, 0.0, 1.0]
    for a, key, title in ((ax[1], "hist", "gate values (all experts)"), (ax[2], "top_share", "largest gate per token")):
        grid = [[col[i] for col in (_total(s[key]) for _, s in snaps)] for i in range(bins)]  # (BINS, points)
        im = a.imshow(grid, origin="lower", aspect="auto", extent=extent, cmap="magma", interpolation="nearest")
        a.axhline(1.0 / n, color="cyan", lw=0.8, ls="--")
        a.set(title=f"{title}, 1/N dashed", ylabel="gate", xlabel="validation point")
        a.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=6, rotation=90)
        fig.colorbar(im, ax=a, label="fraction", shrink=0.8)
    final = per_block[-1]
    ax[3].plot(range(len(blocks)), [final[b] for b in blocks], marker="o", ms=3, label=f"step {steps[-1]} (validation)")
    ev = run / "eval.json"
    layers = (json.loads(ev.read_text()).get("routing") or {}).get("layers") if ev.is_file() else None
    if layers:
        evb = block_mi({"names": list(layers), "mi_norm": [v.get("mi_norm", 0.0) for v in layers.values()]})
        ax[3].plot(range(len(evb)), list(evb.values()), marker="s", ms=3, label="eval stage (test)")
    ax[3].set(title="final MI / H(domain) per block", xlabel="block")
    ax[3].legend(fontsize=7)
    fig.suptitle(label(run, snaps))
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path, dpi=100)


def overlay(runs: dict[str, tuple[list[tuple[int, dict]], bool]], path: Path) -> Path:
    """Mean MI / H(domain) vs step of every run (label -> (snapshots, trained)), one line each; a run that has
    not finished training dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, (snaps, done) in runs.items():
        ax.plot([s for s, _ in snaps], [x["specialisation"] for _, x in snaps], marker=".", label=name,
                ls="-" if done else "--")
    ax.set(xlabel="step", ylabel="I(domain; expert) / H(domain)", title="routing specialisation over training")
    ax.legend(fontsize=6)
    return save_figure(fig, path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (with metrics.jsonl)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures here (<run name>.png) instead of into each run")
    ap.add_argument("--overlay", type=Path, default=None, help="also draw every run's mean MI vs step into this PNG")
    ap.add_argument("--json", type=Path, default=None, help="save the per-run summaries here")
    a = ap.parse_args(argv)
    found, rows = {}, []
    for run in a.runs:
        snaps = snapshots(run)
        if not snaps:
            print(f"{run}: no val_routing rows in metrics.jsonl (a routed adapter trained with a validation split "
                  "of two or more domains logs them at every validation point)", file=sys.stderr)
            continue
        found[label(run, snaps)] = (snaps, trained(run))
        fig = draw(run, snaps, (a.out / f"{run.name}.png") if a.out else run / "routing_curves.png")
        row = {**summary(run, snaps), "figure": str(fig)}
        fig.with_suffix(".json").write_text(json.dumps({**row, "curves": curves(snaps)}, indent=1))
        rows.append(row)
    if not rows:
        return 1
    print("| run | validation points | MI/H first | MI/H last | MI/H max | best block (final MI/H) | figure |")
    print("|---|---:|---:|---:|---:|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['points']} | {r['first']:.4f} | {r['last']:.4f} | {r['max']:.4f} | "
              f"{r['best_block']} ({r['best_block_mi']:.4f}) | {r['figure']} |")
    if a.overlay:
        print(f"overlay: {overlay(found, a.overlay)}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
