"""Collapse a routed adapter into stock PEFT adapters by fixing each layer's gates.

A routed layer mixes its experts with per-token gates w(x) (N,). Replacing w(x) by a constant
w-bar (the mean gate over the real tokens of the validation split, overall or per domain, see
`moetune.eval.report`) turns each type into a static PEFT adapter. Each type owns its rule (its
layer's `collapse(w)`, written out by the collapsed layers' `peft_export`); this module averages
the gates, measures fidelity and writes the files. The rules:

    HydraLoRA  s * sum_i w_i B_i A x = s * B' A x,        B' = sum_i w_i B_i  (d_out, r):  LoRA, rank r
    MoLoRA     s * sum_i w_i B_i A_i x = s * B_cat A_cat x, A_cat = [A_1; ...; A_N]  (N r, d_in),
               B_cat = [w_1 B_1, ..., w_N B_N]  (d_out, N r):                        LoRA, rank N r
    MoV        h * sum_i w_i l_i = h * l',                 l' = 1 + w @ (L - 1)  (d,):  (IA)^3

PEFT scales a LoRA by lora_alpha / r, so the scale s = alpha / r of the routed adapter is kept
with lora_alpha = s * rank: alpha for HydraLoRA (rank r) and N * alpha for MoLoRA (rank N r).
MoV becomes a PEFT IA3 adapter: `ia3_l` is (1, d_in) on `feedforward_modules` (the FFN
intermediate, i.e. the down projection's INPUT is scaled) and (d_out, 1) elsewhere (keys, values).
With constant gates (a zero router, or one expert) the collapse is exact; otherwise
`fidelity` measures what is lost: mean KL(p_routed || p_collapsed) of the next-token
distributions over response tokens, and the change in loss and exact match.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moetune.adapters.inject import routed_layers
from moetune.adapters.io import save_adapter, write_peft
from moetune.core.adapter_files import peft_scale
from moetune.core.checkpoint import atomic_dir
from moetune.core.errors import RecipeError
from moetune.core.ui import console, table
from moetune.data.rows import IGNORE, collate
from moetune.eval.evaluate import exact_match, loss_by_domain
from moetune.eval.report import collect_gates, domain_gates, mean_gates
from moetune.experts.context import batch_routing
from moetune.recipe.experts import EXPERT_CONFIGS
from moetune.run.session import model_with_adapter
from moetune.train.loss import plain_head, target_logits

MODES = ("mean", "per-domain")

# ------------------------------------------------------------------ collapsed layers


@torch.no_grad()
def collapse_layer(layer, w: torch.Tensor) -> nn.Module:
    """The static layer equal to routed `layer` with its gates fixed at w (N,): its type's collapse rule."""
    return layer.collapse(w)


def collapse_layers(routed: dict, gates: torch.Tensor) -> dict[str, nn.Module]:
    """name -> collapsed layer, for routed layers (L in order) and gates (L, N)."""
    return {name: collapse_layer(layer, gates[i]) for i, (name, layer) in enumerate(routed.items())}


