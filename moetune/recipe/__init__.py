"""Typed recipes: OmegaConf structured dataclasses, loading, overrides and clear errors.

A recipe is YAML whose sections are the dataclasses of `recipe.sections` (re-exported here) and
`recipe.experts`; each field's docstring is its documentation (`moetune explain`, `recipe.reference`
prints them). `load_recipe` merges `key=value` overrides, rejects unknown keys with a did-you-mean
(another tool's name gets moetune's key: `recipe.aliases`), converts types, checks
ranges and choices and contradictory settings, and raises `RecipeError` whose message
names the key, the bad value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moetune.core.errors import RecipeError
from moetune.core.schema import allowed_text, check_value, field_docs, opt, schema_keys, walk
from moetune.recipe import reference
from moetune.recipe.aliases import value_hint
from moetune.recipe.experts import EXPERT_CONFIGS, ExpertConfig, LoRAConfig, RoutedConfig
from moetune.recipe.paths import INPUT_PATHS, anchor_path, anchor_paths  # noqa: F401
from moetune.recipe.sections import (FORMATS, MIX_COLUMNS, STAGES, DataConfig, EvalConfig, ExportConfig, MergeConfig,  # noqa: F401
                                     MixSource, ModelConfig, RouterConfig, TrainConfig)


@dataclass
class Recipe:
    """A whole recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Base model."""
    expert: ExpertConfig = field(default_factory=LoRAConfig)
    """Expert type and its settings."""
    router: RouterConfig = field(default_factory=RouterConfig)
    """Router of mixture types."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    merge: MergeConfig = field(default_factory=MergeConfig)
    """Merging."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """Export."""
    output_dir: str = "runs/default"
    """Run directory: checkpoints, metrics.jsonl, summary.json, adapter, merged model, export."""
    stages: list[str] = opt(factory=lambda: ["train", "eval", "export"], choices=STAGES)
    """Stages `moetune train` runs, in this order: train, merge (writes <output_dir>/merged, the base with the
    LoRA folded in: 538 MB for SmolLM2-135M in float32; not in the default, `moetune merge-lora` merges later),
    eval (the merged model after 'merge', else base + adapter), export."""


def _check_keys(data: Any, cls: type, prefix: str, expert_type: str) -> None:
    """Unknown keys -> RecipeError with a did-you-mean (recursively; `reference.unknown_key` words it)."""
    if not isinstance(data, dict):
        return
    keys = schema_keys(cls)
    for k, v in data.items():
        full = f"{prefix}{k}"
        if k not in keys:
            raise reference.unknown_key(Recipe, full, str(k), keys, prefix, expert_type)
        sub = keys[k]
        if cls is DataConfig and k == "mix" and isinstance(v, list):  # a list of MixSource sections
            for i, item in enumerate(v):
                _check_keys(item, MixSource, f"{full}[{i}].", expert_type)
        if sub is not None:
            if not isinstance(v, dict):
                raise RecipeError(f"Recipe key '{full}' must be a section (mapping), got {v!r}.")
            _check_keys(v, sub, full + ".", expert_type)


def _expert_class(data: dict) -> type[ExpertConfig]:
    etype = (data.get("expert") or {}).get("type", "lora")
    if etype not in EXPERT_CONFIGS:
        raise RecipeError(f"Recipe key 'expert.type' has value {etype!r}, which is not an expert type."
                          f"{value_hint('expert.type', [etype], tuple(EXPERT_CONFIGS))} "
                          f"Allowed: {', '.join(EXPERT_CONFIGS)}.")
    return EXPERT_CONFIGS[etype]


def recipe_from_dict(data: dict, source: str = "recipe", check_files: bool = True) -> Recipe:
    """Build and validate a Recipe from a plain dict (already merged with overrides); check_files=False skips
    the checks that the data and centroid files exist."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping of sections, got {type(data).__name__}.")
    expert_cls = _expert_class(data)
    schema = OmegaConf.structured(Recipe)
    schema.expert = OmegaConf.structured(expert_cls)
    etype = str((data.get("expert") or {}).get("type", "lora"))
    _check_keys({k: v for k, v in data.items() if k != "expert"}, Recipe, "", etype)
    _check_keys(data.get("expert") or {}, expert_cls, "expert.", etype)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.create(data))
        recipe: Recipe = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise RecipeError(f"Recipe key '{key}' has a bad value {getattr(e, 'value', None)!r}: "
                          f"{getattr(e, 'msg', str(e)).splitlines()[0]}. {_doc_for(key)}") from None
    for key, f, value in walk(recipe):
        if not check_value(f, value):
            raise RecipeError(f"Recipe key '{key}' has value {value!r}; allowed: {allowed_text(f)}."
                              f"{_bad_choices(key, f, value)} {_doc_for(key)}")
    _check_semantics(recipe, check_files)
    return recipe


