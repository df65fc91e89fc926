"""Which examples each optimizer step and process consumes: a seeded per-epoch order, cut into global
batches of batch_size * grad_accum * processes examples, each cut into per-process micro-batches
(`Plan`); or, with `data.packing: dataset`, the whole epoch packed into rows of data.max_length
tokens, each step taking batch_size * grad_accum * processes rows (`TokenBudgetPlan`).

The order depends only on the seed and the epoch (and the example lengths, for length grouping and
packing), never on the number of processes: one process and N processes with the same global batch
see the same examples in the same steps, and a resumed run continues at the same example. Both
plans have the same interface: `step_indices(step, seed)` (the global batch's examples, O(batch)
per step), `micro_batches(indices, rank)` (this process's micro-batches as positions in those),
`total_steps`, `steps_per_epoch`, `position(step)` (what a checkpoint records) and `mismatch`
(why a checkpoint's position cannot be resumed by this plan).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moetune.data.packing import best_fit_decreasing, length_grouped
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
        """This process's micro-batches of a global batch, as positions in `indices`: micro-batch j of rank r
        is chunk j*world+r."""
        chunks = [list(range(i, min(i + self.micro, len(indices)))) for i in range(0, len(indices), self.micro)]
        return [chunks[j * self.world + rank] for j in range(self.accum)]

    def position(self, step: int) -> dict:
        """A checkpoint's data position after `step` steps."""
        return {"step": step, "global_batch": self.global_batch, "epoch": step / self.steps_per_epoch,
                "examples_seen": step * self.global_batch}

    def mismatch(self, position: dict) -> str | None:
        """Why a checkpoint written at `position` cannot continue under this plan (None: it can)."""
        if position.get("layout", "examples") != "examples":
            return f"the checkpoint's data layout is {position['layout']!r} (data.packing), this run's 'examples'"
        if position.get("global_batch") != self.global_batch:
            return f"the global batch differs from the checkpoint's ({position.get('global_batch')} vs {self.global_batch})"
        return None


def make_plan(recipe, examples, world: int):
    """The plan of a run: `TokenBudgetPlan` for data.packing 'dataset', else `Plan` (the example lengths for
    data.group_by_length)."""
    cfg, data = recipe.train, recipe.data
    needs_lengths = data.group_by_length or data.packing == "dataset"
    lengths = None
    if needs_lengths:
        lengths = (examples.column("length") if hasattr(examples, "column")
                   else np.asarray([len(e.input_ids) for e in examples]))
    if data.packing == "dataset":
        return TokenBudgetPlan(lengths, data.max_length, cfg.batch_size, cfg.grad_accum, world, cfg.epochs, cfg.max_steps)
    return Plan(len(examples), cfg.batch_size, cfg.grad_accum, world, cfg.epochs, cfg.max_steps,
                lengths if data.group_by_length else None)


class Rows(list):
    """A token-budget micro-batch: positions of its examples, row by row; `sizes[r]`: examples in row r."""

    sizes: list[int]


@dataclass
class TokenBudgetPlan:
    """`data.packing: dataset`: each epoch's examples (a seeded order) packed by best-fit decreasing into
    rows of `max_length` tokens (moetune.data.packing), the rows shuffled; each step takes `global_batch`
    rows (batch_size * grad_accum * processes), so a step trains a budget of tokens, not a number of
    examples. The layout is a few numpy arrays per epoch (`epoch_layout`, cached); a step reads only its
    own rows. The number of rows depends only on the lengths, so every epoch has the same steps; as `Plan`
    drops a short last batch, the rows that do not fill a last global batch are skipped that epoch (other
    rows each epoch, the rows being shuffled), so the steps never depend on the number of processes."""

    lengths: np.ndarray   # per-example token counts
    max_length: int
    micro: int            # rows per micro-batch
    accum: int
    world: int
    epochs: float
    max_steps: int

    def __post_init__(self) -> None:
        self.lengths = np.asarray(self.lengths, dtype=np.int64)
        self.n_rows = len(best_fit_decreasing(self.lengths, self.max_length)[1]) - 1  # the same in every epoch

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.n_rows // self.global_batch)

    @property
    def total_steps(self) -> int:
        return self.max_steps if self.max_steps > 0 else max(1, math.ceil(self.epochs * self.steps_per_epoch))

    def efficiency(self) -> float:
        """Real tokens / (rows * max_length): the share of the computed positions that are real tokens."""
        return float(self.lengths.sum()) / max(1, self.n_rows * self.max_length)

    def epoch_layout(self, epoch: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(items, starts, row order) of `epoch`: row j holds items[starts[j]:starts[j + 1]]; the epoch takes
        the rows in `row order`. Computed once per epoch (the last one is kept)."""
        cached = getattr(self, "_layout", None)
        if cached is None or cached[0] != (epoch, seed):
            rng = np.random.default_rng([seed % 2 ** 32, epoch])
            items, starts = best_fit_decreasing(self.lengths, self.max_length, rng.permutation(len(self.lengths)))
            self._layout = ((epoch, seed), (items, starts, rng.permutation(len(starts) - 1)))
        return self._layout[1]

    def step_indices(self, step: int, seed: int) -> list[int]:
        """The examples of the global batch of `step`, row by row (`.sizes`: examples per row): O(batch)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        items, starts, order = self.epoch_layout(epoch, seed)
        g = self.global_batch
        rows = order[k * g:(k + 1) * g]
        if len(rows) < self.world:  # fewer rows than processes (tiny data): cycle
            rows = np.tile(order, math.ceil(self.world / len(order)))[:self.world]
        rows = rows[:len(rows) // self.world * self.world]  # fewer rows than a global batch: the same forwards per process
        out = Rows(int(i) for r in rows for i in items[starts[r]:starts[r + 1]])
        out.sizes = (starts[rows + 1] - starts[rows]).tolist()
        return out

    def micro_batches(self, indices: Rows, rank: int) -> list[Rows]:
        """This process's micro-batches: row i of the global batch goes to process i % world, and each
        process's rows are cut into micro-batches of `micro` rows (fewer, smaller ones on a short last step)."""
        at = np.concatenate([[0], np.cumsum(indices.sizes)])
        mine = list(range(rank, len(indices.sizes), self.world))
        out = []
        for j in range(0, len(mine), self.micro):
            rows = mine[j:j + self.micro]
            mb = Rows(p for r in rows for p in range(at[r], at[r + 1]))
            mb.sizes = [indices.sizes[r] for r in rows]
            out.append(mb)
        return out

    def position(self, step: int) -> dict:
        return {"step": step, "global_batch": self.global_batch, "layout": "dataset", "max_length": self.max_length,
                "epoch": step / self.steps_per_epoch, "rows_seen": step * self.global_batch}

    def mismatch(self, position: dict) -> str | None:
        if position.get("layout", "examples") != "dataset":
            return "the checkpoint's data layout is 'examples', this run's 'dataset' (data.packing)"
        for key, mine in (("global_batch", self.global_batch), ("max_length", self.max_length)):
            if position.get(key) != mine:
                return f"the {key} differs from the checkpoint's ({position.get(key)} vs {mine})"
        return None