def install(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Put `layers` at their names in `model` (routed and collapsed layers share the base projection)."""
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)


# ------------------------------------------------------------------ fidelity


@torch.no_grad()
def kl_by_domain(model, routed: dict, collapsed: dict, examples, pad_id: int, batch_size: int, device) -> dict:
    """Mean over response tokens of KL(p_routed || p_collapsed) = sum_v p_r(v) (log p_r(v) - log p_c(v)),
    overall and per domain. Leaves the routed layers installed."""
    sums, counts = {}, {}
    model.eval()
    sliced = plain_head(model)
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        b = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        keep = b["labels"][:, 1:] != IGNORE                                    # (B, T-1)
        logp = []
        for layers in (routed, collapsed):
            install(model, layers)
            with batch_routing(b["labels"], b["attention_mask"]):          # prompts pooled, padding left out
                logits = target_logits(model, b["input_ids"], b["attention_mask"], keep, sliced)  # (K, V)
            logp.append(F.log_softmax(logits.float(), dim=-1))
        kl = F.kl_div(logp[1], logp[0], log_target=True, reduction="none").sum(-1)  # (K,)
        per_ex = torch.zeros(len(chunk), device=kl.device).index_add_(0, keep.nonzero()[:, 0], kl)  # (B,)
        for e, v, n in zip(chunk, per_ex.tolist(), keep.sum(1).tolist()):
            sums[e.domain] = sums.get(e.domain, 0.0) + v
            counts[e.domain] = counts.get(e.domain, 0) + n
    install(model, routed)
    n = sum(counts.values())
    return {"kl": sum(sums.values()) / max(n, 1), "tokens": n,
            "per_domain": {d: {"kl": sums[d] / max(counts[d], 1), "tokens": counts[d]} for d in sorted(sums)}}


def _scores(model, layers: dict, examples, tokenizer, recipe, device) -> dict:
    """Loss and (with eval.generation) exact match of `model` with `layers` installed, per domain."""
    install(model, layers)
    loss = loss_by_domain(model, examples, tokenizer.pad_token_id, recipe.eval.batch_size, device)
    out = {"loss": loss["loss"], "per_domain": {d: {"loss": v["loss"]} for d, v in loss["per_domain"].items()}}
    if recipe.eval.generation:
        em = exact_match(model, tokenizer, examples, recipe.eval.batch_size, recipe.eval.max_new_tokens, device,
                         show=False, keep_samples=0)
        out["exact_match"] = em["exact_match"]
        for d, v in em["per_domain"].items():
            out["per_domain"][d]["exact_match"] = v["exact_match"]
    return out


def fidelity(model, routed: dict, collapsed: dict, examples, tokenizer, recipe, device) -> dict:
    """KL, loss and exact match of routed vs collapsed on `examples`; leaves the routed layers installed."""
    pad, bs = tokenizer.pad_token_id, recipe.eval.batch_size
    res = kl_by_domain(model, routed, collapsed, examples, pad, bs, device)
    res["collapsed"] = _scores(model, collapsed, examples, tokenizer, recipe, device)
    res["routed"] = _scores(model, routed, examples, tokenizer, recipe, device)
    res["loss_change"] = res["collapsed"]["loss"] - res["routed"]["loss"]
    if "exact_match" in res["routed"]:
        res["exact_match_change"] = res["collapsed"]["exact_match"] - res["routed"]["exact_match"]
    return res


# ------------------------------------------------------------------ writing


def save_collapsed(out_dir: Path, model: nn.Module, layers: dict[str, nn.Module], base_name: str, extra: dict) -> dict:
    """Write one collapsed adapter, a stock PEFT adapter (`peft_export` of the collapsed layers' type); returns its
    PEFT settings. A type moetune saves in PEFT's format anyway (a LoRA) goes through `adapters.io.save_adapter`,
    with moetune.json, so moetune reloads it; any other (IA3) is written with moetune_collapse.json beside it."""
    first = next(iter(layers.values()))
    cls = type(first)
    config, tensors = cls.peft_export(layers)
    if cls.config_cls.stock_peft:
        install(model, layers)
        save_adapter(out_dir, model, first.cfg, None, base_name, extra={"collapsed_from": extra})
    else:
        with atomic_dir(out_dir) as tmp:
            write_peft(tmp, config, tensors, base_name)
            if extra:
                (tmp / "moetune_collapse.json").write_text(json.dumps(extra, indent=2))
    out = {"peft_type": config["peft_type"]}
    if "r" in config:
        out.update(r=config["r"], lora_alpha=config["lora_alpha"], scale=peft_scale(config))
    return out


def _dir_names(keys: list[str]) -> dict[str, str]:
    names = {k: re.sub(r"[^A-Za-z0-9_.-]+", "_", k).strip(".") or "domain" for k in keys}
    if len(set(names.values())) != len(names):
        names = {k: f"{i:02d}-{v}" for i, (k, v) in enumerate(names.items())}
    return names


def export_collapsed(run, mode: str, out: Path | None = None) -> dict:
    """`moetune export RUN --collapse mean|per-domain`: collapse the run's routed adapter at its mean
    validation gates, measure fidelity, write the adapter(s) and collapse.json atomically to `out`."""
    if mode not in MODES:
        raise RecipeError(f"--collapse is {mode!r}; allowed: {', '.join(MODES)}.")
    rc = run.recipe
    val = run.splits("validation").get("validation")
    if not val:
        raise RecipeError("--collapse averages the gates over the validation split, which is empty: set "
                          "data.validation or data.validation_split > 0.")
    model = model_with_adapter(run)
    routed = routed_layers(model)
    if not routed or not rc.expert.collapsible:
        kinds = ", ".join(t for t, c in EXPERT_CONFIGS.items() if c.collapsible)
        raise RecipeError(f"{run.dir / 'adapter'} has no routed layers with a collapse rule (expert type "
                          f"{rc.expert.type!r}); --collapse is for {kinds}. Use `moetune export` as is.")
    pad, bs = run.tokenizer.pad_token_id, rc.eval.batch_size
    sums = collect_gates(model, val, pad, bs, run.device)
    if mode == "mean":
        gates, subsets = {"mean": mean_gates(sums)}, {"mean": val}
    else:
        gates = dict(zip(sums.domains, domain_gates(sums)))                   # domain -> (L, N)
        subsets = {d: [e for e in val if e.domain == d] for d in sums.domains}
    dirs = {"mean": "."} if mode == "mean" else _dir_names(list(gates))
    etype = next(iter(routed.values())).cfg.type
    result = {"mode": mode, "expert_type": etype, "source": str(run.dir / "adapter"), "split": "validation",
              "examples": len(val), "gate_tokens": int(sums.tokens.sum()), "adapters": {}}
    out = Path(out or run.dir / f"collapsed-{mode}")
    try:
        with atomic_dir(out) as tmp:
            for key, g in gates.items():
                collapsed = collapse_layers(routed, g)
                fid = fidelity(model, routed, collapsed, subsets[key], run.tokenizer, rc, run.device)
                info = {"mode": mode, "domain": None if mode == "mean" else key, "expert_type": etype,
                        "source": result["source"]}
                target = tmp if mode == "mean" else tmp / dirs[key]
                peft = save_collapsed(target, model, collapsed, rc.model.path, info)
                result["adapters"][key] = {"dir": dirs[key], **peft, "fidelity": fid,
                                           "gates": {n: g[i].tolist() for i, n in enumerate(sums.names)}}
                install(model, routed)
            (tmp / "collapse.json").write_text(json.dumps(result, indent=2))
    finally:
        install(model, routed)
    fids = {k: v["fidelity"] for k, v in result["adapters"].items()}
    run.update_summary(collapse={"dir": str(out), "mode": mode, "adapters": {
        k: {"kl": f["kl"], "loss_change": f["loss_change"], "exact_match_change": f.get("exact_match_change")}
        for k, f in fids.items()}})
    rows = [[k, v["fidelity"]["kl"], v["fidelity"]["routed"]["loss"], v["fidelity"]["collapsed"]["loss"],
             v["fidelity"]["routed"].get("exact_match"), v["fidelity"]["collapsed"].get("exact_match")]
            for k, v in result["adapters"].items()]
    console.print(table(f"collapse ({mode}) of the {etype} adapter -> {out}\nrouted vs collapsed on the validation "
                        "split; KL in nats per response token", ["adapter", "KL", "loss routed", "loss collapsed",
                                                                 "EM routed", "EM collapsed"], rows))
    return result
