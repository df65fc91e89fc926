"""`make bench-qlora`: what a 4-bit (QLoRA) base saves and costs on SmolLM2-135M-Instruct, measured in one run.

Bases of the built-in `smollm2-135m-instruct`, each with recipes/qlora.yaml's LoRA (rank 16 on every
linear layer) and its batch (8 rows x 96 tokens; loss on the last 18 tokens of each row):
- fp32: model.dtype float32, quantization none (the default recipe's base);
- bf16: model.dtype bfloat16 (weights and compute in bfloat16);
- nf4:  model.quantization nf4 with double quantisation (recipes/qlora.yaml), computing in float32 on
  CPU (model.dtype auto), bfloat16 on CUDA;
- nf4-bf16: the same 4-bit base computing in bfloat16 (model.dtype bfloat16).
Memory, one fresh process per base (`--worker BASE`, so that peak RSS is that base's alone):
- parameter bytes of the loaded base (`moetune.models.quant.loaded_bytes`: 4-bit codes, absmax scales and
  code books, and every float tensor), and for the layers bitsandbytes quantises, their bytes against
  the same layers in bfloat16 (the QLoRA target: <= 0.35x);
- RSS before loading (imports done), after loading + injecting, the peak during the training steps
  (VmHWM, reset after loading through /proc/self/clear_refs) and the peak of the whole process (VmHWM
  without reset: includes loading, where transformers reads the float checkpoint before quantising);
  on CUDA, torch's allocator peaks instead;
- `moetune validate`'s estimate for the same recipe (moetune.commands.validate.estimate: frozen weights, adapter
  train state, activations), against the measured parameter bytes and against the memory training adds
  (peak RSS during the steps - RSS before loading).
Step time (forward + backward + AdamW step, moetune's loss), all bases in one process, timed in
interleaved rounds (harness.interleaved_times); ratios to fp32 per round (median and quartiles).
Results: benchmarks/results/qlora_memory.{json,md}.

    python benchmarks/qlora_memory.py                     # CPU (what make bench-qlora runs)
    python benchmarks/qlora_memory.py --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

import harness as H

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results"
RECIPE = ROOT / "recipes" / "qlora.yaml"
BASES = {"fp32": ["model.quantization=none", "model.dtype=float32"],
         "bf16": ["model.quantization=none", "model.dtype=bfloat16"],
         "nf4": ["model.quantization=nf4", "model.dtype=auto"],
         "nf4-bf16": ["model.quantization=nf4", "model.dtype=bfloat16"]}
MIB = 2 ** 20


def _status(key: str) -> int:
    """Bytes of a /proc/self/status field (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")   # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _recipe(base: str, device: str):
    from moetune.recipe import load_recipe
    return load_recipe(RECIPE, [*BASES[base], f"model.device={device}", "stages=[train]"])


def _setup(base: str, device: torch.device, batch: int, seq: int):
    """(model with LoRA injected, step, trainable params, recipe) for one base: recipes/qlora.yaml's model and expert."""
    from moetune.adapters.inject import inject, trainable_parameters
    from moetune.train.loss import CausalLMLoss
    from moetune.models.load import load_model
    rc = _recipe(base, device.type)
    model = load_model(rc.model, device, log=lambda *a: None)
    inject(model, rc.expert, rc.router, seed=0)
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (batch, seq), generator=g).to(device)   # (B, T)
    labels = ids.clone()
    labels[:, : seq - 3 * seq // 16] = -100                                                   # loss on the last 18
    mask = torch.ones_like(ids)
    lm = CausalLMLoss(model)

    def loss_fn():
        loss_sum, count, aux = lm(ids, mask, labels)
        return loss_sum / count + sum(aux.values())
    params = trainable_parameters(model)
    return model, H.make_step(params, loss_fn, None, device), params, rc


def worker(base: str, device: torch.device, batch: int, seq: int, steps: int) -> dict:
    """Memory of one base in this (fresh) process."""
    import bitsandbytes  # noqa: F401  (imported before the baseline, like transformers and moetune)
    from transformers import AutoModelForCausalLM  # noqa: F401

    from moetune.train import loss  # noqa: F401
    from moetune.models import load, quant
    from moetune.models.quant import is_4bit, loaded_bytes, quantizable
    from moetune.commands.validate import estimate
    rss0 = _status("VmRSS")
    t0 = time.perf_counter()
    model, step, params, rc = _setup(base, device, batch, seq)
    load_s = time.perf_counter() - t0
    rss_loaded, hwm_load = _status("VmRSS"), _status("VmHWM")
    reset = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step()                                                   # first step: AdamW state exists afterwards
    tensor_peak = H.step_peak_bytes(step, device, H.resident_tensors([model], [], step))
    for _ in range(max(steps - 2, 0)):
        step()
    hwm_train = _status("VmHWM")
    got = loaded_bytes(model)
    if rc.model.quantization != "none":                      # the Linear4bit layers: codes, scales, code books
        four = [m for m in model.modules() if is_4bit(m)]
        q_bytes, q_params = got["quantized"], sum(m.in_features * m.out_features for m in four)
    else:                                                    # the same layers in this float base
        float_lin = [m for m in quantizable(model) if not m.weight.requires_grad]
        q_bytes = sum(m.weight.numel() * m.weight.element_size() for m in float_lin)
        q_params = sum(m.weight.numel() for m in float_lin)
    est = estimate(rc)["memory"]
    frozen = got["quantized"] + got["float"] - sum(p.numel() * p.element_size() for p in params)
    added_rss = (hwm_train if reset else max(hwm_train, hwm_load)) - rss0
    res = {"base": base, "quantization": rc.model.quantization, "dtype": rc.model.dtype,
           "compute_dtype": str(model.get_input_embeddings().weight.dtype).replace("torch.", ""),
           "load_s": round(load_s, 2), "param_bytes": got["quantized"] + got["float"], "frozen_bytes": frozen,
           "linear_params": q_params, "linear_bytes": q_bytes, "linear_bytes_vs_bf16": round(q_bytes / (2 * q_params), 4),
           "step_tensor_peak_bytes": tensor_peak,
           "rss": {"before_load": rss0, "after_load": rss_loaded, "peak_during_load": hwm_load,
                   "peak_during_steps": hwm_train if reset else None, "added_by_training": added_rss},
           "validate": est, "validate_total": sum(est.values()),
           "validate_frozen_vs_measured": round(est["frozen_weights"] / frozen, 4),
           "validate_total_vs_tensor_peak": round(sum(est.values()) / tensor_peak, 3),
           "validate_total_vs_rss": round(sum(est.values()) / added_rss, 3), "steps": steps}
    if device.type == "cuda":
        res["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(device)
    return res


def timing(device: torch.device, batch: int, seq: int, rounds: int) -> dict:
    """Step seconds of every base, interleaved round by round in this process."""
    entries, names = {}, list(BASES)
    for base in names:
        _, step, _, _ = _setup(base, device, batch, seq)
        entries[base] = (lambda: None, step)
    H.warm_up(entries, device, 1)
    times = H.interleaved_times(entries, device, rounds)
    out = {}
    for base in names:
        q1, med, q3 = H.paired_ratio(times[base], times["fp32"])
        out[base] = {"step_s": round(sorted(times[base])[len(times[base]) // 2], 3), "times": [round(t, 3) for t in times[base]],
                     "vs_fp32": round(med, 3), "vs_fp32_iqr": [round(q1, 3), round(q3, 3)],
                     "tokens_per_s": round(batch * seq / sorted(times[base])[len(times[base]) // 2], 1)}
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


def markdown(report: dict) -> str:
    mem, t = report["memory"], report["timing"]
    shared = (" The machine was shared with other jobs: step times drift between minutes; the per-round ratios "
              "are the steadier figure." if report["shared"] else "")
    out = [f"# QLoRA memory and step time: SmolLM2-135M-Instruct ({report['device']}, {report['date']})", "",
           f"LoRA rank 16 on every linear layer, batch {report['batch']} x {report['seq']} (loss on the last "
           f"{3 * report['seq'] // 16} tokens of each row); torch {report['torch']}, bitsandbytes "
           f"{report['bitsandbytes']}.{shared}", "",
           "| base | compute | params MiB | the quantisable linears MiB (vs bf16) | step tensor peak MiB | "
           "validate MiB (/ tensor peak) | peak RSS in steps MiB (added) | RSS after load MiB | load s | step s | "
           "vs fp32 [IQR] |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for base, m in mem.items():
        r, tb = m["rss"], t.get(base, {})
        steps = f"{r['peak_during_steps'] / MIB:.0f}" if r["peak_during_steps"] else "-"
        out.append(f"| {base} | {m['compute_dtype']} | {m['param_bytes'] / MIB:.1f} | {m['linear_bytes'] / MIB:.1f} "
                   f"({m['linear_bytes_vs_bf16']:.3f}x) | {m['step_tensor_peak_bytes'] / MIB:.0f} | "
                   f"{m['validate_total'] / MIB:.0f} ({m['validate_total_vs_tensor_peak']:.2f}) | {steps} "
                   f"({r['added_by_training'] / MIB:.0f}) | {r['after_load'] / MIB:.0f} | {m['load_s']} | "
                   f"{tb.get('step_s', '-')} | {tb.get('vs_fp32', '-')} {tb.get('vs_fp32_iqr', '')} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--steps", type=int, default=3, help="training steps of each memory worker")
    ap.add_argument("--rounds", type=int, default=6, help="timed rounds of the step-time comparison")
    ap.add_argument("--shared", action="store_true", help="note in the report that the machine was shared")
    ap.add_argument("--worker", choices=list(BASES), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    args.out = args.out.resolve()
    os.chdir(ROOT)                                           # the recipe names its data relative to the repository
    device = torch.device(args.device)
    if args.worker:
        print(json.dumps(worker(args.worker, device, args.batch, args.seq, args.steps)))
        return
    memory = {}
    for base in BASES:  # one fresh process each: its peak RSS is that base's alone
        proc = subprocess.run([sys.executable, __file__, "--worker", base, "--device", args.device, "--batch",
                               str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)],
                              capture_output=True, text=True, env={**os.environ}, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"worker {base} failed:\n{proc.stderr[-3000:]}")
        memory[base] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{base}: {json.dumps(memory[base])}", flush=True)
    import bitsandbytes
    report = {"device": _device_name(device), "date": date.today().isoformat(), "torch": torch.__version__,
              "bitsandbytes": bitsandbytes.__version__, "batch": args.batch, "seq": args.seq, "shared": args.shared,
              "memory": memory, "timing": timing(device, args.batch, args.seq, args.rounds)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "qlora_memory.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (args.out / "qlora_memory.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
