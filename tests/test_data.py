"""Data: every source type reads the same rows; templates; assistant-only labels; clear errors."""
from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from conftest import build_tokenizer, make_rows, write_jsonl
from moetune.data.pipeline import load_examples, load_splits
from moetune.data.rows import IGNORE, DataError, Encoder, Example, collate
from moetune.recipe import DataConfig, RecipeError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def chat_tok():
    """tiny_llama's tokenizer: ChatML chat template, eos '<|im_end|>'."""
    return build_tokenizer(chat=True)


@pytest.fixture(scope="module")
def plain_tok():
    """tiny_gpt2's tokenizer: no chat template, eos '<|endoftext|>'."""
    return build_tokenizer(chat=False)


def cfg(**kw) -> DataConfig:
    return DataConfig(**{"train": "unused", "validation": None, "test": None, **kw})


def labelled_runs(e: Example) -> list[list[int]]:
    """Contiguous runs of labelled (non -100) tokens."""
    runs, cur = [], []
    for t, lab in zip(e.input_ids, e.labels):
        if lab != IGNORE:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


SHOUT = [{"role": "user", "content": "Shout red"}, {"role": "assistant", "content": "RED"}]


# ------------------------------------------------------------------ sources


def _rows() -> list[dict]:
    rows = make_rows(12, 5)
    for i, r in enumerate(rows):
        r["input"] = f"extra {i}" if i % 3 == 0 else ""
    return rows


def _write_all(d: Path, rows: list[dict]) -> dict[str, Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"jsonl": write_jsonl(d / "rows.jsonl", rows)}
    paths["json_list"] = d / "rows_list.json"
    paths["json_list"].write_text(json.dumps(rows, indent=2))
    paths["json_data"] = d / "rows_data.json"
    paths["json_data"].write_text(json.dumps({"data": rows}))
    paths["csv"] = d / "rows.csv"
    with paths["csv"].open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    paths["parquet"] = d / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"])
    paths["datasets"] = d / "rows_ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(paths["datasets"]))
    return paths


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_every_source_type_gives_identical_examples(tmp_path, chat_tok, template):
    rows = _rows()
    paths = _write_all(tmp_path, rows)
    c = cfg(template=template)
    ref = [asdict(e) for e in load_examples(str(paths["jsonl"]), chat_tok, c)]
    assert len(ref) == len(rows)
    assert [e["domain"] for e in ref] == [r["domain"] for r in rows]
    assert [e["reference"] for e in ref] == [r["response"] for r in rows]
    # the optional input column is appended to the instruction when present
    assert "extra 0" in chat_tok.decode(ref[0]["prompt_ids"])
    assert "extra" not in chat_tok.decode(ref[1]["prompt_ids"])
    for kind, p in paths.items():
        got = [asdict(e) for e in load_examples(str(p), chat_tok, c)]
        assert got == ref, kind


# ------------------------------------------------------------------ templates


def test_instruction_with_chat_template(chat_tok):
    enc = Encoder(chat_tok, cfg())
    assert enc.chat
    e = enc.encode(SHOUT, "shout")
    n = len(e.prompt_ids)
    assert len(e.labels) == len(e.input_ids)
    assert 0 < n < len(e.input_ids)
    assert e.input_ids[:n] == e.prompt_ids
    assert e.labels[:n] == [IGNORE] * n
    assert e.labels[n:] == e.input_ids[n:]
    assert IGNORE not in e.labels[n:]
    # the whole sequence is exactly the template's rendering
    assert chat_tok.decode(e.input_ids) == chat_tok.apply_chat_template(SHOUT, tokenize=False)
    assert chat_tok.decode(e.prompt_ids) == chat_tok.apply_chat_template(
        SHOUT[:1], tokenize=False, add_generation_prompt=True)
    assert chat_tok.decode(e.prompt_ids).endswith("<|im_start|>assistant\n")
    labelled = chat_tok.decode([t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE])
    assert labelled.rstrip("\n") == "RED<|im_end|>"
    assert chat_tok.eos_token_id in e.labels
    assert e.reference == "RED" and e.domain == "shout"


