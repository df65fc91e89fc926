"""Preference data (issue 27): TRL's prompt/chosen/rejected format through the registry (plain and
conversational), only response tokens labelled, bad rows named or counted, identical pairs and prompts
that leave no response token skipped and counted; the committed data/preference is its generator's output."""
from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import ROOT, build_tokenizer, cli, make_rows, write_jsonl
from moetune.core.errors import DataError
from moetune.data import formats
from moetune.data.datagen import BLORP, DOMAINS, fact_table, make_examples
from moetune.data.pipeline import data_summary, load_examples, load_splits, skip_lines
from moetune.data.prefgen import make_pairs, near_miss, readme_text, write_pairs
from moetune.data.rows import IGNORE, Pair, collate_pairs
from moetune.recipe import DataConfig

torch.set_num_threads(1)


def pair_rows(n: int, seed: int, conversational: bool = True) -> list[dict]:
    """The tests' toy rows as preference pairs: the right answer over a near miss (lower case, off by one)."""
    out = []
    for r in make_rows(n, seed):
        wrong = r["response"].lower() if r["domain"] == "shout" else str(int(r["response"]) + 1)
        if conversational:
            out.append({"prompt": [{"role": "user", "content": r["instruction"]}],
                        "chosen": [{"role": "assistant", "content": r["response"]}],
                        "rejected": [{"role": "assistant", "content": wrong}], "domain": r["domain"]})
        else:
            out.append({"prompt": r["instruction"] + " =", "chosen": " " + r["response"], "rejected": " " + wrong,
                        "domain": r["domain"]})
    return out


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(chat=True)


def cfg(tmp_path, **kw) -> DataConfig:
    return DataConfig(**{"train": "unused", "validation": None, "test": None, "cache_dir": str(tmp_path / "c"), **kw})


def _labelled(tok, ids, labels) -> str:
    return tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])


@pytest.mark.parametrize("conversational", [True, False])
def test_preference_rows_become_pairs_with_only_response_tokens_labelled(tmp_path, tok, conversational):
    rows = pair_rows(6, 1, conversational)
    p = write_jsonl(tmp_path / "p.jsonl", rows)
    assert formats.detect(["prompt", "chosen", "rejected", "domain"], DataConfig()).name == "preference"
    es = load_examples(str(p), tok, cfg(tmp_path))
    assert es.pairs and es.info["format"] == "preference" and len(es) == 6
    pairs = es.take(range(6))
    assert all(isinstance(x, Pair) for x in pairs)
    eos = tok.eos_token
    for row, x in zip(rows, pairs):
        chosen = row["chosen"][0]["content"] if conversational else row["chosen"]
        rejected = row["rejected"][0]["content"] if conversational else row["rejected"]
        end = "\n" if conversational else ""                                          # ChatML ends a turn with one
        assert _labelled(tok, x.input_ids, x.labels) == chosen + eos + end            # the response (and its end) only
        assert _labelled(tok, x.rejected_ids, x.rejected_labels) == rejected + eos + end
        n = len(x.prompt_ids)                                                        # one prompt, shared
        assert x.input_ids[:n] == x.rejected_ids[:n] == x.prompt_ids
        assert x.reference == chosen and x.domain == row["domain"]
    b = collate_pairs(pairs[:2], tok.pad_token_id)                                   # [chosen; rejected], (4, T)
    assert b["input_ids"].shape[0] == 4
    assert b["input_ids"][2, :len(pairs[0].rejected_ids)].tolist() == pairs[0].rejected_ids
    col = es.column("length")
    assert col.tolist() == [max(len(x.input_ids), len(x.rejected_ids)) for x in pairs]   # what a batch pads to


def test_rows_missing_chosen_or_rejected_are_named_or_counted(tmp_path, tok):
    rows = pair_rows(4, 1)
    bad = dict(rows[2])
    del bad["rejected"]
    p = write_jsonl(tmp_path / "m.jsonl", rows[:2] + [bad] + rows[3:])
    with pytest.raises(DataError, match=r"m.jsonl line 3: missing key 'rejected' \(row keys: prompt, chosen, "
                                        r"domain\)\. If that column has another name here, set data.rejected_field"):
        load_examples(str(p), tok, cfg(tmp_path))
    nul = dict(rows[1], chosen=None)
    p2 = write_jsonl(tmp_path / "n.jsonl", [rows[0], nul])
    with pytest.raises(DataError, match=r"n.jsonl line 2: 'chosen' is null"):
        load_examples(str(p2), tok, cfg(tmp_path))
    es = load_examples(str(p), tok, cfg(tmp_path, skip_bad_rows=True))
    assert len(es) == 3 and es.info["bad_rows"] == 1 and "m.jsonl line 3" in es.info["bad_examples"][0]


