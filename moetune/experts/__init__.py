"""Expert types, one module per paper, and their registry keyed by the recipe's `expert.type`; `routing`
holds the gates, routers and routing losses the routed types share.

Adding a type: write its settings class in `moetune/recipe/experts.py` (the torch-free recipe
schema, with one line in its `EXPERT_CONFIGS`), its module here (an `ExpertLayer` subclass whose
`config_cls` is that class), add one line to `REGISTRY`, add one recipe under `recipes/`, and its
tests. Everything type-specific is a class attribute or method of those two classes (see the
README's "Adding an expert type"); the code above this package never names a type.
The registry depends on the schema, never the reverse (see `moetune.recipe.experts`).
"""
from __future__ import annotations

from moetune.experts.base import ExpertLayer
from moetune.experts.calm import CALMLayer
from moetune.experts.hydralora import HydraLoRALayer
from moetune.experts.lora import LoRALayer
from moetune.experts.mole import MoLELayer
from moetune.experts.molora import MoLoRALayer
from moetune.experts.mov import MoVLayer
from moetune.recipe.experts import ExpertConfig

REGISTRY: dict[str, type[ExpertLayer]] = {
    "lora": LoRALayer,
    "hydralora": HydraLoRALayer,
    "molora": MoLoRALayer,
    "mov": MoVLayer,
    "mole": MoLELayer,
    "calm": CALMLayer,
}


def config_class(expert_type: str) -> type[ExpertConfig]:
    """The typed settings class for an expert type (KeyError when unknown)."""
    return REGISTRY[expert_type].config_cls


__all__ = ["REGISTRY", "ExpertConfig", "ExpertLayer", "config_class"]
