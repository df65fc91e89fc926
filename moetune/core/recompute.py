"""Is the current forward an activation-checkpointing recompute? (One flag, no moetune imports.)

Under non-reentrant activation checkpointing (`train.gradient_checkpointing`) the backward pass
runs each checkpointed decoder block's forward a second time to rebuild the activations it
dropped. Layers that keep per-forward state for later (a router's logits and gates, read by the
auxiliary losses and the routing statistics) must keep the state of the ORIGINAL forward: the
losses were already built from it, and overwriting it during the backward would swap in tensors
tied to a throwaway graph (kept alive until the next step) and record every routed forward twice.

`moetune.train.activation_checkpointing` runs the recompute inside `recomputing_context()` (through
torch.utils.checkpoint's `context_fn`); `recomputing()` tells a layer whether it is in one.
The flag is a process-wide counter, not thread-local, because autograd may run the backward
(and so the recompute) on a worker thread of its own.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

_DEPTH = 0


def recomputing() -> bool:
    """True while a checkpointed block's forward is being recomputed during the backward pass."""
    return _DEPTH > 0


@contextmanager
def recomputing_context():
    """Marks the code it wraps as a recompute (nests)."""
    global _DEPTH
    _DEPTH += 1
    try:
        yield
    finally:
        _DEPTH -= 1


def checkpoint_contexts():
    """`context_fn` for torch.utils.checkpoint (non-reentrant): nothing on the forward, the flag on the recompute."""
    return nullcontext(), recomputing_context()
