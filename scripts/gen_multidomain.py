#!/usr/bin/env python
"""Generate data/multidomain: 8 instruction domains with different tasks, for routing studies.

More domains (8) than the routed types' usual experts (4), short exact answers (greedy exact
match), and two domains that CONFLICT on the same inputs (zib and quon translate the same
English words into different invented words): a single adapter must tell them apart from the
instruction's first words, while routed experts could keep them apart. Domains:

    zib       "Translate to Zib: cat moon"        -> invented words (fixed table)
    quon      "Translate to Quon: cat moon"       -> other invented words (another table)
    capitals  "Write in capitals: cat moon"       -> "CAT MOON"
    reverse   "Reverse the order: cat moon sun"   -> "sun moon cat"
    next      "What number comes after 417?"      -> "418"
    count     "Count the words: cat moon sun"     -> "3"
    sort      "Sort these digits: 5 2 9"          -> "2 5 9"
    initials  "Initials of: cat moon sun"         -> "CMS"

Deterministic (seeded); test and validation prompts never occur in train.

    python scripts/gen_multidomain.py --out data/multidomain
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = "cat dog sun moon tree river stone bird fire rain house road".split()
ZIB = dict(zip(WORDS, "vel mak tor sil pem rud gax fon lir bek sop nim".split()))
QUON = dict(zip(WORDS, "dask orin pule yat krem hosu bav ilt wen tro meg saff".split()))


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]


def row(domain: str, rng: random.Random) -> dict:
    if domain in ("zib", "quon"):
        w = _words(rng, 1, 3)
        table = ZIB if domain == "zib" else QUON
        return {"instruction": f"Translate to {domain.capitalize()}: {' '.join(w)}",
                "response": " ".join(table[x] for x in w)}
    if domain == "capitals":
        w = _words(rng, 1, 3)
        return {"instruction": f"Write in capitals: {' '.join(w)}", "response": " ".join(w).upper()}
    if domain == "reverse":
        w = _words(rng, 2, 4)
        return {"instruction": f"Reverse the order: {' '.join(w)}", "response": " ".join(reversed(w))}
    if domain == "next":
        n = rng.randint(0, 998)
        return {"instruction": f"What number comes after {n}?", "response": str(n + 1)}
    if domain == "count":
        w = _words(rng, 1, 7)
        return {"instruction": f"Count the words: {' '.join(w)}", "response": str(len(w))}
    if domain == "sort":
        d = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 5))]
        return {"instruction": f"Sort these digits: {' '.join(d)}", "response": " ".join(sorted(d))}
    if domain == "initials":
        w = _words(rng, 2, 4)
        return {"instruction": f"Initials of: {' '.join(w)}", "response": "".join(x[0] for x in w).upper()}
    raise ValueError(domain)


DOMAINS = ["zib", "quon", "capitals", "reverse", "next", "count", "sort", "initials"]


def generate(n_train: int, n_val: int, n_test: int, seed: int) -> dict[str, list[dict]]:
    """Splits of n_* rows per domain, interleaved; held-out prompts are unseen in train."""
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for d in DOMAINS:
        seen: set[str] = set()
        for split, n in (("test", n_test), ("validation", n_val), ("train", n_train)):
            got, tries = 0, 0
            while got < n and tries < 100 * n:
                tries += 1
                r = row(d, rng)
                if r["instruction"] in seen and split != "train":
                    continue
                if split == "train" and r["instruction"] in held:
                    continue
                seen.add(r["instruction"])
                splits[split].append({**r, "domain": d})
                got += 1
            if split == "validation":
                held = set(seen)
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("data/multidomain"))
    ap.add_argument("--train", type=int, default=200, help="training rows per domain")
    ap.add_argument("--validation", type=int, default=15)
    ap.add_argument("--test", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    for split, rows in generate(a.train, a.validation, a.test, a.seed).items():
        (a.out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{a.out / split}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
