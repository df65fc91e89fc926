"""`moetune compare`: what to run. Variants from `--methods`, each variant's recipe, the study file.

A variant is written `[NAME=]METHOD[:KEY=VALUE[:KEY=VALUE ...]]`; `--methods` takes several, comma
separated (a comma inside [...] or {...} belongs to a value). METHOD is

  - an expert type (`moetune explain` lists them): the type's defaults on the comparison's recipe, so the
    recipe's model, data, training and evaluation. The recipe's own `expert:` section when the type is the
    recipe's; otherwise `{type: TYPE}` plus the settings the type needs to run from data alone
    (`ExpertConfig.from_data`: MoLE trains one LoRA per domain first) plus the recipe's CARRIED keys where
    the type has no default of its own for them (MoV keeps its own targets). KEY=VALUE are recipe
    overrides for this variant only (`hydralora:router.level=sequence`);
  - a recipe file (`.yaml`): that recipe, with the comparison's common overrides, then the variant's;
  - `merge:M` (M a `merge-lora --method`: linear, cat, ties, dare_linear, dare_ties, mole): no training; the
    per-domain LoRAs of another variant of the same seed (the first that trains them, or `from=VARIANT`),
    merged into one LoRA with `moetune merge-lora --adapters` (`mole`: at that MoLE's mean gates) and scored.
    KEY=VALUE are its options: density, rank, weights (`weights=0.5;0.3;0.2`), from;
  - `expert:DOMAIN`: no training; the per-domain LoRA of DOMAIN of another variant (`from=VARIANT`), alone.

NAME defaults to METHOD, plus `+key=value` for each override. A study file is a recipe with a `compare:`
section (`recipes/studies/*.yaml`): `recipe` (a recipe file its other sections override), `methods` (a list
of variant strings, or mappings {name, method, overrides}), `seeds`, `steps`, `budget`, `out`. On a study,
`--methods` may name its variants by NAME alone (`with_study_names`).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from moetune.core.errors import RecipeError
from moetune.export.multimerge import GATED
from moetune.export.multimerge import METHODS as MERGE_METHODS
from moetune.recipe import Recipe, parse_overrides, recipe_from_dict
from moetune.recipe.experts import EXPERT_CONFIGS, ExpertConfig

CARRIED = ("target_modules", "dropout", "init_seed")
"""`expert:` keys of the recipe a method of another type keeps, where that type has no default of its own."""
SET_PER_RUN = ("train.seed", "output_dir", "stages")
"""Keys compare sets for every run: a variant may not override them."""
DERIVED = ("merge", "expert")
"""Variant kinds that train nothing and score adapters derived from another variant's per-domain LoRAs."""
STUDY_KEYS = ("recipe", "methods", "seeds", "steps", "budget", "out")


@dataclass
class Variant:
    """One method of a comparison, before seeds: its name, how it was written and what it is."""

    name: str
    spec: str
    kind: str                    # 'type' | 'recipe' | 'merge' | 'expert'
    method: str                  # expert type, recipe file, merge method, or domain
    overrides: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)   # merge / expert options
    data: dict | None = None     # the recipe dict (type, recipe kinds), before seeds and sizes
    source: str | None = None    # derived kinds: the variant whose per-domain LoRAs they use


def split_top(text: str, sep: str) -> list[str]:
    """Split on `sep` outside brackets and quotes."""
    out, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == sep and depth == 0:
            out.append(cur)
            cur = ""
            continue
        cur += ch
    out.append(cur)
    return [p.strip() for p in out if p.strip()]


def _auto_name(method: str, overrides: list[str]) -> str:
    base = Path(method).stem if method.endswith((".yaml", ".yml")) else method.replace(":", "-")
    return base + "".join(f"+{o.split('=', 1)[0].rsplit('.', 1)[-1]}={o.split('=', 1)[1]}" for o in overrides)


