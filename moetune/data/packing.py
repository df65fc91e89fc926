"""Packing several examples into one row, and grouping examples of similar length.

`pack(batch, max_length, pad_id)` puts the examples of a micro-batch into as few rows of
at most `max_length` tokens as first-fit decreasing allows. Each example keeps its own
positions (position_ids restart at 0), so the model attends only inside it: transformers
builds a block-diagonal causal mask from restarting position_ids when no 2D attention mask
is given (sdpa / eager), and flash-attention's varlen path reads the same position_ids.
The first label of every example is set to -100, so the token before it (the previous
example's last) never predicts it: the loss is that of the unpacked examples. The number
of examples per step is unchanged; packing only removes padding.

`length_grouped(order, lengths, group)` reorders a seeded permutation so each run of
`group` consecutive indices holds examples of similar length (megabatches of 50 groups
sorted by length, the groups then shuffled), for unpacked training with less padding.
"""
from __future__ import annotations

import random

import numpy as np
import torch

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


def pack(batch: list[Example], max_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Packed (R, T) input_ids / labels / position_ids / attention_mask / example_index, R <= len(batch).

    attention_mask marks real tokens (1) and padding (0), for counting only: the model gets
    position_ids and no mask. example_index is the batch position of each token's example
    (-1 on padding), e.g. to look up per-example domains.
    """
    lengths = [len(e.input_ids) for e in batch]
    bins = first_fit(lengths, max(max_length, max(lengths)))
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
