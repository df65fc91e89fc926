"""Where a training step's time goes in fp32 and bf16 (issue 26, item 2): torch.profiler over a few steps of
SmolLM2-135M-Instruct with an adapter on every linear layer.

    python benchmarks/profile_bf16.py [--type lora] [--batch 4] [--seq 256] [--steps 2] [--modes fp32,bf16-base,bf16]
                                      [--out benchmarks/results/profile_bf16.md]

Modes: 'fp32' (float32 base, fp32 everything); 'bf16-base' (model.dtype=bfloat16 with train.precision=fp32:
the base in bf16, the adapter computed in fp32, x cast to fp32 in every delta: the path before issue 26);
'bf16' (model.dtype=bfloat16 with train.precision=bf16: the adapter matmuls autocast to bf16 from fp32
masters, forward and backward). One step = forward, the fp32 loss on the last half of each row, backward,
AdamW. The table lists each mode's ops by self CPU time (the top `--top`), and the forward / backward /
optimizer split from record_function ranges. Timings of a shared machine are only indicative; the split
and the op mix are what this is for.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from moetune.adapters.inject import inject, trainable_parameters
from moetune.experts import config_class
from moetune.models.load import load_model
from moetune.recipe import ModelConfig, RouterConfig
from moetune.train.loss import CausalLMLoss
from moetune.train.precision import compute_autocast

ROOT = Path(__file__).resolve().parents[1]


def build(mode: str, etype: str, rank: int):
    dtype = "float32" if mode == "fp32" else "bfloat16"
    model = load_model(ModelConfig(path="smollm2-135m-instruct", dtype=dtype, device="cpu"), torch.device("cpu"),
                       log=lambda *a, **k: None)
    kw = {"lora": dict(rank=rank, alpha=2 * rank)}.get(etype, dict(rank=rank // 4, alpha=rank // 2, num_experts=4))
    if etype == "mov":
        kw = dict(num_experts=4)
    inject(model, config_class(etype)(type=etype, target_modules=["all-linear"], **kw), RouterConfig(type="soft"))
    model.train()
    return model


def make_step(mode: str, etype: str, rank: int, batch: int, seq: int):
    """(step() -> loss, adapter params) of `mode` on a fresh model."""
    model = build(mode, etype, rank)
    lm = CausalLMLoss(model)
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (batch, seq), generator=g)   # (B, T)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    mask = torch.ones_like(ids)
    precision = "bf16" if mode == "bf16" else "fp32"

    def step():
        with record_function("forward"), compute_autocast(torch.device("cpu"), precision):
            s, n, aux = lm(ids, mask, labels)
            loss = s / n + sum(aux.values())
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step, params


def run_mode(mode: str, a) -> tuple[str, dict]:
    step, params = make_step(mode, a.type, a.rank, a.batch, a.seq)
    step()  # warm-up
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            step()
    wall = (time.perf_counter() - t0) / a.steps
    ev = prof.key_averages()
    ranges = {e.key: e.cpu_time_total / 1e3 / a.steps for e in ev if e.key in ("forward", "backward", "optimizer")}
    table = ev.table(sort_by="self_cpu_time_total", row_limit=a.top, max_name_column_width=48)
    dtypes = sorted({str(p.dtype) for p in params})
    return table, {"step_ms": round(wall * 1e3, 1), **{k: round(v, 1) for k, v in ranges.items()}, "adapter_dtypes": dtypes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--type", default="lora")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--modes", default="fp32,bf16-base,bf16")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/profile_bf16.md"))
    a = ap.parse_args()
    torch.manual_seed(0)
    head = (f"# Step profile, {a.type} rank {a.rank} on every linear layer of SmolLM2-135M-Instruct, batch {a.batch} x "
            f"{a.seq}, loss on the last half\n\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} "
            f"threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.1f} "
            "(shared machine: the split matters, not the absolute ms)\n")
    parts, summary = [head], []
    for mode in a.modes.split(","):
        table, s = run_mode(mode, a)
        summary.append(f"| {mode} | {s['step_ms']} | {s.get('forward', 0)} | {s.get('backward', 0)} | "
                       f"{s.get('optimizer', 0)} | {', '.join(s['adapter_dtypes'])} |")
        parts.append(f"\n## {mode}\n\n```\n{table}\n```\n")
        print(summary[-1], flush=True)
    top = ["\n| mode | step ms | forward ms | backward ms | optimizer ms | adapter params |", "|---|---:|---:|---:|---:|---|",
           *summary]
    text = parts[0] + "\n".join(top) + "\n" + "".join(parts[1:])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print("\n".join(top))


if __name__ == "__main__":
    main()
