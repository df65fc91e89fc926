"""Merging several LoRA adapters into one stock PEFT LoRA (`moetune merge-lora --adapters ...`).

Adapter i has, at each module, A_i (r_i, d_in), B_i (d_out, r_i), scale s_i = alpha_i / r_i and
a merge weight w_i, so its weighted delta is w_i s_i B_i A_i (d_out, d_in). Every output adapter
has lora_alpha = r (PEFT scale 1): all scaling is folded into the factors. An adapter that does
not adapt a module counts as zero there.

  linear       PEFT's "linear" (equal ranks only): A = sum_i sgn(w_i s_i) sqrt|w_i s_i| A_i,
               B = sum_i sqrt|w_i s_i| B_i. The factors are averaged, not the deltas, so BA holds
               cross terms B_i A_j: cheap and rank r, but only an approximation of the sum.
  cat          exact: A = [A_1; ...; A_N] (sum r_i, d_in), B = [w_1 s_1 B_1, ..., w_N s_N B_N],
               so BA = sum_i w_i s_i B_i A_i, at rank sum_i r_i.
  ties         TIES-merging (Yadav et al., NeurIPS 2023) on the dense deltas D_i = s_i B_i A_i:
               trim each D_i to its top `density` fraction of entries by magnitude, elect the sign
               of sum_i w_i T_i per entry, and average the w_i T_i that agree with it (disjoint mean).
  dare_linear  DARE (Yu et al., ICML 2024): drop each entry of D_i with probability 1 - density and
               rescale the kept ones by 1 / density (seeded), then sum_i w_i D~_i.
  dare_ties    DARE's random drop and rescale, then TIES' sign election and disjoint mean.
  mole         `cat` with per-module weights: at each module, the mean gate of its MoLE gated place
               over a data split (a trained MoLE collapsed at its average gates).

ties / dare_* give a dense matrix M; it is re-factorised by truncated SVD, M ~ U_k S_k V_k^T with
B = U_k S_k^(1/2), A = S_k^(1/2) V_k^T. The rank k is `rank` (default: the largest input rank,
PEFT's default for its SVD merges), capped at min(d_out, d_in); the relative error
||M - BA||_F / ||M||_F of every module is reported in merge.json. Default weights: 1/N for the
summing methods (linear, cat, dare_linear: the average of the adapters), 1 for the averaging
ones (ties, dare_ties: the disjoint mean already averages).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from moetune.adapters.inject import expert_layers
from moetune.core.adapter_files import PEFT_PREFIX, peft_expert, read_adapter
from moetune.core.checkpoint import atomic_dir
from moetune.core.errors import RecipeError
from moetune.core.ui import plural
from moetune.eval.report import collect_gates, mean_gates
from moetune.experts import REGISTRY
from moetune.models.load import stock_base_name
from moetune.recipe import load_recipe
from moetune.recipe.experts import EXPERT_CONFIGS, same_base
from moetune.run.session import Run, model_with_adapter

METHODS = ("linear", "cat", "ties", "dare_linear", "dare_ties", "mole")
GATED = "mole"
"""The method that weighs each adapter by a trained MoLE run's mean gates (--gates-from), named after its paper."""
DENSE = ("ties", "dare_linear", "dare_ties")


@dataclass
class LoRA:
    """One input adapter: name, directory, scale s = alpha / r, rank r, base model, per-module factors."""

    name: str
    path: str
    scale: float
    rank: int
    base_model: str | None
    fan_in_fan_out: bool
    ab: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A (r, d_in), B (d_out, r))


def read_lora(path: str | Path, name: str | None = None) -> LoRA:
    meta, state = read_adapter(path)
    e = meta["expert"]
    scale = EXPERT_CONFIGS[e["type"]].stored_lora_scale(e) if e["type"] in EXPERT_CONFIGS else None
    if scale is None:  # not one plain LoRA pair per module
        raise RecipeError(f"{path} is a {e['type']!r} adapter; merge-lora --adapters merges LoRA adapters only.")
    cfg_file = Path(path) / "adapter_config.json"
    fifo = bool(json.loads(cfg_file.read_text()).get("fan_in_fan_out")) if cfg_file.is_file() else False
    modules = sorted({k.rsplit(".", 1)[0] for k in state})
    ab = {m: (state[f"{m}.lora_A"].float(), state[f"{m}.lora_B"].float()) for m in modules}
    return LoRA(name or Path(path).name, str(path), scale, e["rank"], meta.get("base_model"), fifo, ab)


