"""Deterministic generator of moetune's default multi-domain instruction dataset.

The dataset is built to fine-tune a tiny causal LM (SmolLM2-135M-Instruct) with LoRA
for a few hundred CPU steps and still show a clear exact-match gain on held-out rows.
Every domain has a fixed output format, a short answer (a few tokens) that can be
checked by exact match, and needs a different skill, so routed experts have something
to specialise on:

- ``arithmetic``: add or subtract two 2-digit numbers ("Compute 47 + 38." -> "85");
  subtraction always has the larger number first, so answers are never negative.
- ``strings``: transform words from a fixed list of 40 common English words: upper-case
  one or two words ("Uppercase: lemon tiger" -> "LEMON TIGER") or join the first letters
  of three or four words ("First letter of each word: apple river green" -> "arg").
- ``facts``: recall an invented fact. A table of 30 made-up countries and their made-up
  capitals is drawn from the seed (seed 0: "What is the capital of Quelonia?" -> "Falmo"); the
  held-out splits ask about the same table in other phrasings, so memorisation is the skill.
- ``cipher``: translate a 1-3 word phrase into the toy language Blorp with a fixed
  20-word dictionary, word by word ("Translate to Blorp: cat sun" -> "miv tarra").
- ``units``: convert between metric units whose factor is a power of ten, in either
  direction, answering with the bare integer ("Convert 7 km to m." -> "7000",
  "Convert 300 cm to m." -> "3").

Each split holds the same number of rows per domain, shuffled. Instructions are unique
across all splits, so validation and test never repeat a training instruction. Only the
stdlib ``random.Random(seed)`` is used, so the output is byte-for-byte reproducible.
Regenerate the committed copy with ``moetune data make --out data/default --seed 0``.
"""
from __future__ import annotations

import random
from functools import partial
from pathlib import Path
from typing import Callable

from moetune.core.files import write_jsonl, write_text_atomic

DOMAINS: tuple[str, ...] = ("arithmetic", "strings", "facts", "cipher", "units")
"""The domain names, in generation order."""

DEFAULT_SIZES: dict[str, int] = {"n_train": 1500, "n_validation": 100, "n_test": 200}
SPLITS: tuple[str, ...] = ("train", "validation", "test")

DOMAIN_SUMMARIES: dict[str, str] = {
    "arithmetic": 'add or subtract two 2-digit numbers ("Compute 47 + 38." -> "85").',
    "strings": 'upper-case 1-2 words or join the first letters of 3-4 words, from a fixed '
               'list of 40 words ("First letter of each word: apple river green" -> "arg").',
    "facts": "recall the capital of one of 30 invented countries; the table is drawn from "
             "the seed and held-out rows ask about the same table in other phrasings.",
    "cipher": 'translate 1-3 words into the toy language Blorp with a fixed 20-word '
              'dictionary ("Translate to Blorp: cat sun" -> "miv tarra").',
    "units": 'convert metric units with a power-of-ten factor, either direction, answering '
             'with the bare integer ("Convert 7 km to m." -> "7000").',
}

WORDS: tuple[str, ...] = (
    "apple", "river", "green", "house", "music", "table", "water", "light", "stone", "cloud",
    "bread", "chair", "dream", "earth", "flame", "glass", "heart", "honey", "lemon", "mouse",
    "night", "ocean", "paper", "plant", "queen", "radio", "smile", "snake", "sugar", "tiger",
    "train", "voice", "whale", "zebra", "bench", "candy", "eagle", "juice", "kite", "robot",
)
"""The closed word list of the ``strings`` domain."""

BLORP: dict[str, str] = {
    "cat": "miv", "sun": "tarra", "dog": "zop", "moon": "kelu", "tree": "brin",
    "fish": "volo", "bird": "quen", "red": "dras", "blue": "ilo", "big": "fenna",
    "small": "gub", "run": "raski", "eat": "tum", "water": "welo", "house": "pira",
    "book": "snoj", "fire": "yarl", "star": "hobi", "rain": "cresk", "happy": "nuvo",
}
"""English -> Blorp dictionary of the ``cipher`` domain."""

UNITS: tuple[tuple[str, str, int], ...] = (
    ("km", "m", 1000), ("m", "cm", 100), ("cm", "mm", 10), ("kg", "g", 1000), ("L", "mL", 1000),
)
"""(larger unit, smaller unit, factor) pairs of the ``units`` domain."""

