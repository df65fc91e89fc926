"""Reading adapter directories: a moetune adapter (moetune.json) or a stock PEFT LoRA directory.

Below the expert layers and the recipe schema: MoLE's expert layers read their frozen LoRAs
here, and MoLE's recipe check reads their metadata (`read_meta`) when a recipe is loaded.
Nothing here imports torch at module import: `safe_open(framework="pt")` loads it only when
tensors are read. Writing adapters (`save_adapter`) lives in `moetune.adapters.io`.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from moetune.core.errors import RecipeError

PEFT_PREFIX = "base_model.model."
LORA_KEYS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude_vector": "lora_magnitude_vector"}
"""moetune's local name of a LoRA tensor -> PEFT's (DoRA's magnitude m (d_out,) is `lora_magnitude_vector`)."""
WEIGHTS = "adapter_model.safetensors"
PEFT_INITS = {"gaussian": "default", "pissa": "pissa", "olora": "olora"}
"""PEFT's init_lora_weights strings moetune imports -> `expert.init` (true/false: 'default'). A 'pissa' or 'olora'
adapter was saved against W_res = W0 - s B0 A0, which PEFT (and moetune) recompute from the base at load."""


def peft_scale(cfg: dict) -> float:
    """The scale PEFT gives a LoRA adapter_config.json: lora_alpha / r (lora_alpha / sqrt(r) with use_rslora)."""
    return cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])


def _weights(d: Path) -> Path:
    if not (d / WEIGHTS).is_file():
        raise RecipeError(f"{d} is not an adapter directory (no adapter_model.safetensors).")
    return d / WEIGHTS


def find_adapter_dir(source: str | Path) -> Path | None:
    """The adapter directory SOURCE stands for: SOURCE itself (a run's adapter/, an export of kind adapter, a
    collapsed export, a PEFT directory) or SOURCE/adapter (a run, an export of kind both); None if neither."""
    for d in (Path(source), Path(source) / "adapter"):
        if (d / WEIGHTS).is_file():
            return d
    return None


def read_meta(adapter_dir: str | Path) -> dict:
    """The metadata of an adapter directory (moetune.json, or one derived from PEFT's
    adapter_config.json), without loading its tensors."""
    d = Path(adapter_dir)
    weights = _weights(d)
    if (d / "moetune.json").is_file():
        return json.loads((d / "moetune.json").read_text())
    with safe_open(str(weights), framework="numpy") as f:
        keys = list(f.keys())
    return peft_meta(d, keys)


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict]:
    """(meta, moetune-keyed tensors) of a moetune or stock PEFT LoRA adapter directory."""
    d = Path(adapter_dir)
    with safe_open(str(_weights(d)), framework="pt") as f:  # as safetensors.torch.load_file
        raw = {k: f.get_tensor(k) for k in f.keys()}
    if (d / "moetune.json").is_file():
        meta = json.loads((d / "moetune.json").read_text())
        if not any(k.startswith(PEFT_PREFIX) for k in raw):  # moetune's own tensor names (not a PEFT file)
            return meta, raw
    else:
        meta = peft_meta(d, list(raw))
    state = {}
    for key, t in raw.items():
        body = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for local, suffix in LORA_KEYS.items():
            for s in (suffix, suffix.replace(".weight", ".default.weight")):
                if body.endswith("." + s):
                    state[f"{body[: -len(s) - 1]}.{local}"] = t
    return meta, state


def peft_meta(d: Path, keys: list[str]) -> dict:
    """moetune metadata for a stock PEFT LoRA directory `d` whose weight file holds `keys`."""
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file():
        raise RecipeError(f"{d}: neither moetune.json nor a PEFT adapter_config.json.")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise RecipeError(f"{d}: PEFT adapter type {cfg.get('peft_type')!r}; moetune imports LORA adapters only.")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise RecipeError(f"{d}: per-module rank_pattern/alpha_pattern are not supported.")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init not in PEFT_INITS:
        raise RecipeError(f"{d}: PEFT init_lora_weights={init!r} is not supported. Allowed: true, false, 'gaussian' "
                          "(any trained LoRA), 'pissa', 'olora' (the base becomes W0 - s B0 A0 as in PEFT).")
    modules = sorted({k[len(PEFT_PREFIX):].rsplit(".lora_A", 1)[0] for k in keys if ".lora_A" in k})
    return {"format": "peft-lora", "expert": peft_expert(cfg, modules), "router": None,
            "base_model": cfg.get("base_model_name_or_path"), "modules": modules}


def peft_expert(cfg: dict, modules: list[str]) -> dict:
    """The moetune `expert` settings (moetune.json) equal to a stock PEFT LoRA adapter_config.json `cfg`
    adapting `modules`: expert type lora with PEFT's rank, alpha and dropout."""
    init = cfg.get("init_lora_weights", True)
    return {"type": "lora", "rank": cfg["r"], "alpha": cfg["lora_alpha"], "dropout": cfg.get("lora_dropout", 0.0),
            "target_modules": list(modules), "init_seed": None, "use_rslora": bool(cfg.get("use_rslora", False)),
            "use_dora": bool(cfg.get("use_dora", False)), "init": PEFT_INITS.get(init, "default")}
