"""`make bench-gpu`: training throughput at GPU scale, moetune against transformers Trainer + PEFT, in one run.

Randomly initialised Qwen2-0.5B-, SmolLM2-1.7B- and Llama-3-8B-shaped models (bf16 weights, sequence
2048, loss on every token as in packed pre-training-style batches). For each shape, one training
step (forward + backward + AdamW step) of:
- moetune LoRA, HydraLoRA, MoLoRA soft, MoLoRA top-2, MoV, MoLE (benchmarks/methods.py, equal
  total rank R = 16 and 4 experts, every linear layer), interleaved round by round (harness.py);
- QLoRA (NF4 base, bitsandbytes, computing in bf16) LoRA and HydraLoRA on the same shape (skipped
  with the reason where bitsandbytes cannot run 4-bit), timed in their own rounds;
- the reference stack: transformers `Trainer` + PEFT LoRA rank 16 on the same batch (its own
  training loop; step time from a callback around each optimizer step);
each without and with activation checkpointing (moetune: `train.gradient_checkpointing`, i.e.
moetune.train.activation_checkpointing; Trainer: `gradient_checkpointing=True`, non-reentrant). Packing is not a
separate axis here (rows are full 2048-token sequences already).
Reported per method: median step time, tokens/s, MFU (model FLOPs of one moetune-LoRA step counted
by torch's FlopCounterMode, over the GPU's dense bf16 peak; or --peak-tflops), peak memory of a
step (harness.step_peak_bytes), and ratios to moetune LoRA and to Trainer + PEFT. Ratios are only
meaningful within one run. Results: benchmarks/results/gpu.json and gpu.md (--smoke: gpu_smoke.*).

    python benchmarks/gpu.py                      # CUDA: all three shapes
    python benchmarks/gpu.py --shapes qwen2-0.5b-shape --steps 5
    python benchmarks/gpu.py --smoke              # tiny shapes on CPU (what the test runs)
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

import harness as H
from bench import _device_name
from methods import (SHAPES, build_model, install, methods, mole_method, randomise, shared_copy, uninstall,
                     write_lora_experts)
from moetune.adapters.inject import expert_layers, inject
from moetune.train.activation_checkpointing import disable_checkpointing, enable_checkpointing
from moetune.train.loss import CausalLMLoss

SHAPES.setdefault("smollm2-1.7b-shape", ("llama", dict(  # SmolLM2-1.7B: 24 layers, hidden 2048, 32 heads (MHA)
    vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=8192, rope_theta=130000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True)))
DEFAULT_SHAPES = ["qwen2-0.5b-shape", "smollm2-1.7b-shape", "llama-8b-shape"]
BATCH = {"qwen2-0.5b-shape": 4, "smollm2-1.7b-shape": 2, "llama-8b-shape": 1}
RESULTS = Path(__file__).parent / "results"


def _batch(vocab: int, batch: int, seq: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(10, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)  # (B, T)
    return ids, torch.ones_like(ids), ids.clone()


def _toggle(model, ckpt: bool) -> None:
    (enable_checkpointing if ckpt else disable_checkpointing)(model)


def moetune_entries(model, ids, mask, labels, device, rank: int, n: int, tmp: str, keys=None) -> dict:
    """name -> (install, step, resident, trainable) for every moetune method, each with and without checkpointing."""
    sets = {}
    for key, m in methods(rank, n, ["all-linear"]).items():
        if keys is None or key in keys:
            sets[key] = inject(model, m.expert, m.router)
            if key != "moetune_lora":
                for layer in sets[key].values():
                    randomise(layer)
            uninstall(model, sets[key])
    if keys is None or "mole" in keys:
        mole = mole_method(write_lora_experts(model, rank, n, ["all-linear"], tmp))
        sets["mole"] = inject(model, mole.expert, mole.router)
        uninstall(model, sets["mole"])
    model.train()
    lm = CausalLMLoss(model)

    def loss_fn():
        s, c, aux = lm(ids, mask, labels)
        return s / c + sum(aux.values())
    out = {}
    for key, layer_set in sets.items():
        params = [p for layer in layer_set.values() for p in layer.adapter_state().values()]
        step = H.make_step(params, loss_fn, None, device)
        for ckpt in (False, True):
            out[key + ("+ckpt" if ckpt else "")] = (
                lambda s=layer_set, c=ckpt: (install(model, s), _toggle(model, c)), step,
                lambda s=step: H.resident_tensors([model], [ids, mask, labels], s), sum(p.numel() for p in params))
    return out


def measure(entries: dict, device, warmup: int, rounds: int) -> dict:
    """Median step seconds and peak bytes per entry (interleaved rounds); failures keep their reason."""
    steps = {k: (v[0], v[1]) for k, v in entries.items()}
    failed = H.warm_up(steps, device, warmup)
    times = H.interleaved_times(steps, device, rounds)
    res = {k: {"error": why} for k, why in failed.items()}
    for k, ts in times.items():
        install, step, resident, n = entries[k]
        install()
        res[k] = {"step_s": statistics.median(ts), "times": ts, "peak_bytes": H.step_peak_bytes(step, device, resident()),
                  "trainable": n}
    return res


def qlora_entries(name: str, device, args, ids, mask, labels) -> tuple[dict, str | None]:
    """QLoRA (NF4 base, computing in the shape's dtype) LoRA and HydraLoRA; ({}, reason) where 4-bit cannot run."""
    from moetune.core.errors import RecipeError
    from moetune.models.load import load_model
    from moetune.recipe import ModelConfig
    model, dtype = build_model(name, device, args.smoke, args.layers)
    with tempfile.TemporaryDirectory() as d:  # random bf16 weights -> disk -> loaded in NF4 by moetune itself
        model.save_pretrained(d)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            q = load_model(ModelConfig(path=d, quantization="nf4", device=device.type,
                                       dtype=str(dtype).replace("torch.", "")), device, log=lambda *a: None)
        except RecipeError as e:  # bitsandbytes missing, or without a 4-bit kernel for this device
            return {}, str(e)
    with tempfile.TemporaryDirectory() as tmp:
        ent = moetune_entries(q, ids, mask, labels, device, args.rank, args.experts, tmp,
                              keys={"moetune_lora", "hydralora"})
    return {f"qlora_{k}": v for k, v in ent.items() if k.split("+")[0] in ("moetune_lora", "hydralora")}, None


def trainer_peft(model, ids, mask, labels, device, args, ckpt: bool) -> dict:
    """transformers Trainer + PEFT LoRA rank R on the same batch: median seconds of its optimizer steps."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments
    peft = get_peft_model(shared_copy(model), LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear"))
    rows = [{"input_ids": i, "attention_mask": m, "labels": l} for i, m, l in zip(ids.cpu(), mask.cpu(), labels.cpu())]
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, per_device_train_batch_size=len(rows), max_steps=args.warmup + args.steps,
                                  learning_rate=1e-4, bf16=device.type == "cuda", use_cpu=device.type != "cuda",
                                  gradient_checkpointing=ckpt, gradient_checkpointing_kwargs={"use_reentrant": False},
                                  report_to=[], save_strategy="no", logging_strategy="no", dataloader_num_workers=0,
                                  remove_unused_columns=False, disable_tqdm=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        Trainer(model=peft, args=targs, train_dataset=rows, callbacks=[Clock()]).train()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    timed = times[args.warmup:] or times
    return {"step_s": statistics.median(timed), "times": timed, "peak_bytes": peak,
            "trainable": sum(p.numel() for p in peft.parameters() if p.requires_grad)}


def run_shape(name: str, device, args) -> dict:
    model, dtype = build_model(name, device, args.smoke, args.layers)
    batch = args.batch or BATCH[name]
    ids, mask, labels = _batch(model.config.vocab_size, batch, args.seq, device)
    with tempfile.TemporaryDirectory() as tmp:
        entries = moetune_entries(model, ids, mask, labels, device, args.rank, args.experts, tmp)
        entries["moetune_lora"][0]()
        flops = H.step_flops(entries["moetune_lora"][1])
        res = measure(entries, device, args.warmup, args.steps)
    plain = _plain(model)
    q, why = qlora_entries(name, device, args, ids, mask, labels)
    if q:
        res.update(measure(q, device, args.warmup, args.steps))
    for ckpt in (False, True):
        key = "trainer_peft_lora" + ("+ckpt" if ckpt else "")
        try:
            res[key] = trainer_peft(plain, ids, mask, labels, device, args, ckpt)
        except torch.OutOfMemoryError:
            res[key] = {"error": "out of memory"}
    return summarise(name, model, dtype, batch, args.seq, res, flops, device, args, why)


def _plain(model):
    """The base model with no adapter installed and no checkpointing (PEFT wraps its own copy of the tree)."""
    uninstall(model, expert_layers(model))
    disable_checkpointing(model)
    return model


def summarise(name, model, dtype, batch, seq, res, flops, device, args, qlora_skip) -> dict:
    peak = H.peak_tflops(device, args.peak_tflops)
    tokens = batch * seq
    ref = {c: res.get("moetune_lora" + c, {}).get("step_s") for c in ("", "+ckpt")}
    trainer = {c: res.get("trainer_peft_lora" + c, {}).get("step_s") for c in ("", "+ckpt")}
    rows = {}
    for k, r in res.items():
        if "step_s" not in r:
            rows[k] = r
            continue
        c = "+ckpt" if k.endswith("+ckpt") else ""
        rows[k] = {"step_ms": round(1e3 * r["step_s"], 2), "tokens_per_s": round(tokens / r["step_s"], 1),
                   "mfu": round(flops / r["step_s"] / (peak * 1e12), 4) if peak else None,
                   "peak_mib": round(r["peak_bytes"] / 2 ** 20, 1) if r.get("peak_bytes") else None,
                   "trainable": r["trainable"],
                   "vs_moetune_lora": round(r["step_s"] / ref[c], 3) if ref[c] else None,
                   "trainer_peft_speedup": round(trainer[c] / r["step_s"], 3) if trainer[c] else None}
    cfg = model.config
    return {"shape": name, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "batch": batch, "seq": seq,
            "dtype": str(dtype).replace("torch.", ""), "flops_per_step": flops, "peak_tflops": peak,
            "qlora_skipped": qlora_skip, "rows": rows}


def markdown(report: dict) -> str:
    out = [f"# GPU benchmark ({report['device']}, {report['date']})", "",
           "step_ms: median step; vs LoRA: step time / moetune LoRA's (same checkpointing); Trainer speedup: "
           "Trainer + PEFT step / this step.", ""]
    for s in report["shapes"]:
        out += [f"## {s['shape']}: {s['layers']} layers, hidden {s['hidden']}, batch {s['batch']} x {s['seq']}, "
                f"{s['dtype']}" + (f" (QLoRA skipped: {s['qlora_skipped']})" if s["qlora_skipped"] else ""), "",
                "| method | step ms | tokens/s | MFU | peak MiB | vs LoRA | Trainer speedup |", "|---|---|---|---|---|---|---|"]
        for k, r in s["rows"].items():
            if "error" in r:
                out.append(f"| {k} | {r['error']} | | | | | |")
                continue
            out.append(f"| {k} | {r['step_ms']} | {r['tokens_per_s']} | {r['mfu'] if r['mfu'] is not None else '-'} | "
                       f"{r['peak_mib'] if r['peak_mib'] is not None else '-'} | {r['vs_moetune_lora']} | "
                       f"{r['trainer_peft_speedup']} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=0, help="rows per step (0: per-shape default)")
    ap.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 4 layers, sequence 64, CPU")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.smoke:
        args.seq, args.layers, args.warmup, args.steps = 64, 4, 1, 2
        torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    report = {"device": _device_name(device), "date": str(date.today()), "torch": torch.__version__,
              "smoke": args.smoke, "shapes": [run_shape(name, device, args) for name in args.shapes]}
    stem = "gpu_smoke" if args.smoke else "gpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(report) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
