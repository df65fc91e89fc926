"""The Arrow pipeline: tokenised cache, shard globs and directories, hub ids from the local cache,
the sharegpt / alpaca / text formats, multi-turn masking, bad rows skipped, O(batch) step order."""
from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import build_tokenizer, make_rows, write_jsonl
from moetune.data import pipeline
from moetune.data.examples import ExampleSet
from moetune.data.pipeline import load_examples, load_splits
from moetune.data.rows import IGNORE, DataError
from moetune.recipe import DataConfig
from moetune.train.loop import Plan


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(chat=True)


def cfg(tmp_path, **kw) -> DataConfig:
    return DataConfig(**{"train": "unused", "validation": None, "test": None, "cache_dir": str(tmp_path / "c"), **kw})


def dicts(es) -> list[dict]:
    return [asdict(e) for e in es]


def test_second_load_reads_the_cache_and_changes_invalidate_it(tmp_path, tok, monkeypatch):
    p = write_jsonl(tmp_path / "t.jsonl", make_rows(30, 1))
    c = cfg(tmp_path)
    first = load_examples(str(p), tok, c)
    assert isinstance(first, ExampleSet) and len(first) == 30
    assert len(list((tmp_path / "c").iterdir())) == 1
    calls = []
    real = pipeline._tokenize
    monkeypatch.setattr(pipeline, "_tokenize", lambda *a: calls.append(1) or real(*a))
    assert dicts(load_examples(str(p), tok, c)) == dicts(first) and not calls      # cached
    short = load_examples(str(p), tok, cfg(tmp_path, max_length=10))                   # a setting changes tokens
    assert len(calls) == 1 and max(len(e.input_ids) for e in short) == 10
    load_examples(str(p), build_tokenizer(chat=False), c)                              # another tokenizer
    assert len(calls) == 2
    write_jsonl(p, make_rows(31, 1))                                                   # the file changed
    assert len(load_examples(str(p), tok, c)) == 31 and len(calls) == 3
    assert len(list((tmp_path / "c").iterdir())) == 4


def test_shards_globs_directories_and_arrow(tmp_path, tok):
    rows = make_rows(24, 2)
    whole = dicts(load_examples(str(write_jsonl(tmp_path / "all.jsonl", rows)), tok, cfg(tmp_path)))
    d = tmp_path / "shards"
    d.mkdir()
    write_jsonl(d / "part-0.jsonl", rows[:10])
    pq.write_table(pa.Table.from_pylist(rows[10:]), d / "part-1.parquet")
    assert dicts(load_examples(str(d), tok, cfg(tmp_path))) == whole
    assert dicts(load_examples(str(d / "part-*"), tok, cfg(tmp_path))) == whole
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    assert dicts(load_examples(str(arrow), tok, cfg(tmp_path))) == whole
    with pytest.raises(DataError, match="matches no file"):
        load_examples(str(tmp_path / "nope-*.jsonl"), tok, cfg(tmp_path))


def _hub_cache(root: Path, rows: list[dict]) -> Path:
    """What `datasets` leaves in HF_DATASETS_CACHE after loading hub dataset 'owner/tiny_set'."""
    pq.write_table(pa.Table.from_pylist(rows), root / "t.parquet")
    datasets.load_dataset("parquet", data_files={"train": str(root / "t.parquet")}, cache_dir=str(root / "build"))
    src = next(p for p in (root / "build" / "parquet").glob("*/0.0.0/*") if p.is_dir())
    dst = root / "hf" / "owner___tiny_set" / "default" / "0.0.0" / src.name
    dst.mkdir(parents=True)
    info = json.loads((src / "dataset_info.json").read_text())
    (dst / "dataset_info.json").write_text(json.dumps({**info, "config_name": "default", "dataset_name": "tiny_set"}))
    shutil.copy(src / "parquet-train.arrow", dst / "tiny_set-train.arrow")
    return root / "hf"


def test_hub_id_from_the_local_cache_offline(tmp_path, tok, monkeypatch):
    rows = make_rows(8, 3)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", _hub_cache(tmp_path, rows))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ref = dicts(load_examples(str(write_jsonl(tmp_path / "r.jsonl", rows)), tok, cfg(tmp_path)))
    assert dicts(load_examples("owner/tiny_set", tok, cfg(tmp_path))) == ref
    with pytest.raises(DataError) as ei:
        load_examples("owner/absent", tok, cfg(tmp_path))
    msg = str(ei.value)
    assert "'owner/absent'" in msg and "offline" in msg and "HF_DATASETS_OFFLINE=0" in msg


