"""The rows one model decodes together: a left-padded KV cache whose rows join and leave between steps.

A `RowBatch` holds B sequences in one transformers `DynamicCache` of T positions, left-padded:

    keys, values per layer : (B, H, T, d)     row b's real positions are the last mask[b].sum() of T
    mask                   : (B, T) long      1 on a cached real token, 0 on padding
    route                  : id(router) -> (B, N)   each row's pooled sequence-level router logits
    state                  : the model's extra per-row state (ExpertLayer.generation_state: CALM), or None

New sequences join after their prefill (together, left-padded, as `generate` batches prompts) by
`merge`: the shorter side is padded on the left with zero keys and values under mask 0, then rows are
stacked. Finished sequences leave by `select`, which also drops leading columns that are padding in
every remaining row. Padding never changes a row's result: its keys get mask 0 (softmax weight exactly
0), its position ids count real tokens only (`positions`), and the causal mask compares cache columns,
which padding shifts equally for queries and keys. So greedy decoding of a row gives the tokens of the
same prompt decoded alone or in any other batch, up to float rounding of differently shaped matmuls.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """t with n zeros prepended along dim (n >= 0)."""
    if n <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim)


def cache_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) (B, H, T, d) per layer of a full-attention DynamicCache."""
    out = []
    for i, layer in enumerate(cache.layers):
        if getattr(layer, "is_sliding", False) or not torch.is_tensor(getattr(layer, "keys", None)):
            raise RuntimeError(f"KV cache layer {i} ({type(layer).__name__}) is not a full-attention DynamicLayer; "
                               "moetune serve batches full-attention caches only.")
        out.append((layer.keys, layer.values))
    return out


def make_cache(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    return DynamicCache(ddp_cache_data=kv)


@dataclass
class RowBatch:
    """B sequences of one model decoded together (see the module docstring); `rows` are the engine's requests."""

    rows: list
    cache: DynamicCache
    mask: torch.Tensor                                    # (B, T) long
    route: dict = field(default_factory=dict)             # id(router) -> (B, N)
    state: object | None = None                           # generation_state snapshot

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def length(self) -> int:
        return self.mask.shape[1]


def positions(batch: RowBatch) -> torch.Tensor:
    """(B, 1) position id of each row's next token: its number of real cached tokens."""
    return batch.mask.sum(1, keepdim=True)


def merge(batches: list[RowBatch], holder=None) -> RowBatch:
    """One batch of every row of `batches` (in order), left-padded to the longest."""
    if len(batches) == 1:
        return batches[0]
    T = max(b.length for b in batches)
    kvs = [cache_tensors(b.cache) for b in batches]
    layers = []
    for li in range(len(kvs[0])):
        k = torch.cat([_pad_left(kv[li][0], T - b.length, 2) for kv, b in zip(kvs, batches)], 0)
        v = torch.cat([_pad_left(kv[li][1], T - b.length, 2) for kv, b in zip(kvs, batches)], 0)
        layers.append((k, v))                                         # (sum B, H, T, d)
    mask = torch.cat([_pad_left(b.mask, T - b.length, 1) for b in batches], 0)   # (sum B, T)
    route = {key: torch.cat([b.route[key] for b in batches], 0) for key in batches[0].route}
    state = None
    if holder is not None:
        state = holder.concat([holder.shift(b.state, T - b.length) for b in batches])
    return RowBatch([r for b in batches for r in b.rows], make_cache(layers), mask, route, state)


def select(batch: RowBatch, keep: list[int], holder=None) -> RowBatch | None:
    """The batch of rows `keep` (indices, in order), leading all-padding columns dropped; None when empty."""
    if not keep:
        return None
    if len(keep) == batch.size:
        return batch
    idx = torch.tensor(keep, device=batch.mask.device)
    mask = batch.mask[idx]                                            # (B', T)
    first = int(mask.any(0).long().argmax())                          # first column some row uses
    layers = [(k[idx, :, first:], v[idx, :, first:]) for k, v in cache_tensors(batch.cache)]
    route = {key: r[idx] for key, r in batch.route.items()}
    state = None
    if holder is not None:
        state = holder.shift(holder.select(batch.state, idx), -first)
    return RowBatch([batch.rows[i] for i in keep], make_cache(layers), mask[:, first:], route, state)
