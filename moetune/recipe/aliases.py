"""Names people bring from other tools, and moetune's key for each (`moetune explain aliases`).

A recipe never accepts these names: a key moetune does not know stops the load, and when the key is one
of these the error names moetune's key (`learning_rate` -> `train.lr`) instead of guessing by spelling.
Accepting both spellings would give two names to one setting, and a recipe copied from another tool
would half-work (its unknown keys ignored). Names moetune itself uses in another section
(`train.output_dir`, `seed` at the top) are found by the key index (`reference.key_index`), not here.

Sources: transformers' `TrainingArguments` and `BitsAndBytesConfig`, PEFT's `LoraConfig`, TRL's
`SFTConfig`, axolotl's and LLaMA-Factory's YAML configs.
"""
from __future__ import annotations

import difflib

TA, AX, LF, TRL, PEFT, BNB = ("transformers' TrainingArguments", "axolotl", "LLaMA-Factory", "TRL",
                              "PEFT's LoraConfig", "transformers' BitsAndBytesConfig")

FOREIGN_KEYS: dict[str, tuple[str, str]] = {
    # training
    "learning_rate": ("train.lr", f"{TA}, {AX}, {LF}"),
    "num_train_epochs": ("train.epochs", f"{TA}, {LF}"),
    "num_epochs": ("train.epochs", AX),
    "per_device_train_batch_size": ("train.batch_size", f"{TA}, {LF}; moetune's is per process too"),
    "micro_batch_size": ("train.batch_size", AX),
    "gradient_accumulation_steps": ("train.grad_accum", f"{TA}, {AX}, {LF}"),
    "lr_scheduler_type": ("train.scheduler", f"{TA}, {LF}"),
    "lr_scheduler": ("train.scheduler", AX),
    "optim": ("train.optimizer", f"{TA}, {AX}; 'adamw_torch' and friends are moetune's 'adamw'"),
    "warmup_ratio": ("train.warmup_steps", f"{TA}, {LF}; moetune counts warmup in optimizer steps: the ratio "
                     "times the run's steps"),
    "logging_steps": ("train.log_every", f"{TA}, {AX}, {LF}"),
    "save_steps": ("train.save_every", f"{TA}, {AX}, {LF}"),
    "eval_steps": ("train.eval_every", f"{TA}, {AX}, {LF}"),
    "save_strategy": ("train.save_every", f"{TA}; moetune saves every N steps and at the end"),
    "eval_strategy": ("train.eval_every", f"{TA}; moetune evaluates every N steps and at the end"),
    "evaluation_strategy": ("train.eval_every", f"{TA} (old name)"),
    "save_total_limit": ("train.keep_checkpoints", f"{TA}, {AX}, {LF}"),
    "bf16": ("train.precision=bf16", f"{TA}, {AX}, {LF}"),
    "fp16": ("train.precision=fp16", f"{TA}, {AX}, {LF}"),
    "loraplus_lr_ratio": ("train.lora_plus_ratio", f"{AX}, {LF}"),
    "per_device_eval_batch_size": ("eval.batch_size", f"{TA}, {LF}"),
    "eval_batch_size": ("eval.batch_size", AX),
    "resume_from_checkpoint": ("--resume", f"{TA}, {AX}; `moetune train RECIPE --resume` continues from the "
                               "newest checkpoint in output_dir"),
    "overwrite_output_dir": ("--overwrite", f"{TA}, {LF}; the old run is moved aside, not deleted"),
    "do_train": ("stages", f"{TA}, {LF}; e.g. stages=[train,eval]"),
    "do_eval": ("stages", f"{TA}, {LF}; e.g. stages=[train,eval]"),
    # data
    "max_seq_length": ("data.max_length", f"{TRL} (old name), LLaMA-Factory scripts"),
    "sequence_len": ("data.max_length", AX),
    "cutoff_len": ("data.max_length", LF),
    "sample_packing": ("data.packing", AX),
    "dataset_text_field": ("data.text_field", TRL),
    "val_set_size": ("data.validation_split", f"{AX}; a fraction of train"),
    "val_size": ("data.validation_split", f"{LF}; a fraction of train"),
    "datasets": ("data.train + data.mix", f"{AX}; one file: data.train, several: data.mix with a format each"),
    "dataset": ("data.train", f"{LF}, {TRL}"),
    "chat_template": ("data.template", f"{AX}; 'chat' uses the tokenizer's own template"),
    # preference tuning
    "rl": ("train.objective", f"{AX}; dpo, ipo (moetune: dpo with train.loss_type=ipo) and orpo"),
    "stage": ("train.objective", f"{LF}; 'sft', 'dpo', 'orpo' (moetune trains the same adapter types with each)"),
    "pref_beta": ("train.beta", LF),
    "rl_beta": ("train.beta", AX),
    "orpo_alpha": ("train.beta", f"{AX}; ORPO's lambda is moetune's beta with train.objective=orpo"),
    "pref_loss": ("train.loss_type", f"{LF}; sigmoid and ipo (orpo is train.objective=orpo)"),
    "ref_model": ("train.reference", f"{TRL}; null is the base with the adapters off, or a run directory"),
    "ref_adapter_name": ("train.reference", f"{TRL}; a run directory whose adapter is the reference"),
    # expert (LoRA)
    "lora_r": ("expert.rank", AX),
    "lora_rank": ("expert.rank", LF),
    "r": ("expert.rank", PEFT),
    "lora_alpha": ("expert.alpha", f"{PEFT}, {AX}, {LF}"),
    "lora_dropout": ("expert.dropout", f"{PEFT}, {AX}, {LF}"),
    "lora_target_modules": ("expert.target_modules", AX),
    "lora_target": ("expert.target_modules", f"{LF}; 'all' is moetune's 'all-linear'"),
    "lora_target_linear": ("expert.target_modules=[all-linear]", AX),
    "init_lora_weights": ("expert.init", f"{PEFT}; 'pissa' and 'olora' are moetune's values too"),
    "adapter": ("expert.type", f"{AX}; QLoRA is expert.type=lora with model.quantization=nf4"),
    "finetuning_type": ("expert.type", LF),
    "peft_type": ("expert.type", "PEFT"),
    # model
    "base_model": ("model.path", AX),
    "model_name_or_path": ("model.path", f"{LF}, transformers' example scripts"),
    "load_in_4bit": ("model.quantization=nf4", f"{AX}, {BNB}"),
    "load_in_8bit": ("model.quantization=nf4", f"{AX}, {BNB}; moetune quantises bases to 4 bit only"),
    "quantization_bit": ("model.quantization=nf4", f"{LF}; 4 is the only width moetune has"),
    "quantization_type": ("model.quantization", LF),
    "bnb_4bit_quant_type": ("model.quantization", BNB),
    "bnb_4bit_use_double_quant": ("model.double_quantization", BNB),
    "bnb_4bit_compute_dtype": ("model.dtype", f"{BNB}; the compute dtype of a 4-bit base"),
    "torch_dtype": ("model.dtype", "transformers' from_pretrained"),
    "flash_attention": ("model.attn_implementation=flash_attention_2", AX),
}
"""A name from another tool -> (moetune's key, `key=value`, several joined by ' + ', or a command-line flag;
who uses the name, and what differs). None of these is a name moetune uses itself (a test checks)."""

