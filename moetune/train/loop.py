"""The one training loop, for every expert type: loss = task loss + sum of auxiliary losses.

Runs under Hugging Face accelerate, so `accelerate launch -m moetune train ...` or
`torchrun -m moetune train ...` trains data-parallel with the same recipe. Each
optimizer step consumes one global batch (batch_size * grad_accum * processes examples)
taken in order from a seeded per-epoch permutation; the task loss is normalised by the
global number of target tokens, so one process and N processes with the same global
batch compute the same update. Only the main process writes checkpoints and logs.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moetune.adapters.inject import trainable_parameters
from moetune.core.checkpoint import newest_verified_checkpoint, save_checkpoint, set_rng_state
from moetune.core.errors import RecipeError
from moetune.core.ui import TrainProgress
from moetune.data.packing import length_grouped, pack
from moetune.data.pipeline import ExampleSet, shuffled, take
from moetune.data.rows import Example, collate
from moetune.experts.routing import router_parameters, scheduled_temperature, set_temperature
from moetune.recipe import Recipe, TrainConfig
from moetune.train.activation_checkpointing import enable_checkpointing
from moetune.train.loggers import TrainLoggers
from moetune.train.loss import CausalLMLoss
from moetune.train.strategy import make_strategy

# transformers (a heavy import) is imported inside the function that uses it.


@dataclass
class Plan:
    """How many steps, and which examples each step and process consumes."""

    n_examples: int
    micro: int   # batch_size
    accum: int
    world: int
    epochs: float
    max_steps: int
    lengths: np.ndarray | None = None   # per-example token counts, for group_by_length

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.n_examples // self.global_batch)

    @property
    def total_steps(self) -> int:
        return self.max_steps if self.max_steps > 0 else max(1, math.ceil(self.epochs * self.steps_per_epoch))

    def epoch_order(self, epoch: int, seed: int) -> np.ndarray:
        """The seeded permutation of `epoch`, computed once per epoch (the last one is kept)."""
        cached = getattr(self, "_order", None)
        if cached is None or cached[0] != (epoch, seed):
            order = shuffled(self.n_examples, seed * 100_003 + epoch)
            if self.lengths is not None:
                order = length_grouped(order, self.lengths, self.global_batch, seed * 100_003 + epoch)
            self._order = ((epoch, seed), order)
        return self._order[1]

    def step_indices(self, step: int, seed: int) -> list[int]:
        """Indices of the whole global batch of `step` (wrapping into the next epoch): O(batch) per step."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = self.epoch_order(epoch, seed)
        g = self.global_batch
        if g > self.n_examples:  # tiny data: cycle
            return np.tile(perm, math.ceil(g / self.n_examples))[:g].tolist()
        return perm[k * g:(k + 1) * g].tolist()

    def micro_batches(self, indices: list[int], rank: int) -> list[list[int]]:
        """This process's micro-batches of a global batch: micro-batch j of rank r is chunk j*world+r."""
        chunks = [indices[i:i + self.micro] for i in range(0, len(indices), self.micro)]
        return [chunks[j * self.world + rank] for j in range(self.accum)]


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def param_groups(model, params: list, recipe: Recipe) -> list:
    """`params` as optimizer param groups: one group, or, when router.lr_multiplier != 1 or
    router.weight_decay is set, the router parameters in a second group with lr = train.lr *
    lr_multiplier and their own weight decay (the schedule scales both groups alike)."""
    rc, cfg = recipe.router, recipe.train
    routers = {id(p) for p in router_parameters(model)}
    mine = [p for p in params if id(p) in routers]
    if not mine or (rc.lr_multiplier == 1.0 and rc.weight_decay is None):
        return params
    wd = cfg.weight_decay if rc.weight_decay is None else rc.weight_decay
    rest = [p for p in params if id(p) not in routers]
    return ([{"params": rest}] if rest else []) + [{"params": mine, "lr": cfg.lr * rc.lr_multiplier, "weight_decay": wd}]


def domain_indices(recipe: Recipe, examples: list[Example]) -> dict[str, int] | None:
    """Domain name -> index (sorted names) for router.domain_loss_weight > 0, else None."""
    if recipe.router.domain_loss_weight <= 0:
        return None
    names = sorted(set(examples.column("domain").tolist()) if isinstance(examples, ExampleSet)
                   else {e.domain for e in examples})
    if len(names) < 2:
        raise RecipeError(f"Recipe key 'router.domain_loss_weight' is {recipe.router.domain_loss_weight}, but the "
                          f"training data has {len(names)} domain ({', '.join(names)}): the loss needs a "
                          f"'{recipe.data.domain_field}' column with at least two values. Allowed: 0, or data "
                          "with domains.")
    return {d: i for i, d in enumerate(names)}


