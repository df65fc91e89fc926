"""Which examples each optimizer step and process consumes: a seeded per-epoch order, cut into global
batches of batch_size * grad_accum * processes examples, each cut into per-process micro-batches.

The order depends only on the seed and the epoch (and, with `data.group_by_length`, the example
lengths), never on the number of processes: one process and N processes with the same global batch
see the same examples in the same steps, and a resumed run continues at the same example.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moetune.data.packing import length_grouped
from moetune.data.pipeline import shuffled


@dataclass
class Plan:
    """How many steps, and which examples each step and process consumes."""

    n_examples: int
    micro: int   # batch_size
    accum: int
    world: int
    epochs: float
    max_steps: int
    lengths: np.ndarray | None = None   # per-example token counts, for group_by_length

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.n_examples // self.global_batch)

    @property
    def total_steps(self) -> int:
        return self.max_steps if self.max_steps > 0 else max(1, math.ceil(self.epochs * self.steps_per_epoch))

    def epoch_order(self, epoch: int, seed: int) -> np.ndarray:
        """The seeded permutation of `epoch`, computed once per epoch (the last one is kept)."""
        cached = getattr(self, "_order", None)
        if cached is None or cached[0] != (epoch, seed):
            order = shuffled(self.n_examples, seed * 100_003 + epoch)
            if self.lengths is not None:
                order = length_grouped(order, self.lengths, self.global_batch, seed * 100_003 + epoch)
            self._order = ((epoch, seed), order)
        return self._order[1]

    def step_indices(self, step: int, seed: int) -> list[int]:
        """Indices of the whole global batch of `step` (wrapping into the next epoch): O(batch) per step."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = self.epoch_order(epoch, seed)
        g = self.global_batch
        if g > self.n_examples:  # tiny data: cycle
            return np.tile(perm, math.ceil(g / self.n_examples))[:g].tolist()
        return perm[k * g:(k + 1) * g].tolist()

    def micro_batches(self, indices: list[int], rank: int) -> list[list[int]]:
        """This process's micro-batches of a global batch: micro-batch j of rank r is chunk j*world+r."""
        chunks = [indices[i:i + self.micro] for i in range(0, len(indices), self.micro)]
        return [chunks[j * self.world + rank] for j in range(self.accum)]
