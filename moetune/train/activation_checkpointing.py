"""Activation checkpointing of the decoder blocks (`train.gradient_checkpointing`), for every expert type.

Each entry of the model's decoder-block list (`models.layers.decoder_layers`) gets an instance
`forward` that runs the original one under non-reentrant `torch.utils.checkpoint`: the block keeps
only its inputs during the forward and recomputes its activations in the backward. The expert
layers live inside the blocks (CALM's `CALMLayer` IS a list entry: the frozen block and its
cross-attention are checkpointed together), so their activations are dropped too. Parameter
names and module hooks are unchanged (only an instance attribute is set), so adapters, state
dicts and DDP/FSDP wrappers see the same model.

The recompute runs inside `recompute.recomputing_context()`, so routers keep the state of the
original forward (aux losses counted once, routing statistics recorded once; see recompute.py), and
inside the routing context of the original forward (moetune.experts.context), captured when the
block runs: the backward comes after the loss has left its context, maybe on autograd's own thread,
and a sequence-level router must pool the same prompt tokens again.
RNG state is restored for the recompute (torch's default), so dropout and router jitter draw the
same numbers twice. Checkpointing applies only in training mode with gradients enabled;
evaluation and generation run the blocks unchanged.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moetune.core.recompute import checkpoint_contexts
from moetune.experts.context import current_context, use_context
from moetune.models.layers import decoder_layers


@contextmanager
def _recompute(inner, routing):
    """The recompute's context: `inner` (the recompute flag) and the forward's routing context."""
    with inner, use_context(routing):
        yield


def _contexts():
    """`context_fn` for torch.utils.checkpoint, called as the block runs: (forward context, recompute context)."""
    forward, inner = checkpoint_contexts()
    return forward, _recompute(inner, current_context())


def _checkpointed(block: nn.Module, forward, *args, **kwargs):
    if block.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, context_fn=_contexts, **kwargs)
    return forward(*args, **kwargs)


def enable_checkpointing(model: nn.Module) -> int:
    """Checkpoint every decoder block of `model` (idempotent); return how many blocks are checkpointed."""
    _, blocks = decoder_layers(model)
    for block in blocks:
        if getattr(block, "_moetune_checkpointed", False):
            continue
        original = block.forward                                          # bound method (class forward)
        block.forward = functools.partial(_checkpointed, block, original)
        block._moetune_checkpointed = True
    return len(blocks)


def disable_checkpointing(model: nn.Module) -> None:
    """Undo `enable_checkpointing`."""
    _, blocks = decoder_layers(model)
    for block in blocks:
        if getattr(block, "_moetune_checkpointed", False):
            del block.forward
            block._moetune_checkpointed = False
