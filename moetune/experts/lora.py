"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") and its variants.

    y = W0 x + s * B A x,     s = alpha / r,   A: (r, d_in) random,  B: (d_out, r) zeros

B starts at zero, so a fresh adapter leaves the model unchanged. The delta folds into
the base as W = W0 + s * B A (see `delta_weight`), which is what `merge-lora` does.
Parameter names match PEFT's (`lora_A.weight`, `lora_B.weight`) on export (`peft_export`).

rsLoRA (Kalajdzievski, 2023; `expert.use_rslora`): s = alpha / sqrt(r), PEFT's `use_rslora: true`.

DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"; `expert.use_dora`): a trained
magnitude m (d_out,) rescales each output row of the adapted weight to its own length,

    W' = diag(g) (W0 + s B A),   g = m / n,   n = ||W0 + s B A||_row  (d_out,),   m starts at n,
    y  = W' x + b = y0 + (g - 1) (y0 - b) + g s B A x,   y0 = W0 x + b,

so the layer rescales the base output (`change`). n is recomputed from the dense W0 every forward
(`models.projection.dense_weight`: dequantised on a 4-bit base) and detached, as the paper's section 4.3
and PEFT do; with dropout in training, PEFT's order: the rescaled base term reads W0 dropout(x).
Exported as PEFT's `use_dora: true` with `lora_magnitude_vector` (d_out,).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from moetune.core.adapter_files import LORA_KEYS, PEFT_PREFIX
from moetune.experts.base import ExpertLayer
from moetune.models import projection
from moetune.recipe.experts import ExpertConfig, LoRAConfig, lora_scale


class LoRALayer(ExpertLayer):
    """Low-rank adapter around one frozen projection (plain, rsLoRA, DoRA)."""

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
        if cfg.use_dora:                                        # m = ||W0 + s B A||_row, i.e. ||W0||_row
            self.lora_magnitude_vector = nn.Parameter(self.weight_norm().float())  # (d_out,)

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

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:        # (..., d_in) -> (..., d_out)
        """s B A x (x as given: the caller applies dropout)."""
        return (x @ self.lora_A.t()) @ self.lora_B.t() * self.scale

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """forward(x) - W0 x - b."""
        if self.cfg.use_dora:
            y = self.base(x)
            return self.change(x, y).to(y.dtype)
        return self.low_rank(self.drop(x.to(self.lora_A.dtype)))  # (..., d_out)

    # ------------------------------------------------------------ DoRA

    def weight_norm(self) -> torch.Tensor:                      # -> (d_out,)
        """n = ||W0 + s B A||_row, detached (no gradient flows through it)."""
        with torch.no_grad():
            w0 = projection.dense_weight(self.base).to(self.lora_A.dtype)   # (d_out, d_in)
            return torch.linalg.norm(w0 + self.scale * self.lora_B @ self.lora_A, dim=1)

    def change(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # (..., d_in), (..., d_out) -> (..., d_out)
        if not self.cfg.use_dora:
            return self.delta(x)
        x = x.to(self.lora_A.dtype)
        g = self.lora_magnitude_vector / self.weight_norm()     # (d_out,) m / n
        if isinstance(self.drop, nn.Identity) or not self.training:
            b = projection.bias(self.base)
            w0x = y.to(x.dtype) - (b.to(x.dtype) if b is not None else 0)  # W0 x, from the base pass
        else:                                                   # PEFT: both terms read dropout(x)
            x = self.drop(x)
            w0x = F.linear(x, projection.dense_weight(self.base).to(x.dtype))
        return (g - 1) * w0x + g * self.low_rank(x)             # (..., d_out)

    def delta_weight(self) -> torch.Tensor:                     # (d_out, d_in)
        """W' - W0: s B A, or with DoRA (g - 1) W0 + g s B A, g = m / n."""
        low = self.scale * self.lora_B @ self.lora_A
        if not self.cfg.use_dora:
            return low
        w0 = projection.dense_weight(self.base).to(low.dtype)
        g = (self.lora_magnitude_vector / self.weight_norm())[:, None]
        return (g - 1) * w0 + g * low

    # ------------------------------------------------------------ stock PEFT

    @classmethod
    def peft_export(cls, layers: dict[str, ExpertLayer]) -> tuple[dict, dict[str, torch.Tensor]]:
        """PEFT's LoRA: `lora_A.weight` (r, d_in) and `lora_B.weight` (d_out, r) per module (DoRA: and
        `lora_magnitude_vector` (d_out,)), lora_alpha = alpha, fan_in_fan_out for GPT-2's Conv1D."""
        cfg = next(iter(layers.values())).cfg
        conv1d = any(projection.fan_in_fan_out(layer.base) for layer in layers.values())
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM",
            "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
            "target_modules": sorted(layers), "bias": "none", "fan_in_fan_out": conv1d,
            "modules_to_save": None, "inference_mode": True, "init_lora_weights": True,
            "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        }
        tensors = {f"{PEFT_PREFIX}{name}.{LORA_KEYS[k]}": v.detach().cpu().contiguous()
                   for name, layer in layers.items() for k, v in layer.adapter_state().items()}
        return config, tensors
