"""Tests of the default dataset generator and of the committed copy in data/default."""
from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from conftest import ROOT
from moetune.data.datagen import (
    BLORP, DOMAINS, UNITS, WORDS, fact_table, make_examples, readme_text, write_splits,
)

SPLITS = ("train", "validation", "test")
FILES = ("train.jsonl", "validation.jsonl", "test.jsonl", "README.md")


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    return make_examples(seed=0)


def solve(instruction: str, domain: str, table: dict[str, str]) -> str:
    """Recompute the expected answer from the instruction alone."""
    if domain == "arithmetic":
        a, op, b = re.fullmatch(r"Compute (\d\d) ([+-]) (\d\d)\.", instruction).groups()
        return str(int(a) + int(b) if op == "+" else int(a) - int(b))
    if domain == "strings":
        op, text = instruction.split(": ", 1)
        words = text.split(" ")
        assert all(w in WORDS for w in words)
        if op == "Uppercase":
            assert 1 <= len(words) <= 2
            return text.upper()
        assert op == "First letter of each word" and 3 <= len(words) <= 4
        return "".join(w[0] for w in words)
    if domain == "facts":
        hits = [c for c in table if re.search(rf"\b{c}\b", instruction)]
        assert len(hits) == 1, instruction
        return table[hits[0]]
    if domain == "cipher":
        prefix, text = instruction.split(": ", 1)
        assert prefix == "Translate to Blorp"
        return " ".join(BLORP[w] for w in text.split(" "))
    if domain == "units":
        n, src, dst = re.fullmatch(r"Convert (\d+) (\w+) to (\w+)\.", instruction).groups()
        factors = {(big, small): f for big, small, f in UNITS}
        if (src, dst) in factors:
            return str(int(n) * factors[src, dst])
        factor = factors[dst, src]
        assert int(n) % factor == 0
        return str(int(n) // factor)
    raise AssertionError(f"unknown domain {domain}")


def test_deterministic_per_seed(data):
    assert make_examples(seed=0) == data
    assert make_examples(seed=1) != data


def test_split_sizes_and_row_shape(data):
    assert {k: len(v) for k, v in data.items()} == {"train": 1500, "validation": 100, "test": 200}
    small = make_examples(seed=3, n_train=50, n_validation=10, n_test=5)
    assert [len(small[s]) for s in SPLITS] == [50, 10, 5]
    for rows in data.values():
        for row in rows:
            assert list(row) == ["instruction", "response", "domain"]
            assert all(isinstance(v, str) and v for v in row.values())


def test_sizes_must_divide_by_domains():
    with pytest.raises(ValueError):
        make_examples(n_train=101)


def test_domains_balanced_and_shuffled(data):
    assert len(DOMAINS) >= 5
    for split, rows in data.items():
        counts = Counter(r["domain"] for r in rows)
        assert set(counts) == set(DOMAINS)
        assert len(set(counts.values())) == 1, (split, counts)
        changes = sum(a["domain"] != b["domain"] for a, b in zip(rows, rows[1:]))
        assert changes > len(rows) // 2, f"{split} is not shuffled"


def test_no_instruction_leaks_across_splits(data):
    seen = {s: {r["instruction"] for r in data[s]} for s in SPLITS}
    assert not seen["train"] & seen["validation"]
    assert not seen["train"] & seen["test"]
    assert not seen["validation"] & seen["test"]
    for split in ("validation", "test"):
        assert len(seen[split]) == len(data[split])


def test_every_answer_is_checkable(data):
    table = fact_table(0)
    for rows in data.values():
        for row in rows:
            assert row["response"] == solve(row["instruction"], row["domain"], table), row


def test_held_out_facts_are_seen_in_training(data):
    table = fact_table(0)
    assert len(table) == 30 and len(set(table.values())) == 30
    trained = {r["response"] for r in data["train"] if r["domain"] == "facts"}
    for split in ("validation", "test"):
        assert {r["response"] for r in data[split] if r["domain"] == "facts"} <= trained
    assert fact_table(1) != table


def test_rows_are_short(data):
    for rows in data.values():
        for row in rows:
            assert len(row["instruction"].split()) <= 10, row
            assert len(row["response"]) <= 20, row


def test_write_splits_format(tmp_path):
    paths = write_splits(tmp_path / "d", seed=2, n_train=20, n_validation=10, n_test=10)
    assert set(paths) == set(SPLITS)
    rows = make_examples(seed=2, n_train=20, n_validation=10, n_test=10)
    for split, path in paths.items():
        text = path.read_text(encoding="utf-8")
        assert text.endswith("}\n") and "\r" not in text
        assert [json.loads(line) for line in text.splitlines()] == rows[split]
    readme = (tmp_path / "d" / "README.md").read_text(encoding="utf-8")
    assert "--seed 2" in readme and all(d in readme for d in DOMAINS)
    assert "moetune data make --out d --seed 2 --n-train 20 --n-validation 10 --n-test 10\n" in readme_text(
        "d", seed=2, n_train=20, n_validation=10, n_test=10)
    assert "moetune data make --out d --seed 0 --n-test 10\n" in readme_text("d", n_test=10)  # only what differs


def test_committed_data_matches_regeneration(tmp_path, monkeypatch):
    committed = ROOT / "data" / "default"
    monkeypatch.chdir(tmp_path)
    write_splits("data/default", seed=0)
    for name in FILES:
        fresh = (tmp_path / "data" / "default" / name).read_bytes()
        assert (committed / name).read_bytes() == fresh, f"data/default/{name} drifted; regenerate it"
    readme = (committed / "README.md").read_text(encoding="utf-8")
    assert "moetune data make --out data/default --seed 0" in readme
    assert readme == readme_text("data/default", seed=0)