FACT_TEMPLATES: tuple[str, ...] = (
    "What is the capital of {e}?", "Name the capital of {e}.", "Which city is the capital of {e}?",
    "Tell me the capital of {e}.", "Give the capital city of {e}.", "What city is the capital of {e}?",
    "{e} has which capital?", "The capital of {e} is?", "Capital of {e}?", "What is {e}'s capital?",
    "In {e}, which city is the capital?", "Which city serves as {e}'s capital?",
    "State the capital of {e}.", "What is the capital city of {e}?", "Which town is the capital of {e}?",
    "Name {e}'s capital city.",
)
"""Question phrasings of the ``facts`` domain; ``{e}`` is the country."""

_COUNTRY_STEMS = (
    "Zorva", "Belmi", "Karto", "Mireda", "Talvo", "Veyra", "Druma", "Ostra", "Quelo", "Norva",
    "Fenmu", "Galdi", "Haska", "Lunte", "Rynso", "Selva", "Torma", "Verni", "Yalda", "Prano",
    "Ambri", "Cesto", "Dalvi", "Elvo", "Gremo", "Ibra", "Jorva", "Kuvo", "Lomba", "Mavro",
    "Nessa", "Orvi", "Pelsa", "Rovi", "Suldo", "Tuvra",
)
_COUNTRY_SUFFIXES = ("nia", "stan", "land", "mora", "ria")
_CAPITALS = (
    "Kelmar", "Dorven", "Ashdor", "Merith", "Tevost", "Braxa", "Silund", "Holok", "Nimra", "Corvel",
    "Ustin", "Gorvik", "Wenla", "Falmo", "Ithar", "Buren", "Cadmo", "Dessa", "Eskar", "Fyrn",
    "Hadro", "Ivel", "Jasto", "Kopra", "Lisk", "Morv", "Nalto", "Oskel", "Pavu", "Qarim",
    "Rasko", "Sevin", "Tilmo", "Urda", "Vasko", "Wyrla", "Xandu", "Yorik", "Zemla", "Arvo",
)
N_COUNTRIES = 30

Sampler = Callable[[random.Random], tuple[str, str]]


def fact_table(seed: int = 0) -> dict[str, str]:
    """The invented country -> capital table of the ``facts`` domain for ``seed``.

    Country stems and capitals all start with different three letters, so no two
    entities look alike to the tokenizer.
    """
    rng = random.Random(f"moetune-facts-{seed}")
    stems = rng.sample(_COUNTRY_STEMS, N_COUNTRIES)
    countries = [stem + rng.choice(_COUNTRY_SUFFIXES) for stem in stems]
    capitals = rng.sample(_CAPITALS, N_COUNTRIES)
    return dict(zip(countries, capitals))


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return f"Compute {a} + {b}.", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"Compute {a} - {b}.", str(a - b)


