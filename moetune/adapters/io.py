"""Saving and loading adapters: stock PEFT LoRA directories plus moetune's small JSON config.

A moetune adapter directory holds
- `adapter_model.safetensors` and `adapter_config.json` in PEFT's LoRA format (for
  mergeable LoRA adapters), which `peft.PeftModel.from_pretrained` loads as is;
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

from moetune.adapters.inject import adapter_state_dict, expert_layers, inject, load_adapter_state_dict
from moetune.core.adapter_files import LORA_KEYS, PEFT_PREFIX, read_adapter
from moetune.core.checkpoint import atomic_dir
from moetune.experts import REGISTRY, ExpertConfig, config_class
from moetune.models.load import stock_base_name
from moetune.recipe import RouterConfig


def _peft_config(model: nn.Module, expert: ExpertConfig, base_name: str, names: list[str]) -> dict:
    conv1d = any(type(layer.base).__name__ == "Conv1D" for layer in expert_layers(model).values())
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": stock_base_name(base_name),
        "r": expert.rank, "lora_alpha": expert.alpha, "lora_dropout": expert.dropout,
        "target_modules": sorted(names), "bias": "none", "fan_in_fan_out": conv1d,
        "modules_to_save": None, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }


def save_adapter(out_dir: str | Path, model: nn.Module, expert: ExpertConfig, router: RouterConfig | None,
                 base_name: str, extra: dict | None = None) -> Path:
    """Write the adapter of an injected model atomically (PEFT files for LoRA + moetune.json)."""
    layers = expert_layers(model)
    names = list(layers)
    state = adapter_state_dict(model)
    meta = {"format": "moetune-adapter/1", "expert": dataclasses.asdict(expert),
            "router": dataclasses.asdict(router) if router else None, "base_model": base_name,
            "modules": names, **(extra or {})}
    with atomic_dir(out_dir) as tmp:
        if expert.type == "lora":
            peft = {}
            for key, t in state.items():
                module, _, local = key.rpartition(".")
                peft[f"{PEFT_PREFIX}{module}.{LORA_KEYS[local]}"] = t
            save_file(peft, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            (tmp / "adapter_config.json").write_text(json.dumps(_peft_config(model, expert, base_name, names), indent=2))
        else:
            save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        meta["expert"] = REGISTRY[expert.type].export_config(expert, tmp)  # MoLE copies its experts in here
        (tmp / "moetune.json").write_text(json.dumps(meta, indent=2))
    return Path(out_dir)


def expert_from_meta(meta: dict) -> ExpertConfig:
    e = dict(meta["expert"])
    cls = config_class(e["type"])
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in e.items() if k in known})


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> dict:
    """Inject the adapter saved in `adapter_dir` into `model` (frozen base) and load its tensors."""
    meta, state = read_adapter(adapter_dir)
    expert = REGISTRY[meta["expert"]["type"]].import_config(expert_from_meta(meta), Path(adapter_dir))
    expert.target_modules = list(meta["modules"])
    # The saved router weights replace any init: no centroid file is needed (nor read) here.
    router = RouterConfig(**{**meta["router"], "init_centroids": None}) if meta.get("router") else None
    inject(model, expert, router)
    load_adapter_state_dict(model, state)
    return meta
