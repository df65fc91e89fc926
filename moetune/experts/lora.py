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

PiSSA (Meng et al., 2024) and OLoRA (Buyukakyuz, 2024) (`expert.init: pissa | olora`): A and B start at
factors A0, B0 of W0 (`principal_factors`) and train against the residual W_res = W0 - s B0 A0. The base is
never modified: the layer keeps A0, B0 (frozen buffers) and computes

    y = W0 x + s (B A - B0 A0) x  (= W_res x + s B A x),

which is exactly 0 + W0 x for a fresh adapter. That delta is a plain LoRA of rank 2r on the original
base, A' = [A; A0], B' = [B, -B0], with lora_alpha doubled (sqrt(2) times with rsLoRA) so that the scale
stays s: PEFT's `path_initial_model_for_weight_conversion` form. moetune saves, merges and exports that
form, so stock PEFT loads the adapter onto the ORIGINAL base and the merged model equals the trained one.
A resumed run recomputes A0, B0 from the same base weights (deterministic).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from moetune.core.adapter_files import LORA_KEYS, PEFT_PREFIX
from moetune.core.errors import RecipeError
from moetune.experts.base import ExpertLayer, compute_input
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
        if cfg.init != "default":                               # PiSSA / OLoRA: A, B start at A0, B0
            if cfg.use_dora:
                raise RecipeError("expert.init pissa/olora does not combine with expert.use_dora.")
            if r > min(self.d_in, self.d_out):
                raise RecipeError(f"Recipe key 'expert.rank' is {r}, more than {name or 'a wrapped projection'} "
                                  f"({self.d_out} x {self.d_in}) has components for expert.init={cfg.init!r}. "
                                  f"Allowed: a rank <= {min(self.d_in, self.d_out)}.")
            a0, b0 = principal_factors(projection.dense_weight(base), r, self.scale, cfg.init)
            self.lora_A.data.copy_(a0)
            self.lora_B.data.copy_(b0)
            self.register_buffer("lora_A0", a0, persistent=False)   # (r, d_in), frozen
            self.register_buffer("lora_B0", b0, persistent=False)   # (d_out, r), frozen

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
        """s B A x, or s (B A - B0 A0) x after a PiSSA/OLoRA init (x as given: the caller applies dropout)."""
        out = (x @ self.lora_A.t()) @ self.lora_B.t()
        if self.cfg.init != "default":                          # the same ops on A0, B0: exactly 0 when fresh
            out = out - (x @ self.lora_A0.t()) @ self.lora_B0.t()
        return out * self.scale

    def lora_plus_parameters(self) -> list[nn.Parameter]:
        return [self.lora_B]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """forward(x) - W0 x - b."""
        if self.cfg.use_dora:
            y = self.base(x)
            return self.change(x, y).to(y.dtype)
        return self.low_rank(self.drop(compute_input(x, self.lora_A)))  # (..., d_out)

    # ------------------------------------------------------------ DoRA

    def weight_norm(self) -> torch.Tensor:                      # -> (d_out,)
        """n = ||W0 + s B A||_row, detached (no gradient flows through it)."""
        with torch.no_grad():
            w0 = projection.dense_weight(self.base).to(self.lora_A.dtype)   # (d_out, d_in)
            return torch.linalg.norm(w0 + self.scale * self.lora_B @ self.lora_A, dim=1)

    def change(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # (..., d_in), (..., d_out) -> (..., d_out)
        if not self.cfg.use_dora:
            return self.delta(x)
        x = compute_input(x, self.lora_A)
        g = self.lora_magnitude_vector / self.weight_norm()     # (d_out,) m / n
        if isinstance(self.drop, nn.Identity) or not self.training:
            b = projection.bias(self.base)
            w0x = y.to(x.dtype) - (b.to(x.dtype) if b is not None else 0)  # W0 x, from the base pass
        else:                                                   # PEFT: both terms read dropout(x)
            x = self.drop(x)
            w0x = F.linear(x, projection.dense_weight(self.base).to(x.dtype))
        return (g - 1) * w0x + g * self.low_rank(x)             # (..., d_out)

    def delta_weight(self) -> torch.Tensor:                     # (d_out, d_in)
        """W' - W0: s B A (PiSSA/OLoRA: s (B A - B0 A0)), or with DoRA (g - 1) W0 + g s B A, g = m / n."""
        low = self.scale * self.lora_B @ self.lora_A
        if self.cfg.init != "default":
            low = low - self.scale * self.lora_B0 @ self.lora_A0
        if not self.cfg.use_dora:
            return low
        w0 = projection.dense_weight(self.base).to(low.dtype)
        g = (self.lora_magnitude_vector / self.weight_norm())[:, None]
        return (g - 1) * w0 + g * low

    # ------------------------------------------------------------ stock PEFT

    def saved_state(self) -> dict[str, torch.Tensor]:
        """The tensors as saved: `adapter_state`, or after a PiSSA/OLoRA init the rank-2r LoRA on the original
        base, lora_A = [A; A0] (2r, d_in), lora_B = [B, -B0] (d_out, 2r)."""
        state = {k: v.detach() for k, v in self.adapter_state().items()}
        if self.cfg.init != "default":
            state["lora_A"] = torch.cat([state["lora_A"], self.lora_A0])
            state["lora_B"] = torch.cat([state["lora_B"], -self.lora_B0], 1)
        return state

    @classmethod
    def export_config(cls, cfg: ExpertConfig, out_dir) -> dict:
        """The settings as saved: after a PiSSA/OLoRA init, those of the rank-2r plain LoRA it is saved as
        (`stored_settings`), with the trained ones under 'converted_from'."""
        return stored_settings(cfg)

    @classmethod
    def peft_export(cls, layers: dict[str, ExpertLayer]) -> tuple[dict, dict[str, torch.Tensor]]:
        """PEFT's LoRA: `lora_A.weight` (r, d_in) and `lora_B.weight` (d_out, r) per module (DoRA: and
        `lora_magnitude_vector` (d_out,)), lora_alpha = alpha, fan_in_fan_out for GPT-2's Conv1D; after a
        PiSSA/OLoRA init the rank-2r form (`saved_state`, `stored_settings`)."""
        cfg = stored_settings(next(iter(layers.values())).cfg)
        conv1d = any(projection.fan_in_fan_out(layer.base) for layer in layers.values())
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM",
            "r": cfg["rank"], "lora_alpha": cfg["alpha"], "lora_dropout": cfg["dropout"],
            "target_modules": sorted(layers), "bias": "none", "fan_in_fan_out": conv1d,
            "modules_to_save": None, "inference_mode": True, "init_lora_weights": True,
            "use_rslora": cfg["use_rslora"], "use_dora": cfg["use_dora"], "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        }
        tensors = {f"{PEFT_PREFIX}{name}.{LORA_KEYS[k]}": v.cpu().contiguous()
                   for name, layer in layers.items() for k, v in layer.saved_state().items()}
        return config, tensors


def stored_settings(cfg: ExpertConfig) -> dict:
    """The settings of the adapter as saved (moetune.json's `expert`, PEFT's r and lora_alpha): `cfg`, or after a
    PiSSA/OLoRA init the plain LoRA of rank 2r with the same scale (lora_alpha doubled, times sqrt(2) with
    rsLoRA), the trained settings kept under 'converted_from'."""
    d = dataclasses.asdict(cfg)
    init = d.get("init", "default")
    if init == "default":
        return d
    factor = math.sqrt(2) if d.get("use_rslora") else 2.0
    return {**d, "rank": 2 * d["rank"], "alpha": d["alpha"] * factor, "init": "default",
            "converted_from": {"init": init, "rank": d["rank"], "alpha": d["alpha"]}}


@torch.no_grad()
def principal_factors(w: torch.Tensor, r: int, scale: float, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 (r, d_in), B0 (d_out, r)) from W0 = w (d_out, d_in), in float32 (PEFT's formulas):
    pissa: W0 = U S V^T, A0 = diag(sqrt(S_r / s)) V_r^T, B0 = U_r diag(sqrt(S_r / s)), so s B0 A0 = U_r S_r V_r^T;
    olora: W0 = Q R, A0 = R[:r], B0 = Q[:, :r] (not divided by s, as in PEFT).
    On the meta device (`moetune validate`) only the shapes."""
    if w.device.type == "meta":
        return w.new_empty(r, w.shape[1], dtype=torch.float32), w.new_empty(w.shape[0], r, dtype=torch.float32)
    w = w.float()
    if how == "pissa":
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        sr = sv[:r] / scale
        return torch.diag(torch.sqrt(sr)) @ vh[:r], u[:, :r] @ torch.diag(torch.sqrt(sr))
    q, rr = torch.linalg.qr(w)
    return rr[:r].contiguous(), q[:, :r].contiguous()