# ------------------------------------------------------------------ the math of one module (pure functions)


def linear_ab(a: list[torch.Tensor], b: list[torch.Tensor], ws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT-style factor average; a[i] (r, d_in), b[i] (d_out, r), ws (N,) = w_i s_i -> (A, B) of rank r."""
    root = ws.abs().sqrt()                                               # (N,)
    A = torch.einsum("n,nrd->rd", torch.sign(ws) * root, torch.stack(a))  # (r, d_in)
    B = torch.einsum("n,nor->or", root, torch.stack(b))                  # (d_out, r)
    return A, B


def cat_ab(a: list[torch.Tensor], b: list[torch.Tensor], ws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact concatenation: A (sum r_i, d_in), B (d_out, sum r_i) with B A = sum_i ws_i B_i A_i."""
    return torch.cat(a, 0), torch.cat([w * bi for w, bi in zip(ws, b)], 1)


def trim(d: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the round(density * numel) entries of largest magnitude, zero the rest."""
    k = int(round(density * d.numel()))
    if k >= d.numel():
        return d
    keep = torch.zeros(d.numel(), dtype=torch.bool)
    keep[d.abs().flatten().topk(k).indices] = True
    return d * keep.view_as(d)


def dare_drop(d: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density` (Bernoulli, from `gen`), rescale kept by 1/density."""
    if density >= 1:
        return d
    keep = torch.rand(d.shape, generator=gen) < density
    return d * keep / density


def disjoint_mean(t: torch.Tensor) -> torch.Tensor:
    """TIES elect + disjoint merge of weighted deltas t (N, d_out, d_in): sign s = sgn(sum_i t_i) per
    entry, then the mean of the t_i whose sign is s (entries that are 0 do not count)."""
    sign = torch.sign(t.sum(0))                                          # (d_out, d_in)
    agree = (torch.sign(t) == sign) & (t != 0)                           # (N, d_out, d_in)
    return (t * agree).sum(0) / agree.sum(0).clamp_min(1)


def dense_merge(deltas: torch.Tensor, w: torch.Tensor, method: str, density: float,
                gen: torch.Generator | None = None) -> torch.Tensor:
    """ties / dare_linear / dare_ties on dense deltas (N, d_out, d_in) with weights w (N,)."""
    if method == "ties":
        pruned = torch.stack([trim(d, density) for d in deltas])
    else:
        pruned = torch.stack([dare_drop(d, density, gen) for d in deltas])
    t = w[:, None, None] * pruned                                        # (N, d_out, d_in)
    return t.sum(0) if method == "dare_linear" else disjoint_mean(t)


def svd_ab(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Truncated SVD m ~ B A with B = U_k S_k^(1/2) (d_out, k), A = S_k^(1/2) V_k^T (k, d_in); the
    relative Frobenius error ||m - BA|| / ||m|| (0 for m = 0)."""
    k = min(rank, *m.shape)
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    root = s[:k].sqrt()
    B, A = u[:, :k] * root, root[:, None] * vh[:k]
    norm = float(m.double().norm())
    err = float((m.double() - B @ A).norm()) / norm if norm > 0 else 0.0
    return A.float(), B.float(), err


# ------------------------------------------------------------------ whole adapters


def default_weights(method: str, n: int) -> list[float]:
    return [1.0] * n if method in ("ties", "dare_ties") else [1.0 / n] * n


def merge_adapters(loras: list[LoRA], method: str, weights, density: float = 0.5, seed: int = 0,
                   rank: int | None = None) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int, dict]:
    """({module: (A, B)}, output rank, per-module relative errors) for `method`. `weights` is a list of
    N floats, or a dict module -> (N,) tensor (the `mole` method's per-module gates)."""
    if method not in METHODS:
        raise RecipeError(f"--method is {method!r}; allowed: {', '.join(METHODS)}.")
    if not 0 < density <= 1:
        raise RecipeError(f"--density is {density}; allowed: a number > 0 and <= 1.")
    modules = sorted({m for lo in loras for m in lo.ab})
    out_rank = {"linear": loras[0].rank, "cat": sum(lo.rank for lo in loras), "mole": sum(lo.rank for lo in loras)}.get(
        method, rank or max(lo.rank for lo in loras))
    if method == "linear" and len({lo.rank for lo in loras}) > 1:
        raise RecipeError(f"--method linear averages the A and B factors, which needs equal ranks; got "
                          f"{[lo.rank for lo in loras]}. Use --method cat (exact) or ties/dare_* (SVD).")
    gen = torch.Generator().manual_seed(seed)
    merged, errors = {}, {}
    for m in modules:
        w = weights[m] if isinstance(weights, dict) else torch.tensor(weights, dtype=torch.float32)  # (N,)
        ref = next(lo.ab[m] for lo in loras if m in lo.ab)
        d_in, d_out = ref[0].shape[1], ref[1].shape[0]
        a = [lo.ab[m][0] if m in lo.ab else torch.zeros(lo.rank, d_in) for lo in loras]   # (r_i, d_in)
        b = [lo.ab[m][1] if m in lo.ab else torch.zeros(d_out, lo.rank) for lo in loras]  # (d_out, r_i)
        s = torch.tensor([lo.scale for lo in loras])                                       # (N,)
        if method == "linear":
            merged[m] = linear_ab(a, b, w * s)
        elif method in ("cat", "mole"):
            merged[m] = cat_ab(a, b, w * s)
        else:
            deltas = torch.stack([si * bi @ ai for si, ai, bi in zip(s, a, b)])           # (N, d_out, d_in)
            A, B, errors[m] = svd_ab(dense_merge(deltas, w, method, density, gen), out_rank)
            pad = out_rank - A.shape[0]                                                    # k < rank: zero rows
            merged[m] = (torch.cat([A, A.new_zeros(pad, d_in)]), torch.cat([B, B.new_zeros(d_out, pad)], 1))
    return merged, out_rank, errors


def save_merged_adapter(out: str | Path, merged: dict, rank: int, loras: list[LoRA], info: dict) -> Path:
    """Write a stock PEFT LoRA directory (lora_alpha = r) plus moetune.json and merge.json, atomically."""
    base = next((lo.base_model for lo in loras if lo.base_model), None)
    modules = sorted(merged)
    tensors = {}
    for m, (a, b) in merged.items():
        tensors[f"{PEFT_PREFIX}{m}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{m}.lora_B.weight"] = b.contiguous()
    peft = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
            "base_model_name_or_path": stock_base_name(base) if base else None,
            "lora_alpha": rank, "lora_dropout": 0.0, "target_modules": modules, "bias": "none",
            "fan_in_fan_out": any(lo.fan_in_fan_out for lo in loras), "modules_to_save": None,
            "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}
    meta = {"format": "moetune-adapter/1", "base_model": base, "modules": modules, "router": None,
            "expert": peft_expert({**peft, "lora_alpha": float(rank)}, modules), "merge": info}
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(peft, indent=2))
        (tmp / "moetune.json").write_text(json.dumps(meta, indent=2))
        (tmp / "merge.json").write_text(json.dumps(info, indent=2))
    return Path(out)


def summary(method: str, loras: list[LoRA], weights, density: float, seed: int, rank: int, errors: dict) -> dict:
    w = ({m: v.tolist() for m, v in weights.items()} if isinstance(weights, dict) else list(weights))
    out = {"method": method, "adapters": [lo.path for lo in loras], "names": [lo.name for lo in loras],
           "weights": w, "rank": rank}
    if method in DENSE:
        errs = list(errors.values())
        out.update(density=density, seed=seed, svd_relative_error={
            "mean": sum(errs) / len(errs), "max": max(errs), "per_module": errors})
    return out


def check_bases(loras: list[LoRA]) -> None:
    named = [lo for lo in loras if lo.base_model]
    for lo in named[1:]:
        if not same_base(lo.base_model, named[0].base_model):
            raise RecipeError(f"Adapters {named[0].path} and {lo.path} name different base models "
                              f"({named[0].base_model!r} vs {lo.base_model!r}); merge LoRAs of one base model.")


def parse_weights(text: str | None, n: int, method: str) -> list[float]:
    if not text:
        return default_weights(method, n)
    try:
        w = [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise RecipeError(f"--weights {text!r}: expected {n} numbers separated by commas.") from None
    if len(w) != n or not all(math.isfinite(x) for x in w):
        raise RecipeError(f"--weights {text!r}: expected {n} finite numbers (one per adapter), got {len(w)}.")
    return w


# ------------------------------------------------------------------ the `mole` method and the command


def mole_gates(run_dir: str | Path, split: str = "validation", overrides: list[str] | None = None
               ) -> tuple[list[str], list[str], dict[str, torch.Tensor]]:
    """(expert dirs, expert names, {module: mean gate (N,)}) of a trained MoLE run: each wrapped module
    gets the mean gate of its gated place over the real tokens of `split` (moetune.eval.report)."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise RecipeError(f"--gates-from {run_dir}: not a moetune run directory (no recipe.yaml).")
    rc = load_recipe(run_dir / "recipe.yaml", [f"output_dir={run_dir}", f"eval.split={split}", "stages=[eval]",
                                               *(overrides or [])])
    if not rc.expert.mixes_trained_loras:
        raise RecipeError(f"--gates-from {run_dir}: a {rc.expert.type!r} run; the mole method needs a MoLE run.")
    run = Run(rc)
    model = model_with_adapter(run)
    examples = run.held_out()[: rc.eval.max_examples] if rc.eval.max_examples else run.held_out()
    sums = collect_gates(model, examples, run.tokenizer.pad_token_id, rc.eval.batch_size, run.device)
    rows = dict(zip(sums.names, mean_gates(sums).float()))                       # place -> (N,)
    return REGISTRY[rc.expert.type].lora_mixture(expert_layers(model), rows)


def merge_command(sources: list[Path], method: str, out: Path, weights: str | None = None, density: float = 0.5,
                  seed: int = 0, rank: int | None = None, gates_from: Path | None = None, split: str = "validation",
                  overrides: list[str] | None = None) -> dict:
    """`moetune merge-lora --adapters ...`: read, merge, write the PEFT adapter to `out`; returns merge.json."""
    if method == "mole":
        if gates_from is None:
            raise RecipeError("--method mole needs --gates-from RUN_DIR (a trained MoLE run).")
        dirs, names, w = mole_gates(gates_from, split, overrides)
        if sources:
            if len(sources) != len(dirs):
                raise RecipeError(f"--method mole: {plural(len(sources), 'adapter')} given but the MoLE has "
                                  f"{plural(len(dirs), 'expert')} ({', '.join(names)}); pass them in that order, or none.")
            dirs = [str(s) for s in sources]
        if weights:
            raise RecipeError("--method mole takes its weights from the MoLE gates; drop --weights.")
        loras = [read_lora(d, n) for d, n in zip(dirs, names)]
    else:
        if len(sources) < 2:
            raise RecipeError(f"--adapters needs at least two adapter directories, got {len(sources)}.")
        if gates_from is not None:
            raise RecipeError("--gates-from is for --method mole only.")
        loras = [read_lora(s) for s in sources]
        w = parse_weights(weights, len(loras), method)
    check_bases(loras)
    merged, r, errors = merge_adapters(loras, method, w, density, seed, rank)
    info = summary(method, loras, w, density, seed, r, errors)
    save_merged_adapter(out, merged, r, loras, info)
    return info
