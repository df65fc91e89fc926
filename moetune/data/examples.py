"""Examples served from a tokenised Arrow dataset (moetune.data.pipeline.tokenized) without a Python list.

`ExampleSet` is a read-only sequence of `Example`s (`Pair`s for preference data) over such a dataset
(and an index array): indexing reads one row, `take` a batch in one Arrow gather, slicing makes a
view. Scalar columns (length, n_targets, domain) are read as numpy arrays for batching and sampling.
"""
from __future__ import annotations

from collections.abc import Sequence

import datasets
import numpy as np

from moetune.data.rows import Example, Pair


class ExampleSet(Sequence):
    """Examples over a tokenised Arrow dataset, optionally through an index array (a view)."""

    def __init__(self, ds: datasets.Dataset, indices: np.ndarray | None = None, info: dict | None = None) -> None:
        self.ds = ds
        self.indices = np.arange(len(ds)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.info = info or {}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ExampleSet(self.ds, self.indices[i], self.info)
        return self.take([i])[0]

    def __iter__(self):
        for s in range(0, len(self), 512):
            yield from self.take(range(s, min(s + 512, len(self))))

    def __add__(self, other):
        return list(self) + list(other)

    def column(self, name: str) -> np.ndarray:
        """A scalar column (length, n_targets, domain) in this view's order."""
        return self.ds.data.column(name).to_numpy(zero_copy_only=False)[self.indices]

    def view(self, positions) -> "ExampleSet":
        return ExampleSet(self.ds, self.indices[np.asarray(positions, dtype=np.int64)], self.info)

    @property
    def pairs(self) -> bool:
        """Whether the rows are preference pairs (`take` gives `Pair`s)."""
        return "chosen_input_ids" in self.ds.column_names

    def take(self, positions) -> list[Example]:
        """The examples (pairs) at `positions` of this view, read in one Arrow gather."""
        rows = self.ds[self.indices[np.asarray(list(positions), dtype=np.int64)]]
        if self.pairs:
            return [Pair(list(a), list(b), list(c), d, e, list(f), list(g)) for a, b, c, d, e, f, g in
                    zip(rows["chosen_input_ids"], rows["chosen_labels"], rows["prompt_ids"], rows["reference"],
                        rows["domain"], rows["rejected_input_ids"], rows["rejected_labels"])]
        return [Example(list(a), list(b), list(c), d, e) for a, b, c, d, e in
                zip(rows["input_ids"], rows["labels"], rows["prompt_ids"], rows["reference"], rows["domain"])]


def take(examples, positions) -> list[Example]:
    """`examples[i] for i in positions`, batched when `examples` is an ExampleSet."""
    if isinstance(examples, ExampleSet):
        return examples.take(positions)
    return [examples[int(i)] for i in positions]


def is_pairs(examples) -> bool:
    """Whether `examples` (an ExampleSet or a list) holds preference pairs."""
    if isinstance(examples, ExampleSet):
        return examples.pairs
    return bool(len(examples)) and isinstance(examples[0], Pair)


def with_targets(es: ExampleSet) -> ExampleSet:
    """`es` without the examples (pairs) that keep no response token within max_length, their count in
    `info['dropped_no_target']`."""
    keep = es.column("n_targets") > 0  # labelled tokens after the first: what the loss sees
    dropped = int((~keep).sum())
    if not dropped:
        return es
    out = es.view(np.flatnonzero(keep))
    out.info = {**es.info, "dropped_no_target": dropped}
    return out
