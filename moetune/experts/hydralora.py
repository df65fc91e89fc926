"""HydraLoRA (Tian et al., NeurIPS 2024, "HydraLoRA: An Asymmetric LoRA Architecture").

One shared down-projection A, N up-projection heads B_i, a per-token router:

    y = W0 x + s * sum_i w_i(x) B_i A x,   w(x) = gates(W_g x),   s = alpha / r  (rsLoRA: alpha / sqrt(r))
    A: (r, d_in) random,  B: (N, d_out, r) zeros,  W_g: (N, d_in)

Cost: `h = A x` is computed once (not once per head), in the same matmul as the
router logits W_g x (`routing.low_rank_and_gates`). The heads are then mixed in one
matmul, gates first: with g = w (x) h, the outer product (..., N, r) flattened to N*r,

    sum_i w_i B_i h = einsum('...n,nor,...r->...o', w, B, h) = g @ B_cat,  B_cat = B^T stacked: (N*r, d_out)

That is N*r*d_out multiply-adds per token and an (..., N*r) intermediate, against an
(..., N, d_out) intermediate for einsum('...r,nor->...no') followed by the gate sum. The
scale s multiplies the (..., N) gates, not the (..., d_out) output: the same product, but
it saves a full pass over the output in the forward and another in the backward.
B zeros make a fresh adapter an exact no-op. Per-token gates do not fold into one
dense delta, so `delta_weight` is None (not mergeable); top-k routing still computes all
heads densely, with zero gates for the unselected ones. At fixed gates w it is a LoRA of
rank r with B' = sum_i w_i B_i (`collapse`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from moetune.experts.base import ExpertLayer
from moetune.experts.lora import LoRALayer
from moetune.experts.routing import Router, low_rank_and_gates
from moetune.recipe.experts import HydraLoRAConfig, lora_scale


class HydraLoRALayer(ExpertLayer):
    """Shared A, N routed B heads around one frozen projection."""

    config_cls = HydraLoRAConfig

    def __init__(self, base: nn.Module, cfg: HydraLoRAConfig, router=None, name: str = "") -> None:
        super().__init__(base, cfg, router, name)
        n, r = cfg.num_experts, cfg.rank
        self.scale = lora_scale(cfg.alpha, r, cfg.use_rslora)              # alpha / r, rsLoRA alpha / sqrt(r)
        self.lora_A = nn.Parameter(torch.empty(r, self.d_in))            # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(n, self.d_out, r))        # (N, d_out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))            # as LoRA / PEFT
        self.router = Router(self.d_in, n, router)                       # W_g: (N, d_in)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def lora_plus_parameters(self) -> list[nn.Parameter]:
        return [self.lora_B]

    def delta(self, x: torch.Tensor) -> torch.Tensor:                    # (..., d_in) -> (..., d_out)
        h, w = low_rank_and_gates(x, self.lora_A, self.router, self.drop)  # (..., r), (..., N)
        w = w * self.scale                                               # (..., N), s folded into the gates
        g = (w.unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)              # (..., N*r)
        n, d_out, r = self.lora_B.shape
        b_cat = self.lora_B.transpose(1, 2).reshape(n * r, d_out)        # (N*r, d_out)
        return g @ b_cat                                                 # (..., d_out)

    @torch.no_grad()
    def collapse(self, w: torch.Tensor) -> LoRALayer:
        """Gates fixed at w (N,): s sum_i w_i B_i A x = s B' A x, B' = sum_i w_i B_i, a LoRA of rank r."""
        return LoRALayer.from_factors(self.base, self.name, self.lora_A, hydra_b(self.lora_B, w), self.scale,
                                      self.cfg.dropout)


def hydra_b(lora_b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """B' = sum_i w_i B_i: lora_b (N, d_out, r), w (N,) -> (d_out, r)."""
    return torch.einsum("n,nor->or", w.to(lora_b.dtype), lora_b)
