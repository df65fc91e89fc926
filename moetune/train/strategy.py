"""How a training run spreads over processes: one strategy object for one process, DDP and FSDP.

The loop (train/loop.py) and the step (train/step.py) never ask how many processes there are or
whether the model is sharded: they call the strategy at the six places where that matters.

    shard(model)              before the trainable parameters are collected (FSDP: fully_shard)
    prepare(lm, optimizer)    accelerate's wrapping (device, mixed-precision autocast, DDP)
    sync(lm, model, last)     one micro-batch's forward and backward: gradients are reduced over
                              the processes on the last micro-batch of a step only
    adapter_state(model)      full adapter tensors for a checkpoint (main process; FSDP gathers)
    optimizer_state(opt)      the optimizer state with full tensors for a checkpoint
    load_state(...)           a checkpoint's full tensors back into the (maybe sharded) run
    finish(model)             after training: full adapter parameters on every process
    value(t)                  a scalar that may be a sharded DTensor (the gradient norm) as a float
    agree(n)                  the largest of an integer over the processes (a stop signal one of them got)

Every process calls every method in the same order: under FSDP the gathering ones are collectives.
Each process's gradient is averaged over the processes (DDP's all-reduce, FSDP's reduce-scatter),
so the step scales its loss by the number of processes (`world`) in every strategy alike.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from moetune.adapters.inject import adapter_state_dict, load_adapter_state_dict
from moetune.train import fsdp


class Strategy:
    """The interface, with one process's behaviour: accelerate moves the loss module and adds its autocast;
    there is nothing to shard, synchronise or gather."""

    name = "single"

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator
        self.world = accelerator.num_processes

    def shard(self, model: torch.nn.Module) -> None:
        """Lay `model` out for the strategy before its parameters are collected (nothing to do)."""

    def prepare(self, lm: torch.nn.Module, optimizer):
        """(lm, optimizer) as the step uses them: accelerate's prepared objects (a DDP wrapper with several processes)."""
        return self.accelerator.prepare(lm, optimizer)

    def sync(self, lm, model: torch.nn.Module, last: bool):
        """Context for one micro-batch's forward and backward; `last`: the step's last micro-batch."""
        return nullcontext()

    def adapter_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """Full adapter tensors (CPU) on the main process, None on the others. Every process calls it."""
        return adapter_state_dict(model) if self.accelerator.is_main_process else None

    def optimizer_state(self, optimizer):
        """An object whose state_dict() holds full tensors (for `checkpoint.save_checkpoint`). Every process calls it."""
        return optimizer

    def load_state(self, model: torch.nn.Module, optimizer, adapter: dict, optimizer_state: dict) -> None:
        """Load a checkpoint's full adapter and optimizer state (every process passes the same)."""
        load_adapter_state_dict(model, adapter)
        optimizer.load_state_dict(optimizer_state)

    def finish(self, model: torch.nn.Module) -> None:
        """After the last step: leave full adapter parameters for the caller to save (nothing to do)."""

    def value(self, t: torch.Tensor) -> float:
        return float(t)

    def agree(self, n: int) -> int:
        """The largest `n` over the processes (one process: `n`). Every process calls it."""
        if self.world == 1:
            return n
        t = torch.tensor([n], dtype=torch.int64, device=self.accelerator.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())


class SingleProcess(Strategy):
    """One process (also `train.distributed: fsdp` or `ddp` when only one process runs)."""


class DDP(Strategy):
    """Data parallel: every process holds the whole model; DDP all-reduces the gradients, skipped (no_sync)
    on the micro-batches before the last of a step."""

    name = "ddp"

    def sync(self, lm, model: torch.nn.Module, last: bool):
        return nullcontext() if last else self.accelerator.no_sync(lm)


class FSDP(Strategy):
    """FSDP2 (moetune/train/fsdp.py): every decoder block and the root are sharded over the processes; FSDP
    reduce-scatters the gradients itself (no DDP wrapper), and everything that leaves the process group
    (checkpoints, the final adapter) is gathered to full tensors first."""

    name = "fsdp"

    def shard(self, model: torch.nn.Module) -> None:
        fsdp.shard_model(model)  # replaces the parameters by sharded DTensors: collect them after this

    def prepare(self, lm: torch.nn.Module, optimizer):
        return lm, self.accelerator.prepare(optimizer)

    def sync(self, lm, model: torch.nn.Module, last: bool):
        fsdp.set_gradient_sync(model, last)
        return nullcontext()

    def adapter_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        return fsdp.full_adapter_state(model)                           # collective: every process

    def optimizer_state(self, optimizer):
        return fsdp.FullOptimizerState(optimizer)                       # collective: every process

    def load_state(self, model: torch.nn.Module, optimizer, adapter: dict, optimizer_state: dict) -> None:
        fsdp.load_full_adapter_state(model, adapter)
        optimizer.load_state_dict(fsdp.shard_optimizer_state(optimizer, optimizer_state))

    def finish(self, model: torch.nn.Module) -> None:
        fsdp.gather_adapters(model)  # full adapter tensors on every process: the caller saves them

    def value(self, t: torch.Tensor) -> float:
        return float(fsdp.full(t))


STRATEGIES = {"ddp": DDP, "fsdp": FSDP}


def make_strategy(distributed: str, accelerator) -> Strategy:
    """The strategy for `train.distributed` with accelerate's process count (one process: SingleProcess)."""
    if accelerator.num_processes == 1:
        return SingleProcess(accelerator)
    return STRATEGIES[distributed](accelerator)