def parse_variant(spec) -> Variant:
    """A variant from its string (`[NAME=]METHOD[:KEY=VALUE...]`) or a study file's mapping."""
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - {"name", "method", "overrides"})
        if unknown or "method" not in spec:
            raise RecipeError(f"compare.methods entry {spec}: a mapping needs 'method' and may have 'name' and "
                              f"'overrides' (a list of key=value){'; unknown: ' + ', '.join(unknown) if unknown else ''}.")
        text = str(spec["method"]) + "".join(f":{o}" for o in spec.get("overrides") or [])
        v = parse_variant(text)
        if spec.get("name"):
            v.name = str(spec["name"])
        return v
    spec = str(spec).strip()
    parts = split_top(spec, ":")
    if not parts:
        raise RecipeError("--methods has an empty variant. Allowed: [NAME=]METHOD[:KEY=VALUE...], comma separated.")
    name = None
    head = parts[0]
    if "=" in head:
        name, head = (x.strip() for x in head.split("=", 1))
    if head in DERIVED:
        if len(parts) < 2 or "=" in parts[1]:
            raise RecipeError(f"--methods variant {spec!r}: '{head}:' needs a "
                              + ("merge method (merge:ties)" if head == "merge" else "domain (expert:DOMAIN)") + ".")
        method, rest = parts[1], parts[2:]
        options = dict(_kv(spec, r) for r in rest)
        kind = head
    else:
        method, rest, options = head, parts[1:], {}
        kind = "recipe" if method.endswith((".yaml", ".yml")) else "type"
    overrides = list(rest) if kind in ("type", "recipe") else []
    for r in overrides:
        _kv(spec, r)
    if not name:
        name = _auto_name(f"{kind}:{method}" if kind in DERIVED else method,
                          overrides or [f"{k}={v}" for k, v in options.items()])
    return Variant(name=name, spec=spec, kind=kind, method=method, overrides=overrides, options=options)


def _kv(spec: str, text: str) -> tuple[str, str]:
    if "=" not in text:
        raise RecipeError(f"--methods variant {spec!r}: {text!r} is not KEY=VALUE. Allowed: "
                          "[NAME=]METHOD[:KEY=VALUE...], e.g. hydralora:router.level=sequence.")
    k, v = text.split("=", 1)
    return k.strip(), v.strip()


def parse_methods(items: list) -> list[Variant]:
    """Variants from --methods values (each may hold several, comma separated) or a study's list."""
    specs = [s for item in items for s in (split_top(item, ",") if isinstance(item, str) else [item])]
    if not specs:
        raise RecipeError("--methods is empty. Allowed: expert types or recipe files, comma separated, e.g. "
                          "--methods lora,hydralora,molora.")
    variants = [parse_variant(s) for s in specs]
    names = [v.name for v in variants]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RecipeError(f"--methods names variant {dup[0]!r} twice. Allowed: distinct variants; name them "
                          "NAME=METHOD:... (e.g. seq=hydralora:router.level=sequence).")
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9_.+=-]+", n)]
    if bad:
        raise RecipeError(f"Variant name {bad[0]!r} has characters a directory name should not. Allowed: letters, "
                          "digits and _ . + = - (name it NAME=METHOD:...).")
    return variants


def with_study_names(items: list, study_methods: list) -> list:
    """--methods values with each bare NAME of one of the study file's variants replaced by that variant's
    definition: on a study, `--methods lora,hydralora-global` names its variants (the same recipes, so the
    same runs in the same --out: a subset of a study, or its variants in another order)."""
    known = {parse_variant(m).name: m for m in study_methods}
    specs = [x for item in items for x in (split_top(item, ",") if isinstance(item, str) else [item])]
    return [known.get(x.strip(), x) if isinstance(x, str) else x for x in specs]


def load_study(path: Path) -> tuple[dict, dict]:
    """(recipe dict, compare settings) of a recipe file, or of a study file (a recipe with `compare:`)."""
    if not Path(path).is_file():
        raise RecipeError(f"Recipe file {str(path)!r} does not exist.")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # noqa: BLE001 - YAML syntax errors of any kind
        raise RecipeError(f"Recipe file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"Recipe file {str(path)!r}: a recipe must be a YAML mapping of sections.")
    settings = data.pop("compare", None) or {}
    if not isinstance(settings, dict):
        raise RecipeError(f"{path}: 'compare:' must be a mapping of {', '.join(STUDY_KEYS)}.")
    unknown = sorted(set(settings) - set(STUDY_KEYS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], STUDY_KEYS, n=1)
        raise RecipeError(f"{path}: unknown key 'compare.{unknown[0]}'.{f' Did you mean {close[0]!r}?' if close else ''} "
                          f"Allowed: {', '.join(STUDY_KEYS)}.")
    if settings.get("recipe"):
        base, _ = load_study(Path(settings["recipe"]))
        data = merge(base, data)
    return data, settings


def merge(base: dict, over: dict) -> dict:
    return OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(base), OmegaConf.create(over)), resolve=True)


