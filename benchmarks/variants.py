"""`make bench-variants`: what the LoRA variants cost over plain LoRA (CPU or GPU), measured in one run.

rsLoRA (a different scale) and LoRA+ (a different learning rate for B) compute exactly what LoRA does,
so only DoRA (a dense W0 + s B A and its row norms every forward) and PiSSA/OLoRA (moetune computes
W0 x + s (B A - B0 A0) x: a second rank-r pass against the frozen init factors) are timed, against LoRA:
- layer: one frozen projection 576 -> 1536 (SmolLM2-135M's MLP up-projection), 2,048 tokens, rank 16;
- model: a whole training step of SmolLM2-135M-Instruct (every linear layer, rank 16), batch 8 x 32.
One step = forward + backward + AdamW step; methods interleaved round by round after warm-up, ratios =
median (quartiles) of the per-round ratios to LoRA's step (benchmarks/harness.py). Also timed once: how
long creating the adapter takes on the model (PiSSA: one SVD, OLoRA: one QR of every wrapped weight).
Results: a markdown table on stdout and benchmarks/results/variants.json.

    python benchmarks/variants.py [--rounds 8] [--layer-rounds 20] [--skip-model] [--shared]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn

import harness as H
from methods import build_model, shared_copy

from moetune.adapters.inject import inject, trainable_parameters
from moetune.experts.lora import LoRALayer
from moetune.recipe.experts import LoRAConfig

OUT = Path(__file__).parent / "results" / "variants.json"
VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "pissa": {"init": "pissa"}, "olora": {"init": "olora"}}


def _cfg(name: str, rank: int) -> LoRAConfig:
    return LoRAConfig(type="lora", rank=rank, alpha=2.0 * rank, **VARIANTS[name])


def layer_level(device, rank: int, warmup: int, rounds: int) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(576, 1536, bias=False).to(device).requires_grad_(False)
    x = torch.randn(2048, 576, device=device, requires_grad=True)
    steps = {}
    for name in VARIANTS:
        torch.manual_seed(0)
        layer = LoRALayer(base, _cfg(name, rank), name="mlp.up_proj").to(device)
        steps[name] = (lambda: None, H.make_step(list(layer.adapter_state().values()),
                                                 lambda layer=layer: layer(x).square().mean(), None, device, (x,)))
    H.warm_up(steps, device, warmup)
    return H.interleaved_times(steps, device, rounds)


def model_level(device, rank: int, warmup: int, rounds: int) -> tuple[dict, dict]:
    base, _ = build_model("smollm2-135m-instruct", device)
    ids = torch.randint(5, base.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0)).to(device)
    steps, create = {}, {}
    for name in VARIANTS:
        model = shared_copy(base)
        t = time.perf_counter()
        inject(model, _cfg(name, rank), seed=0)
        create[name] = time.perf_counter() - t
        model.train()
        steps[name] = (lambda: None, H.make_step(trainable_parameters(model),
                                                 lambda model=model: model(input_ids=ids, labels=ids).loss, None, device))
    H.warm_up(steps, device, warmup)
    return H.interleaved_times(steps, device, rounds), create


def table(times: dict) -> list[dict]:
    rows = []
    for name, ts in times.items():
        q1, med, q3 = H.paired_ratio(ts, times["lora"])
        rows.append({"method": name, "step_ms": 1000 * statistics.median(ts), "ratio_vs_lora": med,
                     "ratio_vs_lora_iqr": [q1, q3]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--layer-rounds", type=int, default=20)
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--shared", action="store_true", help="say in the output that the machine was shared")
    a = ap.parse_args()
    device = torch.device(a.device)
    t0 = time.time()
    out = {"date": date.today().isoformat(), "device": str(device), "cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "rank": a.rank, "shared_machine": a.shared,
           "layer": table(layer_level(device, a.rank, 3, a.layer_rounds))}
    if not a.skip_model:
        times, create = model_level(device, a.rank, 2, a.rounds)
        out["model"] = table(times)
        out["create_s"] = create
    out["wall_s"] = round(time.time() - t0, 1)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2))
    print("| level | method | step ms | vs LoRA [IQR] |\n|---|---|---:|---:|")
    for level in ("layer", "model"):
        for r in out.get(level, []):
            lo, hi = r["ratio_vs_lora_iqr"]
            print(f"| {level} | {r['method']} | {r['step_ms']:.1f} | {r['ratio_vs_lora']:.2f} [{lo:.2f}, {hi:.2f}] |")
    if "create_s" in out:
        print("adapter creation on the model (s): " + ", ".join(f"{k} {v:.2f}" for k, v in out["create_s"].items()))
    print(f"wall {out['wall_s']} s; {out['device']}, {out['threads']} threads, torch {out['torch']}"
          + (" (shared machine)" if a.shared else ""))


if __name__ == "__main__":
    main()