FOREIGN_VALUES: dict[str, dict[str, str]] = {
    "stages": {"evaluate": "eval", "evaluation": "eval", "training": "train", "sft": "train", "merging": "merge",
               "merge_lora": "merge", "exporting": "export", "save": "export"},
    "train.optimizer": {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adam": "adamw"},
    "train.scheduler": {"constant_with_warmup": "constant"},
    "train.precision": {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "no": "fp32"},
    "model.dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"},
    "data.format": {"alpaca": "instruction", "openai": "chat", "messages": "chat", "completion": "text",
                    "dpo": "preference", "pairwise": "preference"},
    "train.objective": {"ipo": "dpo"},
    "train.loss_type": {"dpo": "sigmoid"},
    "eval.split": {"val": "validation", "valid": "validation", "dev": "validation", "eval": "validation"},
    "data.template": {"chat_template": "chat", "tokenizer_default": "chat", "alpaca": "plain"},
    "expert.type": {"qlora": "lora", "adalora": "lora", "ia3": "mov"},
}
"""Per key with a fixed set of values: a value from another tool -> moetune's value for it."""


def foreign_key_hint(name: str) -> str:
    """The sentence naming moetune's key for another tool's `name` ('' when it is none of those)."""
    if name not in FOREIGN_KEYS:
        return ""
    ours, who = FOREIGN_KEYS[name]
    what = "flag" if ours.startswith("--") else "setting" if "=" in ours else "key"
    return (f" '{name}' is a name from {who}; moetune's {what} is '{ours}'. Other tools' names and moetune's: "
            "`moetune explain aliases`.")


def value_hint(key: str, bad: list, choices: tuple) -> str:
    """' Did you mean ...?' for the bad values of a key with `choices`: the alias table first, then spelling."""
    out = []
    for value in bad:
        ours = FOREIGN_VALUES.get(key, {}).get(str(value))
        if ours is None:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
            ours = close[0] if close else None
        if ours is not None:
            out.append(f"'{ours}'" + ("" if len(bad) == 1 else f" for {value!r}"))
    return f" Did you mean {', '.join(out)}?" if out else ""


def aliases_text() -> str:
    """The table of other tools' names (`moetune explain aliases`)."""
    width = max(map(len, FOREIGN_KEYS)) + 2
    lines = ["Names from other tools; a recipe refuses them and names moetune's key:", ""]
    lines += [f"  {name:<{width}}-> {ours}    ({who})" for name, (ours, who) in FOREIGN_KEYS.items()]
    lines += ["", "Values from other tools (the same: refused, moetune's value named):", ""]
    for key, table in FOREIGN_VALUES.items():
        lines.append(f"  {key}: " + ", ".join(f"{theirs} -> {ours}" for theirs, ours in table.items()))
    return "\n".join(lines)