def test_plain_template(plain_tok):
    enc = Encoder(plain_tok, cfg())
    assert not enc.chat
    e = enc.encode(SHOUT)
    assert plain_tok.decode(e.input_ids) == "### Instruction:\nShout red\n\n### Response:\nRED<|endoftext|>"
    assert plain_tok.decode(e.prompt_ids) == "### Instruction:\nShout red\n\n### Response:\n"
    assert e.input_ids[-1] == plain_tok.eos_token_id
    assert e.labels[-1] == plain_tok.eos_token_id
    n = len(e.prompt_ids)
    assert e.input_ids[:n] == e.prompt_ids
    assert e.labels[:n] == [IGNORE] * n and e.labels[n:] == e.input_ids[n:]
    assert plain_tok.decode(e.input_ids[n:]) == "RED<|endoftext|>"
    assert e.input_ids.count(plain_tok.eos_token_id) == 1


def test_plain_template_forced_on_chat_tokenizer(chat_tok):
    e = Encoder(chat_tok, cfg(template="plain")).encode(SHOUT)
    text = chat_tok.decode(e.input_ids)
    assert text.startswith("### Instruction:\nShout red") and "<|im_start|>" not in text
    assert text.endswith("RED<|im_end|>")


MULTI = [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "Shout red"}, {"role": "assistant", "content": "RED"},
         {"role": "user", "content": "Add 1 and 2"}, {"role": "assistant", "content": "3"}]


def test_multi_turn_chat_labels_only_assistant_turns(chat_tok, tmp_path):
    p = write_jsonl(tmp_path / "chat.jsonl", [{"messages": MULTI, "domain": "mix"}])
    (e,) = load_examples(str(p), chat_tok, cfg())  # format auto-detected as chat
    assert chat_tok.decode(e.input_ids) == chat_tok.apply_chat_template(MULTI, tokenize=False)
    runs = [chat_tok.decode(r) for r in labelled_runs(e)]
    assert [r.rstrip("\n") for r in runs] == ["RED<|im_end|>", "3<|im_end|>"]
    unlabelled = chat_tok.decode([t for t, lab in zip(e.input_ids, e.labels) if lab == IGNORE])
    for text in ("Be brief.", "Shout red", "Add 1 and 2", "<|im_start|>system", "<|im_start|>user"):
        assert text in unlabelled
    assert chat_tok.decode(e.prompt_ids) == chat_tok.apply_chat_template(
        MULTI[:4], tokenize=False, add_generation_prompt=True)
    assert e.reference == "3" and e.domain == "mix"


def test_multi_turn_plain_template(plain_tok):
    e = Encoder(plain_tok, cfg()).encode(MULTI)
    assert plain_tok.decode(e.input_ids) == (
        "Be brief.\n\n### Instruction:\nShout red\n\n### Response:\nRED<|endoftext|>\n\n"
        "### Instruction:\nAdd 1 and 2\n\n### Response:\n3<|endoftext|>")
    assert [plain_tok.decode(r) for r in labelled_runs(e)] == ["RED<|endoftext|>", "3<|endoftext|>"]


def test_system_prompt_inserted(chat_tok, plain_tok):
    e = Encoder(chat_tok, cfg(system_prompt="You are terse.")).encode(SHOUT)
    text = chat_tok.decode(e.input_ids)
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nShout red")
    assert chat_tok.decode(e.prompt_ids).startswith("<|im_start|>system\nYou are terse.")
    # a conversation with its own system message keeps it (no second one)
    e2 = Encoder(chat_tok, cfg(system_prompt="You are terse.")).encode(MULTI)
    t2 = chat_tok.decode(e2.input_ids)
    assert "You are terse." not in t2 and t2.count("<|im_start|>system") == 1
    # plain template: system text first, then a blank line
    e3 = Encoder(plain_tok, cfg(system_prompt="You are terse.")).encode(SHOUT)
    assert plain_tok.decode(e3.input_ids).startswith("You are terse.\n\n### Instruction:\nShout red")
    # without system_prompt none is added
    assert "system" not in chat_tok.decode(Encoder(chat_tok, cfg()).encode(SHOUT).input_ids)


def test_chat_template_required_for_template_chat(plain_tok, tmp_path):
    with pytest.raises(RecipeError, match="data.template"):
        Encoder(plain_tok, cfg(template="chat"))
    p = write_jsonl(tmp_path / "d.jsonl", make_rows(2, 0))
    with pytest.raises(RecipeError, match="no chat template"):
        load_examples(str(p), plain_tok, cfg(template="chat"))