def _bad_choices(key: str, f: dataclasses.Field, value: Any) -> str:
    """' Did you mean ...?' for the values outside a field's choices (other tools' names first)."""
    choices = (f.metadata or {}).get("choices")
    if not choices:
        return ""
    items = value if isinstance(value, (list, tuple)) else [value]
    return value_hint(key, [v for v in items if v not in choices], choices)


def _doc_for(key: str) -> str:
    """The docstring of a dotted recipe key, as a sentence for error messages."""
    parts = key.split(".")
    cls: Any = Recipe
    for p in parts[:-1]:
        cls = schema_keys(cls).get(p) or ExpertConfig
    doc = field_docs(cls).get(parts[-1], "")
    if not doc and parts[0] == "expert":  # a key of one type's settings (expert.use_dora, expert.num_experts, ...)
        doc = next((d for c in EXPERT_CONFIGS.values() if (d := field_docs(c).get(parts[-1]))), "")
    return f"({parts[-1]}: {doc})" if doc else ""


def _check_router_init(r: Recipe) -> None:
    """router.init: clusters needs routers that read the layer input, and clusters of the rows it trains on."""
    if r.router.init != "clusters":
        return
    why = None
    if not isinstance(r.expert, RoutedConfig):
        why = (f"expert type {r.expert.type!r} has no router that reads the layer input. Allowed: 'random', or a "
               "routed type (hydralora, molora, mov)")
    elif r.router.init_centroids:
        why = (f"router.init_centroids names a file too ({r.router.init_centroids!r}). Allowed: one of them: "
               "'random' with init_centroids, or 'clusters' with init_centroids: null")
    elif r.train.reference is not None:
        why = ("train.reference starts the adapter, routers included, from that run's tensors. Allowed: 'random'")
    if why:
        raise RecipeError(f"Recipe key 'router.init' is 'clusters', but {why}.")


