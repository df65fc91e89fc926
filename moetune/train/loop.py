"""The one training loop, for every expert type: loss = task loss + sum of auxiliary losses.

Runs under Hugging Face accelerate, so `accelerate launch -m moetune train ...` or
`torchrun -m moetune train ...` trains data-parallel with the same recipe. Each
optimizer step consumes one global batch (batch_size * grad_accum * processes examples)
taken in order from a seeded per-epoch permutation (train/plan.py); the task loss is normalised
by the global number of target tokens, so one process and N processes with the same global
batch compute the same update (train/step.py). Only the main process writes checkpoints and logs.

`train` is three parts: `Trainer.__init__` sets the run up (plan, strategy, optimizer, schedule,
objective, step), `TrainStep` (train/step.py) runs one optimizer step, and
`Trainer.evaluate_and_checkpoint` logs, scores the validation split and writes checkpoints after
it. How the work spreads over processes is the strategy's business (train/strategy.py).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from transformers import get_scheduler

from moetune.adapters.inject import AdapterCopy, adapters_off, lora_plus_parameters, trainable_parameters
from moetune.core.checkpoint import newest_verified_checkpoint, save_checkpoint, set_rng_state
from moetune.core.errors import Interrupted, RecipeError
from moetune.core.ui import TrainProgress
from moetune.data.examples import ExampleSet, is_pairs, take
from moetune.data.rows import Example
from moetune.experts.routing import router_parameters, scheduled_temperature, set_temperature
from moetune.recipe import Recipe, TrainConfig
from moetune.train.activation_checkpointing import enable_checkpointing
from moetune.train.global_balance import step_class
from moetune.train.loggers import TrainLoggers
from moetune.train.plan import Plan, make_plan  # noqa: F401 (Plan: the examples plan, for callers)
from moetune.train.preference import DPO, ORPO
from moetune.train.routing_log import routing_snapshot
from moetune.train.signals import StopRequest
from moetune.train.step import SFT, StepResult
from moetune.train.strategy import make_strategy

# transformers (a heavy import) is imported inside the function that uses it.


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def param_groups(model, params: list, recipe: Recipe) -> list:
    """`params` as optimizer param groups: one group, or, when router.lr_multiplier != 1 or
    router.weight_decay is set, the router parameters in a group with lr = train.lr *
    lr_multiplier and their own weight decay, and with train.lora_plus_ratio != 1 (LoRA+) the B
    matrices (`lora_plus_parameters`) in a group with lr = train.lr * lora_plus_ratio (the schedule
    scales every group alike)."""
    rc, cfg = recipe.router, recipe.train
    routers = {id(p) for p in router_parameters(model)}
    mine = [p for p in params if id(p) in routers]
    if rc.lr_multiplier == 1.0 and rc.weight_decay is None:
        mine = []
    fast_ids = {id(p) for p in lora_plus_parameters(model)} if cfg.lora_plus_ratio != 1.0 else set()
    fast = [p for p in params if id(p) in fast_ids and id(p) not in routers]
    if not mine and not fast:
        return params
    wd = cfg.weight_decay if rc.weight_decay is None else rc.weight_decay
    grouped = {id(p) for p in mine + fast}
    rest = [p for p in params if id(p) not in grouped]
    return (([{"params": rest}] if rest else []) + ([{"params": fast, "lr": cfg.lr * cfg.lora_plus_ratio}] if fast else [])
            + ([{"params": mine, "lr": cfg.lr * rc.lr_multiplier, "weight_decay": wd}] if mine else []))


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


def build_scheduler(opt, cfg: TrainConfig, total: int):
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.scheduler]
    return get_scheduler(name, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=total)


OBJECTIVES = {  # train.objective -> the objective built for a run (train/step.py's interface)
    "sft": lambda recipe, model, pad_id, domains: SFT(recipe.data.packing, recipe.data.max_length, pad_id, domains),
    "dpo": lambda recipe, model, pad_id, domains: DPO(recipe.train.beta, recipe.train.loss_type, pad_id,
                                                      dpo_reference(model, recipe.train.reference), domains),
    "orpo": lambda recipe, model, pad_id, domains: ORPO(recipe.train.beta, pad_id, domains),
}


def dpo_reference(model, reference: str | None):
    """DPO's reference during training: the adapters switched off, or (`train.reference`: the policy started from
    that run's adapter) a frozen copy of the adapter as it is now, in the run's own layout (sharded under FSDP)."""
    if reference is None:
        return lambda: adapters_off(model)
    return AdapterCopy.of_model(model).swapped


def check_objective(recipe: Recipe, examples) -> None:
    """train.objective against the training data: dpo and orpo need preference pairs."""
    if recipe.train.objective != "sft" and not is_pairs(examples):
        fmt = getattr(examples, "info", {}).get("format", "?")
        raise RecipeError(f"Recipe key 'train.objective' is {recipe.train.objective!r}, but the training data "
                          f"({recipe.data.train if not recipe.data.mix else 'data.mix'}) is in format {fmt!r}, not "
                          "preference pairs. Allowed: data with prompt, chosen and rejected columns (TRL's "
                          "preference format, e.g. data/preference/train.jsonl), or train.objective sft.")


def train(recipe: Recipe, model, tokenizer, splits: dict[str, list[Example]], accelerator, run_dir: Path,
          resume: bool = False, console=None) -> dict:
    """Train the injected `model` in place; return {'steps', 'final_train_loss', 'val_loss', 'stopped'}."""
    trainer = Trainer(recipe, model, tokenizer, splits, accelerator, run_dir)
    start = trainer.resume(console) if resume else 0
    result = trainer.run(start, console)
    return {**result, "resumed_from": start} if resume else result


def _carried(position: dict, run_dir: Path, step: int) -> tuple[float, float]:
    """(last training loss, training seconds) up to checkpoint `step`, so that a resumed run reports the whole
    run: summary.json's train entry when the run ended there (train.stop_after, or a finished run: its seconds
    include the final validation), else the checkpoint's (a run killed after it)."""
    loss, seconds = position.get("train_loss"), position.get("seconds")
    try:
        prev = json.loads((Path(run_dir) / "summary.json").read_text()).get("train") or {}
    except (OSError, ValueError, AttributeError):
        prev = {}
    if prev.get("steps") == step:
        loss = prev["final_train_loss"] if prev.get("final_train_loss") is not None else loss
        seconds = prev["seconds"] if prev.get("seconds") is not None else seconds
    return (float(loss) if loss is not None else float("nan")), float(seconds or 0.0)


