"""`train.precision`: the compute dtype of training, the same path on CPU and GPU.

'bf16' runs each micro-batch's forward under `torch.autocast(device, bfloat16)` (train/step.py), on CPU as
on CUDA: the base's and the adapters' matmuls run in bfloat16 forward AND backward, reading the
float32 adapter master weights through autocast's per-forward cast (moetune.experts.base.compute_input keeps
the expert layers from casting their input back to float32); the weight gradients, the AdamW state and the
update stay float32, routers and the loss (log-softmax + cross-entropy over float32 logits) run in float32.
No loss scaling: bfloat16 has float32's exponent range (Micikevicius et al. 2018 need it for fp16 only).
'auto' (the default) is 'bf16' when the base loads in bfloat16 (`model.dtype: bfloat16`), else 'fp32'.
CPUs with avx512_bf16 / AMX run bf16 matmuls about twice as fast as fp32 (benchmarks/RESULTS.md); others
emulate them.
"""
from __future__ import annotations

import contextlib

import torch


def compute_precision(recipe) -> str:
    """The precision a recipe trains in: 'fp32', 'bf16' or 'fp16' ('auto' resolved by model.dtype)."""
    p = recipe.train.precision
    if p == "auto":
        return "bf16" if recipe.model.dtype == "bfloat16" else "fp32"
    return p


def mixed_precision(recipe, cpu: bool) -> str:
    """accelerate's `mixed_precision` for the recipe: 'fp16' on GPU (autocast with its loss scaler), else 'no':
    bf16 autocast is the train step's own (accelerate's process-wide state would refuse a second run of another
    precision in the same process), and fp16 autocast needs a GPU (on CPU it trains fp32)."""
    return "fp16" if compute_precision(recipe) == "fp16" and not cpu else "no"


def compute_autocast(device: torch.device, precision: str):
    """The autocast context of `precision` on `device`: the train step's for bf16; benchmarks and tests use it too."""
    if precision == "bf16" or (precision == "fp16" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()
