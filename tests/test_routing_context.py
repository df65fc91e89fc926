"""The routing context (moetune.experts.context): a frozen dataclass in a context variable, entered once per
forward. Inner blocks override field by field and restore the outer value on exit (also on an error);
another thread sees its own (empty) context; the batch helper builds the prompt pool and packed segments
the routers read, and the loss passes the step's token domains through it."""
from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from moetune.experts.context import (RoutingContext, batch_context, batch_routing, current_context,
                                     generation_routing, prompt_mask, routing_context, use_context)


def empty(ctx: RoutingContext) -> bool:
    return all(getattr(ctx, f.name) is None for f in dataclasses.fields(ctx))


def test_nesting_inherits_overrides_and_restores():
    pool, dom = torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 3, dtype=torch.long)
    assert empty(current_context())
    with routing_context(token_domain=dom):
        with routing_context(pool_mask=pool, token_domain=None) as inner:
            assert inner.pool_mask is pool and inner.token_domain is dom   # None inherits the outer value
            assert current_context() is inner
        assert current_context().pool_mask is None and current_context().token_domain is dom
        with pytest.raises(RuntimeError):
            with use_context(RoutingContext(pool_mask=pool)):
                assert current_context().token_domain is None               # use_context: exactly this one
                raise RuntimeError("boom")
        assert current_context().token_domain is dom and current_context().pool_mask is None
    assert empty(current_context())
    with pytest.raises(dataclasses.FrozenInstanceError):
        current_context().pool_mask = pool


def test_another_thread_sees_its_own_context():
    seen = {}
    with routing_context(pool_mask=torch.ones(1, 2, dtype=torch.bool)):
        t = threading.Thread(target=lambda: seen.setdefault("ctx", current_context()))
        t.start()
        t.join()
    assert empty(seen["ctx"])


def test_batch_context_pools_each_packed_segments_prompt():
    labels = torch.tensor([[-100, -100, 5, 6, -100, -100, 7, -100]])      # two packed examples, then padding
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])
    example_index = torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1]])
    ctx = batch_context(labels, mask, example_index=example_index)
    assert torch.equal(ctx.segment_ids, example_index + 1)
    assert ctx.pool_mask.long().tolist() == [[1, 1, 0, 0, 1, 1, 0, 0]]
    assert torch.equal(ctx.pool_mask, prompt_mask(labels != -100, mask, example_index + 1))
    with routing_context(token_domain=torch.zeros_like(labels)):
        with batch_routing(labels, mask, example_index=example_index) as inner:
            assert inner.token_domain is not None and torch.equal(inner.pool_mask, ctx.pool_mask)
    with generation_routing(mask) as gen:
        assert gen.cache == {} and torch.equal(gen.pool_mask, mask.bool()) and gen.segment_ids is None
    assert empty(current_context())
