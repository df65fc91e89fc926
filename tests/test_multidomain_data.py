"""data/multidomain and its generator (scripts/gen_multidomain.py)."""
from __future__ import annotations

import json

from scripts_loader import load_script

from conftest import ROOT


def test_committed_data_is_the_generators_output_and_held_out_is_unseen():
    gen = load_script("gen_multidomain")
    splits = gen.generate(200, 15, 25, 0)
    for split, rows in splits.items():
        committed = [json.loads(x) for x in (ROOT / "data/multidomain" / f"{split}.jsonl").read_text().splitlines()]
        assert committed == rows
    train = {r["instruction"] for r in splits["train"]}
    held = splits["validation"] + splits["test"]
    assert not [r for r in held if r["instruction"] in train]
    assert {r["domain"] for r in splits["test"]} == set(gen.DOMAINS) and len(gen.DOMAINS) == 8
    assert gen.row("zib", _Fixed()) == {"instruction": "Translate to Zib: cat cat cat", "response": "vel vel vel"}
    assert gen.row("quon", _Fixed())["response"] == "dask dask dask"      # same input, another answer
    assert gen.row("initials", _Fixed())["response"] == "CCC"


class _Fixed:
    """A stand-in random.Random: every choice is the first, every integer 3."""

    def choice(self, xs):
        return xs[0]

    def randint(self, a, b):
        return 3
