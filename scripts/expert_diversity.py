#!/usr/bin/env python
"""How different did a routed adapter's experts end up? A router can only matter where its experts differ.

For each routed module of each RUN's adapter (adapter/adapter_model.safetensors) the experts' weight deltas
are dW_i = B_i A_i (HydraLoRA: one shared A (r, d_in) and B_i (d_out, r); MoLoRA: A_i (r, d_in), B_i (d_out,
r)). From their Gram matrix in the Frobenius inner product, G_ij = <dW_i, dW_j> = tr((B_i^T B_j)(A_j A_i^T))
(N x N, from r x r products: no d_out x d_in matrix is formed), it reports

  cosine   the mean over expert pairs of G_ij / sqrt(G_ii G_jj): 1 = the experts point the same way
           (routing only rescales one delta), 0 = orthogonal experts;
  spread   sqrt(mean_i ||dW_i - dW_mean||^2) / ||dW_mean||: 0 = identical experts, so any gates give the
           same layer (the gates' weighted sum is dW_mean whatever they are).

Both per module, then the median over modules and per transformer block. Why it matters for issue 25: LoRA-
style init (B = 0) makes every expert start identical; under near-uniform gates each B_i gets the same
gradient times its gate, so the experts stay alike and the router sees no difference to route on. A run's
routing specialisation (eval.json) is printed beside it.

    python scripts/expert_diversity.py runs/studies/routing-balance-multidomain/runs/*-s0 --json out.json --plot out.png
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from moetune.core.files import save_figure  # noqa: E402
from moetune.models.layers import layer_index  # noqa: E402


def gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """G (N, N) with G_ij = <B_i A_i, B_j A_j>_F = sum_rs (B_i^T B_j)_rs (A_i A_j^T)_rs; a: (r, d_in) shared
    or (N, r, d_in), b: (N, d_out, r)."""
    b = b.double()
    a = a.double().expand(b.shape[0], -1, -1) if a.dim() == 2 else a.double()  # (N, r, d_in)
    bb = torch.einsum("ior,jos->ijrs", b, b)                             # (N, N, r, r): B_i^T B_j
    aa = torch.einsum("ird,jsd->ijrs", a, a)                             # (N, N, r, r): A_i A_j^T
    return (bb * aa).sum((-1, -2))                                       # (N, N)


def diversity(g: torch.Tensor) -> dict[str, float]:
    """cosine and spread (module docstring) of one module's Gram matrix g (N, N)."""
    n = g.shape[0]
    diag = g.diagonal().clamp_min(1e-30)
    cos = g / (diag.sqrt()[:, None] * diag.sqrt()[None, :])             # (N, N)
    pairs = cos[~torch.eye(n, dtype=torch.bool)]
    mean_sq = g.sum() / n ** 2                                           # ||dW_mean||^2
    spread_sq = (g.diagonal().sum() / n - mean_sq).clamp_min(0)          # mean_i ||dW_i - dW_mean||^2
    return {"cosine": float(pairs.mean()), "spread": float((spread_sq / mean_sq.clamp_min(1e-30)).sqrt())}


def run_diversity(run: Path) -> dict:
    """Per-module diversity of `run`'s adapter, their medians, the per-block medians and the run's specialisation."""
    tensors = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    modules = {}
    for key, b in tensors.items():
        if key.endswith(".lora_B") and b.dim() == 3:
            name = key[: -len(".lora_B")]
            modules[name] = diversity(gram(tensors[name + ".lora_A"], b))
    if not modules:
        raise SystemExit(f"{run}: no routed module (lora_B of shape (N, d_out, r)) in its adapter")
    blocks: dict[str, list[dict]] = {}
    for name, d in modules.items():
        blocks.setdefault(str(layer_index(name)), []).append(d)
    ev = run / "eval.json"
    spec = (json.loads(ev.read_text()).get("routing") or {}).get("specialisation") if ev.is_file() else None
    med = {k: statistics.median(d[k] for d in modules.values()) for k in ("cosine", "spread")}
    return {"run": run.name, "modules": len(modules), **med, "specialisation": spec,
            "per_block": {blk: {k: statistics.median(d[k] for d in ds) for k in ("cosine", "spread")}
                          for blk, ds in blocks.items()}}


def run_row(run: Path) -> dict | None:
    """run_diversity(run) where the run has its adapter, else the row kept beside an archived run
    (diversity.json, scripts/study_archive.py), else None."""
    if (run / "adapter" / "adapter_model.safetensors").is_file():
        return run_diversity(run)
    kept = run / "diversity.json"
    return json.loads(kept.read_text()) if kept.is_file() else None


def plot(rows: list[dict], path: Path) -> None:
    """Left: each run's spread (its specialisation written beside the bar); right: the spread per block."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 1.5 + 0.3 * len(rows)))
    names = [r["run"] for r in rows]
    colours = plt.get_cmap("tab20")(range(len(rows)))
    axes[0].barh(names, [r["spread"] for r in rows], color=colours)
    for i, r in enumerate(rows):
        if r["specialisation"] is not None:
            axes[0].text(r["spread"], i, f" spec {r['specialisation']:.3f}", va="center", fontsize=7)
    axes[0].set_xlabel("expert spread (median over modules; 0 = identical experts)")
    axes[0].set_xlim(0, max(r["spread"] for r in rows) * 1.3 or 1)
    axes[0].invert_yaxis()
    for r, c in zip(rows, colours):
        blocks = sorted((int(b), v["spread"]) for b, v in r["per_block"].items() if b.isdigit())
        axes[1].plot([b for b, _ in blocks], [v for _, v in blocks], label=r["run"], lw=1, color=c)
    axes[1].set_xlabel("transformer block")
    axes[1].set_ylabel("expert spread (median over the block's modules)")
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories with adapter/ (routed types) or an archived diversity.json")
    ap.add_argument("--json", type=Path, help="write every run's numbers here")
    ap.add_argument("--plot", type=Path, help="draw spread per run and per block here")
    args = ap.parse_args(argv)
    rows = [row for row in map(run_row, args.runs) if row is not None]
    print("| run | expert cosine | expert spread | specialisation |\n|---|---|---|---|")
    for r in rows:
        spec = "-" if r["specialisation"] is None else f"{r['specialisation']:.4f}"
        print(f"| {r['run']} | {r['cosine']:.3f} | {r['spread']:.3f} | {spec} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.plot and rows:
        plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