# ------------------------------------------------------------------ malformed rows


def test_invalid_json_line(tmp_path, chat_tok):
    p = tmp_path / "broken.jsonl"
    good = [json.dumps(r) for r in make_rows(4, 0)]
    p.write_text("\n".join([good[0], good[1], '{"instruction": "x", "response": ', good[2]]) + "\n")
    with pytest.raises(DataError) as ei:
        load_examples(str(p), chat_tok, cfg())
    msg = str(ei.value)
    assert "broken.jsonl" in msg and "line 3" in msg and "JSON" in msg


def test_jsonl_line_numbers_count_blank_lines(tmp_path, chat_tok):
    p = tmp_path / "gaps.jsonl"
    p.write_text(json.dumps(make_rows(1, 0)[0]) + "\n\n" + "[1, 2]\n")
    with pytest.raises(DataError, match="gaps.jsonl line 3.*object"):
        load_examples(str(p), chat_tok, cfg())


def test_missing_response(tmp_path, chat_tok):
    rows = make_rows(3, 0)
    del rows[1]["response"]
    p = write_jsonl(tmp_path / "noresp.jsonl", rows)
    with pytest.raises(DataError) as ei:
        load_examples(str(p), chat_tok, cfg())
    msg = str(ei.value)
    assert "noresp.jsonl" in msg and "line 2" in msg and "'response'" in msg


def test_renamed_fields(tmp_path, chat_tok):
    rows = [{"q": r["instruction"], "a": r["response"]} for r in make_rows(3, 0)]
    p = write_jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(DataError, match="cannot tell the format"):
        load_examples(str(p), chat_tok, cfg())
    ex = load_examples(str(p), chat_tok, cfg(instruction_field="q", response_field="a"))
    assert [e.reference for e in ex] == [r["a"] for r in rows]


def test_csv_error_names_csv_line(tmp_path, chat_tok):
    p = tmp_path / "bad.csv"
    p.write_text("instruction,response\nShout red,RED\nAdd 1 and 2,3\nShout blue\n")
    with pytest.raises(DataError) as ei:
        load_examples(str(p), chat_tok, cfg())
    msg = str(ei.value)
    assert "bad.csv" in msg and "line 4" in msg and "'response'" in msg


def test_csv_line_numbers_after_multiline_field(tmp_path, chat_tok):
    """Quoted fields spanning lines and blank lines must not shift the reported line of later rows."""
    p = tmp_path / "multi.csv"
    p.write_text('instruction,response\n"Write two lines","one\ntwo"\n\nAdd 1 and 2,3\nShout blue\n')
    with pytest.raises(DataError) as ei:
        load_examples(str(p), chat_tok, cfg())
    assert "multi.csv line 6" in str(ei.value)
    p.write_text('instruction,response\n"Write two lines","one\ntwo"\nAdd 1 and 2,3\n')
    ex = load_examples(str(p), chat_tok, cfg())
    assert [e.reference for e in ex] == ["one\ntwo", "3"]


def test_chat_row_must_end_with_assistant(tmp_path, chat_tok):
    rows = [{"messages": SHOUT}, {"messages": MULTI[:4]}]
    p = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError) as ei:
        load_examples(str(p), chat_tok, cfg())
    msg = str(ei.value)
    assert "chat.jsonl line 2" in msg and "assistant" in msg and "'user'" in msg


def test_chat_row_bad_message(tmp_path, chat_tok):
    p = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "bot", "content": "hi"}]}])
    with pytest.raises(DataError, match="line 1: message 0"):
        load_examples(str(p), chat_tok, cfg())


def test_unsupported_suffix(tmp_path, chat_tok):
    p = tmp_path / "rows.txt"
    p.write_text("Shout red\tRED\n")
    with pytest.raises(DataError) as ei:
        load_examples(str(p), chat_tok, cfg())
    msg = str(ei.value)
    assert "rows.txt" in msg and "'.txt'" in msg
    for allowed in (".jsonl", ".json", ".csv", ".parquet", "datasets"):
        assert allowed in msg


def test_missing_file(tmp_path, chat_tok):
    with pytest.raises(DataError, match="does not exist"):
        load_examples(str(tmp_path / "nope.jsonl"), chat_tok, cfg())


# ------------------------------------------------------------------ lengths and splits


