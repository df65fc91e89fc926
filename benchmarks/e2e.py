"""End to end: one epoch of fine-tuning, moetune against TRL SFTTrainer + PEFT and transformers Trainer + PEFT.

    python benchmarks/e2e.py [--rows 160] [--rounds 2] [--precisions fp32 bf16] [--device cpu|cuda]
                             [--moetune-set data.packing=dataset ...] [--shared] [--results-md benchmarks/RESULTS.md]

`make bench-e2e` runs it with the defaults and writes the table into RESULTS.md.

**Work.** The same model (the built-in SmolLM2-135M-Instruct: moetune's resolver converts it once into
a local directory that TRL and transformers then load), the same rows (`e2e_data.py`: seeded
prompt-completion chat rows, short prompts, long-tailed answers), the same hyperparameters: one epoch
(`--epochs`), AdamW at `--lr` with a cosine schedule and no warmup, no weight decay, gradient norm
clipped to 1, LoRA rank 16 / alpha 32 / no dropout on every linear layer but the head, max_length 512,
loss on the completion tokens, seed 0, no gradient checkpointing, nothing saved mid-run. Each run is a
fresh process.

**Contenders**, each in its best packing:
- `moetune`: `moetune train` with `data.packing=true` (or whatever `--moetune-set` says), batch `--batch-size`
  examples (with `--moetune-set data.packing=dataset`, whose batch counts rows of max_length tokens: TRL's
  rows per step); bf16 = `model.dtype=bfloat16` and `train.precision=bf16` (bf16 autocast on CPU and GPU:
  matmuls forward and backward in bf16; adapter masters, optimizer state and the loss in float32).
- `moetune-hydralora`: the same with `expert.type=hydralora` (3 B heads of rank 16 on one shared A,
  soft router): what routing costs on the same work.
- `trl`: TRL 1.16 `SFTTrainer` + PEFT, `packing=True, packing_strategy="bfd"` (padding-free), completion-only
  loss. Its batch counts packed rows of max_length tokens, so `--trl-batch-size auto` takes
  round(batch_size x mean example tokens / max_length): about the tokens of one moetune step per step,
  about the same number of optimizer steps per epoch.
- `trainer`: transformers `Trainer` + PEFT with `DataCollatorWithFlattening` (padding-free), batch `--batch-size`.
- `trl-liger` (`--device cuda` only): `trl` with `use_liger_kernel=True`, when the `liger-kernel` package
  imports; otherwise it is skipped with a message.

**Timing.** After an untimed one-step moetune run (`--no-warmup` skips it) that fills the OS file cache
and moetune's tokenised-data cache, each tool's own training-loop clock (moetune: the seconds its final checkpoint records, i.e.
the steps, without writing that checkpoint and curves.png, which are kept as train_seconds_with_final_save;
TRL/Trainer: `train_runtime`), after model loading and tokenisation; the process wall time is recorded too. Rounds
alternate: every round runs every (precision, contender) once, the contender order rotated per round,
so the drift of a shared machine hits all. A ratio is the median over rounds of the per-round ratio
(a contender's seconds over moetune's in the same round and precision), with min and max.
Results: `--out` (JSON, every run with its per-step losses; results/e2e.json, or e2e_cuda.json on a GPU),
the same path with .md (the table), and with `--results-md` the device's block of RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from e2e_data import write_rows  # noqa: E402
from e2e_report import render_table, summarise, update_results_md  # noqa: E402

CONTENDERS = ("moetune", "moetune-hydralora", "trl", "trainer", "trl-liger")
PRECISIONS = ("fp32", "bf16")
OPTIONAL = ("trl-liger",)
"""Contenders whose failure (e.g. a kernel package that does not fit this transformers) drops them, not the run."""


class OptionalFailed(RuntimeError):
    """An optional contender's run failed; the message has its command and stderr."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=160, help="training rows (seeded chat set)")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2, help="rounds; each runs every (precision, contender) once")
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP/MKL threads of each run (CPU)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or local model directory")
    ap.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step (moetune, trainer)")
    ap.add_argument("--trl-batch-size", default="auto", help="packed rows per step for TRL ('auto': see above)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--moetune-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra moetune recipe override for both moetune contenders (repeatable), e.g. data.packing=dataset")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="skip the untimed one-step moetune run that first fills the OS file cache (model, libraries) "
                         "and moetune's tokenised-data cache, so the first timed run does not pay for them")
    ap.add_argument("--shared", action="store_true", help="record that the machine was shared during the run")
    ap.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/e2e.json, "
                    "e2e_cuda.json with --device cuda); the table goes beside it as .md")
    ap.add_argument("--results-md", default=None, help="also write the table into this RESULTS.md (between its e2e markers)")
    a = ap.parse_args(argv)
    a.out = a.out or str(ROOT / "benchmarks/results" / ("e2e.json" if a.device == "cpu" else "e2e_cuda.json"))
    if a.trl_batch_size != "auto" and not (a.trl_batch_size.isdigit() and int(a.trl_batch_size) >= 1):
        ap.error(f"--trl-batch-size {a.trl_batch_size!r}: allowed: 'auto' or a positive integer")
    bad = [s for s in a.moetune_set if "=" not in s or s.startswith("=")]
    if bad:
        ap.error(f"--moetune-set {bad[0]!r}: allowed: KEY=VALUE, e.g. data.packing=dataset")
    return a