def token_domains(examples: list[Example], index: dict[str, int] | None, attention_mask: torch.Tensor,
                  example_index: torch.Tensor | None = None):
    """(B, T) domain index of every real token (-1 on padding), or None without an index. A packed batch
    (moetune/data/packing.py) gives each token's example in `example_index` (R, T), -1 on padding."""
    if index is None:
        return None
    dom = torch.tensor([index.get(e.domain, -1) for e in examples], device=attention_mask.device)  # (B,)
    if example_index is not None:                                                                   # packed rows
        return dom[example_index.clamp(min=0)].masked_fill(example_index < 0, -1)                  # (R, T)
    return dom.unsqueeze(1).expand_as(attention_mask).masked_fill(attention_mask == 0, -1)         # (B, T)


def build_scheduler(opt, cfg: TrainConfig, total: int):
    from transformers import get_scheduler
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.scheduler]
    return get_scheduler(name, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=total)


def _seed_step(seed: int, step: int, rank: int, world: int) -> None:
    """Reseed dropout/jitter RNG per step so a resumed run draws exactly the same numbers."""
    s = (seed * 1_000_003 + step * world + rank) % (2 ** 31)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s)


def validation_loss(model, examples: list[Example], batch_size: int, pad_id: int, device) -> float:
    """Token-weighted mean loss on `examples` (response tokens only)."""
    lm = CausalLMLoss(model)
    was = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            b = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
            s, c, _ = lm(**b)
            total, n = total + float(s), n + int(c)
    model.train(was)
    return total / max(n, 1)


