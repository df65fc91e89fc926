"""data/disjoint and its generator (scripts/gen_disjoint.py): 6 domains that share no surface form."""
from __future__ import annotations

import json
from collections import defaultdict

from scripts_loader import load_script
from test_multidomain_data import _Fixed

from conftest import ROOT


def _committed(split: str) -> list[dict]:
    return [json.loads(x) for x in (ROOT / "data/disjoint" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_committed_data_is_the_generators_output_and_held_out_is_unseen():
    gen = load_script("gen_disjoint")
    splits = gen.generate(250, 20, 30, 0)
    for split, rows in splits.items():
        assert _committed(split) == rows
    train = {r["instruction"] for r in splits["train"]}
    held = [r["instruction"] for r in splits["validation"] + splits["test"]]
    assert not train & set(held) and len(set(held)) == len(held)
    assert {r["domain"] for r in splits["test"]} == set(gen.DOMAINS) and len(gen.DOMAINS) == 6
    assert gen.row("sum", _Fixed()) == {"instruction": "3+3=", "response": "6"}
    assert gen.row("greek", _Fixed()) == {"instruction": "α α α", "response": "α α α"}
    assert gen.row("arrows", _Fixed())["response"] == "→ → →"
    assert gen.row("brackets", _Fixed())["response"] == ") ) )"
    assert gen.row("morse", _Fixed())["response"] == "--- --- ---"


def test_domains_share_no_character_but_the_space_and_no_token():
    """Every character (but the separating space) and every token of the built-in model's tokenizer (prompt
    and answer tokenised on their own) belongs to one domain only."""
    from moetune.models.load import load_tokenizer
    from moetune.recipe import ModelConfig
    tok = load_tokenizer(ModelConfig(), log=lambda *a: None)
    chars, tokens = defaultdict(set), defaultdict(set)
    for r in _committed("train") + _committed("test"):
        for text in (r["instruction"], r["response"]):
            chars[r["domain"]] |= set(text) - {" "}
            tokens[r["domain"]] |= set(tok(text, add_special_tokens=False).input_ids)
    doms = sorted(chars)
    for i, a in enumerate(doms):
        for b in doms[i + 1:]:
            assert not chars[a] & chars[b], (a, b)
            assert not tokens[a] & tokens[b], (a, b, [tok.decode([t]) for t in tokens[a] & tokens[b]])
