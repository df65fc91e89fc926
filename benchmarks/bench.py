"""`make bench`: one training step (forward + backward + AdamW step) of moetune's expert types, measured in one run.

Methods (benchmarks/methods.py): moetune LoRA, PEFT LoRA, HydraLoRA, MoLoRA soft, MoLoRA top-2,
MoV and MoLE (gates over frozen LoRAs) at equal total rank (default 16, 4 experts), plus a
loop-over-experts reference of each routed method (benchmarks/reference_loop.py, the way research code writes it). Levels:
- layer: one frozen projection of a representative shape (SmolLM2-135M's MLP up-projection,
  576 -> 1536, 2,048 tokens, input requires grad), at 4 experts and again at 8 experts;
- model: a whole training step of a causal LM (default: the built-in SmolLM2-135M-Instruct,
  batch 8 x 32, loss on the last 6 tokens) with moetune's loss path; PEFT with the HF loss.
  With --device cuda the default also runs randomly initialised Qwen2-0.5B- and Llama-3-8B-
  shaped models in bf16 (--tiny shrinks them for a CPU check of that path).
Per method: median step time (methods interleaved round by round after warm-up), ratio to
moetune LoRA and to the loop reference of the same method (median and quartiles of the
per-round ratios), peak memory of the step (see
harness.py), tokens/s and MFU (FLOPs counted by torch on one moetune-LoRA step; MFU needs a
known GPU or --peak-tflops). Ratios are only comparable within one run.
Results: a markdown table on stdout and benchmarks/results/latest.json.

    python benchmarks/bench.py [--device cpu|cuda] [--rank 16] [--experts 4] [--quick]
    python benchmarks/bench.py --skip-layer --models qwen2-0.5b-shape llama-8b-shape --tiny --quick  # CPU check
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from datetime import date
from pathlib import Path

import torch
from torch import nn

import harness as H
from methods import (ROUTED, SHAPES, build_model, describe, install, label, make_layer, methods, mole_method,
                     randomise, shared_copy, uninstall, write_lora_experts)
from reference_loop import from_layer, loop_set, trainable

from moetune.adapters.inject import inject

OUT = Path(__file__).parent / "results" / "latest.json"
D_IN, D_OUT, TOKENS = 576, 1536, 2048
ONLY: set[str] = set()  # --only
DEFINITIONS = {
    "step_ms": "median of the timed steps (forward + backward + AdamW step), methods interleaved round by round",
    "ratio_vs_lora": "median over rounds of (this step / moetune LoRA's step in the same round)",
    "ratio_vs_lora_iqr": "first and third quartile of those per-round ratios (the spread on this machine)",
    "ratio_vs_loop": "median over rounds of (this step / the step of the loop-over-experts reference of the same "
                     "method in the same round) (<1: faster)",
    "ratio_vs_loop_iqr": "first and third quartile of those per-round ratios",
    "adapter_ms": "median over rounds of (this step - the frozen base's step), what the adapter adds (the model's "
                  "frozen base step runs the backward from the input embeddings; not given for PEFT on the model, "
                  "whose step also differs by the HF loss)",
    "adapter_speedup_vs_loop": "the loop reference's adapter_ms / this method's adapter_ms "
                               "(null where adapter_ms is under 5% of the frozen base's step: within noise)",
    "peak_mem_mb": "MiB: tensors resident before the step (base, inputs, this method's adapter and AdamW state) + "
                   "peak of new tensor allocations during one step (CUDA: max_memory_allocated - memory_allocated; "
                   "CPU: ATen-level allocation tracker, not RSS)",
    "mfu": "FLOPs of one moetune-LoRA step (torch.utils.flop_counter) / step time / peak_tflops; null without a peak",
}


def _params(ps) -> int:
    return sum(p.numel() for p in ps)


def run_level(entries: dict, device, warmup: int, rounds: int, tokens: int):
    """entries: method -> (install, step, resident tensors fn, trainable params). Per method: warm-up
    steps, one step for peak memory, then timed rounds; FLOPs from one more moetune-LoRA step."""
    if ONLY:
        entries = {k: e for k, e in entries.items() if k in ONLY or k == "moetune_lora"}
    steps = {k: (e[0], e[1]) for k, e in entries.items()}
    failed = H.warm_up(steps, device, warmup)
    if "moetune_lora" in failed:
        raise SystemExit("moetune LoRA itself ran out of memory: lower --shaped-batch / --shaped-seq / --llama-layers")
    peaks = {}
    for k in steps:
        entries[k][0]()
        peaks[k] = H.step_peak_bytes(entries[k][1], device, entries[k][2]())
    times = H.interleaved_times(steps, device, rounds)
    entries["moetune_lora"][0]()
    flops = H.step_flops(entries["moetune_lora"][1])
    return times, peaks, {k: e[3] for k, e in entries.items()}, failed, flops, tokens


def summarise(times, peaks, params, failed, flops, tokens, peak_tf, no_adapter_ms=()) -> dict:
    """method -> {step_ms, ratio_vs_lora, ratio_vs_loop (this / its loop reference), peak_mem_mb, ...};
    where the frozen base alone was timed, also adapter_ms (step - frozen base step) and, for routed
    methods, adapter_speedup_vs_loop (the loop reference's adapter_ms / this one's); not for `no_adapter_ms`."""
    ours, base = times["moetune_lora"], times.get("frozen_base")
    out = {}
    for k in params:
        if k in failed:
            out[k] = {"step_ms": None, "error": failed[k], "trainable_params": params[k]}
            continue
        t, loop = times[k], times.get(f"loop_{k}")
        step = statistics.median(t)
        q1, lora, q3 = H.paired_ratio(t, ours)
        row = out[k] = {"step_ms": round(step * 1e3, 3), "ratio_vs_lora": round(lora, 3),
                        "ratio_vs_lora_iqr": [round(q1, 3), round(q3, 3)], "ratio_vs_loop": None,
                        "peak_mem_mb": round(peaks[k] / 2**20, 1), "tokens_per_s": round(tokens / step, 1),
                        "mfu": None if peak_tf is None else round(flops / step / (peak_tf * 1e12), 4),
                        "trainable_params": params[k]}
        if loop is not None:
            q1, mid, q3 = H.paired_ratio(t, loop)
            row["ratio_vs_loop"], row["ratio_vs_loop_iqr"] = round(mid, 3), [round(q1, 3), round(q3, 3)]
        if base is not None and k not in ("frozen_base", *no_adapter_ms):
            added = statistics.median(a - b for a, b in zip(t, base))
            row["adapter_ms"] = round(added * 1e3, 3)
            if loop is not None:  # only where the adapter's share stands out of the timing noise (> 5% of base)
                loop_added = statistics.median(a - b for a, b in zip(loop, base))
                clear = added > 0.05 * statistics.median(base)
                row["adapter_speedup_vs_loop"] = round(loop_added / added, 2) if clear else None
    return out


def table_row(title: str, key: str, r: dict) -> str:
    if r["step_ms"] is None:
        return f"| {title} | {label(key)} | {r['trainable_params']:,} | {r['error']} | | | | | | |"
    lo, hi = r["ratio_vs_lora_iqr"]
    loop = ""
    if r["ratio_vs_loop"] is not None:
        a, b = r["ratio_vs_loop_iqr"]
        loop = f"{1 / r['ratio_vs_loop']:.2f}x [{1 / b:.2f}, {1 / a:.2f}]"
    adapter = "" if "adapter_ms" not in r else f"{r['adapter_ms']:.1f}"
    if "adapter_speedup_vs_loop" in r:
        speedup = r["adapter_speedup_vs_loop"]
        adapter += " (below noise)" if speedup is None else f" ({speedup:.2f}x)"
    mfu = "" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    return (f"| {title} | {label(key)} | {r['trainable_params']:,} | {r['step_ms']:.1f} | {r['ratio_vs_lora']:.2f} [{lo:.2f}, {hi:.2f}] "
            f"| {loop} | {adapter} | {r['peak_mem_mb']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} |")


def layer_level(args, device, amp, n: int, with_peft: bool):
    """One 576 -> 1536 projection, 2,048 tokens: the frozen base alone, moetune LoRA (and PEFT's),
    the routed moetune layers and their loop references."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT, bias=False).to(device).requires_grad_(False)   # W0: (d_out, d_in)
    x = torch.randn(TOKENS, D_IN, device=device, requires_grad=True)            # (T, d_in)
    entries = {}

    def add(key, module, params):
        step = H.make_step(params, lambda: module(x).square().mean(), amp, device, (x,))
        entries[key] = (lambda: None, step, lambda: H.resident_tensors([module], [x], step), _params(params))
    ms = methods(args.rank, n, ["all-linear"])
    add("frozen_base", base, [])
    layer = make_layer(ms["moetune_lora"], base)
    add("moetune_lora", layer, list(layer.adapter_state().values()))
    if with_peft:
        holder = nn.Sequential(nn.Linear(D_IN, D_OUT, bias=False)).to(device)
        holder[0].weight.data.copy_(base.weight)
        peft = get_peft_model(holder, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["0"]))
        add("peft_lora", peft, [p for p in peft.parameters() if p.requires_grad])
    for key in ROUTED:
        layer = make_layer(ms[key], base)
        randomise(layer)
        ref = from_layer(layer)
        with torch.no_grad():  # the reference computes the same function (tests/test_reference_loop.py in full)
            torch.testing.assert_close(ref(x[:64]), layer(x[:64]), atol=1e-4, rtol=1e-4)
        add(key, layer, list(layer.adapter_state().values()))
        add(f"loop_{key}", ref, trainable(ref))
    with tempfile.TemporaryDirectory() as tmp:  # MoLE: N frozen LoRAs on disk, read once into the layer
        holder = nn.Module()
        holder.mlp = nn.Module()
        holder.mlp.up_proj = base
        layer = make_layer(mole_method(write_lora_experts(holder, args.rank, n, ["all-linear"], tmp)), base)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.02)  # non-uniform gates, so the reference check compares them
    ref = from_layer(layer)
    with torch.no_grad():
        torch.testing.assert_close(ref(x[:64]), layer(x[:64]), atol=1e-4, rtol=1e-4)
    add("mole", layer, list(layer.adapter_state().values()))
    add("loop_mole", ref, trainable(ref))
    warmup, rounds = (1, 3) if args.quick else (2, args.layer_steps)
    title = f"layer {D_IN}->{D_OUT} x {TOKENS} tokens" + ("" if n == args.experts else f", {n} experts")
    note = f"{n} experts of rank {args.rank // n} (HydraLoRA: shared A rank {args.rank // n}, {n} B heads)"
    return title, note, run_level(entries, device, warmup, rounds, TOKENS)


