"""The one interface every expert type implements.

An expert layer wraps one frozen base projection (``nn.Linear``, GPT-2 ``Conv1D`` or a
bitsandbytes 4-bit linear; `moetune.models.projection` knows their dims, dense weight and bias)
and adds a trainable delta. The training loop only ever
sees this interface: it adds ``sum(aux_losses())`` over wrapped layers to the task
loss and never knows which expert type it trains.
"""
from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from moetune.core.errors import RecipeError
from moetune.models.load import find_targets
from moetune.models.targets import resolve_auto
from moetune.models.projection import dense_weight as dense_base_weight  # noqa: F401 (the dispatch's, for callers)
from moetune.models.projection import dims as base_dims
from moetune.recipe.experts import ExpertConfig


def compute_input(x: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """x as an adapter matmul with `param` reads it. Under autocast (`train.precision: bf16`, moetune/train/
    precision.py) x is left as it is: autocast runs the matmul in bf16, casting the float32 master weight
    once per forward, and its backward (dx, dW) in bf16 too; the weight's gradient reaches the float32
    master through that cast (mixed precision as in Micikevicius et al. 2018, "Mixed Precision Training",
    without loss scaling: bf16 has float32's exponent range). Without autocast, x is cast to the
    parameter's dtype (float32 adapters on a bfloat16 base compute in float32)."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(param.dtype)


class ExpertLayer(nn.Module, abc.ABC):
    """Wraps one frozen base projection. Subclasses: one file each, one paper each.

    Everything type-specific is a hook of the layer class (below) or of its settings class
    `config_cls` (the torch-free facts: mergeable, routed, collapsible, stock PEFT, model-card lines;
    see moetune.recipe.experts), so the code above the experts layer never names a type.

    A type that wraps other modules than the projections chosen by `target_modules` (CALM: whole
    decoder blocks, plus a second model) defines a classmethod `inject_model(model, cfg) -> {name:
    layer}`, which `inject` calls instead of wrapping every target projection."""

    config_cls: ClassVar[type[ExpertConfig]] = ExpertConfig
    mergeable: ClassVar[bool] = False  # = config_cls.mergeable (set for every subclass)
    adapter_off: bool = False
    """True: the layer computes its base module alone (`moetune.adapters.inject.adapters_off`: the reference
    model of preference tuning). Every `forward` checks it first."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.mergeable = cls.config_cls.mergeable

    def __init__(self, base: nn.Module, cfg: ExpertConfig, router: Any = None, name: str = "") -> None:
        super().__init__()
        self.name = name  # the wrapped module's name in the model ('model.layers.0.mlp.down_proj')
        self.base = base
        self.cfg = cfg
        self.router_cfg = router
        self.d_in, self.d_out = self.dims(base)

    def dims(self, base: nn.Module) -> tuple[int, int]:
        """(d_in, d_out) of the wrapped module: a projection here; CALM wraps whole decoder blocks."""
        return base_dims(base)

    @abc.abstractmethod
    def delta(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_out)
        """The adapter's additive contribution for input x."""

    def change(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # (..., d_in), (..., d_out) -> (..., d_out)
        """What the layer adds to the base output y = W0 x + b: `delta(x)` for an additive type. A type whose
        forward also rescales the base output overrides this and reads y (DoRA: (m/n - 1) (y - b) + (m/n) s B A x)."""
        return self.delta(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_out)
        y = self.base(x)
        if self.adapter_off:
            return y
        return y + self.change(x, y).to(y.dtype)

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses of the last forward, already weighted by the recipe. Default: the layer's `router`
        (moetune.experts.routing.Router: balance, z and domain losses), none for a layer without one."""
        router = getattr(self, "router", None)
        return router.aux_losses() if router is not None else {}

    def balance_sums(self) -> tuple[Any, torch.Tensor] | None:
        """(router settings, load sums (2N + 2,) of the last forward's real tokens, moetune.experts.balance.load_sums)
        for the balance loss and z-loss over the global batch (`router.balance_scope: global`,
        moetune/train/global_balance.py); None for a layer without a router group of its own. Default: the
        layer's `router` (HydraLoRA, MoLoRA, MoV); MoLE answers on the first place, for all places."""
        router = getattr(self, "router", None)
        sums = router.load_sums() if hasattr(router, "load_sums") else None
        return None if sums is None else (router.cfg, sums)

    def lora_plus_parameters(self) -> list[nn.Parameter]:
        """The parameters LoRA+ trains at lr * train.lora_plus_ratio (the B matrices; `config_cls.lora_plus`)."""
        return []

    def routing_stats(self) -> dict | None:
        """Gate statistics of the last forward (routed types), for the routing report. Default: the layer's
        `router`'s, None for a layer without one."""
        router = getattr(self, "router", None)
        return router.stats() if router is not None else None

    def delta_weight(self) -> torch.Tensor | None:
        """Dense (d_out, d_in) delta when the adapter folds into the base, else None."""
        return None

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Trainable tensors of this layer, keyed by local name (no base weights)."""
        return {k: v for k, v in self.named_parameters() if not k.startswith("base.")}

    # ------------------------------------------------ hooks for types that span layers (MoLE)

    @classmethod
    def for_model(cls, model: nn.Module, cfg: ExpertConfig) -> ExpertConfig:
        """The settings `inject` builds the layers from: a copy with `target_modules: auto` resolved for the
        model's architecture (the type's `auto_targets`, moetune.models.targets); `cfg` itself when nothing
        is 'auto'. A type with more per-architecture keys resolves them here too (MoV)."""
        if "auto" not in cfg.target_modules:
            return cfg
        return dataclasses.replace(cfg, target_modules=resolve_auto(list(cfg.target_modules), model, cfg.auto_targets))

    @classmethod
    def target_names(cls, model: nn.Module, cfg: ExpertConfig) -> list[str]:
        """Names of the projections this type wraps (default: `cfg.target_modules`)."""
        return find_targets(model, list(cfg.target_modules))

    @classmethod
    def after_inject(cls, layers: dict[str, "ExpertLayer"]) -> None:
        """Called once with every new layer of a model (model order), before the parameters are
        marked trainable: a type whose layers share state links them here."""

    @classmethod
    def export_config(cls, cfg: ExpertConfig, out_dir: Path) -> dict:
        """The `expert` entry of a saved adapter's moetune.json; a type may write files to `out_dir`."""
        return dataclasses.asdict(cfg)

    @classmethod
    def import_config(cls, cfg: ExpertConfig, adapter_dir: Path) -> ExpertConfig:
        """The inverse of `export_config` when loading from `adapter_dir` (e.g. resolve relative paths)."""
        return cfg

    # ------------------------------------------------ stock formats, collapse, masking, memory

    @classmethod
    def peft_export(cls, layers: dict[str, "ExpertLayer"]) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """The stock PEFT adapter these layers (name -> layer, one model) amount to: (adapter_config.json
        without `base_model_name_or_path`, tensors keyed as PEFT saves them, 'base_model.model.<module>.<name>'),
        or None when stock PEFT has no equivalent. `save_adapter` writes it for a `config_cls.stock_peft`
        type; `moetune export --collapse` for the layers `collapse` returns."""
        return None

    def collapse(self, w: torch.Tensor) -> "ExpertLayer":
        """The static layer equal to this routed layer with its gates fixed at w (N,) (the collapse rule
        of a `config_cls.collapsible` type; its class has a `peft_export`)."""
        raise RecipeError(f"{self.name}: expert type {self.cfg.type!r} has no collapse rule; `moetune export "
                          "--collapse` is for the types that route tokens to low-rank or (IA)^3 experts.")

    @classmethod
    def set_mask(cls, layers, names: list[str]) -> None:
        """Fix the gates of the experts named `names` at 0 in `layers` (a type with `config_cls.mask_key`)."""
        raise RecipeError("--mask-experts applies to adapters whose experts can be masked (MoLE); this "
                          f"adapter is a {cls.config_cls.__name__} adapter.")

    @classmethod
    def write_mask(cls, adapter_dir: Path, names: list[str]) -> None:
        """Record `names` as masked in the saved adapter at `adapter_dir` (a type with `config_cls.mask_key`)."""
        cls.set_mask([], names)

    @classmethod
    def lora_mixture(cls, layers: dict[str, "ExpertLayer"], place_gates: dict[str, torch.Tensor]
                     ) -> tuple[list[str], list[str], dict[str, torch.Tensor]]:
        """(expert adapter directories, expert names, {module: weights (N,)}) of a type that mixes trained
        LoRAs (`config_cls.mixes_trained_loras`), from the mean gate of each gated place (place name ->
        (N,)): what `merge-lora --method mole --gates-from` folds."""
        raise RecipeError(f"expert type {cls.config_cls.__name__} does not mix trained LoRA adapters.")

    @classmethod
    def generation_state(cls, model: nn.Module) -> Any | None:
        """The object that holds a generation's per-sequence state outside the KV cache and the routing
        context (CALM: the augmenting model's states and cache), or None. A server that decodes sequences
        which join and leave a batch (`moetune serve`) moves it with the cache rows through its methods:
        `snapshot()` -> S (the current state, by reference), `restore(S, cache)` (make S current, in step
        with the anchor's KV cache object `cache`), `select(S, idx)` (keep batch rows idx),
        `shift(S, n)` (n > 0: n masked positions added on the left; n < 0: the -n leftmost dropped) and
        `concat([S, ...])` (rows stacked; equal lengths)."""
        return None

    @classmethod
    def parameters_over_experts(cls, model: nn.Module, cfg: ExpertConfig, router: Any, targets: list[str],
                                n: int) -> int:
        """Parameters a type that first trains per-domain experts (`config_cls.per_domain_expert`) trains on top
        of `n` of them that adapt the projections `targets` of `model` (the meta device will do): what its
        budget adds to theirs before any expert exists (`moetune compare --budget equal-params`)."""
        raise RecipeError(f"expert type {cls.config_cls.__name__} trains no per-domain experts to count over.")

    @classmethod
    def extra_frozen_bytes(cls, model: nn.Module, cfg: ExpertConfig, model_cfg, dtype_bytes: int) -> dict | None:
        """Frozen bytes this type adds besides the base model's ({'quantized', 'float'}; CALM: its second
        model), for `moetune validate`'s memory estimate; None when it adds none."""
        return None
