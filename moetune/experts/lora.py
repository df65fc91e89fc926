"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

    y = W0 x + s * B A x,     s = alpha / r,   A: (r, d_in) random,  B: (d_out, r) zeros

B starts at zero, so a fresh adapter leaves the model unchanged. The delta folds into
the base as W = W0 + s * B A (see `delta_weight`), which is what `merge-lora` does.
Parameter names match PEFT's (`lora_A.weight`, `lora_B.weight`) on export.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from moetune.experts.base import ExpertLayer
from moetune.recipe.experts import ExpertConfig


class LoRALayer(ExpertLayer):
    """Plain low-rank adapter around one frozen projection."""

    config_cls = ExpertConfig
    mergeable = True

    def __init__(self, base: nn.Module, cfg: ExpertConfig, router=None, name: str = "") -> None:
        super().__init__(base, cfg, router, name)
        r = cfg.rank
        self.scale = cfg.alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, self.d_in))   # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(self.d_out, r))  # (d_out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # PEFT's default init
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(x.to(self.lora_A.dtype))                  # (..., d_in)
        return (x @ self.lora_A.t()) @ self.lora_B.t() * self.scale  # (..., d_out)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.lora_B @ self.lora_A           # (d_out, d_in)
