"""Tokens per second with packing vs without (and with length grouping), at equal examples seen.

    python benchmarks/packing_speed.py [--rows 512] [--steps 12] [--rounds 2] [--out benchmarks/results/packing.json]

Data: seeded instructions whose rendered length spreads over about 20 to 512 tokens, short
answers. Model: a random-init Llama (hidden 128, 4 layers) with SmolLM2's tokenizer, LoRA
rank 16 on every linear layer, batch 8, data.max_length 512. Each variant is one
`moetune train ... stages=[train]` run of `--steps` steps; the variants see the same
examples in the same order (packing changes only how a micro-batch is laid out; length
grouping changes the order, not the examples of an epoch). tokens/s = real (non-padding)
tokens / training time, taken from metrics.jsonl with the first step left out as warm-up.
Variants alternate over `--rounds` rounds to spread the drift of a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from data_scale import WORDS, tiny_model  # noqa: E402

VARIANTS = {"unpacked": [], "group_by_length": ["data.group_by_length=true"], "packed": ["data.packing=true"]}


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            words = rng.choices(WORDS, k=rng.randint(1, 440))
            f.write(json.dumps({"instruction": "Repeat the last word: " + " ".join(words),
                                "response": words[-1], "domain": "d"}) + "\n")


def one_run(model: Path, data: Path, cache: Path, out: Path, steps: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "moetune", "train", "recipes/default.yaml", f"model.path={model}",
           f"data.train={data}", "data.validation=null", "data.validation_split=0", "data.test=null",
           f"data.cache_dir={cache}", "data.max_length=512", f"output_dir={out}", "stages=[train]",
           f"train.max_steps={steps}", "train.eval_before=false", "train.batch_size=8", "train.log_every=1",
           "train.save_every=0", "model.device=cpu", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"train failed:\n{p.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in rows if "tokens_per_s" in r][1:]  # first step: warm-up
    return {"tokens_per_s_by_step": [r["tokens_per_s"] for r in steps_],
            "final_loss": rows[-1].get("loss")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/packing.json"))
    a = ap.parse_args()
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": platform.machine(),
                 "cores": os.cpu_count(), "load_avg_start": os.getloadavg(), "runs": {k: [] for k in VARIANTS}}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        model = tiny_model(d / "model")
        data = d / "var.jsonl"
        write_rows(data, a.rows)
        for r in range(a.rounds):
            for name, extra in VARIANTS.items():
                run = one_run(model, data, d / "cache", d / f"{name}{r}", a.steps, extra)
                res["runs"][name].append(run)
                print(name, r, statistics.median(run["tokens_per_s_by_step"]), flush=True)
        from datasets import load_from_disk
        ds = load_from_disk(str(next((d / "cache").iterdir()) / "data"))
        lengths = ds["length"][:]
        res["data"] = {"rows": len(lengths), "min_tokens": min(lengths), "max_tokens": max(lengths),
                       "mean_tokens": round(sum(lengths) / len(lengths), 1)}
    med = {k: statistics.median(t for run in v for t in run["tokens_per_s_by_step"]) for k, v in res["runs"].items()}
    res["median_tokens_per_s"] = {k: round(v, 1) for k, v in med.items()}
    res["speedup_vs_unpacked"] = {k: round(v / med["unpacked"], 2) for k, v in med.items()}
    res["load_avg_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("data", "median_tokens_per_s", "speedup_vs_unpacked")}, indent=1))


if __name__ == "__main__":
    main()
