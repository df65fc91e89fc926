"""The routing context: what the routers of one forward need to know besides their layer input x.

A router sees only its layer's input (..., d_in); it has no attention mask, no labels, no example
ids. What it needs beyond x about the batch (which tokens form a sequence's prompt, where packed
sequences begin, each token's domain, a generation cache) travels in one frozen `RoutingContext`
held in a `contextvars.ContextVar`. The context is entered ONCE per forward, by the code that owns
the batch, through `batch_routing` (training, validation, scoring, the routing report) or
`generation_routing` (every `generate`); the routers read it with `current_context()`.

A context variable, not a module global: each thread and each asyncio task sees its own value, a
block's value is restored exactly on exit (also on an exception), and activation checkpointing
captures the forward's context and re-enters it for the recompute (`moetune.train.
activation_checkpointing`), which autograd may run later, on a thread of its own.

Entering a context over an outer one replaces field by field: a field left None inherits the
outer value (a training step may set `token_domain` around a loss that sets the prompt mask).
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, fields
from typing import Iterator

import torch

from moetune.data.rows import IGNORE


@dataclass(frozen=True, eq=False)
class RoutingContext:
    """Per-forward facts about the batch that routers read (all optional; None: not known / not used).
    Compared by identity (its fields are tensors)."""

    pool_mask: torch.Tensor | None = None
    """(B, T) bool. Tokens whose mean router logits give a sequence's gates (`router.level: sequence`):
    each sequence's prompt (`prompt_mask`) in training and scoring, the prompt's real tokens in
    generation. None: every position of the forward counts."""
    segment_ids: torch.Tensor | None = None
    """(B, T) long. Packed rows (moetune.data.packing): which sequence of its row each token belongs
    to (padding is a segment of its own). None: one sequence per row."""
    token_domain: torch.Tensor | None = None
    """(B, T) long. Domain index of each token (-1: padding or no domain), for the weak domain
    supervision `router.domain_loss_weight`; set by training only."""
    token_mask: torch.Tensor | None = None
    """(B, T) bool. The tokens that count in router statistics: real tokens, not padding or a packed row's
    filler (the attention mask; packed rows: example_index >= 0). Every routing loss (balance, z-loss) and
    statistic (the training log's load and entropy) skips the others. None: every position counts."""
    cache: dict | None = None
    """Generation: id(router) -> (B, N) sequence logits. The first forward (the prompt) stores each
    sequence-level router's pooled logits, the later one-token forwards reuse them. The one mutable
    field (a dict shared by the forwards of one `generate`)."""

    def over(self, outer: RoutingContext) -> RoutingContext:
        """This context entered inside `outer`: fields left None take the outer value."""
        if outer is _EMPTY:
            return self
        return RoutingContext(**{k: getattr(outer, k) if getattr(self, k) is None else getattr(self, k) for k in _FIELDS})


_EMPTY = RoutingContext()
_FIELDS = tuple(f.name for f in fields(RoutingContext))


_CURRENT: ContextVar[RoutingContext] = ContextVar("moetune_routing_context", default=_EMPTY)


def current_context() -> RoutingContext:
    """The routing context of the forward running now (an empty one outside every block)."""
    return _CURRENT.get()


@contextmanager
def use_context(ctx: RoutingContext) -> Iterator[RoutingContext]:
    """Make `ctx` (exactly, nothing inherited) the current context inside the block; restore the old one after."""
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


@contextmanager
def routing_context(**values) -> Iterator[RoutingContext]:
    """Enter a context with the given `RoutingContext` fields over the current one (None: inherit)."""
    with use_context(RoutingContext(**values).over(current_context())) as ctx:
        yield ctx


def prompt_mask(targets: torch.Tensor, attention_mask: torch.Tensor,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) bool: real tokens before the first target token of their sequence (segment).

    targets (B, T) bool marks tokens in the loss (labels != -100). Pooling only these tokens keeps
    sequence routing causal: no gate depends on the answer it helps to predict. A row's first token
    is never a target (nothing predicts it; packing masks each example's first label the same way),
    so a text-format example pools its first token, packed or not."""
    targets = targets.clone()
    targets[:, 0] = False
    t = targets.long()                                                   # (B, T)
    before = t.cumsum(1) - t                                             # (B, T): targets strictly before
    if segment_ids is not None:  # count only the targets of the token's own segment
        seg = segment_ids.long()
        first = torch.full((t.shape[0], int(seg.max()) + 1), t.shape[1] ** 2, dtype=torch.long, device=t.device)
        first = first.scatter_reduce(1, seg, before, "amin")             # (B, S): count at segment start
        before = before - first.gather(1, seg)
    return (before == 0) & ~targets & attention_mask.bool()


def batch_context(labels: torch.Tensor, attention_mask: torch.Tensor, segment_ids: torch.Tensor | None = None,
                  example_index: torch.Tensor | None = None,
                  token_domain: torch.Tensor | None = None) -> RoutingContext:
    """The routing context of a forward over a training or scoring batch (moetune.data.rows.collate or
    moetune.data.packing.pack output), all (B, T): pool_mask = each sequence's prompt, segment_ids of a
    packed batch (from its example_index, -1 on padding, when not given), the token domains if any, and
    token_mask = the real tokens (example_index >= 0 for a packed batch, else the attention mask)."""
    if segment_ids is None and example_index is not None:
        segment_ids = example_index + 1  # padding (-1) becomes a segment of its own, 0
    pool = prompt_mask(labels != IGNORE, attention_mask, segment_ids)    # (B, T)
    real = attention_mask.bool() if example_index is None else example_index >= 0  # (B, T)
    return RoutingContext(pool_mask=pool, segment_ids=segment_ids, token_domain=token_domain, token_mask=real)


@contextmanager
def batch_routing(labels: torch.Tensor, attention_mask: torch.Tensor, segment_ids: torch.Tensor | None = None,
                  example_index: torch.Tensor | None = None,
                  token_domain: torch.Tensor | None = None) -> Iterator[RoutingContext]:
    """Enter `batch_context(...)` over the current context for one forward: the one helper every
    training, validation, scoring and routing-report forward goes through."""
    ctx = batch_context(labels, attention_mask, segment_ids, example_index, token_domain)
    with use_context(ctx.over(current_context())) as entered:
        yield entered


@contextmanager
def generation_routing(attention_mask: torch.Tensor) -> Iterator[RoutingContext]:
    """Enter the context of one `generate` over left-padded prompts, attention_mask (B, T): sequence-level
    routers pool the prompt's real tokens once and keep those gates for every new token (a fresh cache)."""
    with routing_context(pool_mask=attention_mask.bool(), cache={}) as entered:
        yield entered
