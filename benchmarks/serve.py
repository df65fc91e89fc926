"""`make bench-serve`: `moetune serve` under 1, 4 and 16 concurrent clients on localhost, per expert type.

For each served run (by default tiny-step runs of the shipped recipes it trains itself: lora, hydralora,
molora, mov, mole on SmolLM2-135M-Instruct) it measures, with real HTTP clients streaming from a real
server process:
- output tokens/s (all clients' generated tokens over the wall time of the batch of requests),
- p50 / p95 latency per request, and time to first token (TTFT: the first chunk with text),
for `--concurrency` clients (1, 4, 16): each client sends its next request as soon as its last one ends.
Baselines, for the same requests: the server with ONE client ("one at a time"), and a plain transformers
`generate` loop, one request after the other, in this process (greedy, `min_new_tokens` = max_tokens).
Every request decodes exactly `--max-tokens` tokens (`ignore_eos`), greedy, so rates compare equal work.

Rounds: every (type, mode) measurement is repeated `--rounds` times, types and modes in a rotated order
each round; ratios (16 clients / one at a time, 16 clients / generate loop, a routed type / LoRA at the
same concurrency) are taken within a round and the median over rounds is reported, which cancels most
of a shared machine's drift. Results: a markdown table on stdout and benchmarks/results/serve.json.

    python benchmarks/serve.py [--types lora hydralora molora mov mole] [--runs RUN ...] [--device cpu|cuda]
                               [--concurrency 1 4 16] [--requests 16] [--max-tokens 48] [--rounds 2]
                               [--workdir DIR] [--threads N] [--shared] [--out FILE]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "serve.json"
TRAIN = ["train.max_steps=2", "train.warmup_steps=0", "train.eval_every=0", "train.save_every=0",
         "train.eval_before=false", "stages=[train]"]
EXTRA = {"mole": ["expert.expert_max_steps=2"]}
RECIPE = {"lora": "default"}                        # recipes/<type>.yaml otherwise


def make_runs(types: list[str], work: Path, device: str) -> list[Path]:
    """A run per type from recipes/<type>.yaml, trained 2 steps (kept in `work`; an existing run is reused)."""
    runs = []
    for t in types:
        out = work / t
        if not (out / "adapter" / "adapter_model.safetensors").is_file():
            print(f"training a 2-step {t} run in {out}", flush=True)
            subprocess.run([sys.executable, "-m", "moetune", "train", str(ROOT / "recipes" / f"{RECIPE.get(t, t)}.yaml"), *TRAIN,
                            *EXTRA.get(t, []), f"output_dir={out}", f"model.device={device}", "--overwrite"],
                           check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        runs.append(out)
    return runs


def start_server(runs: list[Path], device: str, max_batch: int, max_tokens: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "moetune", "serve", *map(str, runs), "--port", "0", "--device",
                             device, "--max-batch", str(max_batch), "--max-tokens-limit", str(max_tokens)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    for line in proc.stdout:
        print("  server:", line.rstrip(), flush=True)
        if "listening on http://" in line:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, line.split("listening on http://", 1)[1].split()[0]
    raise RuntimeError("moetune serve did not start")


def one_request(addr: str, model: str, prompt: str, max_tokens: int) -> dict:
    """Stream one chat completion; {'latency', 'ttft', 'tokens'} as the client sees them."""
    host, port = addr.rsplit(":", 1)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                       "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    ttft, tokens = None, 0
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            ttft = time.perf_counter() - t0
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    conn.close()
    return {"latency": time.perf_counter() - t0, "ttft": ttft, "tokens": tokens}


def serve_mode(addr: str, model: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    todo = list(enumerate(prompts))
    lock = threading.Lock()
    results: list[dict] = []

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                _, p = todo.pop(0)
            r = one_request(addr, model, p, max_tokens)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    return summarise(results, wall)


def generate_loop(served, prompts: list[str], max_tokens: int) -> dict:
    """A plain transformers `generate` per request (batch 1, greedy), one after the other."""
    from moetune.eval.evaluate import generate_ids
    results = []
    t0 = time.perf_counter()
    for p in prompts:
        ids = torch.tensor([served.encoder.prompt_ids([{"role": "user", "content": p}])])
        t = time.perf_counter()
        with torch.inference_mode():
            out = generate_ids(served.model, ids, torch.ones_like(ids), served.device, do_sample=False,
                               max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                               pad_token_id=served.tokenizer.pad_token_id)
        results.append({"latency": time.perf_counter() - t, "ttft": None, "tokens": out.shape[1] - ids.shape[1]})
    return summarise(results, time.perf_counter() - t0)


def summarise(results: list[dict], wall: float) -> dict:
    lat = sorted(r["latency"] for r in results)
    ttft = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    q = lambda xs, f: xs[min(len(xs) - 1, int(round(f * (len(xs) - 1))))] if xs else None  # noqa: E731
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "p50_s": q(lat, 0.5), "p95_s": q(lat, 0.95), "ttft_p50_s": q(ttft, 0.5), "ttft_p95_s": q(ttft, 0.95)}


def prompts_of(n: int) -> list[str]:
    rows = [json.loads(x) for x in (ROOT / "data" / "default" / "test.jsonl").read_text().splitlines()]
    return [r["instruction"] for r in rows[:n]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=["lora", "hydralora", "molora", "mov", "mole"])
    ap.add_argument("--runs", nargs="+", type=Path, help="serve these run directories instead of training runs")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=16, help="requests per measurement with several clients")
    ap.add_argument("--sequential-requests", type=int, default=8,
                    help="requests for one client and the generate loop (they take longest)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", type=Path, help="where the 2-step runs are trained and kept (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the server, the training runs and the "
                    "generate loop (0: torch's default; 1 keeps a shared machine from oversubscribing its cores)")
    ap.add_argument("--shared", action="store_true", help="note in the results that the machine was shared")
    ap.add_argument("--out", type=Path, default=OUT, help=f"results JSON (default {OUT.relative_to(ROOT)}; give a "
                    "smoke run its own file)")
    args = ap.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)                 # the server and training subprocesses
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available here")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="moetune-bench-serve-"))
    runs = args.runs or make_runs(args.types, work, args.device)
    names = [r.resolve().name for r in runs]
    from moetune.serve.loading import load_served
    served = load_served(runs, device=args.device, log=lambda m: None)
    proc, addr = start_server(runs, args.device, max(args.concurrency), args.max_tokens)
    many, few = prompts_of(args.requests), prompts_of(args.sequential_requests)
    modes = ["generate"] + [f"serve-{c}" for c in args.concurrency]
    rounds: list[dict] = []
    t_start = time.time()
    try:
        one_request(addr, names[0], many[0], 4)                              # warm-up
        generate_loop(served[names[0]], few[:1], 4)
        for r in range(args.rounds):
            got: dict = {}
            order = names[r % len(names):] + names[:r % len(names)]
            for i, name in enumerate(order):
                for mode in modes[(r + i) % len(modes):] + modes[:(r + i) % len(modes)]:
                    if mode == "generate":
                        res = generate_loop(served[name], few, args.max_tokens)
                    else:
                        c = int(mode.split("-")[1])
                        res = serve_mode(addr, name, few if c == 1 else many, c, args.max_tokens)
                    got.setdefault(name, {})[mode] = res
                    print(f"round {r + 1} {name:10s} {mode:9s} {res['tok_s']:8.1f} tok/s  p50 {res['p50_s']:.2f}s",
                          flush=True)
            rounds.append(got)
    finally:
        proc.terminate()
        proc.wait(60)
    report(args, names, modes, rounds, time.time() - t_start)


def report(args, names: list[str], modes: list[str], rounds: list[dict], wall: float) -> None:
    med = statistics.median
    top = f"serve-{max(args.concurrency)}"
    rows = []
    for name in names:
        for mode in modes:
            rs = [rd[name][mode] for rd in rounds]
            row = {"run": name, "mode": mode, **{k: med([x[k] for x in rs]) if rs[0][k] is not None else None
                                                for k in ("tok_s", "p50_s", "p95_s", "ttft_p50_s", "ttft_p95_s")}}
            row["vs_one_at_a_time"] = med([rd[name][mode]["tok_s"] / rd[name]["serve-1"]["tok_s"] for rd in rounds]) \
                if "serve-1" in modes else None
            row["vs_generate_loop"] = med([rd[name][mode]["tok_s"] / rd[name]["generate"]["tok_s"] for rd in rounds])
            row["vs_lora_same_mode"] = med([rd[name][mode]["tok_s"] / rd[names[0]][mode]["tok_s"] for rd in rounds])
            rows.append(row)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU {platform.machine()}"
    meta = {"date": date.today().isoformat(), "device": device, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "shared_machine": args.shared,
            "max_tokens": args.max_tokens, "requests": args.requests, "sequential_requests": args.sequential_requests,
            "rounds": args.rounds, "wall_s": wall, "top_concurrency": top, "baseline_run": names[0]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "rounds": rounds}, indent=2))
    fmt = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    print(f"\n{meta['date']}, {device}, {meta['threads']} threads, torch {meta['torch']}"
          f"{', shared machine' if args.shared else ''}; {args.max_tokens} tokens per request, median of "
          f"{args.rounds} rounds; vs LoRA: this type's tok/s over {names[0]}'s in the same mode\n")
    print("| run | mode | tok/s | p50 s | p95 s | TTFT p50 s | TTFT p95 s | vs one at a time | vs generate loop "
          f"| vs {names[0]} |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['mode']} | {fmt(r['tok_s'], 1)} | {fmt(r['p50_s'])} | {fmt(r['p95_s'])} | "
              f"{fmt(r['ttft_p50_s'])} | {fmt(r['ttft_p95_s'])} | {fmt(r['vs_one_at_a_time'])} | "
              f"{fmt(r['vs_generate_loop'])} | {fmt(r['vs_lora_same_mode'])} |")
    print(f"\n-> {args.out}")


if __name__ == "__main__":
    main()