def model_level(args, name: str, device, n: int):
    """A whole training step; every method's layers share the frozen base and are swapped in before its step."""
    from peft import LoraConfig, get_peft_model
    from moetune.train.loss import CausalLMLoss
    shaped = name in SHAPES
    layers = args.llama_layers if name == "llama-8b-shape" else None
    batch, seq = (args.shaped_batch, args.shaped_seq) if shaped else (args.batch, args.seq)
    model, dtype = build_model(name, device, args.tiny, layers)
    amp = torch.bfloat16 if dtype != torch.float32 or (device.type == "cuda" and args.precision == "bf16") else None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (batch, seq), generator=g).to(device)   # (B, T)
    labels = ids.clone()
    labels[:, : seq - max(1, 3 * seq // 16)] = -100      # loss on the last 3/16 of each row (6 of 32)
    mask = torch.ones_like(ids)
    ms = methods(args.rank, n, ["all-linear"])
    sets = {}
    for key, m in ms.items():
        sets[key] = inject(model, m.expert, m.router)
        for layer in sets[key].values():
            if key != "moetune_lora":
                randomise(layer)
        uninstall(model, sets[key])
    with tempfile.TemporaryDirectory() as tmp:  # MoLE: N frozen LoRAs on disk, read once by inject
        mole = mole_method(write_lora_experts(model, args.rank, n, ["all-linear"], tmp))
        sets["mole"] = inject(model, mole.expert, mole.router)
        uninstall(model, sets["mole"])
    for key in (*ROUTED, "mole"):
        sets[f"loop_{key}"] = loop_set(sets[key])
    model.train()
    lm = CausalLMLoss(model)

    def loss_fn():
        loss_sum, count, aux = lm(ids, mask, labels)
        return loss_sum / count + sum(aux.values())
    entries = {}
    emb = model.get_input_embeddings()
    base_step = H.make_step([], loss_fn, amp, device)

    def frozen_step():  # no adapter: the backward still runs through every layer, from the input embeddings
        hook = emb.register_forward_hook(lambda module, inputs, out: out.requires_grad_(True))
        try:
            base_step()
        finally:
            hook.remove()
    entries["frozen_base"] = (lambda: uninstall(model, sets["moetune_lora"]), frozen_step,
                              lambda: H.resident_tensors([model], [ids, labels, mask], base_step), 0)
    for key, layer_set in sets.items():
        params = [p for layer in layer_set.values()
                  for p in (trainable(layer) if key.startswith("loop_") else layer.adapter_state().values())]
        step = H.make_step(params, loss_fn, amp, device)
        entries[key] = (lambda s=layer_set: install(model, s), step,
                        lambda s=step: H.resident_tensors([model], [ids, labels, mask], s), _params(params))
    peft = get_peft_model(shared_copy(model),  # PEFT rewires modules in place: its own tree, same weights
                          LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear"))
    peft.train()
    pp = [p for p in peft.parameters() if p.requires_grad]
    step = H.make_step(pp, lambda: peft(input_ids=ids, attention_mask=mask, labels=labels).loss, amp, device)
    entries["peft_lora"] = (lambda: None, step, lambda: H.resident_tensors([peft], [ids, labels, mask], step),
                            _params(pp))
    order = ["frozen_base", "moetune_lora", "peft_lora", *ROUTED, "mole", *(f"loop_{k}" for k in (*ROUTED, "mole"))]
    warmup, rounds = (1, 2) if args.quick else (1, args.steps)
    res = run_level({k: entries[k] for k in order}, device, warmup, rounds, batch * seq)
    cfg = model.config
    note = (f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {'bf16' if dtype != torch.float32 else 'fp32'} "
            f"weights{', autocast bf16' if amp else ''}; loss on the last {max(1, 3 * seq // 16)} tokens of each row; "
            f"{n} experts of rank {args.rank // n} on every linear layer")
    if name == "llama-8b-shape" and cfg.num_hidden_layers != 32:
        note += " (fewer layers than Llama-3-8B's 32: tokens/s is not the full model's)"
    title = f"model {name}{' (tiny)' if args.tiny and shaped else ''} batch {batch} x {seq}"
    return title, note, res


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=None,
                    help=f"model paths / built-in names, or {', '.join(SHAPES)} (default: smollm2-135m-instruct; "
                         "on CUDA also both shaped models)")
    ap.add_argument("--rank", type=int, default=16, help="total rank (LoRA rank; experts x rank per expert)")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--experts-large", type=int, default=8, help="second layer run, this many experts (0: skip)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps, model level (CPU 8, CUDA 20)")
    ap.add_argument("--layer-steps", type=int, default=None, help="timed steps, layer level (CPU 20, CUDA 50)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--shaped-batch", type=int, default=4)
    ap.add_argument("--shaped-seq", type=int, default=None, help="default 512 (32 with --tiny)")
    ap.add_argument("--llama-layers", type=int, default=None, help="layers of the Llama-8B shape (default all 32)")
    ap.add_argument("--tiny", action="store_true", help="shrink the shaped models to a few MB (CPU check of that path)")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                    help="CUDA autocast for the layer and fp32 models (CPU always runs fp32 there)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s for MFU (known GPUs: automatic)")
    ap.add_argument("--quick", action="store_true", help="1 warm-up step and 2-3 timed steps (development only)")
    ap.add_argument("--only", nargs="+", default=None, metavar="METHOD",
                    help="time only these methods (and moetune_lora, the ratio base); development aid")
    ap.add_argument("--skip-layer", action="store_true")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    ONLY.update(args.only or ())
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.shaped_seq = args.shaped_seq or (32 if args.tiny else 512)
    args.steps = args.steps or (20 if gpu else 8)
    args.layer_steps = args.layer_steps or (50 if gpu else 20)
    models = args.models or (["smollm2-135m-instruct"] + (list(SHAPES) if device.type == "cuda" else []))
    amp = torch.bfloat16 if device.type == "cuda" and args.precision == "bf16" else None
    peak_tf = H.peak_tflops(device, args.peak_tflops)
    out = {"date": date.today().isoformat(), "device": _device_name(device), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "rank": args.rank, "experts": args.experts,
           "peak_tflops": peak_tf, "methods": describe(args.rank, args.experts), "definitions": DEFINITIONS,
           "levels": {}, "results": {}}
    jobs = []  # each returns (title, note, measurements)
    if not args.skip_layer:
        jobs += [lambda n=n, first=i == 0: layer_level(args, device, amp, n, with_peft=first)
                 for i, n in enumerate([args.experts] + ([args.experts_large] if args.experts_large else []))]
    if not args.skip_model:
        jobs += [lambda name=name: model_level(args, name, device, args.experts) for name in models]
    print("| benchmark | method | trainable params | step ms | vs moetune LoRA [IQR] | speed-up vs loop ref. [IQR] "
          "| adapter ms (speed-up vs loop) | peak MiB | tokens/s | MFU |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for job in jobs:
        title, note, res = job()
        *measured, flops, tokens = res
        rows = summarise(*measured, flops, tokens, peak_tf, () if title.startswith("layer") else ("peft_lora",))
        out["results"][title] = rows
        out["levels"][title] = {"tokens_per_step": tokens, "flops_per_step_moetune_lora": flops, "note": note}
        for k, r in rows.items():
            print(table_row(title, k, r), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
