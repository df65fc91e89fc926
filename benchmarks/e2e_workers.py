"""One training run of a non-moetune contender of `benchmarks/e2e.py`, in a fresh process.

    python benchmarks/e2e_workers.py {trl,trainer} SPEC.json OUT.json

SPEC (written by e2e.py): model (a local directory), data (prompt-completion JSONL, see
e2e_data.py), device, precision (fp32 | bf16), batch_size, lr, epochs, rank, alpha, max_length,
seed, liger (TRL only), out_dir. OUT gets: train_seconds (the tool's own `train_runtime`: the
training loop, after model loading and tokenisation), steps, losses (one per optimizer step),
final_loss, trained_tokens (target tokens of the epoch) and what the tool was set to.

- `trl`: TRL's `SFTTrainer` + PEFT LoRA with TRL's recommended packing: `packing=True,
  packing_strategy="bfd"` (best-fit decreasing into rows of max_length, which turns on its
  padding-free collator: one flattened row per batch with position ids restarting per example),
  completion-only loss (prompt-completion rows). TRL's own defaults that differ from the other
  contenders are set back: gradient checkpointing off, bf16 only in the bf16 rounds.
  `per_device_train_batch_size` counts packed rows here (e2e.py picks it so a step trains about
  as many tokens as the others' `batch_size` examples; see its --trl-batch-size).
- `trainer`: transformers' `Trainer` + PEFT LoRA on the same rows, rendered by the chat template
  with the prompt masked, batched by transformers' padding-free `DataCollatorWithFlattening`
  (the examples of a batch in one row, position ids restarting per example).

bf16 for both: the base loaded in bfloat16, PEFT's adapters in float32 (its default
`autocast_adapter_dtype`), `bf16=True` (autocast), the same as moetune's `model.dtype=bfloat16`.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _load(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    kwargs = {"dtype": dtype}
    if spec.get("attn_implementation"):
        kwargs["attn_implementation"] = spec["attn_implementation"]
    model = AutoModelForCausalLM.from_pretrained(spec["model"], **kwargs).to(spec["device"])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _lora(spec: dict):
    from peft import LoraConfig
    return LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")


def _common_args(spec: dict) -> dict:
    """TrainingArguments shared by both workers: the benchmark's hyperparameters, nothing saved, no logging
    services, a loss logged every optimizer step."""
    return dict(output_dir=spec["out_dir"], per_device_train_batch_size=spec["batch_size"],
                num_train_epochs=spec["epochs"], learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=0,
                weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", logging_steps=1, save_strategy="no",
                report_to=[], seed=spec["seed"], data_seed=spec["seed"], bf16=spec["precision"] == "bf16",
                use_cpu=spec["device"] == "cpu", dataloader_num_workers=0, disable_tqdm=True,
                gradient_checkpointing=False)


def run_trl(spec: dict) -> dict:
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer
    model, tok = _load(spec)
    rows = load_dataset("json", data_files=spec["data"], split="train")
    args = SFTConfig(**_common_args(spec), max_length=spec["max_length"], packing=True, packing_strategy="bfd",
                     completion_only_loss=True, use_liger_kernel=bool(spec.get("liger")))
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tok, peft_config=_lora(spec))
    ds = trainer.train_dataset
    tokens = sum(sum(x != -100 for x in lab) for lab in ds["labels"]) if "labels" in ds.column_names else None
    out = _train(trainer)
    return {**out, "trained_tokens": tokens, "packed_rows": len(ds), "padding_free": trainer.padding_free,
            "packing_strategy": args.packing_strategy, "liger": bool(spec.get("liger"))}


def _encode(tok, row: dict, max_length: int) -> dict:
    """input_ids of prompt + completion through the chat template, labels -100 on the prompt, cut at max_length."""
    prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=False)
    full = tok.apply_chat_template(row["prompt"] + row["completion"], return_dict=False)[:max_length]
    n = min(len(prompt), len(full))
    return {"input_ids": full, "labels": [-100] * n + full[n:]}


def run_trainer(spec: dict) -> dict:
    from datasets import load_dataset
    from peft import get_peft_model
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments
    model, tok = _load(spec)
    rows = load_dataset("json", data_files=spec["data"], split="train")
    ds = rows.map(lambda r: _encode(tok, r, spec["max_length"]), remove_columns=rows.column_names)
    ds = ds.filter(lambda r: any(x != -100 for x in r["labels"][1:]))   # cut before any target: nothing to train
    model = get_peft_model(model, _lora(spec))
    trainer = Trainer(model=model, args=TrainingArguments(**_common_args(spec)), train_dataset=ds,
                      data_collator=DataCollatorWithFlattening())
    tokens = sum(sum(x != -100 for x in lab[1:]) for lab in ds["labels"])
    return {**_train(trainer), "trained_tokens": tokens, "collator": "DataCollatorWithFlattening"}


def _train(trainer) -> dict:
    t = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_seconds": round(result.metrics["train_runtime"], 3), "train_call_seconds": round(wall, 3),
            "steps": trainer.state.global_step, "losses": losses, "final_loss": losses[-1] if losses else None}


def main() -> None:
    kind, spec_path, out_path = sys.argv[1:4]
    spec = json.loads(Path(spec_path).read_text())
    out = {"trl": run_trl, "trainer": run_trainer}[kind](spec)
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