def test_identical_pairs_and_prompts_without_a_response_token_are_skipped_and_counted(tmp_path, tok):
    rows = pair_rows(8, 1)
    rows[1] = dict(rows[1], rejected=rows[1]["chosen"])                            # identical: teaches nothing
    rows[5] = dict(rows[5], prompt=[{"role": "user", "content": "Shout " + "red green blue " * 30}])  # too long
    p = write_jsonl(tmp_path / "s.jsonl", rows)
    c = cfg(tmp_path, train=str(p), validation=str(p), max_length=48)
    splits = load_splits(c, tok, ("train", "validation"))
    for name in ("train", "validation"):
        es = splits[name]
        assert len(es) == 6, name
        assert es.info["identical_pairs"] == 1 and es.info["dropped_no_target"] == 1
    summary = data_summary(splits)
    assert summary["train"]["identical_pairs_skipped"] == 1 and summary["train"]["no_response_skipped"] == 1
    lines = skip_lines(summary)
    assert "data.train: 1 pair with identical chosen and rejected tokens skipped" in lines
    assert "data.validation: 1 row with no response token within data.max_length skipped" in lines


def test_objective_and_data_must_agree(tmp_path, tiny_llama, monkeypatch, capsys):
    sft = write_jsonl(tmp_path / "sft.jsonl", make_rows(8, 1))
    code = cli(monkeypatch, "train", "recipes/default.yaml", f"model.path={tiny_llama}", f"data.train={sft}",
               "data.validation=null", "data.test=null", "model.device=cpu", "train.objective=dpo", "stages=[train]",
               "train.eval_before=false", f"output_dir={tmp_path / 'r'}")
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "Recipe key 'train.objective' is 'dpo', but the training data" in err
    assert "in format 'instruction', not preference pairs" in err and "Traceback" not in err
    for extra, want in ((["train.objective=dpo", "data.packing=true"], "Recipe key 'data.packing' is true"),
                        (["train.objective=orpo", "train.reference=runs/x"], "only dpo has a reference model"),
                        (["train.objective=dpo", "train.reference=/nonexistent/run"], "holds no trained adapter")):
        pref = write_jsonl(tmp_path / "p.jsonl", pair_rows(8, 1))
        code = cli(monkeypatch, "train", "recipes/default.yaml", f"model.path={tiny_llama}", f"data.train={pref}",
                   "data.validation=null", "data.test=null", "model.device=cpu", "stages=[train]",
                   "train.eval_before=false", f"output_dir={tmp_path / 'r2'}", *extra)
        err = " ".join(capsys.readouterr().err.split())
        assert code == 2 and want in err and "Traceback" not in err, err


# ------------------------------------------------------------------ data/preference and its generator

def test_committed_preference_data_matches_regeneration(tmp_path, monkeypatch):
    committed = ROOT / "data" / "preference"
    monkeypatch.chdir(tmp_path)
    write_pairs("data/preference", seed=0)
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl", "README.md"):
        assert (committed / name).read_bytes() == (tmp_path / "data" / "preference" / name).read_bytes(), \
            f"data/preference/{name} drifted; regenerate it (moetune data make --preference)"
    assert (committed / "README.md").read_text() == readme_text("data/preference", seed=0)
    assert "moetune data make --preference --out data/preference --seed 0" in (committed / "README.md").read_text()


def test_pairs_are_right_answers_over_near_misses_on_unseen_held_out_prompts():
    pairs, base = make_pairs(0), make_examples(0)
    assert {k: len(v) for k, v in pairs.items()} == {"train": 500, "validation": 50, "test": 100}
    answer = {r["instruction"]: r["response"] for rows in base.values() for r in rows}
    default_train = {r["instruction"] for r in base["train"]}
    for split, rows in pairs.items():
        assert sorted(sum(r["domain"] == d for r in rows) for d in DOMAINS) == [len(rows) // 5] * 5
        for r in rows:
            prompt, chosen, rejected = r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]
            assert chosen == answer[prompt] and rejected != chosen, r
            assert (prompt in default_train) == (split == "train"), r
    assert make_pairs(0) == pairs and make_pairs(1) != pairs
    rng, table = random.Random(0), fact_table(0)
    misses = {d: set() for d in DOMAINS}
    for _ in range(50):
        misses["arithmetic"].add(int(near_miss("Compute 40 + 45.", "85", "arithmetic", rng, table)))
        misses["strings"].add(near_miss("Uppercase: lemon tiger", "LEMON TIGER", "strings", rng, table))
        misses["units"].add(near_miss("Convert 7 km to m.", "7000", "units", rng, table))
        misses["cipher"].add(near_miss("Translate to Blorp: cat sun", "miv tarra", "cipher", rng, table))
    assert misses["arithmetic"] == {84, 86, 75, 95}
    assert misses["strings"] == {"LEMON tiger"} and misses["units"] == {"700", "70000"}
    assert all(sum(a != b for a, b in zip(m.split(), ["miv", "tarra"])) == 1 and set(m.split()) <= set(BLORP.values())
               for m in misses["cipher"])


def test_data_make_preference_writes_the_pairs(tmp_path, monkeypatch, capsys):
    code = cli(monkeypatch, "data", "make", "--preference", "--out", tmp_path / "p", "--n-train", "25",
               "--n-validation", "5", "--n-test", "10", "--seed", "2")
    assert code in (0, None)
    rows = [json.loads(x) for x in (tmp_path / "p" / "train.jsonl").read_text().splitlines()]
    assert rows == make_pairs(2, 25, 5, 10)["train"]
    assert "--n-train 25" in (tmp_path / "p" / "README.md").read_text()
    assert cli(monkeypatch, "data", "make", "--preference", "--n-train", "7", "--out", tmp_path / "q") == 2
