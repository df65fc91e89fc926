"""The base of every expert type's settings (`expert:` in a recipe), torch-free: `ExpertConfig`.

Its fields are the ones every type shares (rank, alpha, dropout, target modules, ...); its class attributes
and methods are what the torch-free code above the schema asks a type (whether it merges, routes, collapses,
is a stock PEFT adapter, which key --mask-experts sets, its lines in `validate` and the model card, its
budget keys for `moetune compare`). The subclasses, one per type, and the `expert.type` table are in
`moetune/recipe/experts.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from moetune.core.errors import RecipeError
from moetune.core.schema import opt

GRANULARITIES = ("matrix", "layer", "block", "network")


def _error(msg: str) -> Exception:
    return RecipeError(msg)


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """The adapter scale s: alpha / r (LoRA), or alpha / sqrt(r) with rsLoRA (Kalajdzievski, 2023)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


@dataclass
class ExpertConfig:
    """Settings shared by every expert type (``expert:`` in a recipe)."""

    type: str = "lora"
    """Expert type, a key of the expert registry (lora, ...)."""
    rank: int = opt(8, min=1)
    """Rank r of each low-rank adapter (LoRA: A is r x d_in, B is d_out x r)."""
    alpha: float = opt(16.0, min=0)
    """Scaling numerator: the adapter output is multiplied by s = alpha / rank (alpha / sqrt(rank)
    with use_rslora)."""
    dropout: float = opt(0.0, min=0, max=1)
    """Dropout on the adapter's input during training (0 disables it)."""
    target_modules: list[str] = opt(factory=lambda: ["all-linear"])
    """Which projections to wrap: 'all-linear' (every linear layer but the output head), 'auto' (the
    type's default places on the model's architecture, moetune/models/targets.py: all-linear for the
    low-rank types, keys, values and the FFN down projection for mov), exact module names ('q_proj'
    matches '...self_attn.q_proj'), shell globs ('layers.1*.mlp.*') or regular expressions prefixed
    with 're:'."""
    init_seed: int | None = None
    """Seed for adapter initialisation (None: use train.seed)."""
    use_rslora: bool = False
    """rsLoRA (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA"):
    scale the adapter by s = alpha / sqrt(rank) instead of alpha / rank, so that large ranks learn as
    fast as small ones. For the types with a low-rank scale: lora, hydralora, molora (s multiplies the
    gates) and MoLE's per-domain LoRAs. Exported as PEFT's `use_rslora: true`."""

    mergeable: ClassVar[bool] = False
    """The adapter folds into the base weights (`merge` stage, `merge-lora`, export.kind merged/both)."""
    routed: ClassVar[bool] = False
    """Every token gets its own gates over the experts (a `Router`; the routing report covers it)."""
    collapsible: ClassVar[bool] = False
    """`moetune export --collapse` fixes the gates at their mean and writes a stock PEFT adapter."""
    stock_peft: ClassVar[bool] = False
    """The saved adapter directory is a stock PEFT adapter (`peft.PeftModel.from_pretrained` loads it)."""
    mask_key: ClassVar[str | None] = None
    """The list key under `expert:` that --mask-experts sets, for a type whose experts can be masked."""
    auto_targets: ClassVar[tuple[tuple[str, ...], ...] | None] = None
    """What `target_modules: auto` wraps: places, each a tuple of alternative roles of
    moetune.models.targets (q, k, v, qkv, o, gate, up, gate_up, down); None: every linear layer."""
    scaled: ClassVar[bool] = True
    """The type multiplies a low-rank delta by s = alpha / r, so `use_rslora` applies."""
    lora_plus: ClassVar[bool] = True
    """The type trains B matrices (layer hook `lora_plus_parameters`), so `train.lora_plus_ratio` applies."""
    path_keys: ClassVar[tuple[str, ...]] = ()
    """Keys of this type's settings that name local files or directories it reads (a path or a list of them):
    a run directory records them absolute (`moetune.recipe.anchor_paths`)."""
    mixes_trained_loras: ClassVar[bool] = False
    """The experts are trained LoRA adapters mixed by learned gates (`merge-lora --method mole
    --gates-from RUN` folds them at their mean gates)."""
    budget_keys: ClassVar[tuple[str, ...]] = ("rank",)
    """Integer keys `moetune compare --budget equal-params` may change to meet a parameter budget, the first
    preferred (`alpha` follows `rank`, so the scale alpha / r is unchanged); empty: the type is used as set."""
    from_data: ClassVar[dict] = {}
    """Settings `moetune compare --methods TYPE` adds to the type's defaults so that it runs on a recipe's model
    and data alone (MoLE: train one LoRA per domain first)."""

    def check_recipe(self, recipe) -> None:
        """Recipe-level checks that need no model (called when a recipe is loaded)."""
        if self.use_rslora and not self.scaled:
            raise _error(f"Recipe key 'expert.use_rslora' is true, but expert type {self.type!r} has no low-rank "
                         "scale alpha / rank to change. Allowed: false (rsLoRA is for lora, hydralora, molora).")
        if recipe.train.lora_plus_ratio != 1.0 and not self.lora_plus:
            raise _error(f"Recipe key 'train.lora_plus_ratio' is {recipe.train.lora_plus_ratio}, but expert type "
                         f"{self.type!r} trains no B matrices. Allowed: 1 (LoRA+ is for lora, hydralora, molora and "
                         "MoLE's per-domain LoRAs).")

    def variants(self) -> list[str]:
        """The variants of the method this expert uses, for `validate` and the model card ('rsLoRA', ...)."""
        return ["rsLoRA (s = alpha / sqrt(r))"] if self.use_rslora and self.scaled else []

    def describe(self) -> str:
        """The expert in one line of `moetune validate`."""
        extra = "".join(f", {v}" for v in self.variants())
        return f"{self.type} rank {self.rank} on {list(self.target_modules)}{extra}"

    def card_line(self) -> str:
        """The expert in the model card's `- Expert:` line."""
        extra = "".join(f", {v}" for v in self.variants())
        return f"{self.type}, rank {self.rank}, alpha {self.alpha}, targets {list(self.target_modules)}{extra}"

    def how_to_load(self, sub: str) -> str:
        """The model card's sentence on loading the adapter directory `sub` (without a merged model)."""
        return (f"a {self.type} adapter (safetensors + moetune.json): load with "
                f"`moetune.adapters.io.load_adapter(base, '{sub}')` or `moetune eval`")

    def merge_refusal(self) -> RecipeError:
        """The error for `merge` on this type (when it is not mergeable)."""
        return RecipeError(f"Expert type {self.type!r} does not fold into the base weights, so 'merge' cannot run "
                           "on it. Allowed: stages without 'merge', and export.kind 'adapter'.")

    def budget_values(self) -> dict[str, int]:
        """The values of `budget_keys` (what `moetune compare --budget equal-params` may change)."""
        return {k: getattr(self, k) for k in self.budget_keys}

    def masked_experts(self) -> list[str]:
        """The experts whose gates are fixed at 0 (--mask-experts), for a type with `mask_key`."""
        return list(getattr(self, self.mask_key)) if self.mask_key else []

    def per_domain_expert(self) -> tuple[ExpertConfig, int, float | None] | None:
        """(settings, optimizer steps (0: the recipe's), learning rate (None: the recipe's)) of the adapter
        `moetune train` first trains on each domain of the data, before this type's own training; None
        when it trains none (every type but MoLE with experts_from: per_domain)."""
        return None

    def use_trained_experts(self, dirs: list[str], names: list[str]) -> None:
        """Point the settings at the adapters trained for `per_domain_expert` (one per domain, sorted)."""
        raise _error(f"Expert type {self.type!r} trains no per-domain experts.")

    def over_trained_experts(self, dirs: list[str], names: list[str]) -> dict:
        """The `expert:` section of this type over the given trained adapters (one per domain, sorted), training
        none itself: what `moetune compare` runs when another variant trained the same per-domain experts."""
        raise _error(f"Expert type {self.type!r} trains no per-domain experts.")

    @classmethod
    def stored_lora_scale(cls, expert: dict) -> float | None:
        """The scale s of a SAVED adapter of this type (its moetune.json `expert` entry) when its tensors
        are one plain LoRA pair per module whose delta is s B A (what MoLE mixes and merge-lora --adapters
        merges); None otherwise."""
        return None
