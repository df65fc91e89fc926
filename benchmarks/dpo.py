"""`make bench-dpo`: a DPO training step of moetune against TRL's DPOTrainer + PEFT, same data, same steps.

Both train a rank-16 LoRA on every linear layer of SmolLM2-135M-Instruct (alpha 32, no dropout) with the
DPO sigmoid loss (beta 0.1), the reference being the base with the adapter switched off, AdamW at the
same learning rate, a cosine schedule, gradient clipping at 1.0, batches of 8 pairs from
data/preference/train.jsonl. Each step takes THE SAME 8 pairs in both (moetune's seeded order; TRL's
collator is handed the same rows) and the script checks that both tokenise them alike (equal input ids and
response masks, else it stops). What is timed per step is each library's own step:

- moetune: `Trainer.train_step` (train/step.py): take the pairs from the Arrow cache, collate, the
  reference forward (no grad, adapters off), the policy forward and backward over 2B rows, clip, AdamW,
  schedule;
- TRL 1.16: the collator, then `DPOTrainer.training_step` (its reference forward with the adapter
  disabled, the policy forward and backward, plus TRL's own metrics), then what `Trainer.train`'s loop
  does after it: clip, optimizer step, schedule, zero_grad.

After one warm-up step each, the two are timed one step at a time in rounds, the order alternating each
round (benchmarks/harness.py); the ratio is the median (quartiles) of the per-round ratios TRL / moetune.
Results: a markdown table on stdout and benchmarks/results/dpo.json.

    python benchmarks/dpo.py [--rounds 10] [--batch 8] [--device cpu|cuda] [--shared]

On CUDA both run with bf16 autocast (moetune train.precision bf16, TRL bf16=True).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

import harness as H
from methods import shared_copy

from moetune.adapters.inject import expert_layers
from moetune.data.examples import take
from moetune.data.rows import collate_pairs

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results" / "dpo.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def moetune_trainer(device: str, batch: int, steps: int, run_dir: Path):
    """(Trainer, the model) of recipes/dpo.yaml's settings with a fresh adapter (reference: adapters off)."""
    from accelerate import Accelerator
    from moetune.adapters.io import start_adapter
    from moetune.data.pipeline import load_splits
    from moetune.models.load import load_model, load_tokenizer
    from moetune.recipe import load_recipe
    from moetune.train.loop import Trainer
    rc = load_recipe(ROOT / "recipes" / "dpo.yaml", [
        "train.reference=null", "data.system_prompt=null", "data.validation=null", f"train.batch_size={batch}",
        f"train.max_steps={steps}", f"model.device={device}", f"train.precision={'bf16' if device == 'cuda' else 'fp32'}",
        f"expert.target_modules=[{','.join(TARGETS)}]", f"data.train={ROOT / 'data/preference/train.jsonl'}"])
    acc = Accelerator(cpu=device == "cpu", mixed_precision="bf16" if device == "cuda" else "no")
    tok = load_tokenizer(rc.model, log=lambda *a: None)
    model = load_model(rc.model, acc.device, log=lambda *a: None)
    start_adapter(model, rc)
    splits = load_splits(rc.data, tok, ("train",))
    trainer = Trainer(rc, model, tok, splits, acc, run_dir)
    model.train()
    return trainer, model, tok, rc


