"""MoLE's `experts_from: per_domain`: train one LoRA per domain, then the gates over them.

MoLE (Wu et al., ICLR 2024) starts from LoRAs that were already trained, one per task or
domain. With `expert.experts_from: per_domain`, `moetune train` makes them first, so one
command goes from data to MoLE. For every value d of the training rows' domain field (sorted):

  - a derived recipe: `expert.type: lora` with the MoLE recipe's rank, alpha, dropout,
    target_modules and init_seed; `train:` as in the recipe but max_steps =
    expert.expert_max_steps (when > 0), lr = expert.expert_lr (when set), no stop_after and no
    before-training evaluation; stages [train]; output_dir <output_dir>/experts/<d>;
  - the same `stages.stage_train` (the one training loop) on the train and validation rows of
    domain d, filtered in memory (any data format works); stages passes it in, since this
    module sits below stages (stages calls it);
  - the adapter lands in <output_dir>/experts/<d>/adapter.

The MoLE recipe's expert.experts / expert.names then name those adapters and the domains, and
<output_dir>/experts/experts.json records rows, steps and losses per domain. With `--resume`, a
domain whose adapter is already written is not trained again.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable

from moetune.core.checkpoint import write_json
from moetune.core.errors import RecipeError
from moetune.core.ui import plural
from moetune.recipe import Recipe, RouterConfig


def domain_dir(domain: str) -> str:
    """A file-system-safe directory name for a domain value."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", domain).strip("._") or "domain"


def domain_recipe(rc: Recipe, domain: str) -> Recipe:
    """The recipe of one domain's expert, derived from a recipe whose expert type trains per-domain experts
    first (`ExpertConfig.per_domain_expert`; see the module docstring)."""
    plan = rc.expert.per_domain_expert()
    if plan is None:
        raise RecipeError(f"Expert type {rc.expert.type!r} trains no per-domain experts.")
    expert, steps, lr = plan
    train = dataclasses.replace(rc.train, max_steps=steps or rc.train.max_steps, lr=lr or rc.train.lr,
                                stop_after=0, eval_before=False)
    return dataclasses.replace(rc, expert=expert, router=RouterConfig(), train=train, stages=["train"],
                               output_dir=str(Path(rc.output_dir) / "experts" / domain_dir(domain)))


def train_domain_experts(run, resume: bool, stage_train: Callable) -> dict:
    """Train the per-domain LoRAs of `run` (a `run.session.Run` of a MoLE recipe) with `stage_train(sub_run)`
    (`stages.stage_train`), and point its recipe's experts at them."""
    rc = run.recipe
    splits = run.splits("train", "validation")
    domains = sorted({ex.domain for ex in splits["train"]})
    dirs = [domain_dir(d) for d in domains]
    if len(set(dirs)) != len(dirs):
        raise RecipeError(f"Domains {domains} map to clashing directory names {dirs}; rename the domains.")
    info: dict = {}
    for d in domains:
        sub = type(run)(domain_recipe(rc, d), run.accelerator)
        sub._tok = run.tokenizer
        sub._splits = {k: [ex for ex in v if ex.domain == d] for k, v in splits.items() if v is not None}
        adapter = sub.dir / "adapter"
        if resume and (adapter / "moetune.json").is_file():
            run.log(f"MoLE expert [bold]{d}[/]: reusing {adapter}")
            result = sub.summary().get("train", {})
        else:
            run.log(f"MoLE expert [bold]{d}[/]: training a LoRA on {plural(len(sub._splits['train']), 'row')} -> {adapter}")
            result = stage_train(sub)
        info[d] = {"adapter": str(adapter), "rows": len(sub._splits["train"]),
                   **{k: result.get(k) for k in ("steps", "final_train_loss", "val_loss")}}
    rc.expert.use_trained_experts([info[d]["adapter"] for d in domains], list(domains))
    if run.main:
        write_json(run.dir / "experts" / "experts.json", info)
    return info
