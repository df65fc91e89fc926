"""MoV, mixture of (IA)^3 vectors (Zadouri et al., 2023, "Pushing Mixture of Experts to the
Limit: Extremely Parameter Efficient MoE for Instruction Tuning", arXiv 2309.05444).

Each expert is an (IA)^3 scaling vector l_i (Liu et al., 2022), all initialised to ones;
a per-token router mixes them and the mixture scales an activation h elementwise:

    h' = h ⊙ sum_i w_i(x) l_i = h ⊙ (1 + w(x) @ (L - 1)),   L: (N, d),   w(x) = gates(W_g x)

(the two forms are equal because the gates sum to 1; the second is exactly 1 for a fresh
adapter, so fresh MoV leaves the model bit-for-bit unchanged). As in (IA)^3, h is
- the OUTPUT of the attention key and value projections (k_proj, v_proj): d = d_out;
- the FFN intermediate activation, i.e. the INPUT of the down projection (Llama
  down_proj, GPT-2 mlp.c_proj): d = d_in. `input_scaled_modules` names these.
Both default to 'auto': these places on the model's architecture (moetune/models/targets.py).
The router reads the wrapped projection's input x. Scaling is not additive, so this type
overrides `forward` (one base pass); per-token gates do not fold into the weights, so it
is not mergeable. `rank`, `alpha` and `dropout` are unused.

GPT-2 fuses q, k and v into one `c_attn` (NeoX `query_key_value`, Phi-3 `qkv_proj`); 'auto'
targets it there, which scales queries too, as PEFT's IA3 does on GPT-2. Llama-style models and
OPT get exactly keys, values and the FFN intermediate.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moetune.core.adapter_files import PEFT_PREFIX
from moetune.experts.base import ExpertLayer
from moetune.experts.routing import Router
from moetune.models import projection
from moetune.models.load import matches_pattern
from moetune.models.targets import resolve_auto
from moetune.recipe import RouterConfig
from moetune.recipe.experts import MoVConfig


class MoVLayer(ExpertLayer):
    """N routed (IA)^3 vectors scaling one frozen projection's input or output."""

    config_cls = MoVConfig

    def __init__(self, base: nn.Module, cfg: MoVConfig, router=None, name: str = "") -> None:
        super().__init__(base, cfg, router, name)
        self.scale_input = any(matches_pattern(name, p) for p in cfg.input_scaled_modules)
        d = self.d_in if self.scale_input else self.d_out
        self.ia3_l = nn.Parameter(torch.ones(cfg.num_experts, d))       # (N, d), l_i = 1
        self.router = Router(self.d_in, cfg.num_experts, router)        # W_g: (N, d_in)

    @classmethod
    def for_model(cls, model: nn.Module, cfg: MoVConfig) -> MoVConfig:
        """'auto' in target_modules (keys, values, FFN down) and in input_scaled_modules (FFN down) resolved
        for the model's architecture."""
        cfg = super().for_model(model, cfg)
        if "auto" not in cfg.input_scaled_modules:
            return cfg
        return dataclasses.replace(cfg, input_scaled_modules=resolve_auto(
            list(cfg.input_scaled_modules), model, cfg.auto_input_scaled, "expert.input_scaled_modules"))

    def scaling(self, x: torch.Tensor) -> torch.Tensor:                 # (..., d_in) -> (..., d)
        """sum_i w_i(x) l_i, as 1 + w @ (L - 1) (exactly 1 while L is ones)."""
        w = self.router(x)                                              # (..., N) float32
        with torch.autocast(x.device.type, enabled=False):              # keep 1 + small in float32
            l_minus_1 = self.ia3_l.float() - 1.0                        # (N, d)
            s = torch.addmm(l_minus_1.new_ones(()), w.reshape(-1, w.shape[-1]), l_minus_1)  # (T, d), "1 +" fused
            return s.reshape(*w.shape[:-1], l_minus_1.shape[-1])        # (..., d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                 # (..., d_in) -> (..., d_out)
        if self.adapter_off:
            return self.base(x)
        s = self.scaling(x)
        if self.scale_input:
            return self.base(x * s.to(x.dtype))
        y = self.base(x)
        return y * s.to(y.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:                   # (..., d_in) -> (..., d_out)
        """forward(x) - W0 x (for the interface; `forward` does not use it)."""
        return self.forward(x) - self.base(x)

    @torch.no_grad()
    def collapse(self, w: torch.Tensor) -> "MoVLayer":
        """Gates fixed at w (N,): h * l', l' = 1 + w @ (L - 1) (`mov_vector`): a one-expert MoV layer, whose
        gate is exactly 1, i.e. (IA)^3 (`peft_export` writes it as a PEFT IA3 adapter)."""
        cfg = MoVConfig(type="mov", num_experts=1, target_modules=[self.name],
                        input_scaled_modules=list(self.cfg.input_scaled_modules))
        with torch.random.fork_rng(devices=[]):
            new = MoVLayer(self.base, cfg, RouterConfig(), name=self.name).to(self.ia3_l.device)
        assert new.scale_input == self.scale_input, self.name
        new.ia3_l.data = mov_vector(self.ia3_l, w).detach().clone()[None]   # (1, d)
        return new

    @classmethod
    def peft_export(cls, layers: dict[str, ExpertLayer]) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """One-expert layers (a collapse) as PEFT's IA3: 'base_model.model.<module>.ia3_l', (1, d_in) on
        `feedforward_modules` (input-scaled, the FFN intermediate), else (d_out, 1); None with N > 1."""
        if any(m.ia3_l.shape[0] != 1 for m in layers.values()):
            return None
        tensors = {f"{PEFT_PREFIX}{n}.ia3_l": (m.ia3_l[0][None] if m.scale_input else m.ia3_l[0][:, None])
                   .detach().float().cpu().contiguous() for n, m in layers.items()}
        conv1d = any(projection.fan_in_fan_out(m.base) for m in layers.values())
        config = {"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": sorted(layers),
                  "feedforward_modules": sorted(n for n, m in layers.items() if m.scale_input),
                  "fan_in_fan_out": conv1d, "exclude_modules": None, "modules_to_save": None,
                  "init_ia3_weights": True, "inference_mode": True}
        return config, tensors


def mov_vector(ia3_l: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """l' = 1 + w @ (L - 1) = sum_i w_i l_i (the gates sum to 1): ia3_l (N, d), w (N,) -> (d,)."""
    return 1.0 + w.to(ia3_l.dtype) @ (ia3_l - 1.0)
