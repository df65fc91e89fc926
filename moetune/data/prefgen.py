"""Deterministic generator of moetune's preference data set (data/preference): the right answer over a near miss.

Each row is a preference pair in TRL's conversational preference format,

    {"prompt": [{"role": "user", "content": instruction}],
     "chosen": [{"role": "assistant", "content": right answer}],
     "rejected": [{"role": "assistant", "content": near miss}], "domain": ...}

built from the rows of the default data set (`moetune.data.datagen.make_examples`, same seed): the
training pairs from its training rows, the validation and test pairs from its validation and test rows,
so no held-out prompt occurs in the default training data either (DPO after the default SFT run scores
unseen prompts). The near miss is the kind of mistake a small model makes in each domain:

- ``arithmetic``: the sum or difference off by one or by ten ("85" over "86" or "75");
- ``strings``: upper-casing only the first word, or title case for one word ("LEMON TIGER" over
  "LEMON tiger"); initials with the last letter dropped or the last two swapped ("arg" over "ar");
- ``facts``: another capital of the invented table ("Falmo" over "Kelmar");
- ``cipher``: one Blorp word replaced by another dictionary word;
- ``units``: the conversion factor applied the wrong way or off by ten ("7000" over "700").

Rows are taken per domain in the default split's order (n / 5 per domain), then shuffled with the seed.
Regenerate the committed copy with ``moetune data make --preference --out data/preference --seed 0``.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from moetune.data.datagen import BLORP, DOMAINS, SPLITS, fact_table, make_examples

DEFAULT_SIZES: dict[str, int] = {"n_train": 500, "n_validation": 50, "n_test": 100}


def near_miss(instruction: str, answer: str, domain: str, rng: random.Random, table: dict[str, str]) -> str:
    """A wrong answer close to `answer` (never equal to it) for a row of `domain`."""
    if domain == "arithmetic":
        n = int(answer)
        step = rng.choice((1, 10))
        return str(n - step if n - step >= 0 and rng.random() < 0.5 else n + step)
    if domain == "strings":
        if instruction.startswith("Uppercase: "):
            words = answer.split(" ")
            if len(words) == 1:
                return words[0].capitalize() if rng.random() < 0.5 else words[0].lower()
            return " ".join([words[0]] + [w.lower() for w in words[1:]])
        if rng.random() < 0.5 or answer[-1] == answer[-2]:
            return answer[:-1]
        return answer[:-2] + answer[-1] + answer[-2]
    if domain == "facts":
        return rng.choice(sorted(c for c in table.values() if c != answer))
    if domain == "cipher":
        words = answer.split(" ")
        i = rng.randrange(len(words))
        words[i] = rng.choice(sorted(w for w in BLORP.values() if w != words[i]))
        return " ".join(words)
    if domain == "units":
        n = int(answer)
        return str(n // 10) if n % 10 == 0 and rng.random() < 0.5 else str(n * 10)
    raise ValueError(f"unknown domain {domain!r}")


def make_pairs(seed: int = 0, n_train: int = 500, n_validation: int = 50, n_test: int = 100) -> dict[str, list[dict]]:
    """The three splits of preference rows (see the module docstring); each size a multiple of the 5 domains
    and at most the default data set's split."""
    sizes = {"train": n_train, "validation": n_validation, "test": n_test}
    base = make_examples(seed)
    table = fact_table(seed)
    rng = random.Random(f"moetune-preference-{seed}")
    out: dict[str, list[dict]] = {}
    for split in SPLITS:
        n = sizes[split]
        per = n // len(DOMAINS)
        if n < 0 or n % len(DOMAINS) or per > len(base[split]) // len(DOMAINS):
            raise ValueError(f"{split} size {n} must be a non-negative multiple of {len(DOMAINS)}, at most "
                             f"{len(base[split])}")
        rows = []
        for domain in DOMAINS:
            for r in [r for r in base[split] if r["domain"] == domain][:per]:
                wrong = near_miss(r["instruction"], r["response"], domain, rng, table)
                assert wrong != r["response"], r
                rows.append({"prompt": [{"role": "user", "content": r["instruction"]}],
                             "chosen": [{"role": "assistant", "content": r["response"]}],
                             "rejected": [{"role": "assistant", "content": wrong}], "domain": domain})
        rng.shuffle(rows)
        out[split] = rows
    return out


def readme_text(out: str, seed: int = 0, **sizes: int) -> str:
    """The README written next to the splits; `out` is the directory as given on the CLI."""
    sizes = {**DEFAULT_SIZES, **sizes}
    command = f"moetune data make --preference --out {out} --seed {seed}"
    for key, value in sizes.items():
        if value != DEFAULT_SIZES[key]:
            command += f" --{key.replace('_', '-')} {value}"
    return "\n".join([
        "# moetune preference data set", "",
        "Generated by `moetune/data/prefgen.py`; do not edit by hand. Regenerate with:", "",
        f"    {command}", "",
        f"Seed: {seed}. Pairs: train {sizes['n_train']}, validation {sizes['n_validation']}, test {sizes['n_test']} "
        "(a fifth per domain, shuffled).", "",
        "Each line is one pair in TRL's conversational preference format: `prompt` (a user message), `chosen` (the "
        "right answer) and `rejected` (a near miss), plus `domain`. The prompts are the default data set's rows of "
        "the same split (data/default, same seed), so no validation or test prompt occurs in either training set. "
        "Near misses: sums off by one or ten, half-upper-cased words and initials missing a letter, another "
        "capital of the invented table, one Blorp word swapped, a unit conversion off by ten.", ""])


def write_pairs(out_dir: str | Path, seed: int = 0, **sizes: int) -> dict[str, Path]:
    """Write train/validation/test.jsonl and README.md into `out_dir`; the split name -> jsonl path mapping."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split, rows in make_pairs(seed, **sizes).items():
        path = out / f"{split}.jsonl"
        with path.open("w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        paths[split] = path
    with (out / "README.md").open("w", encoding="utf-8", newline="\n") as f:
        f.write(readme_text(Path(out_dir).as_posix(), seed, **sizes))
    return paths