def _check_semantics(r: Recipe, check_files: bool = True) -> None:
    """Contradictory settings that no single field can catch; with check_files, the input files exist."""
    if r.model.quantization != "none":
        if "merge" in r.stages and not r.merge.dequantize:
            raise RecipeError("Recipe stages include 'merge' with a 4-bit base (model.quantization="
                              f"{r.model.quantization!r}) but 'merge.dequantize' is false. A LoRA cannot be folded "
                              "into 4-bit weights: set merge.dequantize=true (the base is dequantised first and "
                              "the max logit difference reported) or drop 'merge' from stages.")
    if r.export.kind in ("merged", "both") and not r.expert.mergeable:
        raise RecipeError(f"Recipe key 'export.kind' is {r.export.kind!r}, but expert type {r.expert.type!r} "
                          "does not fold into the base. Allowed: 'adapter'.")
    if "merge" in r.stages and not r.expert.mergeable:
        raise r.expert.merge_refusal()  # at load and `validate` time, not after training
    if r.router.type == "top_k" and hasattr(r.expert, "num_experts") and r.router.top_k > r.expert.num_experts:
        raise RecipeError(f"Recipe key 'router.top_k' is {r.router.top_k}, more than expert.num_experts "
                          f"({r.expert.num_experts}). Allowed: 1..{r.expert.num_experts}.")
    _check_router_init(r)
    r.expert.check_recipe(r)  # type-specific checks, e.g. calm's augmenting model and layer lists
    _check_held_out(r)
    if len(set(r.stages)) != len(r.stages):
        raise RecipeError(f"Recipe key 'stages' repeats a stage: {r.stages}. Allowed: each of {', '.join(STAGES)} once.")
    if check_files and r.router.init_centroids and "train" in r.stages and not Path(r.router.init_centroids).is_file():
        raise RecipeError(f"Recipe key 'router.init_centroids' names {r.router.init_centroids!r}, which does not "
                          f"exist (working directory: {Path.cwd()}). Allowed: a centroid file written by "
                          "`moetune cluster-heads --init-router`, or null.")
    _check_objective(r)
    if r.data.packing and r.data.group_by_length:
        raise RecipeError("Recipe keys 'data.packing' and 'data.group_by_length' are both true; length grouping "
                          "is for unpacked training. Allowed: at most one of them true.")
    for i, src in enumerate(r.data.mix):
        if not src.path:
            raise RecipeError(f"Recipe key 'data.mix[{i}].path' is missing. Allowed: a file, glob, directory or hub id.")
        for key, f, value in walk(src, f"data.mix[{i}]."):
            if not check_value(f, value):
                raise RecipeError(f"Recipe key '{key}' has value {value!r}; allowed: {allowed_text(f)}.")
        bad = sorted(set(src.columns) - set(MIX_COLUMNS))
        if bad:
            raise RecipeError(f"Recipe key 'data.mix[{i}].columns' names {bad[0]!r}. Allowed: {', '.join(MIX_COLUMNS)}.")
    if r.data.mix and any(s.weight is not None for s in r.data.mix) and any(s.weight is None for s in r.data.mix):
        raise RecipeError("Recipe key 'data.mix[].weight' is set on some sources only. Allowed: a weight on every "
                          "source, or on none.")
    for key in ("train", "validation", "test"):
        path = getattr(r.data, key)
        if key == "train" and r.data.mix:
            continue
        hub_or_glob = path and (any(c in path for c in "*?[") or (
            path.count("/") == 1 and not path.startswith(".") and Path(path).suffix == ""))
        if check_files and path and "train" in r.stages and not hub_or_glob and not Path(path).exists():
            if key == "test" and r.eval.split != "test":
                continue
            raise RecipeError(f"Recipe key 'data.{key}' names {path!r}, which does not exist "
                              f"(working directory: {Path.cwd()}). Allowed: an existing .jsonl/.json/.csv/"
                              ".parquet file or a datasets directory" + ("" if key == "train" else ", or null") + ".")


def _check_objective(r: Recipe) -> None:
    """train.objective against the keys it needs or cannot use (the data's format is checked when it is read, the
    reference run when training starts: a recipe may name a run that an earlier recipe writes)."""
    t = r.train
    if t.objective != "sft" and r.data.packing:
        raise RecipeError(f"Recipe key 'data.packing' is true with train.objective={t.objective!r}: a preference "
                          "pair's chosen and rejected sequences are scored side by side, not packed. Allowed: "
                          "data.packing false (data.group_by_length batches pairs of similar length).")
    if t.reference is not None and t.objective != "dpo":
        raise RecipeError(f"Recipe key 'train.reference' is {t.reference!r} with train.objective={t.objective!r}; "
                          "only dpo has a reference model (orpo needs none). Allowed: null, or train.objective dpo.")


def scores_before(r: Recipe) -> bool:
    """Whether training first scores the held-out split (the summary's 'before'): train.eval_before, whose
    default (None) follows the stages: only when they include 'eval'."""
    return "eval" in r.stages if r.train.eval_before is None else r.train.eval_before


def scores_held_out(r: Recipe) -> bool:
    """Whether the stages score the held-out split (eval.split): the eval stage, or train's 'before' scores."""
    return "eval" in r.stages or ("train" in r.stages and scores_before(r))


def _check_held_out(r: Recipe) -> None:
    """The held-out split the stages score has data (what `train` would otherwise find out after loading the model)."""
    if not scores_held_out(r):
        return
    why = "the eval stage" if "eval" in r.stages else "train.eval_before (the 'before' scores)"
    if r.eval.split == "test" and not r.data.test:
        raise RecipeError(f"Recipe key 'eval.split' is 'test' but 'data.test' is null, and {why} scores that split. "
                          "Allowed: data.test=FILE (held-out rows), or eval.split=validation (data.validation, or the "
                          "part of data.train that data.validation_split holds out).")
    if r.eval.split == "validation" and not r.data.validation and r.data.validation_split == 0:
        raise RecipeError(f"Recipe key 'eval.split' is 'validation' but 'data.validation' is null and "
                          f"'data.validation_split' is 0, so there is no validation split for {why} to score. "
                          "Allowed: data.validation=FILE, data.validation_split > 0 (e.g. 0.05), or eval.split=test "
                          "with data.test=FILE.")