def test_sharegpt_alpaca_and_text_formats(tmp_path, tok):
    chat = [{"messages": [{"role": "system", "content": "Be loud."}, {"role": "user", "content": "Shout red"},
                          {"role": "assistant", "content": "RED"}]}]
    share = [{"conversations": [{"from": "system", "value": "Be loud."}, {"from": "human", "value": "Shout red"},
                                {"from": "gpt", "value": "RED"}]}]
    a = dicts(load_examples(str(write_jsonl(tmp_path / "c.jsonl", chat)), tok, cfg(tmp_path)))
    b = dicts(load_examples(str(write_jsonl(tmp_path / "s.jsonl", share)), tok, cfg(tmp_path)))
    assert a == b
    alpaca = [{"instruction": "Shout red", "input": "", "output": "RED"}]
    inst = [{"instruction": "Shout red", "response": "RED"}]
    assert (dicts(load_examples(str(write_jsonl(tmp_path / "a.jsonl", alpaca)), tok, cfg(tmp_path)))
            == dicts(load_examples(str(write_jsonl(tmp_path / "i.jsonl", inst)), tok, cfg(tmp_path))))
    text = load_examples(str(write_jsonl(tmp_path / "t.jsonl", [{"text": "red green blue"}])), tok, cfg(tmp_path))
    e = text[0]
    assert e.labels == e.input_ids and tok.decode(e.input_ids) == "red green blue" + tok.eos_token
    with pytest.raises(DataError, match=r"s2.jsonl line 1: turn 1 must be"):
        bad = [{"conversations": [{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}]}]
        load_examples(str(write_jsonl(tmp_path / "s2.jsonl", bad)), tok, cfg(tmp_path))


def test_multi_turn_every_assistant_turn_or_last_only(tmp_path, tok):
    conv = [{"messages": [{"role": "user", "content": "Shout red"}, {"role": "assistant", "content": "RED"},
                          {"role": "user", "content": "Shout blue"}, {"role": "assistant", "content": "BLUE"}]}]
    p = write_jsonl(tmp_path / "m.jsonl", conv)

    def trained(c):
        e = load_examples(str(p), tok, c)[0]
        return tok.decode([t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE])
    every, last = trained(cfg(tmp_path)), trained(cfg(tmp_path, mask_history=True))
    assert "RED" in every and "BLUE" in every
    assert "RED" not in last and "BLUE" in last


def test_bad_rows_stop_or_are_skipped_and_counted(tmp_path, tok):
    rows = make_rows(6, 1)
    rows[2] = {"instruction": "Shout red", "domain": "shout"}          # no response
    rows[4] = {"instruction": "Add 1 and 2", "domain": "add"}
    p = tmp_path / "b.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" + ("\n" if i == 0 else "") for i, r in enumerate(rows)))
    with pytest.raises(DataError) as ei:
        load_examples(str(p), tok, cfg(tmp_path))
    msg = str(ei.value)
    assert "b.jsonl line 4: missing key 'response'" in msg and "2 bad rows" in msg and "skip_bad_rows" in msg
    es = load_examples(str(p), tok, cfg(tmp_path, skip_bad_rows=True))
    assert len(es) == 4
    assert es.info["bad_rows"] == 2 and "b.jsonl line 6" in es.info["bad_examples"][1]


def test_step_indices_match_the_old_full_shuffle_and_cover_each_epoch():
    def old(plan, step, seed):  # the per-step full permutation the loop used before
        epoch, k = divmod(step, plan.steps_per_epoch)
        perm = list(range(plan.n_examples))
        random.Random(seed * 100_003 + epoch).shuffle(perm)
        g = plan.global_batch
        if g > plan.n_examples:
            perm = perm * math.ceil(g / plan.n_examples)
        return perm[k * g:(k + 1) * g] if g <= plan.n_examples else perm[:g]
    for n, micro in ((103, 4), (3, 4)):
        plan = Plan(n, micro, 2, 1, 3.0, 0)
        for step in range(plan.total_steps):
            assert plan.step_indices(step, 7) == old(plan, step, 7)
    plan = Plan(100, 5, 1, 2, 1.0, 0)
    seen = sum((plan.step_indices(s, 0) for s in range(plan.steps_per_epoch)), [])
    assert sorted(seen) == list(range(100))


