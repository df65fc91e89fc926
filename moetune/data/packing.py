"""Packing several examples into one row, and grouping examples of similar length.

`pack(batch, max_length, pad_id)` puts the examples of a micro-batch into as few rows of
at most `max_length` tokens as first-fit decreasing allows (`data.packing: true`); with
`sizes` it lays out rows chosen beforehand, `sizes[r]` consecutive examples in row r
(`data.packing: dataset`, whose rows `best_fit_decreasing` chose over the whole epoch). Each example keeps its own
positions (position_ids restart at 0), so the model attends only inside it: transformers
builds a block-diagonal causal mask from restarting position_ids when no 2D attention mask
is given (sdpa / eager), and flash-attention's varlen path reads the same position_ids.
The first label of every example is set to -100, so the token before it (the previous
example's last) never predicts it: the loss is that of the unpacked examples. The number
of examples per step is unchanged; packing only removes padding.

`best_fit_decreasing(lengths, capacity, order)` packs a whole epoch into rows of `capacity`
tokens (Johnson 1973's best-fit decreasing: longest first, each into the fullest row it still
fits), computed with numpy over the lengths column: rows with the same free space are
interchangeable, so a run of equal lengths fills whole groups of rows at once.

`length_grouped(order, lengths, group)` reorders a seeded permutation so each run of
`group` consecutive indices holds examples of similar length (megabatches of 50 groups
sorted by length, the groups then shuffled), for unpacked training with less padding.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from moetune.core.ui import plural
from moetune.data.rows import IGNORE, Example


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example positions (longest first) whose lengths sum to at most `capacity`."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        n = lengths[i]
        j = next((b for b, r in enumerate(room) if r >= n), None)
        if j is None:
            bins.append([i])
            room.append(capacity - n)
        else:
            bins[j].append(i)
            room[j] -= n
    return bins


def best_fit_decreasing(lengths: np.ndarray, capacity: int, order: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Rows of at most `capacity` tokens holding every item: (items (n,), starts (rows + 1,)), row j
    holding items[starts[j]:starts[j + 1]] (longest first). Best-fit decreasing: items by decreasing
    length (ties in `order`, default 0..n-1), each into the row with the least free space that fits it.

    Sequentially, a row that takes an item of length v while having the least fitting space c keeps
    the least fitting space (c - v < c), so it takes c // v such items in a row; rows of equal free
    space are interchangeable. So each distinct length is placed by a few numpy steps, one per
    free-space level it fills (`free[c]`: the rows with c tokens free), not one Python step per item."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    order = np.arange(n) if order is None else np.asarray(order, dtype=np.int64)
    if n and int(lengths.max()) > capacity:
        raise ValueError(f"an item of {plural(int(lengths.max()), 'token')} exceeds the row capacity {capacity}")
    order = order[np.argsort(-lengths[order], kind="stable")]            # longest first, ties in `order`
    row_of = np.empty(n, dtype=np.int64)
    free: list[np.ndarray] = [np.empty(0, dtype=np.int64) for _ in range(capacity + 1)]
    has = np.zeros(capacity + 1, dtype=bool)                             # free[c] non-empty
    rows = 0

    def put(ids: np.ndarray, room: np.ndarray) -> None:                  # rows ids now have room[i] free
        for c in np.unique(room):
            free[c] = np.concatenate([free[c], ids[room == c]])
            has[c] = True

    vals, first = np.unique(-lengths[order], return_index=True)          # distinct lengths, longest first
    for v, lo, hi in zip(-vals, first, np.append(first[1:], n)):
        items, pos = order[lo:hi], 0
        while pos < len(items):
            need = len(items) - pos
            fits = np.flatnonzero(has[v:])
            if len(fits):                                                # the fullest rows that fit v
                c = v + int(fits[0])
                q = c // v                                               # items each such row takes
                ids = free[c][: -(-need // q)]
                free[c] = free[c][len(ids):]
                has[c] = len(free[c]) > 0
            else:                                                        # open new rows
                c, q = capacity, capacity // v
                ids = np.arange(rows, rows - (-need // q))
                rows += len(ids)
            take = min(need, len(ids) * q)
            row_of[items[pos:pos + take]] = ids[np.arange(take) // q]
            room = np.full(len(ids), c - q * v)
            room[-1] = c - (take - (len(ids) - 1) * q) * v
            put(ids, room)
            pos += take
    placed = np.empty(n, dtype=np.int64)
    placed[order] = np.arange(n)                                         # placement rank of each item
    items = np.lexsort((placed, row_of))                                 # by row, then placement order
    starts = np.concatenate([[0], np.cumsum(np.bincount(row_of, minlength=rows))])
    return items, starts


def layout_efficiency(lengths: np.ndarray, max_length: int, batch_size: int, seed: int = 0) -> dict[str, float]:
    """Real tokens / computed token positions of one epoch under each batch layout (what `data inspect` shows):
    'unpacked' (seeded batches of `batch_size` examples, right-padded to their longest), 'packing: true'
    (each such batch first-fit into rows padded to the longest row) and 'packing: dataset' (best-fit
    decreasing rows of `max_length`). `lengths` already cut to max_length."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(lengths):
        return {"unpacked": 0.0, "true": 0.0, "dataset": 0.0}
    real = float(lengths.sum())
    order = np.random.default_rng(seed).permutation(len(lengths))
    batches = [lengths[order[i:i + batch_size]] for i in range(0, len(order), batch_size)]
    padded = sum(len(b) * int(b.max()) for b in batches)
    packed = 0
    for b in batches:
        bins = first_fit(b.tolist(), max(max_length, int(b.max())))
        packed += len(bins) * max(int(b[g].sum()) for g in bins)
    rows = len(best_fit_decreasing(lengths, max(max_length, int(lengths.max())))[1]) - 1
    return {"unpacked": round(real / padded, 4), "true": round(real / packed, 4),
            "dataset": round(real / (rows * max(max_length, int(lengths.max()))), 4)}


