"""Registry of expert types, keyed by the recipe's `expert.type`.

Adding a type: write its module (an `ExpertLayer` subclass with a `config_cls`),
add one line to `REGISTRY`, add one recipe under `recipes/`.
"""
from __future__ import annotations

from moetune.experts.base import ExpertConfig, ExpertLayer
from moetune.experts.calm import CALMLayer
from moetune.experts.hydralora import HydraLoRALayer
from moetune.experts.lora import LoRALayer
from moetune.experts.mole import MoLELayer
from moetune.experts.molora import MoLoRALayer
from moetune.experts.mov import MoVLayer

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