def train(recipe: Recipe, model, tokenizer, splits: dict[str, list[Example]], accelerator, run_dir: Path,
          resume: bool = False, console=None) -> dict:
    """Train the injected `model` in place; return {'steps', 'final_train_loss', 'val_loss', 'stopped'}."""
    cfg = recipe.train
    train_ex, val_ex = splits["train"], splits.get("validation") or []
    pad_id = tokenizer.pad_token_id
    world, rank = accelerator.num_processes, accelerator.process_index
    data = recipe.data
    lengths = None
    if data.group_by_length:
        lengths = (train_ex.column("length") if isinstance(train_ex, ExampleSet)
                   else np.asarray([len(e.input_ids) for e in train_ex]))
    plan = Plan(len(train_ex), cfg.batch_size, cfg.grad_accum, world, cfg.epochs, cfg.max_steps, lengths)
    make_batch = ((lambda exs: pack(exs, data.max_length, pad_id)) if data.packing
                  else (lambda exs: collate(exs, pad_id)))
    if not trainable_parameters(model):
        raise RecipeError("No trainable parameters: the expert wrapped nothing.")
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    strategy = make_strategy(cfg.distributed, accelerator)  # one process, DDP or FSDP
    strategy.shard(model)  # FSDP replaces the parameters by sharded DTensors: collect them after this
    params = trainable_parameters(model)
    optimizer = build_optimizer(param_groups(model, params, recipe), cfg)
    dom_index = domain_indices(recipe, train_ex)
    scheduler = build_scheduler(optimizer, cfg, plan.total_steps)
    lm = CausalLMLoss(model)
    lm, optimizer = strategy.prepare(lm, optimizer)
    metrics = TrainLoggers(recipe, run_dir, model, enabled=accelerator.is_main_process)  # metrics.jsonl + report_to

    start = 0
    if resume:
        ckpt, state, damaged = newest_verified_checkpoint(run_dir, warn=console.print if console else print)
        if ckpt is None:
            raise RecipeError(f"--resume: no complete checkpoint under {run_dir / 'checkpoints'} verifies"
                              f"{' (' + '; '.join(damaged) + ')' if damaged else ''}. Allowed: start over with "
                              "--overwrite (the old run is moved aside, not deleted).")
        if state["position"].get("global_batch") != plan.global_batch:  # checked before anything is applied
            raise RecipeError("--resume: the global batch differs from the checkpoint's "
                              f"({state['position'].get('global_batch')} vs {plan.global_batch}).")
        strategy.load_state(model, optimizer, state["adapter"], state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(*state["rng"])
        start = state["step"]
        metrics.log({"event": "resume", "step": start, "checkpoint": str(ckpt), "skipped_damaged": damaged})

    def checkpoint(step: int) -> None:
        adapter = strategy.adapter_state(model)            # collectives under FSDP: every process calls them
        opt_state = strategy.optimizer_state(optimizer)
        if accelerator.is_main_process:
            save_checkpoint(run_dir, step, adapter, opt_state, scheduler,
                            {"step": step, "global_batch": plan.global_batch, "epoch": step / plan.steps_per_epoch,
                             "examples_seen": step * plan.global_batch}, keep=cfg.keep_checkpoints)
        accelerator.wait_for_everyone()

    end = plan.total_steps if cfg.stop_after <= 0 else min(plan.total_steps, start + cfg.stop_after)
    model.train()
    progress = TrainProgress(plan.total_steps, start, console, enabled=accelerator.is_main_process)
    last_loss, val = float("nan"), None
    window_tokens, window_t0 = 0, time.perf_counter()
    with progress:
        for step in range(start, end):
            _seed_step(cfg.seed, step, rank, world)
            set_temperature(model, scheduled_temperature(recipe.router, step, plan.total_steps))
            indices = plan.step_indices(step, cfg.seed)
            rows = take(train_ex, indices)  # the global batch's examples, read once (one Arrow gather)
            n_global = sum(sum(1 for lab in e.labels[1:] if lab >= 0) for e in rows)
            loss_sum = torch.zeros((), device=accelerator.device)
            aux_sum: dict[str, float] = {}
            mbs = plan.micro_batches(list(range(len(indices))), rank)
            for j, mb in enumerate(mbs):
                exs = [rows[i] for i in mb]
                batch = {k: v.to(accelerator.device) for k, v in make_batch(exs).items()}
                doms = token_domains(exs, dom_index, batch["attention_mask"], batch.get("example_index"))  # (B, T)
                if doms is not None:
                    batch["token_domain"] = doms  # reaches the routers through the loss's routing context
                window_tokens += int(batch["attention_mask"].sum()) * world
                with strategy.sync(lm, model, j == len(mbs) - 1), accelerator.autocast():
                    s, _, aux = lm(**batch)
                    # DDP averages gradients over processes: scale so the sum over the global batch is exact.
                    loss = s * world / max(n_global, 1) + sum(aux.values(), torch.zeros((), device=accelerator.device)) / len(mbs)
                    accelerator.backward(loss)
                loss_sum += s.detach()
                for k, v in aux.items():
                    aux_sum[k] = aux_sum.get(k, 0.0) + float(v.detach()) / len(mbs)
            grad_norm = (accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            last_loss = float(accelerator.reduce(loss_sum, "sum")) / max(n_global, 1)
            done = step + 1
            elapsed = time.perf_counter() - window_t0
            tps = window_tokens / max(elapsed, 1e-9)
            progress.update(done, last_loss, scheduler.get_last_lr()[0], tps)
            if done % cfg.log_every == 0 or done == end:
                metrics.log({"step": done, "epoch": round(done / plan.steps_per_epoch, 4), "loss": last_loss,
                             "lr": scheduler.get_last_lr()[0], "tokens_per_s": round(tps, 1),
                             "grad_norm": strategy.value(grad_norm) if grad_norm is not None else None,
                             **({"aux": aux_sum} if aux_sum else {})}, mask=batch["attention_mask"])
                window_tokens, window_t0 = 0, time.perf_counter()
            if val_ex and cfg.eval_every and done % cfg.eval_every == 0 and done < end:
                val = _val(model, val_ex, recipe, pad_id, accelerator)
                metrics.log({"step": done, "split": "validation", "val_loss": val})
            if cfg.save_every and done % cfg.save_every == 0 and done < end:
                checkpoint(done)
    checkpoint(end)
    set_temperature(model, scheduled_temperature(recipe.router, plan.total_steps, plan.total_steps))  # the end value
    if val_ex:
        val = _val(model, val_ex, recipe, pad_id, accelerator)
        metrics.log({"step": end, "split": "validation", "val_loss": val})
    strategy.finish(model)  # FSDP: full adapter tensors on every process, so the caller can save them
    metrics.close()  # trackers closed, curves.png drawn from metrics.jsonl
    model.eval()
    return {"steps": end, "total_steps": plan.total_steps, "final_train_loss": last_loss, "val_loss": val,
            "stopped": end < plan.total_steps, "global_batch": plan.global_batch, "processes": world}


def _val(model, val_ex, recipe, pad_id, accelerator) -> float:
    return validation_loss(model, val_ex, recipe.eval.batch_size, pad_id, accelerator.device)