def _set(data: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for p in path:
        data = data.setdefault(p, {})
    data[last] = value


def _defaults(cls: type[ExpertConfig], name: str) -> dict:
    return dataclasses.asdict(cls(type=name))


def method_expert(method: str, recipe: Recipe, written: dict) -> dict:
    """The `expert:` section of method `method` (an expert type) on a recipe whose section is `written`."""
    if method == recipe.expert.type:
        return copy.deepcopy(written)
    cls = EXPERT_CONFIGS[method]
    mine, base = _defaults(cls, method), _defaults(ExpertConfig, method)
    carried = {k: written[k] for k in CARRIED if k in written and k in mine and mine[k] == base[k]}
    return {"type": method, **copy.deepcopy(cls.from_data), **carried}


def variant_recipe(v: Variant, base: dict, recipe: Recipe, common: list[str], steps: int | None) -> dict:
    """The recipe dict of a training variant before seeds and sizes: its expert section (or file), the
    comparison's --steps, then its own overrides (checked by loading it)."""
    if v.kind == "recipe":
        if not Path(v.method).is_file():
            raise RecipeError(f"Variant {v.name!r}: recipe file {v.method!r} does not exist.")
        data, _ = load_study(Path(v.method))
        data = merge(data, parse_overrides(common))
    else:
        if v.method not in EXPERT_CONFIGS:
            close = difflib.get_close_matches(v.method, list(EXPERT_CONFIGS), n=1)
            raise RecipeError(f"--methods: unknown method {v.method!r}.{f' Did you mean {close[0]!r}?' if close else ''} "
                              f"Allowed: an expert type ({', '.join(EXPERT_CONFIGS)}), a recipe file (.yaml), "
                              f"merge:METHOD ({', '.join(MERGE_METHODS)}) or expert:DOMAIN.")
        data = copy.deepcopy(base)
        data["expert"] = method_expert(v.method, recipe, base.get("expert") or {})
    if steps:
        _set(data, "train.max_steps", steps)
    own = parse_overrides(v.overrides)
    for key in SET_PER_RUN:
        top, _, sub = key.partition(".")
        if top in own and (not sub or (isinstance(own[top], dict) and sub in own[top])):
            raise RecipeError(f"Variant {v.name!r} sets {key}, which compare sets for every run (--seeds, --out). "
                              "Allowed: any other recipe key.")
    data = merge(data, own)
    check(v.name, protocol(data, 0, "runs/check"))
    return data


def protocol(data: dict, seed: int, run_dir: str) -> dict:
    """A run's recipe dict: the variant's, at `seed`, into `run_dir`, training then scoring (no score before
    training, no merge or export)."""
    out = copy.deepcopy(data)
    _set(out, "train.seed", seed)
    _set(out, "train.eval_before", False)
    out["output_dir"] = run_dir
    out["stages"] = ["train", "eval"]
    return out


def check(name: str, data: dict) -> Recipe:
    """Load a variant's recipe dict; a RecipeError names the variant."""
    try:
        return recipe_from_dict(data, source=f"variant {name}")
    except RecipeError as e:
        raise RecipeError(f"Variant {name!r}: {e}") from None


HELD_OUT_KEYS = ("eval.split", "eval.max_examples")


def held_out(recipe: Recipe) -> tuple:
    """What a run is scored on: the split, its data, the row limit (paired comparisons need one)."""
    return recipe.eval.split, getattr(recipe.data, recipe.eval.split), recipe.eval.max_examples


def resolve_sources(variants: list[Variant], recipes: dict[str, Recipe]) -> None:
    """Point each derived variant (merge:, expert:) at the training variant whose per-domain LoRAs it uses."""
    trains = [v.name for v in variants if v.kind in ("type", "recipe")
              and recipes[v.name].expert.per_domain_expert() is not None]
    for v in variants:
        if v.kind not in DERIVED:
            continue
        if v.kind == "merge" and v.method not in MERGE_METHODS:
            raise RecipeError(f"Variant {v.name!r}: unknown merge method {v.method!r}. Allowed: {', '.join(MERGE_METHODS)}.")
        allowed = {"from", "density", "rank", "weights"} if v.kind == "merge" else {"from"}
        bad = sorted(set(v.options) - allowed)
        if bad:
            raise RecipeError(f"Variant {v.name!r}: unknown option {bad[0]!r}. Allowed: {', '.join(sorted(allowed))}.")
        src = v.options.get("from") or (trains[0] if trains else None)
        if src not in trains:
            raise RecipeError(f"Variant {v.name!r} uses the per-domain LoRAs of another variant that trains them "
                              f"(an expert type with per-domain experts, e.g. mole), but "
                              + (f"{src!r} is none of them ({', '.join(trains) or 'there is none'})." if src else
                                 "no variant of this comparison trains them. Add one (e.g. mole) or name it with from=."))
        if v.kind == "merge" and v.method == GATED and not recipes[src].expert.mixes_trained_loras:
            raise RecipeError(f"Variant {v.name!r}: merge:mole reads the gates of {src!r}, which mixes no trained LoRAs.")
        v.source = src