def test_max_length_truncates(chat_tok):
    full = Encoder(chat_tok, cfg()).encode(SHOUT)
    assert len(full.input_ids) > 12
    cut = Encoder(chat_tok, cfg(max_length=12)).encode(SHOUT)
    assert cut.input_ids == full.input_ids[:12]
    assert cut.labels == full.labels[:12]
    assert len(cut.prompt_ids) <= 12


def test_rows_without_response_tokens_dropped(tmp_path, chat_tok):
    short = make_rows(6, 0)
    long = [{"instruction": "Shout " + "red green blue " * 20, "response": "RED", "domain": "long"}] * 3
    train = write_jsonl(tmp_path / "train.jsonl", short + long)
    val = write_jsonl(tmp_path / "val.jsonl", make_rows(2, 1))
    n = max(len(Encoder(chat_tok, cfg()).encode([{"role": "user", "content": r["instruction"]},
                                                  {"role": "assistant", "content": r["response"]}]).input_ids)
            for r in short)
    c = cfg(train=str(train), validation=str(val), max_length=n)
    splits = load_splits(c, chat_tok, need=("train", "validation"))
    assert len(splits["train"]) == len(short)
    assert all(e.domain != "long" for e in splits["train"])
    assert all(any(lab != IGNORE for lab in e.labels) for e in splits["train"])
    assert len(splits["validation"]) == 2

    only_long = write_jsonl(tmp_path / "long.jsonl", long)
    with pytest.raises(DataError) as ei:
        load_splits(cfg(train=str(only_long), validation=str(val), max_length=n), chat_tok, need=("train",))
    msg = str(ei.value)
    assert "data.max_length" in msg and "3 dropped" in msg


def test_validation_split_carved_from_train(tmp_path, chat_tok):
    rows = make_rows(20, 4)
    p = write_jsonl(tmp_path / "train.jsonl", rows)
    all_ex = load_examples(str(p), chat_tok, cfg())
    c = cfg(train=str(p), validation=None, validation_split=0.25, seed=3)
    s = load_splits(c, chat_tok, need=("train", "validation"))
    assert len(s["validation"]) == 5 and len(s["train"]) == 15
    key = lambda e: tuple(e.input_ids)  # noqa: E731
    assert Counter(map(key, s["train"] + s["validation"])) == Counter(map(key, all_ex))
    again = load_splits(c, chat_tok, need=("train", "validation"))
    assert [key(e) for e in again["validation"]] == [key(e) for e in s["validation"]]
    # a given validation file is used as is, train is not carved
    val = write_jsonl(tmp_path / "val.jsonl", make_rows(3, 9))
    s2 = load_splits(cfg(train=str(p), validation=str(val)), chat_tok, need=("train", "validation"))
    assert len(s2["train"]) == 20 and len(s2["validation"]) == 3


def test_max_train_examples(tmp_path, chat_tok):
    p = write_jsonl(tmp_path / "train.jsonl", make_rows(20, 4))
    val = write_jsonl(tmp_path / "val.jsonl", make_rows(3, 9))
    full = load_splits(cfg(train=str(p), validation=str(val)), chat_tok, need=("train",))["train"]
    few = load_splits(cfg(train=str(p), validation=str(val), max_train_examples=4), chat_tok, need=("train",))
    assert len(few["train"]) == 4
    assert [e.input_ids for e in few["train"]] == [e.input_ids for e in full[:4]]


def test_test_split_only(tmp_path, chat_tok):
    test = write_jsonl(tmp_path / "test.jsonl", make_rows(5, 2))
    s = load_splits(cfg(train=str(tmp_path / "absent.jsonl"), validation="x", test=str(test)), chat_tok,
                    need=("test",))
    assert list(s) == ["test"] and len(s["test"]) == 5


# ------------------------------------------------------------------ batching


def test_collate_right_pads():
    a = Example([5, 6, 7], [IGNORE, 6, 7], [5], "x", "d")
    b = Example([8, 9, 10, 11, 12], [IGNORE, IGNORE, IGNORE, 11, 12], [8, 9, 10], "y", "d")
    out = collate([a, b], pad_id=3)
    assert out["input_ids"].tolist() == [[5, 6, 7, 3, 3], [8, 9, 10, 11, 12]]
    assert out["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, IGNORE], [IGNORE, IGNORE, IGNORE, 11, 12]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert all(t.dtype == torch.long for t in out.values())