def plan_runs(contenders: list[str], precisions: list[str], rounds: int) -> list[tuple[int, str, str]]:
    """(round, precision, contender) in run order: per round, each precision, the contenders rotated by the round."""
    out = []
    for r in range(rounds):
        order = contenders[r % len(contenders):] + contenders[: r % len(contenders)]
        out += [(r, p, c) for p in precisions for c in order]
    return out


def usable_contenders(a: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The contenders that can run here, and name -> why not for the others."""
    skipped = {}
    if "trl-liger" in a.contenders:
        if a.device != "cuda":
            skipped["trl-liger"] = "Liger's kernels are Triton GPU kernels: --device cuda only"
        elif find_spec("liger_kernel") is None:
            skipped["trl-liger"] = "the liger-kernel package is not installed (pip install liger-kernel)"
    if any(c.startswith("trl") for c in a.contenders) and find_spec("trl") is None:
        skipped.update({c: "TRL is not installed (pip install -e '.[dev]')" for c in a.contenders if c.startswith("trl")})
    return [c for c in a.contenders if c not in skipped], skipped


def token_budget_packing(moetune_set: list[str]) -> bool:
    """Whether the overrides turn on moetune's epoch-level packing (`data.packing=dataset`), whose batch counts
    rows of max_length tokens as TRL's does."""
    return any(s.replace(" ", "") == "data.packing=dataset" for s in moetune_set)


def moetune_batch(a, trl_batch: int) -> int:
    """moetune's train.batch_size: --batch-size examples, or with token-budget packing TRL's packed rows per step
    (an explicit --moetune-set train.batch_size=N still wins: the overrides come last)."""
    return trl_batch if token_budget_packing(a.moetune_set) else a.batch_size


def moetune_recipe(a, contender: str, precision: str, data: Path, cache: Path, out: Path, batch: int | None = None) -> dict:
    expert = {"type": "lora", "rank": a.rank, "alpha": 2 * a.rank, "dropout": 0.0, "target_modules": ["all-linear"]}
    if contender == "moetune-hydralora":
        expert.update(type="hydralora", num_experts=3)
    return {"model": {"path": a.model, "device": a.device, "dtype": "bfloat16" if precision == "bf16" else "float32"},
            "expert": expert,
            "data": {"train": str(data), "format": "prompt_completion", "validation": None, "validation_split": 0.0,
                     "test": None, "max_length": a.max_length, "packing": True, "cache_dir": str(cache), "seed": 0},
            "train": {"epochs": a.epochs, "batch_size": batch or a.batch_size, "lr": a.lr, "scheduler": "cosine",
                      "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "precision": precision,
                      "seed": 0, "log_every": 1, "save_every": 0, "eval_before": False},
            "output_dir": str(out), "stages": ["train"]}


def run_moetune(a, contender, precision, data, work, tag, env, batch, extra: tuple[str, ...] = ()) -> dict:
    import yaml
    out = work / f"run-{tag}"
    recipe = work / f"{tag}.yaml"
    recipe.write_text(yaml.safe_dump(moetune_recipe(a, contender, precision, data, work / "cache", out, batch)))
    cmd = [sys.executable, "-m", "moetune", "train", str(recipe), *a.moetune_set, *extra]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        print(f"\n{contender} {precision}: `{' '.join(cmd)}` exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}",
              file=sys.stderr)
        raise SystemExit(2 if p.returncode == 2 else 1)
    train = json.loads((out / "summary.json").read_text())["train"]
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    # the training loop's seconds up to the final checkpoint (its state.json): the steps, as Trainer's train_runtime;
    # summary.json's seconds add that checkpoint's writing and curves.png
    final = json.loads(sorted((out / "checkpoints").glob("step-*/state.json"))[-1].read_text())["position"]
    return {"train_seconds": final["seconds"], "train_seconds_with_final_save": train["seconds"],
            "process_seconds": round(wall, 3), "steps": train["steps"], "losses": losses,
            "final_loss": train["final_train_loss"], "data": train.get("data")}


def run_worker(a, contender, precision, data, work, tag, env, model_dir, trl_batch) -> dict:
    cuda_bf16 = a.device == "cuda" and precision == "bf16"
    spec = {"model": model_dir, "data": str(data), "device": a.device, "precision": precision,
            "batch_size": trl_batch if contender.startswith("trl") else a.batch_size, "lr": a.lr, "epochs": a.epochs,
            "rank": a.rank, "alpha": 2 * a.rank, "max_length": a.max_length, "seed": 0,
            "liger": contender == "trl-liger", "out_dir": str(work / f"run-{tag}"),
            "attn_implementation": "flash_attention_2" if cuda_bf16 and find_spec("flash_attn") else "sdpa"}
    (work / f"{tag}.spec.json").write_text(json.dumps(spec))
    kind = "trl" if contender.startswith("trl") else "trainer"
    cmd = [sys.executable, str(ROOT / "benchmarks/e2e_workers.py"), kind, str(work / f"{tag}.spec.json"), str(work / f"{tag}.out.json")]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        message = f"{contender} {precision}: `{' '.join(cmd)}` exited {p.returncode}:\n{p.stderr[-4000:]}"
        if contender in OPTIONAL:
            raise OptionalFailed(message)
        print("\n" + message, file=sys.stderr)
        raise SystemExit(1)
    out = json.loads((work / f"{tag}.out.json").read_text())
    return {**out, "process_seconds": round(wall, 3), "batch_size": spec["batch_size"],
            "attn_implementation": spec["attn_implementation"]}


def check_moetune_recipes(a, contenders: list[str], data: Path, work: Path, batch: int) -> None:
    """Load every moetune recipe with the --moetune-set overrides before anything runs: a bad override stops
    here with moetune's own message (exit 2), not after the other contenders' runs."""
    import yaml
    from moetune.core.errors import RecipeError
    from moetune.recipe import load_recipe
    for contender in (c for c in contenders if c.startswith("moetune")):
        for precision in a.precisions:
            path = work / f"check-{contender}-{precision}.yaml"
            path.write_text(yaml.safe_dump(moetune_recipe(a, contender, precision, data, work / "cache", work / "x", batch)))
            try:
                load_recipe(path, a.moetune_set)
            except RecipeError as e:
                print(f"--moetune-set {' '.join(a.moetune_set)}: {e}", file=sys.stderr)
                raise SystemExit(2) from None


def data_stats(model_dir: str, data: Path, max_length: int) -> dict:
    """Token lengths of the rows through the chat template (the layout every contender starts from)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    lengths = [min(max_length, len(tok.apply_chat_template(r["prompt"] + r["completion"], return_dict=False))) for r in rows]
    prompts = [len(tok.apply_chat_template(r["prompt"], add_generation_prompt=True, return_dict=False)) for r in rows]
    q = statistics.quantiles(lengths, n=10)
    return {"rows": len(rows), "tokens": sum(lengths), "mean": round(sum(lengths) / len(lengths), 1),
            "median": statistics.median(lengths), "p90": q[-1], "max": max(lengths), "min": min(lengths),
            "prompt_tokens_mean": round(sum(prompts) / len(prompts), 1),
            "cut_at_max_length": sum(len(tok.apply_chat_template(r["prompt"] + r["completion"], return_dict=False))
                                     > max_length for r in rows)}


def machine(device: str) -> str:
    import torch
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores"


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in ("torch", "transformers", "peft", "trl", "liger-kernel", "flash-attn"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _usage_error(message: str) -> None:
    print(message, file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            _usage_error("--device cuda: CUDA is not available on this machine; allowed here: --device cpu.")
    from moetune.models.load import resolve_path
    contenders, skipped = usable_contenders(a)
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", flush=True)
    if "moetune" not in contenders:
        _usage_error("--contenders must include moetune (the ratios are against it).")
    model_dir = resolve_path(a.model)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(a.device), "device": a.device,
           "threads": a.threads, "shared": a.shared, "load_avg_start": os.getloadavg(), "versions": versions(),
           "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
           "settings": {k: v for k, v in vars(a).items() if k not in ("out", "results_md")},
           "skipped": skipped, "runs": []}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moetune-e2e-") as d:
        work = Path(d)
        data = write_rows(work / "chat.jsonl", a.rows, a.data_seed)
        res["data"] = stats = data_stats(model_dir, data, a.max_length)
        trl_batch = (max(1, round(a.batch_size * stats["mean"] / a.max_length)) if a.trl_batch_size == "auto"
                     else int(a.trl_batch_size))
        res["trl_batch_size"] = trl_batch
        res["moetune_batch_size"] = batch = moetune_batch(a, trl_batch)
        if token_budget_packing(a.moetune_set):
            print(f"data.packing=dataset: moetune's batch is {batch} rows of {a.max_length} tokens, as TRL's", flush=True)
        check_moetune_recipes(a, contenders, data, work, batch)
        if a.warmup:
            print("warm-up (untimed): one moetune step ...", end=" ", flush=True)
            t = time.perf_counter()
            run_moetune(a, "moetune", a.precisions[0], data, work, "warmup", env, batch, ("train.max_steps=1",))
            res["warmup_seconds"] = round(time.perf_counter() - t, 1)
            print(f"{res['warmup_seconds']} s", flush=True)
        for i, (r, precision, contender) in enumerate(plan := plan_runs(contenders, a.precisions, a.rounds)):
            tag = f"{contender}-{precision}-{r}"
            if contender in skipped:
                continue
            print(f"[{i + 1}/{len(plan)}] round {r} {precision} {contender} ...", end=" ", flush=True)
            if contender.startswith("moetune"):
                run = run_moetune(a, contender, precision, data, work, tag, env, batch)
            else:
                try:
                    run = run_worker(a, contender, precision, data, work, tag, env, model_dir, trl_batch)
                except OptionalFailed as e:
                    print(f"failed; {contender} is dropped from the benchmark:\n{e}", flush=True)
                    skipped[contender] = f"its run failed: {str(e).strip().splitlines()[-1][:300]}"
                    res["runs"] = [x for x in res["runs"] if x["contender"] != contender]
                    continue
            res["runs"].append({"round": r, "precision": precision, "contender": contender, **run})
            print(f"{run['train_seconds']:.1f} s, {run['steps']} steps, final loss {run['final_loss']:.4f}", flush=True)
    res["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    res["load_avg_end"] = os.getloadavg()
    res["summary"] = summarise(res["runs"])
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    table = render_table(res)
    out.with_suffix(".md").write_text(table)
    if a.results_md:
        update_results_md(Path(a.results_md), table, a.device)
    print(table)


if __name__ == "__main__":
    main()
