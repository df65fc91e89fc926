"""Data pipeline at scale: time to the first training step and peak RSS, 10k vs 1M rows.

    python benchmarks/data_scale.py [--sizes 100 10000 1000000] [--rate-rows 20000] [--out FILE.json]

Generates seeded short instructions (8-40 words) as JSON lines, a random-init tiny Llama
with SmolLM2's tokenizer (chat template included), then runs `moetune train` as a fresh
process under /usr/bin/time (wall seconds, peak RSS) with one training step, no
validation and stages=[train]: its wall time bounds the time to the first step from above.
Each size runs twice: the first run tokenises and writes the cache, the second reuses it.
Also times the first tokenisation per row against the pipeline before the Arrow rewrite
(moetune/data.py at commit 2d35e01, read from git) on the same rows.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("alpha bright cold dark early fast green heavy icy jolly kind light merry noble open plain quick "
         "red soft tall upper vivid warm young zesty river stone cloud field garden window market letter "
         "number story music paper engine bridge island forest valley").split()
OLD_COMMIT = "2d35e01"


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    doms = ("copy", "count", "first", "reverse")
    with path.open("w") as f:
        for i in range(n):
            words = rng.choices(WORDS, k=rng.randint(8, 40))
            d = doms[i % 4]
            ans = {"copy": words[0], "count": str(len(words)), "first": words[0][0], "reverse": words[-1]}[d]
            f.write(json.dumps({"instruction": f"{d}: " + " ".join(words), "response": ans, "domain": d}) + "\n")


def tiny_model(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from moetune.models.load import cache_root
    tok = AutoTokenizer.from_pretrained(cache_root() / "models" / "smollm2-135m-instruct")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run_train(model: Path, data: Path, cache: Path, out: Path) -> dict:
    cmd = ["/usr/bin/time", "-f", "TIME %e %M", sys.executable, "-m", "moetune", "train", "recipes/default.yaml",
           f"model.path={model}", f"data.train={data}", "data.validation=null", "data.validation_split=0",
           "data.test=null", f"data.cache_dir={cache}", f"output_dir={out}", "stages=[train]",
           "train.max_steps=1", "train.eval_before=false", "train.batch_size=8", "model.device=cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    line = [x for x in p.stderr.splitlines() if x.startswith("TIME ")]
    if p.returncode or not line:
        raise SystemExit(f"train failed ({p.returncode}):\n{p.stderr[-3000:]}")
    wall, kb = line[-1].split()[1:]
    return {"wall_s": float(wall), "peak_rss_mib": round(int(kb) / 1024, 1)}


def old_rate(model: Path, data: Path) -> float:
    """Rows/s of the pre-Arrow `load_examples` (python lists, one row at a time)."""
    src = subprocess.run(["git", "show", f"{OLD_COMMIT}:moetune/data.py"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    old = {}
    exec(compile(src, "old_data.py", "exec"), old)  # the old module, run against today's DataConfig
    from moetune.models.load import load_tokenizer
    from moetune.recipe import ModelConfig, load_recipe
    tok = load_tokenizer(ModelConfig(path=str(model)), log=lambda *a, **k: None)
    cfg = load_recipe(ROOT / "recipes/default.yaml").data
    t = time.perf_counter()
    n = len(old["load_examples"](str(data), tok, cfg))
    return n / (time.perf_counter() - t)


def new_rate(model: Path, data: Path, cache: Path, num_proc: int | None) -> float:
    import dataclasses
    from moetune.data.pipeline import load_examples
    from moetune.models.load import load_tokenizer
    from moetune.recipe import ModelConfig, load_recipe
    tok = load_tokenizer(ModelConfig(path=str(model)), log=lambda *a, **k: None)
    cfg = dataclasses.replace(load_recipe(ROOT / "recipes/default.yaml").data, cache_dir=str(cache), num_proc=num_proc)
    t = time.perf_counter()
    n = len(load_examples(str(data), tok, cfg))
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="*", default=[100, 10_000, 1_000_000],
                    help="Row counts to run (100: the fixed cost of starting `moetune train`).")
    ap.add_argument("--rate-rows", type=int, default=20_000, help="Rows for the tokenisation rate (0: skip).")
    ap.add_argument("--rate-rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/data_scale.json"))
    a = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    sys.path.insert(0, str(ROOT))
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": platform.processor() or
                 platform.machine(), "cores": os.cpu_count(), "load_avg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        model = tiny_model(d / "model")
        rate_data = d / "rate.jsonl"
        write_rows(rate_data, a.rate_rows, seed=1)
        if a.rate_rows:  # alternating rounds, medians: the machine's load drifts between minutes
            runs: dict = {"old_pipeline": [], "new_1_proc": [], "new_2_procs": []}
            for r in range(a.rate_rounds):
                runs["old_pipeline"].append(old_rate(model, rate_data))
                runs["new_1_proc"].append(new_rate(model, rate_data, d / f"c1_{r}", 1))
                runs["new_2_procs"].append(new_rate(model, rate_data, d / f"c2_{r}", 2))
            res["tokenise_rows_per_s"] = {k: round(sorted(v)[len(v) // 2]) for k, v in runs.items()}
            res["tokenise_rows_per_s_rounds"] = {k: [round(x) for x in v] for k, v in runs.items()}
            print(json.dumps(res), flush=True)
        for n in a.sizes:
            data = d / f"rows{n}.jsonl"
            t = time.perf_counter()
            write_rows(data, n)
            res[f"generate_{n}_s"] = round(time.perf_counter() - t, 1)
            first = run_train(model, data, d / "cache", d / f"run{n}a")
            second = run_train(model, data, d / "cache", d / f"run{n}b")
            res[str(n)] = {"first_run": first, "second_run": second, "file_mib": round(data.stat().st_size / 2**20, 1)}
            print(json.dumps(res), flush=True)
    res["load_avg_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