class Trainer:
    """One training run: set up here; `run` drives the steps, `evaluate_and_checkpoint` follows each."""

    def __init__(self, recipe: Recipe, model, tokenizer, splits: dict[str, list[Example]], accelerator,
                 run_dir: Path) -> None:
        cfg = self.cfg = recipe.train
        self.recipe, self.model, self.accelerator, self.run_dir = recipe, model, accelerator, run_dir
        self.train_ex, self.val_ex = splits["train"], splits.get("validation") or []
        self.pad_id = tokenizer.pad_token_id
        self.plan = make_plan(recipe, self.train_ex, accelerator.num_processes)  # examples or token budget per step
        if not trainable_parameters(model):
            raise RecipeError("No trainable parameters: the expert wrapped nothing.")
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        self.strategy = make_strategy(cfg.distributed, accelerator)  # one process, DDP or FSDP
        self.strategy.shard(model)  # FSDP replaces the parameters by sharded DTensors: collect them after this
        params = trainable_parameters(model)
        optimizer = build_optimizer(param_groups(model, params, recipe), cfg)
        check_objective(recipe, self.train_ex)  # the objective (train/step.py, train/preference.py): train.objective
        objective = self.objective = OBJECTIVES[cfg.objective](recipe, model, self.pad_id,
                                                                domain_indices(recipe, self.train_ex))
        self.scheduler = build_scheduler(optimizer, cfg, self.plan.total_steps)
        lm, self.optimizer = self.strategy.prepare(objective.module(model), optimizer)
        step = step_class(recipe, model)  # TrainStep, or GlobalBalanceStep for router.balance_scope: global
        self.train_step = step(model, lm, objective, self.strategy, self.optimizer, self.scheduler, params, recipe,
                               self.plan.total_steps, accelerator)
        self.metrics = TrainLoggers(recipe, run_dir, model, enabled=accelerator.is_main_process)  # metrics.jsonl + report_to
        self.last_loss, self.val = float("nan"), None
        self.prior_seconds, self.t0 = 0.0, time.perf_counter()   # training seconds before this process; its start

    def resume(self, console=None) -> int:
        """Load the newest complete checkpoint (adapter, optimizer, schedule, RNG); return its step."""
        run_dir, plan = self.run_dir, self.plan
        ckpt, state, damaged = newest_verified_checkpoint(run_dir, warn=console.print if console else print)
        if ckpt is None:
            raise RecipeError(f"--resume: no complete checkpoint under {run_dir / 'checkpoints'} verifies"
                              f"{' (' + '; '.join(damaged) + ')' if damaged else ''}. Allowed: start over with "
                              "--overwrite (the old run is moved aside, not deleted).")
        why = plan.mismatch(state["position"])  # checked before anything is applied
        if why:
            raise RecipeError(f"--resume: {why}.")
        self.strategy.load_state(self.model, self.optimizer, state["adapter"], state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(*state["rng"])
        start = state["step"]
        self.last_loss, self.prior_seconds = _carried(state["position"], run_dir, start)
        self.metrics.log({"event": "resume", "step": start, "checkpoint": str(ckpt), "skipped_damaged": damaged})
        if console is not None and self.accelerator.is_main_process:
            done = start >= plan.total_steps
            console.print(f"--resume: resumed from {ckpt} at step {start} of {plan.total_steps}"
                          + ("; the run is complete, nothing to train." if done else "."))
        return start

    def run(self, start: int, console=None) -> dict:
        """Steps start .. end (train.stop_after may end early), then the final checkpoint and validation."""
        cfg, plan, acc, model = self.cfg, self.plan, self.accelerator, self.model
        end = plan.total_steps if cfg.stop_after <= 0 else min(plan.total_steps, start + cfg.stop_after)
        model.train()
        progress = TrainProgress(plan.total_steps, start, console, enabled=acc.is_main_process)
        self.t0 = time.perf_counter()
        self.window_tokens, self.window_slots, self.window_t0 = 0, 0, time.perf_counter()
        log = console.print if console is not None and acc.is_main_process else None
        with progress, StopRequest(log) as stop:
            for step in range(start, end):
                indices = plan.step_indices(step, cfg.seed)
                rows = take(self.train_ex, indices)  # the global batch's examples, read once (one Arrow gather)
                result = self.train_step(step, rows, plan.micro_batches(indices, acc.process_index))
                self.evaluate_and_checkpoint(step + 1, end, result, progress)
                signum = self.strategy.agree(stop.signum or 0)  # every process stops after the same step
                if signum:
                    self.stop_at(step + 1, end, signum)
        if end > start:  # resumed at its end (a finished run): the checkpoint there is this state already
            self.checkpoint(end)
        set_temperature(model, scheduled_temperature(self.recipe.router, plan.total_steps, plan.total_steps))  # the end value
        if self.val_ex:
            self.validate(end)
        self.strategy.finish(model)  # FSDP: full adapter tensors on every process, so the caller can save them
        self.metrics.close()  # trackers closed, curves.png drawn from metrics.jsonl
        model.eval()
        return {"steps": end, "total_steps": plan.total_steps, "final_train_loss": self.last_loss, "val_loss": self.val,
                "stopped": end < plan.total_steps, "global_batch": plan.global_batch, "processes": self.strategy.world,
                "seconds": round(self.seconds(), 1)}

    def seconds(self) -> float:
        """Training seconds of the whole run: those before the checkpoint it resumed from, plus this process's."""
        return self.prior_seconds + time.perf_counter() - self.t0

    def evaluate_and_checkpoint(self, done: int, end: int, result: StepResult, progress) -> None:
        """After step `done`: the progress bar, a metrics line every train.log_every steps, the validation
        loss every train.eval_every steps, a checkpoint every train.save_every steps (the last step's
        validation and checkpoint come after the loop)."""
        cfg, plan = self.cfg, self.plan
        self.last_loss = result.loss
        self.window_tokens += result.tokens
        self.window_slots += result.slots
        lr = self.scheduler.get_last_lr()[0]
        tps = self.window_tokens / max(time.perf_counter() - self.window_t0, 1e-9)
        progress.update(done, result.loss, lr, tps)
        if done % cfg.log_every == 0 or done == end:
            grad_norm = self.strategy.value(result.grad_norm) if result.grad_norm is not None else None
            self.metrics.log({"step": done, "epoch": round(done / plan.steps_per_epoch, 4), "loss": result.loss,
                              "lr": lr, "tokens_per_s": round(tps, 1), "grad_norm": grad_norm, **result.metrics,
                              "real_tokens": round(self.window_tokens / max(self.window_slots, 1), 4),
                              **({"aux": result.aux} if result.aux else {})}, mask=result.mask)
            self.window_tokens, self.window_slots, self.window_t0 = 0, 0, time.perf_counter()
        if self.val_ex and cfg.eval_every and done % cfg.eval_every == 0 and done < end:
            self.validate(done)
        if cfg.save_every and done % cfg.save_every == 0 and done < end:
            self.checkpoint(done)

    def stop_at(self, done: int, end: int, signum: int) -> None:
        """A signal asked to stop (train/signals.py): checkpoint step `done` (unless the periodic one just did),
        close the loggers (curves.png), raise Interrupted naming the checkpoint."""
        cfg = self.cfg
        if not (cfg.save_every and done % cfg.save_every == 0 and done < end):
            self.checkpoint(done)
        self.metrics.log({"event": "stopped", "step": done, "signal": signum})
        self.metrics.close()
        path = Path(self.run_dir) / "checkpoints" / f"step-{done:07d}"
        raise Interrupted(signum, f"training stopped after step {done} of {self.plan.total_steps}; its checkpoint "
                          f"is {path}.", step=done, resumable=True)

    def validate(self, step: int) -> None:
        """Score the validation split (the objective's `validate`: its loss, and DPO's metrics) and log it."""
        scores = self.objective.validate(self.model, self.val_ex, self.recipe.eval.batch_size, self.accelerator.device)
        self.val = scores["val_loss"]
        self.metrics.log({"step": step, "split": "validation", **scores, **self.val_routing()})

    def val_routing(self) -> dict:
        """{'val_routing': per-layer MI and gate histograms} on the validation split (train/routing_log.py) for a
        routed adapter, the sft objective and at least two domains, else {}. Every process runs it (FSDP's forward
        is collective)."""
        if self.cfg.objective != "sft":  # preference pairs: no single row per example to route
            return {}
        snap = routing_snapshot(self.model, self.val_ex, self.pad_id, self.recipe.eval.batch_size, self.accelerator.device)
        return {"val_routing": snap} if snap else {}

    def checkpoint(self, step: int) -> None:
        """Write checkpoint `step` (main process; every process takes part in gathering the state)."""
        plan = self.plan
        adapter = self.strategy.adapter_state(self.model)             # collectives under FSDP: every process calls them
        opt_state = self.strategy.optimizer_state(self.optimizer)
        if self.accelerator.is_main_process:
            save_checkpoint(self.run_dir, step, adapter, opt_state, self.scheduler,
                            {**plan.position(step), "seconds": round(self.seconds(), 3),
                             "train_loss": self.last_loss if math.isfinite(self.last_loss) else None},
                            keep=self.cfg.keep_checkpoints)
        self.accelerator.wait_for_everyone()