def _strings(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        words = rng.sample(WORDS, rng.randint(1, 2))
        return "Uppercase: " + " ".join(words), " ".join(words).upper()
    words = rng.sample(WORDS, rng.randint(3, 4))
    return "First letter of each word: " + " ".join(words), "".join(w[0] for w in words)


def _facts(rng: random.Random, table: dict[str, str]) -> tuple[str, str]:
    country = rng.choice(list(table))
    return rng.choice(FACT_TEMPLATES).format(e=country), table[country]


def _cipher(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(list(BLORP), rng.randint(1, 3))
    return "Translate to Blorp: " + " ".join(words), " ".join(BLORP[w] for w in words)


def _units(rng: random.Random) -> tuple[str, str]:
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(1, 99)
    if rng.random() < 0.5:
        return f"Convert {n} {big} to {small}.", str(n * factor)
    return f"Convert {n * factor} {small} to {big}.", str(n)


def _draw(sampler: Sampler, rng: random.Random, n: int, taken: set[str], domain: str) -> list[dict]:
    """Draw ``n`` rows whose instructions are not in ``taken`` (which is updated)."""
    rows: list[dict] = []
    for _ in range(1000 + 200 * n):
        if len(rows) == n:
            return rows
        instruction, response = sampler(rng)
        if instruction not in taken:
            taken.add(instruction)
            rows.append({"instruction": instruction, "response": response, "domain": domain})
    if len(rows) == n:
        return rows
    raise ValueError(f"domain {domain!r} cannot supply {n} more distinct instructions")


def make_examples(seed: int = 0, n_train: int = 1500, n_validation: int = 100,
                  n_test: int = 200) -> dict[str, list[dict]]:
    """Generate the three splits; each row is ``{"instruction", "response", "domain"}``.

    Every split holds ``n / len(DOMAINS)`` rows per domain (sizes must divide evenly) in
    shuffled order. Validation and test rows are drawn first, then training rows whose
    instructions differ from every held-out one.
    """
    sizes = {"train": n_train, "validation": n_validation, "test": n_test}
    for split, n in sizes.items():
        if n < 0 or n % len(DOMAINS):
            raise ValueError(f"{split} size {n} must be a non-negative multiple of {len(DOMAINS)}")
    per = {split: n // len(DOMAINS) for split, n in sizes.items()}
    samplers: dict[str, Sampler] = {
        "arithmetic": _arithmetic, "strings": _strings, "facts": partial(_facts, table=fact_table(seed)),
        "cipher": _cipher, "units": _units,
    }
    rng = random.Random(seed)
    taken: set[str] = set()
    out: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for domain in DOMAINS:
        held = _draw(samplers[domain], rng, per["validation"] + per["test"], taken, domain)
        out["validation"] += held[:per["validation"]]
        out["test"] += held[per["validation"]:]
        out["train"] += _draw(samplers[domain], rng, per["train"], taken, domain)
    for split in SPLITS:
        rng.shuffle(out[split])
    return out


def regenerate_command(command: str, sizes: dict[str, int], defaults: dict[str, int]) -> str:
    """`command` plus a `--n-train N`-style flag for each size that differs from its default."""
    return command + "".join(f" --{key.replace('_', '-')} {value}" for key, value in sizes.items()
                             if value != defaults[key])


def readme_text(out: str, seed: int = 0, **sizes: int) -> str:
    """The README written next to the splits; ``out`` is the directory as given on the CLI."""
    sizes = {**DEFAULT_SIZES, **sizes}
    command = regenerate_command(f"moetune data make --out {out} --seed {seed}", sizes, DEFAULT_SIZES)
    per = {k: v // len(DOMAINS) for k, v in sizes.items()}
    lines = [
        "# moetune default dataset", "",
        "Generated by `moetune/data/datagen.py`; do not edit by hand. Regenerate with:", "",
        f"    {command}", "",
        f"Seed: {seed}. Rows: train {sizes['n_train']}, validation {sizes['n_validation']}, "
        f"test {sizes['n_test']} ({per['n_train']} / {per['n_validation']} / {per['n_test']} "
        f"per domain, shuffled).", "",
        "Each line of `train.jsonl`, `validation.jsonl` and `test.jsonl` is one JSON object with "
        "the keys `instruction`, `response` and `domain`. Responses are short and checked by "
        "exact match; no validation or test instruction appears in train.", "",
        "## Domains", "",
    ]
    lines += [f"- `{d}`: {DOMAIN_SUMMARIES[d]}" for d in DOMAINS]
    return "\n".join(lines) + "\n"


def write_splits(out_dir: str | Path, seed: int = 0, **sizes: int) -> dict[str, Path]:
    """Write ``train/validation/test.jsonl`` and ``README.md`` into ``out_dir``.

    ``sizes`` are the ``n_train``, ``n_validation`` and ``n_test`` keywords of
    `make_examples`. Returns the split name -> jsonl path mapping.
    """
    splits = {split: [{k: row[k] for k in ("instruction", "response", "domain")} for row in rows]
              for split, rows in make_examples(seed, **sizes).items()}
    return save_splits(out_dir, splits, readme_text(Path(out_dir).as_posix(), seed, **sizes))


def save_splits(out_dir: str | Path, splits: dict[str, list[dict]], readme: str) -> dict[str, Path]:
    """`<split>.jsonl` for each split and README.md into `out_dir` (each file whole or not at all); the split
    name -> jsonl path mapping."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {split: write_jsonl(out / f"{split}.jsonl", rows) for split, rows in splits.items()}
    write_text_atomic(out / "README.md", readme)
    return paths
