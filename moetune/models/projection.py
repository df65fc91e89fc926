"""The base projections an adapter wraps, in one place: `torch.nn.Linear`, GPT-2's `Conv1D` and the
bitsandbytes 4-bit (`Linear4bit`, see moetune.models.quant) and 8-bit linears.

Every expert type, the merge, the adapter files and the collapse ask here, never by class name:

    kind(m)            'linear' | 'conv1d' | '4bit' | '8bit' | None (not a projection)
    dims(m)            (d_in, d_out)
    dense_weight(m)    W0 as a dense (d_out, d_in) tensor: Conv1D's (d_in, d_out) weight transposed,
                       a 4-bit weight dequantised (float32)
    bias(m)            b (d_out,) or None
    fan_in_fan_out(m)  PEFT's flag for a weight stored (d_in, d_out) (Conv1D)
    with_weight(m, w)  the module computing x w^T + b: w written into m (Linear, Conv1D), or a new
                       dense nn.Linear (4-bit: what merging into a quantised base produces)

All of them compute y = W0 x + b for an input x (..., d_in): calling the module is calling the base.
"""
from __future__ import annotations

import torch
from torch import nn

from moetune.models.quant import dequantize

KINDS = {"Conv1D": "conv1d", "Linear4bit": "4bit", "Linear8bitLt": "8bit"}


def kind(m: nn.Module) -> str | None:
    """Which kind of projection `m` is (None: not one an adapter can wrap)."""
    name = KINDS.get(type(m).__name__)
    if name is not None:
        return name
    return "linear" if isinstance(m, nn.Linear) else None


def is_projection(m: nn.Module) -> bool:
    """A linear projection an adapter can wrap: nn.Linear, GPT-2 Conv1D, bnb 4/8-bit linears."""
    return kind(m) is not None


def dims(m: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a projection."""
    k = kind(m)
    if k == "conv1d":  # GPT-2: weight is (d_in, d_out), y = x @ W + b
        return int(m.weight.shape[0]), int(m.weight.shape[1])
    if k is not None:
        return int(m.in_features), int(m.out_features)
    raise TypeError(f"cannot wrap {type(m).__name__}: not a linear projection")


def dense_weight(m: nn.Module) -> torch.Tensor:
    """W0 as a dense (d_out, d_in) tensor, dequantising a 4-bit weight (no copy for Linear)."""
    k = kind(m)
    if k == "conv1d":
        return m.weight.data.t()
    if k == "4bit":
        return dequantize(m)
    return m.weight.data


def bias(m: nn.Module) -> torch.Tensor | None:
    """b (d_out,) or None."""
    return getattr(m, "bias", None)


def fan_in_fan_out(m: nn.Module) -> bool:
    """True when the weight is stored (d_in, d_out), as PEFT's `fan_in_fan_out` says (GPT-2's Conv1D)."""
    return kind(m) == "conv1d"


@torch.no_grad()
def with_weight(m: nn.Module, w: torch.Tensor, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The projection computing x w^T + b for w (d_out, d_in): `m` itself with w written in its own layout and
    dtype (nn.Linear, Conv1D), or, for a quantised `m`, a new dense nn.Linear in `dtype` with m's bias."""
    k = kind(m)
    if k == "conv1d":
        m.weight.data = w.t().contiguous().to(m.weight.dtype)
        return m
    if k == "linear" and type(m) is nn.Linear:
        m.weight.data = w.to(m.weight.dtype)
        return m
    b = bias(m)
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=dtype)
    new.weight.data = w.to(dtype)
    if b is not None:
        new.bias.data = b.data.to(dtype)
    return new