def test_splits_are_views_over_one_cached_table(tmp_path, tok):
    p = write_jsonl(tmp_path / "t.jsonl", make_rows(40, 4))
    s = load_splits(cfg(tmp_path, train=str(p), validation_split=0.25), tok, ("train", "validation"))
    assert isinstance(s["train"], ExampleSet) and s["train"].ds is s["validation"].ds
    assert len(s["train"]) == 30 and len(s["validation"]) == 10
    assert sorted(s["train"].indices.tolist() + s["validation"].indices.tolist()) == list(range(40))
    part = s["train"][5:9]
    assert dicts(part) == dicts(list(s["train"])[5:9]) and len(part) == 4


def test_data_inspect_json(tiny_llama, tmp_path, monkeypatch, capsys):
    from conftest import cli
    rows = make_rows(20, 1) + [{"instruction": "Shout " + "red " * 80, "response": "RED", "domain": "long"},
                               {"instruction": "Shout red", "response": "RED " * 40, "domain": "shout"}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    code = cli(monkeypatch, "data", "inspect", "recipes/default.yaml", f"model.path={tiny_llama}",
               f"data.train={train}", "data.validation=null", "data.validation_split=0", "data.test=null", "stages=[train]",
               "data.max_length=64", f"data.cache_dir={tmp_path / 'c'}", "--json", "--examples", "2")
    assert code in (0, None)
    rep = json.loads(capsys.readouterr().out)
    (s,) = [x for x in rep["splits"] if x["split"] == "train"]
    assert s["source_rows"] == 22 and s["format"] == "instruction"
    assert s["rows"] == 21 and s["dropped_no_trained_token"] == 1  # the cut prompt keeps no response token
    assert s["truncated"] == 1                                       # the long answer is cut but kept
    assert s["domains"] == {"add": 10, "shout": 11}
    assert sum(h["rows"] for h in s["histogram"]) == 21 and s["histogram"][-1]["to"] == 64
    eff = s["real_tokens"]  # real tokens / computed positions per layout (issue 26)
    assert all(0 < v <= 1 for v in eff.values())
    rows_of_64 = s["tokens"]["total"] / (64 * eff["dataset"])  # 'dataset': full rows of max_length
    assert abs(rows_of_64 - round(rows_of_64)) < 0.01 and round(rows_of_64) >= s["tokens"]["total"] / 64
    ex = s["examples"][0]
    assert ex["trained"] and all(f"⟦{r}⟧" in ex["text"] for r in ex["trained"])
    assert ex["trained"][0].strip() in {r["response"] + "<|im_end|>" for r in rows}


def test_mix_of_sources_with_columns_domains_weights_and_caps(tmp_path, tok):
    from moetune.recipe import MixSource
    qa = [{"question": f"Shout {w}", "answer": w.upper()} for w in ("red", "blue", "cat", "dog", "sun", "moon")]
    share = [{"conversations": [{"from": "human", "value": f"Add {a} and 1"}, {"from": "gpt", "value": str(a + 1)}]}
             for a in range(4)]
    p1 = write_jsonl(tmp_path / "qa.jsonl", qa)
    pq.write_table(pa.Table.from_pylist(share), tmp_path / "share.parquet")
    src = [MixSource(path=str(p1), columns={"instruction": "question", "response": "answer"}, domain="qa"),
           MixSource(path=str(tmp_path / "share.parquet"), format="sharegpt", domain="chat")]
    plain = load_splits(cfg(tmp_path, mix=src, validation_split=0), tok, ("train",))["train"]
    assert sorted(e.domain for e in plain) == ["chat"] * 4 + ["qa"] * 6
    assert {e.reference for e in plain} == {r["answer"] for r in qa} | {str(a + 1) for a in range(4)}
    weighted = [MixSource(**{**vars(s), "weight": w}) for s, w in zip(src, (1.0, 4.0))]
    es = load_splits(cfg(tmp_path, mix=weighted, validation_split=0), tok, ("train",))["train"]
    doms = [e.domain for e in es]
    assert len(es) == 10 and doms.count("chat") == 8 and doms.count("qa") == 2   # chat rows repeated
    assert es.info["sources"][1]["taken"] == 8
    capped = [MixSource(**{**vars(src[0]), "max_rows": 3}), src[1]]
    es = load_splits(cfg(tmp_path, mix=capped, validation_split=0), tok, ("train",))["train"]
    assert [e.domain for e in es].count("qa") == 3 and len(es) == 7


def test_cluster_heads_texts_read_every_mix_source(tmp_path):
    """cluster-heads embeds the rows of every data.mix source, each with its own format and columns,
    labelled with the source's domain (the labels its purity/ARI scores compare against)."""
    from moetune.commands.cluster import example_texts
    from moetune.recipe import MixSource
    qa = [{"question": f"Shout {w}", "answer": w.upper()} for w in ("red", "blue", "cat")]
    share = [{"conversations": [{"from": "human", "value": f"Add {a} and 1"}, {"from": "gpt", "value": str(a + 1)}]}
             for a in range(2)]
    p1 = write_jsonl(tmp_path / "qa.jsonl", qa)
    p2 = write_jsonl(tmp_path / "share.jsonl", share)
    src = [MixSource(path=str(p1), columns={"instruction": "question", "response": "answer"}, domain="qa"),
           MixSource(path=str(p2), format="sharegpt", domain="chat")]
    texts, domains = example_texts(cfg(tmp_path, mix=src), with_response=True)
    assert texts == ["Shout red\nRED", "Shout blue\nBLUE", "Shout cat\nCAT", "Add 0 and 1\n1", "Add 1 and 1\n2"]
    assert domains == ["qa"] * 3 + ["chat"] * 2


def test_two_processes_tokenise_the_same(tmp_path, tok):
    p = write_jsonl(tmp_path / "t.jsonl", make_rows(300, 6))
    one = load_examples(str(p), tok, cfg(tmp_path, num_proc=1))
    two = load_examples(str(p), tok, cfg(tmp_path, num_proc=2, cache_dir=str(tmp_path / "c2")))
    assert dicts(one) == dicts(two) and len(one) == 300
    assert not list((tmp_path / "c2").rglob("tokens*.arrow"))  # the map's own files are gone once saved


def test_validate_reads_globs_and_mix(tiny_llama, tmp_path, monkeypatch, capsys):
    from conftest import cli
    d = tmp_path / "shards"
    d.mkdir()
    write_jsonl(d / "a.jsonl", make_rows(4, 1))
    write_jsonl(d / "b.jsonl", make_rows(3, 2))
    common = ["recipes/default.yaml", f"model.path={tiny_llama}", "data.validation=null", "data.test=null", "stages=[train]"]
    assert cli(monkeypatch, "validate", *common, f"data.train={d}/*.jsonl") in (0, None)
    out = capsys.readouterr()
    assert "7 rows" in out.err and "Generating" not in out.err
    mix = f"data.mix=[{{path: {d}/a.jsonl, domain: x}}, {{path: {d}/b.jsonl, format: instruction}}]"
    assert cli(monkeypatch, "validate", *common, mix) in (0, None)
    out = capsys.readouterr().err
    assert "data.mix[0]" in out and "data.mix[1]" in out


def test_skipped_rows_reach_the_run_summary(tiny_llama, tiny_data, tmp_path):
    from conftest import tiny_overrides
    from moetune.commands.stages import run_recipe
    from moetune.recipe import load_recipe
    rows = make_rows(12, 1) + [{"instruction": "Shout red", "domain": "shout"}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    data = {**tiny_data, "train": train}
    s = run_recipe(load_recipe(None, tiny_overrides(tiny_llama, data, tmp_path / "run", "train.max_steps=1",
                                                    "stages=[train]", "train.eval_before=false",
                                                    "data.skip_bad_rows=true")))
    d = s["train"]["data"]["train"]
    assert d["examples"] == 12 and d["source_rows"] == 13 and d["bad_rows_skipped"] == 1
    assert "train.jsonl line 13: missing key 'response'" in d["bad_examples"][0]
