"""The models `moetune serve` answers for: one per RUN (named by its directory), plus `base`.

RUN is what `moetune chat` takes: a run directory (`recipe.yaml` + `adapter/`), an export directory
(`recipe.yaml` + the adapter files), a bare adapter directory (base model from its config) or a merged
model directory (`config.json`). The template and system prompt are the run's recipe's.

Runs whose recipes load the same base (equal `model:` settings) share ONE copy of its weights: the base
is loaded once, and each run gets a copy of the base's module tree whose parameters and buffers ARE the
base's tensors (`copy.deepcopy` with every tensor pre-entered in the memo), into which its adapter is
injected. Injection replaces modules of that copy only (the wrappers, CALM's blocks), so the shared base
stays the plain base: the model `base` serves it as it is. A merged model has its own weights.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moetune import recipe as R
from moetune.adapters.inject import expert_layers
from moetune.adapters.io import load_adapter
from moetune.core.adapter_files import read_adapter
from moetune.data.rows import Encoder
from moetune.eval.evaluate import eos_ids
from moetune.models.load import load_model, load_tokenizer, pick_device

BASE = "base"


@dataclass
class Source:
    """What one RUN names: its recipe, and its adapter directory or merged model directory."""

    name: str
    path: Path
    recipe: R.Recipe
    adapter: Path | None = None
    merged: Path | None = None
    base: R.ModelConfig | None = None     # the base model's settings (for a merged model: the base it was merged into)


@dataclass
class Served:
    """One model the server answers for (the request's `model` field): the module, its tokenizer and template."""

    name: str
    model: nn.Module
    tokenizer: object
    encoder: Encoder
    device: torch.device
    expert_type: str
    label: str
    context: int                      # longest sequence (prompt + completion) the model takes
    eos: list[int] = field(default_factory=list)
    base_key: str = ""                # equal for models that share one base copy
    state: object | None = None       # per-sequence state outside the KV cache (ExpertLayer.generation_state)


def _first(*dirs: Path, file: str) -> Path | None:
    return next((d for d in dirs if (d / file).is_file()), None)


def resolve(path: Path, overrides: list[str]) -> Source:
    """The recipe and adapter (or merged model) of RUN `path`; RecipeError when it is none of the four kinds."""
    path = Path(path)
    if not path.is_dir():
        raise R.RecipeError(f"{path} is not a directory. Pass run directories (a recipe's output_dir), or export, "
                            "adapter or merged model directories.")
    name = path.resolve().name
    found = _first(path, path.parent, file="recipe.yaml")
    adapter = _first(path, path / "adapter", file="adapter_model.safetensors")
    merged = None if adapter else _first(path, path / "merged", file="config.json")
    if adapter is None and merged is None:
        raise R.RecipeError(f"{path} holds neither an adapter (adapter_model.safetensors, here or in adapter/) nor a "
                            "model (config.json). Pass a run, export, adapter or merged model directory.")
    if found is not None:
        rc = R.load_recipe(found / "recipe.yaml", [f"output_dir={found}", *overrides])
    else:
        base = read_adapter(adapter)[0].get("base_model") if adapter else str(merged)
        if not base:
            raise R.RecipeError(f"{adapter}: the adapter names no base model; pass model.path=MODEL.")
        rc = R.load_recipe(None, [f"model.path={base}", "data.test=null", "eval.split=validation", *overrides])
    base = dataclasses.replace(rc.model)
    if merged is not None:
        rc.model.path, rc.model.quantization = str(merged), "none"
    return Source(name, path, rc, adapter, merged, base)


def share_base(base: nn.Module) -> nn.Module:
    """A copy of `base`'s modules whose parameters and buffers are `base`'s own tensor objects (no new storage)."""
    memo = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
    return copy.deepcopy(base, memo)


def _context(model: nn.Module) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        n = getattr(cfg, key, None)
        if isinstance(n, int) and n > 0:
            return n
    return 2048


def _state(model: nn.Module):
    layers = expert_layers(model)
    return type(next(iter(layers.values()))).generation_state(model) if layers else None


def load_served(paths: list[Path], overrides: list[str] | None = None, device: str | None = None,
                log=print) -> dict[str, Served]:
    """name -> Served for every RUN in `paths`, plus `base` (the first run's base model and template). Runs on equal
    bases share one base copy; RecipeError for two runs of one name or a run named `base`."""
    extra = list(overrides or []) + ([f"model.device={device}"] if device else [])
    sources = [resolve(p, extra) for p in paths]
    names = [s.name for s in sources]
    for s in sources:
        if s.name == BASE or names.count(s.name) > 1:
            why = "is reserved for the base model" if s.name == BASE else "is the directory name of two RUNs"
            raise R.RecipeError(f"The model name {s.name!r} ({s.path}) {why}; requests pick a model by its RUN's "
                                "directory name, so rename or copy the directory.")
    bases: dict[str, tuple[nn.Module, object]] = {}
    out: dict[str, Served] = {}
    quiet = lambda msg: None  # noqa: E731

    def base_of(cfg: R.ModelConfig) -> tuple[str, nn.Module, object, torch.device]:
        key = repr(sorted(dataclasses.asdict(cfg).items()))
        dev = pick_device(cfg)
        if key not in bases:
            log(f"loading {cfg.path} on {dev}")
            bases[key] = (load_model(cfg, dev, log=quiet), load_tokenizer(cfg, log=quiet))
        return key, *bases[key], dev

    for s in sources:
        key, base, tok, dev = base_of(s.recipe.model)
        if s.merged is not None:
            model, kind, label = base, "merged", f"merged model {s.merged}"
        else:
            model = share_base(base)
            kind = load_adapter(model, s.adapter)["expert"]["type"]
            label = f"{s.adapter} on {s.recipe.model.path}"
            model.eval()
        out[s.name] = Served(s.name, model, tok, Encoder(tok, s.recipe.data), dev, kind, label, _context(model),
                             eos_ids(model, tok), key, _state(model))
        log(f"model {s.name!r}: {label} ({kind})")
    first = sources[0]
    key, base, tok, dev = base_of(first.base)
    out[BASE] = Served(BASE, base, tok, Encoder(tok, first.recipe.data), dev, "base",
                       f"base model {first.base.path}", _context(base), eos_ids(base, tok), key, None)
    return out


def unique_bytes(models: list[nn.Module]) -> int:
    """Bytes of the distinct tensor storages of `models` (shared base weights counted once)."""
    seen, total = set(), 0
    for m in models:
        for t in itertools.chain(m.parameters(), m.buffers()):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
    return total


