#!/usr/bin/env python
"""Generate data/disjoint: 6 instruction domains that share NO surface form, for routing studies.

The opposite of data/multidomain (whose zib and quon domains put the same words to different tasks):
here every domain has its own characters, in the prompt AND in the answer, and no instruction words at
all, so the domain of a token is visible from the token alone. A router that reads its layer input
can separate these domains at the first layer; if unsupervised routers do not specialise here, they
will not on harder data. Each row is short and has one exact answer (greedy exact match):

    sum       "37+48="            -> "85"                 digits, + and = only
    shout     "river stone"       -> "RIVER STONE"        lower-case English words -> capitals
    greek     "α β γ δ"           -> "δ γ β α"            Greek letters, reversed
    brackets  "( [ < {"           -> "} > ] )"            opening brackets -> their closing ones, reversed
    morse     ".-- -."            -> "-.. .-"             dots and dashes, swapped
    arrows    "↑ ← ↓"             -> "→ ↑ ←"              arrows, each turned a quarter clockwise

Deterministic (seeded `random.Random`); validation and test prompts never occur in train; the splits
are shuffled. Regenerate the committed copy (tests/test_disjoint_data.py checks it):

    python scripts/gen_disjoint.py --out data/disjoint
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = "river stone cloud maple otter lantern meadow pebble harbor willow falcon ember".split()
GREEK = list("αβγδεζηθικλμνξοπρστυφχψω")
CLOSE = {"(": ")", "[": "]", "{": "}", "<": ">"}
TURN = {"↑": "→", "→": "↓", "↓": "←", "←": "↑"}
DOMAINS = ["sum", "shout", "greek", "brackets", "morse", "arrows"]


def row(domain: str, rng: random.Random) -> dict:
    """One {'instruction', 'response'} pair of `domain`."""
    if domain == "sum":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return {"instruction": f"{a}+{b}=", "response": str(a + b)}
    if domain == "shout":
        w = [rng.choice(WORDS) for _ in range(rng.randint(1, 3))]
        return {"instruction": " ".join(w), "response": " ".join(w).upper()}
    if domain == "greek":
        w = [rng.choice(GREEK) for _ in range(rng.randint(3, 5))]
        return {"instruction": " ".join(w), "response": " ".join(reversed(w))}
    if domain == "brackets":
        w = [rng.choice(list(CLOSE)) for _ in range(rng.randint(2, 5))]
        return {"instruction": " ".join(w), "response": " ".join(CLOSE[x] for x in reversed(w))}
    if domain == "morse":
        groups = ["".join(rng.choice(".-") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(2, 3))]
        return {"instruction": " ".join(groups), "response": " ".join(g.translate(str.maketrans(".-", "-.")) for g in groups)}
    if domain == "arrows":
        w = [rng.choice(list(TURN)) for _ in range(rng.randint(3, 6))]
        return {"instruction": " ".join(w), "response": " ".join(TURN[x] for x in w)}
    raise ValueError(domain)


def generate(n_train: int, n_val: int, n_test: int, seed: int) -> dict[str, list[dict]]:
    """Splits of n_* rows per domain, shuffled; held-out prompts are unique and unseen in train."""
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for d in DOMAINS:
        held: set[str] = set()
        for split, n in (("test", n_test), ("validation", n_val), ("train", n_train)):
            got, tries = 0, 0
            while got < n and tries < 100 * n:
                tries += 1
                r = row(d, rng)
                if r["instruction"] in held:        # held-out rows: unique; train rows: never a held-out prompt
                    continue
                if split != "train":
                    held.add(r["instruction"])
                splits[split].append({**r, "domain": d})
                got += 1
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("data/disjoint"))
    ap.add_argument("--train", type=int, default=250, help="training rows per domain")
    ap.add_argument("--validation", type=int, default=20)
    ap.add_argument("--test", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    for split, rows in generate(a.train, a.validation, a.test, a.seed).items():
        (a.out / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                              encoding="utf-8")
        print(f"{a.out / split}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
