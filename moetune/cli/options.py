"""What several commands share: argument and option declarations, loading a recipe, sampling settings."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from moetune.core.errors import RecipeError
from moetune.recipe import load_recipe, load_run_recipe

OVERRIDES = typer.Argument(None, metavar="KEY=VALUE", help="key=value overrides, OmegaConf style (e.g. train.lr=1e-4 expert.rank=16).")
SOURCE = typer.Argument(None, help="Run directory, export / adapter / merged model directory (omit with --base "
                        "for the default base model).")
TEMPERATURE = typer.Option(0.0, "--temperature", help="Sampling temperature; 0 = greedy (the evaluation's decoding).")
TOP_P = typer.Option(0.9, "--top-p", help="Nucleus sampling mass (when temperature > 0).")
SEED = typer.Option(None, "--seed", help="Seed for sampling.")
BASE = typer.Option(False, "--base", help="The base model without the adapter, to compare.")
MASK = typer.Option(None, "--mask-experts", help="MoLE: comma-separated expert names whose gates are fixed at 0.")


def load(path: Optional[Path], overrides: Optional[List[str]]):
    """The recipe file `path` (None: the defaults) with overrides, its relative paths made absolute."""
    return load_recipe(path, overrides or [])


def load_run(run_dir: Path, overrides: Optional[List[str]]):
    """The resolved recipe saved in a run directory, with overrides (its paths found from any working directory)."""
    return load_run_recipe(run_dir, overrides or [])


def is_run(d: Path) -> bool:
    """A run directory (what `train` writes into output_dir): recipe.yaml beside summary.json. An export has a
    recipe.yaml but no summary.json."""
    return (d / "recipe.yaml").is_file() and (d / "summary.json").is_file()


def mask_overrides(run_dir: Path, overrides: Optional[List[str]], mask: Optional[str]) -> List[str]:
    """Overrides plus `expert.<mask_key>=[...]` for --mask-experts (a type whose experts can be masked: MoLE)."""
    extra = list(overrides or [])
    if mask:
        rc = load_run(run_dir, extra)
        if rc.expert.mask_key is None:  # the type has no experts to mask
            raise RecipeError(f"--mask-experts applies to MoLE runs (expert.type mole); {run_dir} is a "
                              f"{rc.expert.type!r} run.")
        extra.append(f"expert.{rc.expert.mask_key}=" + json.dumps([n.strip() for n in mask.split(",") if n.strip()]))
    return extra


def sampling(temperature: float, top_p: float, max_new_tokens: int, seed: Optional[int]):
    from moetune.eval.generation import Sampling
    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
        raise RecipeError(f"--temperature must be >= 0 (0: greedy), --top-p in (0, 1], --max-new-tokens >= 1; got "
                          f"{temperature}, {top_p}, {max_new_tokens}.")
    return Sampling(temperature, top_p, max_new_tokens, seed)


def masks(mask: Optional[str]) -> List[str]:
    return [n.strip() for n in (mask or "").split(",") if n.strip()]