def pack(batch: list[Example], max_length: int, pad_id: int, sizes: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Packed (R, T) input_ids / labels / position_ids / attention_mask / example_index, R <= len(batch).

    attention_mask marks real tokens (1) and padding (0), for counting only: the model gets
    position_ids and no mask. example_index is the batch position of each token's example
    (-1 on padding), e.g. to look up per-example domains. `sizes`: the rows are given, row r
    holding the next sizes[r] examples of `batch` (a token-budget plan's rows), else first-fit
    decreasing over the batch.
    """
    lengths = [len(e.input_ids) for e in batch]
    if sizes is None:
        bins = first_fit(lengths, max(max_length, max(lengths)))
    else:
        ends = np.cumsum(sizes).tolist()
        bins = [list(range(e - s, e)) for s, e in zip(sizes, ends)]
    T = max(sum(lengths[i] for i in b) for b in bins)
    R = len(bins)
    ids = torch.full((R, T), pad_id, dtype=torch.long)
    labels = torch.full((R, T), IGNORE, dtype=torch.long)
    pos = torch.zeros((R, T), dtype=torch.long)
    mask = torch.zeros((R, T), dtype=torch.long)
    which = torch.full((R, T), -1, dtype=torch.long)
    for r, b in enumerate(bins):
        at = 0
        for i in b:
            e, n = batch[i], lengths[i]
            ids[r, at:at + n] = torch.tensor(e.input_ids)
            labels[r, at + 1:at + n] = torch.tensor(e.labels[1:], dtype=torch.long)
            pos[r, at:at + n] = torch.arange(n)
            mask[r, at:at + n] = 1
            which[r, at:at + n] = i
            at += n
        pos[r, at:] = torch.arange(T - at)   # padding: a segment of its own
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": pos, "example_index": which}


def length_grouped(order: np.ndarray, lengths: np.ndarray, group: int, seed: int) -> np.ndarray:
    """`order` rearranged so consecutive runs of `group` hold similar lengths (see module docstring)."""
    mega = group * 50
    out = []
    for s in range(0, len(order), mega):
        chunk = order[s:s + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        out += [chunk[g:g + group] for g in range(0, len(chunk), group)]
    full, tail = [g for g in out if len(g) == group], [g for g in out if len(g) < group]
    random.Random(seed).shuffle(full)
    return np.concatenate(full + tail) if out else order
