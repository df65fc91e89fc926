"""Trainable-parameter budgets of `moetune compare`: counted on the meta device, and matched.

`count` builds the base model from its config on PyTorch's meta device (no weights, as `moetune validate`
does), injects the variant's experts and counts their parameters exactly. A type that first trains one
LoRA per domain (`ExpertConfig.per_domain_expert`: MoLE) counts those D LoRAs plus what it trains over them
(the layer's `parameters_over_experts`: MoLE's gates), D the number of domains in the training data.

`size` (`--budget equal-params`) changes a variant's `budget_keys` (its settings class: rank; heads or
experts) until its count is within TOLERANCE of the reference's. Each type's count is affine in each of
its keys with the others fixed (rank r: r (d_in + d_out) per LoRA projection; N heads or experts: N d_out
or N d_in per projection), so two counts give the line and its solution; neighbours are counted to round
it. The first key is solved for each value of the second, tried from the type's own value outwards; the
first within the tolerance wins. `alpha` follows `rank` (the scale alpha / r is unchanged) unless the
variant sets alpha itself. Keys a variant sets itself are not changed (pinned).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from transformers import AutoModelForCausalLM

from moetune.adapters.inject import count_parameters, inject
from moetune.core.errors import RecipeError
from moetune.core.ui import plural
from moetune.experts import REGISTRY
from moetune.models.load import load_config
from moetune.recipe import Recipe

# transformers (a heavy import) is imported inside the function that uses it.

TOLERANCE = 0.05
SECOND_KEY_RANGE = 8  # values of the second key tried on each side of the type's own


class Counter:
    """Trainable parameters of recipes on meta-device models (each base model built once)."""

    def __init__(self, log=print) -> None:
        self.models: dict[tuple, torch.nn.Module] = {}
        self.log = log
        self.calls = 0

    def _model(self, recipe: Recipe) -> torch.nn.Module:
        key = (recipe.model.path, recipe.model.trust_remote_code)
        if key not in self.models:
            config = load_config(recipe.model, log=self.log)
            with torch.device("meta"):
                self.models[key] = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
        return copy.deepcopy(self.models[key])

    def count(self, recipe: Recipe, domains: list[str]) -> int:
        """The variant's trainable parameters: its experts, or D per-domain LoRAs and what it trains over them."""
        self.calls += 1
        plan = recipe.expert.per_domain_expert()
        model = self._model(recipe)
        with torch.device("meta"):
            if plan is None:
                inject(model, recipe.expert, recipe.router, seed=recipe.train.seed)
                return count_parameters(model)[0]
            targets = list(inject(model, plan[0], None, seed=recipe.train.seed))
            per_domain = count_parameters(model)[0]
            over = REGISTRY[recipe.expert.type].parameters_over_experts(self._model(recipe), recipe.expert,
                                                                       recipe.router, targets, len(domains))
        return per_domain * len(domains) + over


def _second_values(own: int) -> list[int]:
    """The second key's values to try: its own, then outwards (own+1, own-1, own+2, ...), at least 1."""
    out = [own]
    for k in range(1, SECOND_KEY_RANGE + 1):
        out += [v for v in (own + k, own - k) if v >= 1]
    return out


def size(build: Callable[[dict], Recipe], keys: list[str], own: dict, target: int, count: Callable[[Recipe], int],
         alpha: float | None) -> dict:
    """Values of `keys` (the first solved, the second searched) whose count is within TOLERANCE of `target`.
    `build(values)` makes the variant's recipe with `values` set (alpha scaled with rank when `alpha` is the
    variant's own), raising RecipeError for a combination the type refuses. Returns {'values', 'trainable'},
    or raises RecipeError naming the closest combination found."""
    first, second = keys[0], (keys[1] if len(keys) > 1 else None)
    best: tuple[float, dict, int] | None = None

    def settings(values: dict) -> dict:
        out = dict(values)
        if alpha is not None and "rank" in out and own.get("rank"):
            out["alpha"] = alpha * out["rank"] / own["rank"]
        return out

    def counted(values: dict) -> int | None:
        try:
            return count(build(settings(values)))
        except RecipeError:
            return None

    for v2 in (_second_values(own[second]) if second else [None]):
        fixed = {second: v2} if second else {}
        c1, c2 = counted({first: 1, **fixed}), counted({first: 2, **fixed})
        if c1 is None or c2 is None or c2 <= c1:
            continue
        guess = 1 + (target - c1) / (c2 - c1)
        for v1 in sorted({max(1, int(guess)), max(1, int(guess) + 1)}):
            c = counted({first: v1, **fixed})
            if c is None:
                continue
            dev = abs(c / target - 1)
            if best is None or dev < best[0]:
                best = (dev, {first: v1, **fixed}, c)
        if best is not None and best[0] <= TOLERANCE:
            return {"values": settings(best[1]), "trainable": best[2]}
    if best is None:
        raise RecipeError(f"no value of {', '.join(keys)} gives a recipe this type accepts.")
    shown = ", ".join(f"{k}={v}" for k, v in best[1].items())
    raise RecipeError(f"the closest is {shown} with {plural(best[2], 'trainable parameter')} "
                      f"({100 * (best[2] / target - 1):+.1f}% of {target:,}), outside +-{100 * TOLERANCE:.0f}%.")
