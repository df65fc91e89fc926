"""Registry of expert types, keyed by the recipe's `expert.type`.

Adding a type: write its settings class in `moetune/expert_configs.py` (the torch-free recipe
schema, with one line in its `EXPERT_CONFIGS`), its module here (an `ExpertLayer` subclass whose
`config_cls` is that class), add one line to `REGISTRY`, add one recipe under `recipes/`.
The registry depends on the schema, never the reverse (see `moetune.expert_configs`).
"""
from __future__ import annotations

from moetune.expert_configs import ExpertConfig
from moetune.experts.base import ExpertLayer
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
