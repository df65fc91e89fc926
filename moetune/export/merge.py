"""Folding LoRA adapters into the base weights: W = W0 + s * B A.

A 4-bit base is dequantised first (the merged projection becomes a dense nn.Linear in
the requested dtype), so the merged model reproduces the adapter model up to the
dequantisation and dtype rounding; `max_logit_diff` measures that.
"""
from __future__ import annotations

import torch
from torch import nn

from moetune.adapters.inject import expert_layers
from moetune.core.checkpoint import atomic_dir
from moetune.experts.base import dense_base_weight


@torch.no_grad()
def merge_into_base(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every expert layer of `model` by its base projection with the delta folded in."""
    for name, layer in expert_layers(model).items():
        delta = layer.delta_weight()
        if delta is None:
            raise ValueError(f"{name}: expert type {layer.cfg.type!r} does not fold into the base weights.")
        base = layer.base
        w = dense_base_weight(base).float() + delta.float()        # (d_out, d_in)
        if type(base).__name__ == "Conv1D":                        # GPT-2 stores (d_in, d_out)
            base.weight.data = w.t().contiguous().to(base.weight.dtype)
            new = base
        elif isinstance(base, nn.Linear) and type(base) is nn.Linear:
            base.weight.data = w.to(base.weight.dtype)
            new = base
        else:                                                      # bnb 4-bit: a dense Linear replaces it
            new = nn.Linear(layer.d_in, layer.d_out, bias=base.bias is not None, device=w.device, dtype=dtype)
            new.weight.data = w.to(dtype)
            if base.bias is not None:
                new.bias.data = base.bias.data.to(dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


@torch.no_grad()
def max_logit_diff(a: nn.Module, b_logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
    """max |logits_a - b_logits| over attended positions of `batch`."""
    la = a(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    mask = batch["attention_mask"].bool()
    return float((la - b_logits.float()).abs()[mask].max())


def save_merged(model: nn.Module, tokenizer, out_dir, dtype: torch.dtype, note: str = "") -> None:
    """Save a merged model as a plain HF directory (safetensors), atomically."""
    cfg = model.config
    if getattr(cfg, "quantization_config", None) is not None:  # merged weights are dense now
        delattr(cfg, "quantization_config")
        model.hf_quantizer = None
        model.is_quantized = False
    model.to(dtype)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if note:
            (tmp / "MOETUNE_MERGE.txt").write_text(note)
