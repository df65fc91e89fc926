"""`make bench-balance`: what `router.balance_scope: global` costs over `micro`, one training step, measured in one run.

The real training step (train/step.py's TrainStep for micro, train/global_balance.py's GlobalBalanceStep for
global) of HydraLoRA (4 experts, rank 6, switch balance 0.01 + z-loss 0.001) on SmolLM2-135M-Instruct, one
process, a global batch of 8 data/multidomain rows as 1 micro-batch of 8 (grad_accum 1) and as 2 of 4
(grad_accum 2). With grad_accum 1 the global scope adds only the load sums (2N + 2 numbers per routed
layer) and, with several processes, one all-reduce of them; with grad_accum M > 1 it adds a statistics pass,
one forward without gradients per micro-batch. Steps interleaved round by round after warm-up; ratios =
median (quartiles) of the per-round ratios to micro at the same grad_accum (benchmarks/harness.py).
Results: a markdown table on stdout and benchmarks/results/balance_scope.json.

    python benchmarks/balance_scope.py [--rounds 8] [--device cpu|cuda] [--layers N] [--shared]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

import harness as H
from methods import build_model, shared_copy

from moetune.adapters.inject import inject
from moetune.data.examples import take
from moetune.data.pipeline import load_examples
from moetune.models.layers import decoder_layers
from moetune.models.load import load_tokenizer
from moetune.recipe import load_recipe
from moetune.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results" / "balance_scope.json"
ROUTER = ["expert.type=hydralora", "expert.rank=6", "expert.alpha=12", "expert.num_experts=4", "expert.dropout=0.0",
          "router.balance_loss=switch", "router.balance_weight=0.01", "router.z_loss_weight=0.001"]
CASES = {"micro, accum 1": ("micro", 8, 1), "global, accum 1": ("global", 8, 1),
         "micro, accum 2": ("micro", 4, 2), "global, accum 2": ("global", 4, 2)}


def trainers(device: torch.device, tmp: Path, layers: int | None = None) -> tuple[dict, list]:
    """name -> (Trainer, rows of one global batch) over one shared frozen base (its first `layers` decoder
    blocks only, when given: the same widths, a shorter stack)."""
    from accelerate import Accelerator
    base, _ = build_model("smollm2-135m-instruct", device)
    if layers:
        _, blocks = decoder_layers(base)
        del blocks[layers:]
        base.config.num_hidden_layers = layers
    tok = load_tokenizer(load_recipe(ROOT / "recipes" / "default.yaml").model, log=lambda *a: None)
    acc = Accelerator(cpu=device.type == "cpu")
    out = {}
    rows = None
    for name, (scope, bs, accum) in CASES.items():
        recipe = load_recipe(ROOT / "recipes" / "default.yaml",
                             [*ROUTER, f"router.balance_scope={scope}", f"train.batch_size={bs}", f"train.grad_accum={accum}",
                              f"model.device={device.type}", f"output_dir={tmp / name}", "train.report_to=[]", "stages=[train]"])
        if rows is None:
            train = load_examples(str(ROOT / "data/multidomain/train.jsonl"), tok, recipe.data)
            rows = take(train, list(range(8)))
        model = shared_copy(base)
        inject(model, recipe.expert, recipe.router, seed=0)
        model.train()
        (tmp / name).mkdir(parents=True, exist_ok=True)
        out[name] = Trainer(recipe, model, tok, {"train": train, "validation": []}, acc, tmp / name)
    return out, rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N decoder blocks (a faster CPU run)")
    ap.add_argument("--shared", action="store_true", help="say in the output that the machine was shared")
    a = ap.parse_args()
    device = torch.device(a.device)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        runs, rows = trainers(device, Path(tmp), a.layers)
        steps = {}
        for name, tr in runs.items():
            micro = tr.plan.micro_batches(list(range(8)), 0)
            steps[name] = (lambda: None, lambda tr=tr, micro=micro: tr.train_step(0, rows, micro))
        H.warm_up(steps, device, a.warmup)
        times = H.interleaved_times(steps, device, a.rounds)
    table = []
    for name, ts in times.items():
        ref = times[name.replace("global", "micro")]
        q1, med, q3 = H.paired_ratio(ts, ref)
        table.append({"case": name, "step_ms": 1000 * statistics.median(ts), "ratio_vs_micro": med,
                      "ratio_vs_micro_iqr": [q1, q3]})
    out = {"date": date.today().isoformat(), "device": str(device), "cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "shared_machine": a.shared,
           "model": "smollm2-135m-instruct" + (f", first {a.layers} blocks" if a.layers else ""), "router": ROUTER, "global_batch": 8, "rounds": a.rounds, "steps": table,
           "wall_s": round(time.time() - t0, 1)}
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2))
    print("| case | step ms | vs micro at the same grad_accum [IQR] |\n|---|---:|---:|")
    for r in table:
        lo, hi = r["ratio_vs_micro_iqr"]
        print(f"| {r['case']} | {r['step_ms']:.0f} | {r['ratio_vs_micro']:.2f} [{lo:.2f}, {hi:.2f}] |")
    print(f"wall {out['wall_s']} s; {out['device']}, {out['threads']} threads, torch {out['torch']}"
          + (" (shared machine)" if a.shared else ""))


if __name__ == "__main__":
    main()
