"""bf16 vs fp32 training step on SmolLM2-135M-Instruct (issue 26, item 2), alternating rounds.

    python benchmarks/bf16_step.py [--types lora,hydralora] [--batch 4] [--seq 256] [--rounds 5] [--threads 2]
                                   [--out benchmarks/results/bf16_step.json]

Per type, three models of the same adapter: 'fp32' (float32 base, no autocast), 'bf16-base' (model.dtype=
bfloat16 with train.precision=fp32: float32 adapter matmuls, the path before issue 26) and 'bf16'
(model.dtype=bfloat16, train.precision=bf16: autocast, bf16 backward). One step = forward, float32 loss on
the last half of each row, backward, AdamW (benchmarks/profile_bf16.py's step). Each round times one step
of each mode, the order rotated; a ratio is the median over rounds of the per-round ratio, so the drift of
a shared machine cancels within a round. Records the load average: on a shared machine only ratios count.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from profile_bf16 import make_step  # noqa: E402

MODES = ("fp32", "bf16-base", "bf16")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="lora,hydralora")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/bf16_step.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
                 "cores": os.cpu_count(), "threads": a.threads, "torch": torch.__version__,
                 "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                 "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                 "load_avg_start": os.getloadavg(), "args": vars(a), "types": {}}
    for etype in a.types.split(","):
        steps = {m: make_step(m, etype, a.rank, a.batch, a.seq)[0] for m in MODES}
        for s in steps.values():
            s()                                               # warm-up
        times: dict[str, list[float]] = {m: [] for m in MODES}
        for r in range(a.rounds):
            order = MODES[r % 3:] + MODES[:r % 3]
            for m in order:
                t0 = time.perf_counter()
                steps[m]()
                times[m].append(time.perf_counter() - t0)
            print(etype, r, {m: round(times[m][-1], 2) for m in MODES}, flush=True)
        ratio = lambda m: [f / x for f, x in zip(times["fp32"], times[m])]  # noqa: E731
        res["types"][etype] = {
            "step_s": {m: [round(t, 3) for t in v] for m, v in times.items()},
            "median_step_s": {m: round(statistics.median(v), 3) for m, v in times.items()},
            "speedup_vs_fp32": {m: round(statistics.median(ratio(m)), 3) for m in MODES},
            "speedup_iqr": {m: [round(q, 3) for q in statistics.quantiles(ratio(m), n=4)[::2]] for m in MODES}
            if a.rounds >= 2 else None}
        print(etype, res["types"][etype]["speedup_vs_fp32"], flush=True)
        del steps
    res["load_avg_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v["speedup_vs_fp32"] for k, v in res["types"].items()}, indent=1))


if __name__ == "__main__":
    main()
