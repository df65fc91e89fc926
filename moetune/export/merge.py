"""Folding LoRA adapters into the base weights: W = W0 + s * B A.

A 4-bit base is dequantised first (every bitsandbytes Linear4bit becomes a dense nn.Linear in
the requested dtype, W0 = dequant(W), see moetune.models.quant), so the merged model reproduces the
4-bit adapter model up to the compute- and merge-dtype rounding; `max_logit_diff` measures that.
"""
from __future__ import annotations

import json

import torch
from torch import nn

from moetune.adapters.inject import expert_layers
from moetune.core.checkpoint import atomic_dir
from moetune.models import projection


def _put(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def merge_into_base(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every expert layer of `model` by its base projection with the delta folded in.

    A 4-bit base is dequantised whole: every bitsandbytes Linear4bit, adapted or not, becomes a dense
    nn.Linear, and the model a plain float model in `dtype` (`dequantized`)."""
    quantized = is_quantized(model)
    for name, layer in expert_layers(model).items():
        delta = layer.delta_weight()
        if delta is None:
            raise ValueError(f"{name}: expert type {layer.cfg.type!r} does not fold into the base weights.")
        w = projection.dense_weight(layer.base).float() + delta.float()  # (d_out, d_in)
        _put(model, name, projection.with_weight(layer.base, w, dtype))  # 4-bit: a dense Linear replaces it
    if quantized:
        dequantized(model, dtype)
    return model


def is_quantized(model: nn.Module) -> bool:
    return getattr(model.config, "quantization_config", None) is not None or getattr(model, "hf_quantizer", None) is not None


@torch.no_grad()
def dequantized(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Turn a 4-bit (bitsandbytes) model into a plain float model in `dtype`, in place: every Linear4bit
    becomes an nn.Linear holding its dequantised weight, and transformers' quantisation marks go, so the
    model casts, saves and reloads as an ordinary checkpoint."""
    for name, m in list(model.named_modules()):
        if projection.kind(m) == "4bit":
            _put(model, name, projection.with_weight(m, projection.dense_weight(m).float(), dtype))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # transformers' own: quantizer, config entry, method marks
    if getattr(model.config, "quantization_config", None) is not None:
        delattr(model.config, "quantization_config")
    model.__dict__.pop("is_loaded_in_4bit", None)
    return model.to(dtype)


@torch.no_grad()
def max_logit_diff(a: nn.Module, b_logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
    """max |logits_a - b_logits| over attended positions of `batch`."""
    la = a(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    mask = batch["attention_mask"].bool()
    return float((la - b_logits.float()).abs()[mask].max())


MERGE_INFO = "MOETUNE_MERGE.json"
"""Beside a merged model: what was merged (adapter, expert type, base) and the template and system prompt it
was trained with, which `moetune chat` uses."""


def save_merged(model: nn.Module, tokenizer, out_dir, dtype: torch.dtype, note: str = "", info: dict | None = None) -> None:
    """Save a merged model as a plain HF directory (safetensors), atomically, with `info` as MOETUNE_MERGE.json."""
    if is_quantized(model):  # a 4-bit model that was not merged: dense weights first
        dequantized(model, dtype)
    model.to(dtype)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if note:
            (tmp / "MOETUNE_MERGE.txt").write_text(note)
        if info:
            (tmp / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n")
