"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

    y = W0 x + s * B A x,     s = alpha / r,   A: (r, d_in) random,  B: (d_out, r) zeros

rsLoRA (Kalajdzievski, 2023; `expert.use_rslora`): s = alpha / sqrt(r), PEFT's `use_rslora: true`.

B starts at zero, so a fresh adapter leaves the model unchanged. The delta folds into
the base as W = W0 + s * B A (see `delta_weight`), which is what `merge-lora` does.
Parameter names match PEFT's (`lora_A.weight`, `lora_B.weight`) on export (`peft_export`).
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from moetune.core.adapter_files import LORA_KEYS, PEFT_PREFIX
from moetune.experts.base import ExpertLayer
from moetune.models import projection
from moetune.recipe.experts import ExpertConfig, LoRAConfig, lora_scale


class LoRALayer(ExpertLayer):
    """Plain low-rank adapter around one frozen projection."""

    config_cls = LoRAConfig

    def __init__(self, base: nn.Module, cfg: ExpertConfig, router=None, name: str = "") -> None:
        if not isinstance(cfg, LoRAConfig):  # the shared settings alone (ExpertConfig(type="lora", ...))
            cfg = LoRAConfig(**dataclasses.asdict(cfg))
        super().__init__(base, cfg, router, name)
        r = cfg.rank
        self.scale = lora_scale(cfg.alpha, r, cfg.use_rslora)  # alpha / r; rsLoRA: alpha / sqrt(r)
        self.lora_A = nn.Parameter(torch.empty(r, self.d_in))   # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(self.d_out, r))  # (d_out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # PEFT's default init
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    @classmethod
    def from_factors(cls, base: nn.Module, name: str, a: torch.Tensor, b: torch.Tensor, scale: float,
                     dropout: float = 0.0) -> "LoRALayer":
        """A plain LoRA layer with the given factors a (r, d_in), b (d_out, r) and scale s (lora_alpha = s r, PEFT's
        scale without rsLoRA), e.g. a routed layer collapsed at fixed gates. The random init is drawn from a
        forked RNG stream."""
        r = a.shape[0]
        cfg = LoRAConfig(type="lora", rank=r, alpha=scale * r, dropout=dropout, target_modules=[name])
        with torch.random.fork_rng(devices=[]):
            new = cls(base, cfg, name=name)
        new.lora_A.data = a.detach().clone()
        new.lora_B.data = b.detach().clone()
        return new

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(x.to(self.lora_A.dtype))                  # (..., d_in)
        return (x @ self.lora_A.t()) @ self.lora_B.t() * self.scale  # (..., d_out)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.lora_B @ self.lora_A           # (d_out, d_in)

    @classmethod
    def peft_export(cls, layers: dict[str, ExpertLayer]) -> tuple[dict, dict[str, torch.Tensor]]:
        """PEFT's LoRA: `lora_A.weight` (r, d_in) and `lora_B.weight` (d_out, r) per module, lora_alpha = alpha,
        fan_in_fan_out for GPT-2's Conv1D."""
        cfg = next(iter(layers.values())).cfg
        conv1d = any(projection.fan_in_fan_out(layer.base) for layer in layers.values())
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM",
            "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
            "target_modules": sorted(layers), "bias": "none", "fan_in_fan_out": conv1d,
            "modules_to_save": None, "inference_mode": True, "init_lora_weights": True,
            "use_rslora": cfg.use_rslora, "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {},
        }
        tensors = {f"{PEFT_PREFIX}{name}.{LORA_KEYS[k]}": v.detach().cpu().contiguous()
                   for name, layer in layers.items() for k, v in layer.adapter_state().items()}
        return config, tensors