def not_mergeable(expert_type: str) -> RecipeError:
    """The error for merging an adapter of `expert_type`, which does not fold into the base weights
    (its settings class words it: `ExpertConfig.merge_refusal`)."""
    return EXPERT_CONFIGS[expert_type](type=expert_type).merge_refusal()


def parse_overrides(overrides: list[str]) -> dict:
    """`key=value` strings (OmegaConf dotlist) -> nested dict; rejects malformed ones."""
    for o in overrides:
        if "=" not in o:
            raise RecipeError(f"Override {o!r} is not of the form key=value (e.g. train.lr=1e-4).")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise RecipeError(f"Could not parse overrides {overrides}: {e}") from None


def load_recipe(path: str | Path | None, overrides: list[str] | None = None, base_dirs: list[Path] | None = None,
                check_files: bool = True) -> Recipe:
    """Load a YAML recipe (or the defaults when path is None) and apply overrides.

    Relative input paths (`anchor_paths`) become absolute: the file's against `base_dirs` (default: the working
    directory), the overrides' against the working directory. check_files=False skips the checks that data files
    and centroid files exist, for commands that read neither (chat, generate, merge-lora: see `load_run_recipe`)."""
    cwd = [Path.cwd()]
    base = OmegaConf.create({})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"Recipe file {str(p)!r} does not exist.")
        try:
            base = OmegaConf.load(p)
        except Exception as e:  # YAML syntax errors
            raise RecipeError(f"Recipe file {str(p)!r} is not valid YAML: {e}") from None
        body = [x for x in p.read_text().splitlines() if x.strip() and not x.lstrip().startswith("#")]
        if not body:
            raise RecipeError(f"Recipe file {str(p)!r} is empty (or holds only comments), so it sets nothing. "
                              "Allowed: a YAML mapping of sections (model:, expert:, data:, train:, ...), e.g. a copy "
                              "of recipes/default.yaml; to run every default on purpose, write `{}` in it.")
        if not OmegaConf.is_dict(base):  # e.g. a YAML list: merging it below would raise TypeError
            raise RecipeError(f"Recipe file {str(p)!r}: a recipe must be a YAML mapping of sections "
                              "(model:, expert:, data:, train:, ...), got a list.")
    file_part = anchor_paths(OmegaConf.to_container(base, resolve=False), base_dirs or cwd)
    merged = OmegaConf.merge(OmegaConf.create(file_part),
                             OmegaConf.create(anchor_paths(parse_overrides(overrides or []), cwd)))
    try:
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        raise RecipeError(f"Recipe {path}: {e}") from None
    return recipe_from_dict(data or {}, source=str(path), check_files=check_files)


def load_run_recipe(run_dir: str | Path, overrides: list[str] | None = None) -> Recipe:
    """The recipe saved in a run (or export) directory, with `output_dir` set to it, plus overrides. Its relative
    paths (runs written before paths were recorded absolute) are looked up from the run directory and its parents,
    then the working directory; files are not checked (a command that reads data fails when it reads them)."""
    run_dir = Path(run_dir)
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        raise RecipeError(f"{run_dir} is not a moetune run directory (no recipe.yaml). Pass the run's output_dir.")
    where = Path(os.path.abspath(run_dir))
    return load_recipe(path, [f"output_dir={run_dir}", *(overrides or [])],
                       base_dirs=[where, *where.parents, Path.cwd()], check_files=False)


def to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (saved beside every run and export)."""
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def explain(query: str | None = None) -> str:
    """The recipe reference (`moetune explain [QUERY]`): every key with its default, allowed values and
    docstring, or one key, section or expert type; see `recipe.reference.explain`."""
    return reference.explain(Recipe, query)
