"""Saving and loading adapters: stock PEFT LoRA directories plus moetune's small JSON config.

A moetune adapter directory holds
- `adapter_model.safetensors` and `adapter_config.json` in stock PEFT format for a type saved that way
  (`stock_peft` on its settings class: LoRA and its variants; the tensors and config fields come from
  the layer class's `peft_export`), which `peft.PeftModel.from_pretrained` loads as is;
- `moetune.json`: expert and router settings, base model and wrapped module names, so
  that moetune reloads any expert type (routed types keep their own tensors in
  `adapter_model.safetensors` under moetune names; PEFT cannot load those).
A stock PEFT LoRA directory (no moetune.json) is imported too (reading: `moetune.core.adapter_files`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from moetune.adapters.inject import (AdapterCopy, adapter_state_dict, adapters_off, expert_layers, inject,
                                     load_adapter_state_dict)
from moetune.core.adapter_files import read_adapter
from moetune.core.checkpoint import atomic_dir
from moetune.core.errors import RecipeError
from moetune.experts import REGISTRY, ExpertConfig, config_class
from moetune.models.load import stock_base_name
from moetune.recipe import Recipe, RouterConfig


def save_adapter(out_dir: str | Path, model: nn.Module, expert: ExpertConfig, router: RouterConfig | None,
                 base_name: str, extra: dict | None = None) -> Path:
    """Write the adapter of an injected model atomically: a stock PEFT adapter for a type saved in PEFT's format
    (`config_cls.stock_peft`: its layers' `peft_export`), else the adapter tensors under moetune's names; and
    moetune.json."""
    layers = expert_layers(model)
    names = list(layers)
    cls = REGISTRY[expert.type]
    meta = {"format": "moetune-adapter/1", "expert": dataclasses.asdict(expert),
            "router": dataclasses.asdict(router) if router else None, "base_model": base_name,
            "modules": names, **(extra or {})}
    peft = cls.peft_export(layers) if cls.config_cls.stock_peft else None
    with atomic_dir(out_dir) as tmp:
        if peft is not None:
            write_peft(tmp, *peft, base_name)
        else:
            save_file(adapter_state_dict(model), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        meta["expert"] = cls.export_config(expert, tmp)  # MoLE copies its experts in here
        (tmp / "moetune.json").write_text(json.dumps(meta, indent=2))
    return Path(out_dir)


def write_peft(directory: Path, config: dict, tensors: dict, base_name: str | None) -> None:
    """adapter_model.safetensors and adapter_config.json of a stock PEFT adapter in `directory` (the caller
    makes it atomic); `base_model_name_or_path` names the base as stock loaders find it."""
    config = {"base_model_name_or_path": stock_base_name(base_name) if base_name else None, **config}
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))


def expert_from_meta(meta: dict) -> ExpertConfig:
    e = dict(meta["expert"])
    cls = config_class(e["type"])
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in e.items() if k in known})


def load_adapter(model: nn.Module, adapter_dir: str | Path, fresh_seed: int | None = None) -> dict:
    """Inject the adapter saved in `adapter_dir` into `model` (frozen base) and load its tensors. With
    `fresh_seed`: the same adapter as initialised before training with that seed (train.seed), its trained
    tensors not loaded: the model that training started from (the 'before' of the evaluation)."""
    meta, state = read_adapter(adapter_dir)
    expert = REGISTRY[meta["expert"]["type"]].import_config(expert_from_meta(meta), Path(adapter_dir))
    expert.target_modules = list(meta["modules"])
    # The saved router weights replace any init: no centroid file is needed (nor read) here.
    router = RouterConfig(**{**meta["router"], "init_centroids": None}) if meta.get("router") else None
    if fresh_seed is not None:
        inject(model, expert, router, seed=fresh_seed)
        return meta
    inject(model, expert, router)
    load_adapter_state_dict(model, state)
    return meta


# ------------------------------------------------------------------ preference tuning: start and reference

def reference_dir(reference: str | Path) -> Path:
    """The adapter directory `train.reference` names: a run directory's `adapter/`, or an adapter directory."""
    d = Path(reference)
    return d / "adapter" if (d / "adapter" / "adapter_model.safetensors").is_file() else d


def start_adapter(model: nn.Module, recipe: Recipe) -> None:
    """Give `model` the adapter training starts from: a fresh one (`inject` with the recipe's expert and router),
    or with `train.reference` (DPO after SFT) the same layers holding that run's trained tensors (the policy
    starts at the reference, as in TRL with an SFT-ed PEFT adapter loaded twice). The recipe's expert settings
    must be the reference adapter's (all but dropout, a training setting, and the module names, which the
    adapter's tensors are checked against)."""
    inject(model, recipe.expert, recipe.router, seed=recipe.train.seed)
    if recipe.train.reference is None:
        return
    d = reference_dir(recipe.train.reference)
    if not (d / "adapter_model.safetensors").is_file():
        raise RecipeError(f"Recipe key 'train.reference' names {recipe.train.reference!r}, which holds no trained "
                          f"adapter (no {d / 'adapter_model.safetensors'}; working directory: {Path.cwd()}). Allowed: "
                          "null (the base model, adapters off), or the run directory (or adapter directory) of a "
                          "finished run: train that run first (e.g. `make demo` writes runs/default).")
    meta, state = read_adapter(d)
    mine, theirs = dataclasses.asdict(recipe.expert), dict(meta["expert"])
    diff = [f"expert.{k}: {mine[k]!r} here, {theirs[k]!r} in the reference" for k in mine
            if k not in ("target_modules", "init_seed", "dropout") and k in theirs and mine[k] != theirs[k]]
    try:
        if diff:
            raise ValueError("; ".join(diff))
        load_adapter_state_dict(model, state)
    except ValueError as e:
        raise RecipeError(f"Recipe key 'train.reference' names {recipe.train.reference!r}, whose adapter ({d}) does "
                          f"not fit this recipe's expert section ({e}). The policy starts from that adapter, so the "
                          f"expert section must be its own: copy it from {Path(recipe.train.reference) / 'recipe.yaml'}."
                          ) from None


def reference_context(model: nn.Module, reference: str | None):
    """A function giving the context in which `model` computes DPO's reference model: its adapters switched off
    (`reference` None), or the adapter saved under the run `reference` swapped in (read once, here)."""
    if reference is None:
        return lambda: adapters_off(model)
    _, state = read_adapter(reference_dir(reference))
    return AdapterCopy.of_state(model, state).swapped
