"""MoLoRA (Zadouri et al., 2023, "Pushing Mixture of Experts to the Limit: Extremely
Parameter Efficient MoE for Instruction Tuning", arXiv 2309.05444).

N full LoRA experts (A_i, B_i) of rank r each, mixed per token:

    y = W0 x + s * sum_i w_i(x) B_i A_i x,   w(x) = gates(W_g x),   s = alpha / r  (rsLoRA: alpha / sqrt(r))
    A: (N, r, d_in) random,  B: (N, d_out, r) zeros,  W_g: (N, d_in)

All experts run as two matmuls (no loop over experts; the first also yields the router
logits W_g x, see `routing.low_rank_and_gates`):

    h = einsum('...d,nrd->...nr', x, A) = x @ A_cat^T,   A_cat = A.reshape(N*r, d_in)  (a view)
    y = einsum('...n,nor,...nr->...o', w, B, h) = (w * h).flatten(-2) @ B_cat,
        B_cat = B^T stacked: (N*r, d_out)

i.e. exactly a rank-N*r LoRA whose inner activations are scaled by the gates (s is folded
into the (..., N) gates too, which saves two passes over the (..., d_out) output). Top-k
routing (`router.type: top_k`) is computed densely too: unselected experts get gate 0,
so they contribute nothing and receive no gradient, but their FLOPs are still spent
(at adapter sizes a dense pass is cheaper than gathering tokens per expert).
Not mergeable (per-token gates): `delta_weight` is None. At fixed gates w it is a LoRA of rank
N r, A_cat = [A_1; ...; A_N], B_cat = [w_1 B_1, ..., w_N B_N] (`collapse`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from moetune.experts.base import ExpertLayer
from moetune.experts.lora import LoRALayer
from moetune.experts.routing import Router, low_rank_and_gates
from moetune.recipe.experts import MoLoRAConfig, lora_scale


class MoLoRALayer(ExpertLayer):
    """N routed LoRA experts around one frozen projection."""

    config_cls = MoLoRAConfig

    def __init__(self, base: nn.Module, cfg: MoLoRAConfig, router=None, name: str = "") -> None:
        super().__init__(base, cfg, router, name)
        n, r = cfg.num_experts, cfg.rank
        self.scale = lora_scale(cfg.alpha, r, cfg.use_rslora)              # alpha / r, rsLoRA alpha / sqrt(r)
        bound = 1.0 / math.sqrt(self.d_in)  # = PEFT's kaiming_uniform_(a=sqrt(5)) on each (r, d_in) A_i
        self.lora_A = nn.Parameter(torch.empty(n, r, self.d_in).uniform_(-bound, bound))  # (N, r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(n, self.d_out, r))        # (N, d_out, r)
        self.router = Router(self.d_in, n, router)                       # W_g: (N, d_in)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def lora_plus_parameters(self) -> list[nn.Parameter]:
        return [self.lora_B]

    def delta(self, x: torch.Tensor) -> torch.Tensor:                    # (..., d_in) -> (..., d_out)
        n, d_out, r = self.lora_B.shape
        a_cat = self.lora_A.reshape(n * r, self.d_in)                    # (N*r, d_in)
        h, w = low_rank_and_gates(x, a_cat, self.router, self.drop)  # (..., N*r), (..., N)
        w = w * self.scale                                               # (..., N), s folded into the gates
        g = (h.unflatten(-1, (n, r)) * w.unsqueeze(-1)).flatten(-2)      # (..., N*r)
        b_cat = self.lora_B.transpose(1, 2).reshape(n * r, d_out)        # (N*r, d_out)
        return g @ b_cat                                                 # (..., d_out)

    @torch.no_grad()
    def collapse(self, w: torch.Tensor) -> LoRALayer:
        """Gates fixed at w (N,): a LoRA of rank N r with the same scale s (lora_alpha = s N r), `molora_ab`."""
        return LoRALayer.from_factors(self.base, self.name, *molora_ab(self.lora_A, self.lora_B, w), self.scale,
                                      self.cfg.dropout)


def molora_ab(lora_a: torch.Tensor, lora_b: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_cat (N r, d_in), B_cat (d_out, N r)) from lora_a (N, r, d_in), lora_b (N, d_out, r), w (N,);
    column block i of B_cat is w_i B_i, so B_cat A_cat = sum_i w_i B_i A_i."""
    n, r, d_in = lora_a.shape
    b = lora_b * w.to(lora_b.dtype)[:, None, None]                  # (N, d_out, r)
    return lora_a.reshape(n * r, d_in), b.permute(1, 0, 2).reshape(lora_b.shape[1], n * r)
