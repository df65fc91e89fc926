"""One epoch with token-budget packing (`data.packing: dataset`) vs unpacked vs per-batch packing, on
SmolLM2-135M-Instruct (issue 26, item 3).

    python benchmarks/packing_epoch.py [--rows 96] [--max-length 512] [--rounds 2] [--model smollm2-135m-instruct]
                                       [--dtype float32] [--out benchmarks/results/packing_epoch.json]

Data: `--rows` seeded chat rows with a short prompt and a long-tailed answer (Pareto word counts, as
issue 26's set), cut at `--max-length`. Every variant is one `moetune train` run of one epoch, LoRA
rank 16 on all linear layers, the same lr and seed. Unpacked and `packing: true` take 8 examples a step;
`packing: dataset` takes rows of max_length, as many per step as carry about the same number of real
tokens as 8 examples (round(8 * mean length / max_length), at least 1), so the three make a similar
number of updates per epoch. The time is summary.json's training seconds (no validation), the final
loss the last step's mean loss per target token. Variants alternate over `--rounds` rounds, so a shared
machine's drift spreads over all; the speed-up is the median over rounds of the per-round ratio.
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
WORDS = ("alpha bright cold dark early fast green heavy icy jolly kind light merry noble open plain quick red soft "
         "tall upper vivid warm young zesty river stone cloud field garden window market letter number story music "
         "paper engine bridge island forest valley").split()


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    """Short prompts, long-tailed answers: 5-40 prompt words, answers of 3 + Pareto(1.2) * 25 words."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            prompt = "Tell a story about " + " ".join(rng.choices(WORDS, k=rng.randint(5, 40)))
            answer = " ".join(rng.choices(WORDS, k=min(600, 3 + int(rng.paretovariate(1.2) * 25))))
            f.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": answer}]}) + "\n")


def one_run(a, data: Path, cache: Path, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "moetune", "train", "recipes/default.yaml", f"model.path={a.model}",
           f"model.dtype={a.dtype}", f"data.train={data}", "data.validation=null", "data.validation_split=0",
           "data.test=null", "data.system_prompt=null", f"data.cache_dir={cache}", f"data.max_length={a.max_length}",
           f"output_dir={out}", "stages=[train]", "train.max_steps=0", "train.epochs=1", "train.eval_before=false",
           "train.log_every=1", "train.save_every=0", "train.warmup_steps=0", "train.lr=1e-3", "model.device=cpu",
           *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(a.threads)}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"train failed:\n{p.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())["train"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    return {"seconds": summary["seconds"], "steps": summary["steps"], "final_loss": round(steps[-1]["loss"], 4),
            "mean_real_tokens": round(statistics.mean(r.get("real_tokens", float("nan")) for r in steps), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--variants", default="unpacked,true,dataset")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/packing_epoch.json"))
    a = ap.parse_args()
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": platform.processor() or
                 platform.machine(), "cores": os.cpu_count(), "threads": a.threads, "load_avg_start": os.getloadavg(),
                 "args": vars(a)}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        data = d / "chat.jsonl"
        write_rows(data, a.rows)
        # lengths as the pipeline tokenises them: one throwaway inspect builds the cache the runs reuse
        p = subprocess.run([sys.executable, "-m", "moetune", "data", "inspect", "recipes/default.yaml",
                            f"model.path={a.model}", f"data.train={data}", "data.validation=null",
                            "data.validation_split=0", "data.test=null", "data.system_prompt=null", "stages=[train]",
                            f"data.cache_dir={d / 'cache'}", f"data.max_length={a.max_length}", "--json",
                            "--examples", "0"], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        if p.returncode:
            raise SystemExit(f"data inspect failed:\n{p.stderr[-3000:]}")
        (split,) = [s for s in json.loads(p.stdout)["splits"] if s["split"] == "train"]
        res["data"] = {k: split[k] for k in ("rows", "tokens", "real_tokens")}
        rows_per_step = max(1, round(8 * split["tokens"]["mean"] / a.max_length))
        variants = {"unpacked": ["train.batch_size=8"], "true": ["train.batch_size=8", "data.packing=true"],
                    "dataset": [f"train.batch_size={rows_per_step}", "data.packing=dataset"]}
        variants = {k: v for k, v in variants.items() if k in a.variants.split(",")}
        res["variants"] = variants
        res["runs"] = {k: [] for k in variants}
        for r in range(a.rounds):
            names = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in names:
                run = one_run(a, data, d / "cache", d / f"{name}{r}", variants[name])
                res["runs"][name].append(run)
                print(name, r, run, flush=True)
    base = res["runs"].get("unpacked")
    if base:
        res["speedup_vs_unpacked"] = {k: round(statistics.median(b["seconds"] / x["seconds"] for b, x in zip(base, v)), 3)
                                      for k, v in res["runs"].items()}
    res["median_seconds"] = {k: statistics.median(x["seconds"] for x in v) for k, v in res["runs"].items()}
    res["load_avg_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res.get(k) for k in ("data", "median_seconds", "speedup_vs_unpacked")}, indent=1))


if __name__ == "__main__":
    main()
