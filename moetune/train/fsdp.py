"""FSDP2 (`train.distributed: fsdp`): shard the frozen base and the adapters over the processes.

With several processes (`accelerate launch` / `torchrun`), `torch.distributed.fsdp.fully_shard`
is applied to every decoder block (a CALMLayer entry with its cross-attention) and then to the
whole model, so each process holds 1/N of every weight, adapters included, and all-gathers one
block at a time. Gradients are reduce-scattered and averaged like DDP's all-reduce, so the
training loop's loss scaling is the same. The frozen base may be bfloat16 while the adapters stay
float32 in the same block (FSDP2 all-gathers each dtype separately); the AdamW moments are DTensors
sharded like their parameters. A CALM augmenting model is not a submodule and stays whole on
each process.

What leaves the process group is always FULL (gathered) tensors: checkpoints hold the gathered
adapter and optimizer moments in the ordinary single-process format (so a checkpoint written
under FSDP resumes under FSDP, DDP or one process alike), and after training the adapter
parameters are replaced by their gathered values so that saving the adapter needs no collective.
All functions that gather are collectives: every process must call them, in the same order.

The sliced-head loss calls the decoder stack and the head separately, which would bypass the
root's all-gather; a sharded model is marked `moetune_full_forward` so the loss runs the model's
own forward instead (loss.py).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from moetune.adapters.inject import expert_layers
from moetune.models.layers import decoder_layers


def shard_model(model: nn.Module) -> int:
    """fully_shard each decoder block, then the root (embeddings, final norm, head); return the block count."""
    _, blocks = decoder_layers(model)
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    model.moetune_full_forward = True
    return len(blocks)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (all-gathered from every process when `t` is a sharded DTensor)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`t` (a full tensor, the same on every process) laid out as `ref`: this process's shard if ref is a DTensor."""
    if isinstance(ref, DTensor):
        return distribute_tensor(t.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)
    return t


def _adapter_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v for n, layer in expert_layers(model).items() for k, v in layer.adapter_state().items()}


def full_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """`inject.adapter_state_dict` with gathered tensors (collective)."""
    return {k: full(v.detach()).cpu().contiguous() for k, v in _adapter_params(model).items()}


def load_full_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors (e.g. from a checkpoint) into the sharded adapters (every process passes the same)."""
    params = _adapter_params(model)
    if set(params) != set(state):
        raise ValueError(f"adapter does not fit this model: {sorted(set(params) ^ set(state))[:3]}")
    with torch.no_grad():
        for k, p in params.items():
            if tuple(p.shape) != tuple(state[k].shape):
                raise ValueError(f"adapter tensor {k} has shape {tuple(state[k].shape)}, model wants {tuple(p.shape)}")
            p.copy_(like(state[k], p))


class FullOptimizerState:
    """The optimizer's state_dict with gathered moments, for `checkpoint.save_checkpoint` (collective to build)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        sd = optimizer.state_dict()
        self.sd = {"param_groups": sd["param_groups"],
                   "state": {i: {k: (full(v).detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in st.items()}
                             for i, st in sd["state"].items()}}

    def state_dict(self) -> dict:
        return self.sd


def shard_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict) -> dict:
    """A full optimizer state_dict (as saved) with each moment laid out like its (sharded) parameter."""
    params = [p for g in optimizer.param_groups for p in g["params"]]   # the state_dict's integer ids
    state = {int(i): {k: (like(v, params[int(i)]) if torch.is_tensor(v) and v.dim() > 0 else v)
                      for k, v in st.items()} for i, st in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def gather_adapters(model: nn.Module) -> None:
    """Replace every sharded adapter parameter by its full value (collective), so the adapter can be saved
    by one process. The model is for saving only afterwards (its base stays sharded)."""
    for layer in expert_layers(model).values():
        for name, p in list(layer.adapter_state().items()):
            if isinstance(p, DTensor):
                owner, _, leaf = name.rpartition(".")
                module = layer.get_submodule(owner) if owner else layer
                setattr(module, leaf, nn.Parameter(full(p.detach()).clone(), requires_grad=p.requires_grad))


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Skip the reduce-scatter on micro-batches before the last of a step (gradient accumulation)."""
    model.set_requires_gradient_sync(sync)