def trl_trainer(model, tok, rc, device: str, steps: int, out: Path):
    """TRL's DPOTrainer over a second module tree sharing `model`'s frozen base weights (PEFT wraps in place)."""
    import datasets
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer
    rows = [json.loads(x) for x in (ROOT / "data/preference/train.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    args = DPOConfig(output_dir=str(out), beta=rc.train.beta, loss_type=["sigmoid"], learning_rate=rc.train.lr,
                     lr_scheduler_type="cosine", warmup_steps=rc.train.warmup_steps, max_steps=steps,
                     max_grad_norm=rc.train.max_grad_norm, per_device_train_batch_size=rc.train.batch_size,
                     max_length=rc.data.max_length, truncation_mode="keep_start", weight_decay=0.0,
                     bf16=device == "cuda", use_cpu=device == "cpu", report_to=[], save_strategy="no")
    lora = LoraConfig(r=rc.expert.rank, lora_alpha=rc.expert.alpha, lora_dropout=0.0, target_modules=TARGETS)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets per step (no accumulation here)
    trainer.model.train()
    return trainer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8, help="pairs per step")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--shared", action="store_true", help="say in the output that the machine was shared")
    a = ap.parse_args()
    t0 = time.time()
    steps = a.rounds + 1
    tmp = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    mt, model, tok, rc = moetune_trainer(a.device, a.batch, steps, tmp / "moetune")
    base = shared_copy(model)                     # the same base tensors; its expert layers swapped for the base
    for name, layer in list(expert_layers(base).items()):
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, layer.base)
    tt = trl_trainer(base, tok, rc, a.device, steps, tmp / "trl")
    params = [p for p in tt.model.parameters() if p.requires_grad]
    state = {"step": 0}

    def indices(step: int) -> list[int]:
        return mt.plan.step_indices(step, rc.train.seed)

    def moetune_step() -> None:
        step = state["step"]
        idx = indices(step)
        mt.train_step(step, take(mt.train_ex, idx), mt.plan.micro_batches(list(range(len(idx))), 0))

    def trl_step() -> None:
        rows = [tt.train_dataset[int(i)] for i in mt.train_ex.indices[indices(state["step"])]]
        batch = {k: v.to(tt.args.device) if torch.is_tensor(v) else v for k, v in tt.data_collator(rows).items()}
        tt.training_step(tt.model, batch)
        torch.nn.utils.clip_grad_norm_(params, rc.train.max_grad_norm)
        tt.optimizer.step()
        tt.lr_scheduler.step()
        tt.model.zero_grad(set_to_none=True)

    for step in range(steps):                     # the two see the same tokens at every step
        idx = indices(step)
        ours = collate_pairs(take(mt.train_ex, idx), tok.pad_token_id)
        theirs = tt.data_collator([tt.train_dataset[int(i)] for i in mt.train_ex.indices[idx]])
        if not (torch.equal(ours["input_ids"], theirs["input_ids"])
                and torch.equal((ours["labels"] != -100).long(), theirs["completion_mask"])):
            raise SystemExit(f"step {step}: moetune and TRL tokenise the pairs differently; the comparison would be unfair")
    tokens = int(collate_pairs(take(mt.train_ex, indices(0)), tok.pad_token_id)["attention_mask"].sum())

    device = torch.device(a.device)
    methods = {"moetune": (lambda: None, moetune_step), "trl": (lambda: None, trl_step)}
    H.warm_up(methods, device, 1)
    state["step"] = 1
    times: dict[str, list[float]] = {"moetune": [], "trl": []}
    for r in range(a.rounds):                     # one step each per round, order alternating
        for name in (("moetune", "trl") if r % 2 == 0 else ("trl", "moetune")):
            H._sync(device)
            t = time.perf_counter()
            methods[name][1]()
            H._sync(device)
            times[name].append(time.perf_counter() - t)
        state["step"] += 1
    q1, med, q3 = H.paired_ratio(times["trl"], times["moetune"])
    out = {"date": date.today().isoformat(), "device": str(device),
           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "trl": __import__("trl").__version__, "peft": __import__("peft").__version__,
           "model": rc.model.path, "rank": rc.expert.rank, "pairs_per_step": a.batch, "tokens_first_step": tokens,
           "rounds": a.rounds, "shared_machine": a.shared, "same_tokens_checked_steps": steps,
           "step_ms": {k: 1000 * statistics.median(v) for k, v in times.items()},
           "trl_over_moetune": med, "trl_over_moetune_iqr": [q1, q3], "wall_s": round(time.time() - t0, 1),
           "times_s": times}
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2))
    print("| method | step ms (median) | vs moetune [IQR] |\n|---|---:|---:|")
    print(f"| moetune DPO | {out['step_ms']['moetune']:.0f} | 1.00 |")
    print(f"| TRL {out['trl']} DPOTrainer + PEFT {out['peft']} | {out['step_ms']['trl']:.0f} | {med:.2f} [{q1:.2f}, {q3:.2f}] |")
    print(f"{a.batch} pairs per step ({tokens} tokens in step 1, same tokens in both checked for {steps} steps); "
          f"{a.rounds} rounds; wall {out['wall_s']} s; {out['device']}, {out['threads']} threads, torch {out['torch']}"
          + (" (shared machine)" if a.shared else ""))


if __name__ == "__main__":
    main()
