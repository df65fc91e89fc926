"""The input paths of a recipe made absolute, so that a run directory works from any working directory.

A recipe names its model, data, centroid, multiple-choice and expert files relative to the working
directory. `load_recipe` makes those that exist absolute (`anchor_paths`), so the recipe.yaml a run saves,
its adapter's base_model and its export name files that `moetune eval`, `chat`, `merge-lora` find from
anywhere. A run's recipe.yaml written before (relative paths) is read with its paths looked up from the
run directory and its parents (`moetune.recipe.load_run_recipe`).
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

from moetune.recipe.experts import EXPERT_CONFIGS

INPUT_PATHS = (("model", "path"), ("data", "train"), ("data", "validation"), ("data", "test"),
               ("router", "init_centroids"), ("eval", "multiple_choice"))
"""(section, key) of the recipe keys that name files or directories moetune reads (besides data.mix[i].path
and each expert type's `path_keys`): `anchor_paths` makes them absolute."""


def anchor_path(value, bases: list[Path]):
    """A relative path that exists against one of `bases` (the first that has it; a glob that matches), made
    absolute; anything else (absolute, a hub id, a built-in model name, a missing file, not a string) as is."""
    if isinstance(value, list):
        return [anchor_path(v, bases) for v in value]
    if not isinstance(value, str) or not value or "${" in value:
        return value
    if value.startswith("~"):
        return os.path.expanduser(value) if os.path.exists(os.path.expanduser(value)) else value
    if os.path.isabs(value):
        return value
    pattern = any(c in value for c in "*?[")
    for base in bases:
        candidate = os.path.join(base, value)
        if os.path.exists(candidate) or (pattern and glob.glob(candidate)):
            return os.path.abspath(candidate)
    return value


def anchor_paths(data: dict, bases: list[Path]) -> dict:
    """Make the input paths of a recipe dict (`INPUT_PATHS`, data.mix[i].path, the expert type's `path_keys`)
    absolute, in place: a recipe read from a run directory then finds its data and models from any working
    directory. `bases`: where relative paths are looked up, in order (a recipe file: the working directory;
    a run's recipe.yaml: the run directory and its parents, then the working directory)."""
    if not isinstance(data, dict):
        return data
    for section, key in INPUT_PATHS:
        sec = data.get(section)
        if isinstance(sec, dict) and key in sec:
            sec[key] = anchor_path(sec[key], bases)
    mix = (data.get("data") or {}).get("mix") if isinstance(data.get("data"), dict) else None
    for src in mix if isinstance(mix, list) else []:
        if isinstance(src, dict) and "path" in src:
            src["path"] = anchor_path(src["path"], bases)
    expert = data.get("expert")
    if isinstance(expert, dict) and expert.get("type", "lora") in EXPERT_CONFIGS:
        for key in EXPERT_CONFIGS[expert.get("type", "lora")].path_keys:
            if key in expert:
                expert[key] = anchor_path(expert[key], bases)
    return data
