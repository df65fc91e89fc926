"""The format registry, the cache key derived from DataConfig, TRL's prompt/completion format and tool
messages through it, and the data errors a user meets first (encoding, nulls, missing columns,
1-based locations, no `datasets`/pyarrow log line before moetune's own message)."""
from __future__ import annotations

import dataclasses
import json
import logging

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import CHATML, build_tokenizer, cli, make_rows, write_jsonl
from moetune.data import formats
from moetune.data.pipeline import NOT_TOKEN_FIELDS, cache_key, load_examples
from moetune.data.rows import IGNORE, DataError, Encoder
from moetune.data.read import read_file
from moetune.data.sources import iter_sources
from moetune.recipe import FORMATS, MIX_COLUMNS, DataConfig, MixSource

torch.set_num_threads(1)

# ChatML plus OpenAI tool calls ({type, function: {name, arguments}}) and the 'tool' role.
TOOL_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\nTools: ' + (tools | tojson) + '<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m.content is defined and m.content %}{{ m.content }}{% endif %}"
    "{% if m.tool_calls is defined %}{% for c in m.tool_calls %}"
    "{{ '<tool_call>' + (c.function | tojson) + '</tool_call>' }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(chat=True)


@pytest.fixture(scope="module")
def plain_tok():
    return build_tokenizer(chat=False)


@pytest.fixture(scope="module")
def tool_tok():
    t = build_tokenizer(chat=True)
    t.chat_template = TOOL_TEMPLATE
    return t


def cfg(tmp_path, **kw) -> DataConfig:
    return DataConfig(**{"train": "unused", "validation": None, "test": None, "cache_dir": str(tmp_path / "c"), **kw})


def trained_text(tok, e) -> list[str]:
    """The decoded runs of labelled tokens."""
    runs, cur = [], []
    for t, lab in zip(e.input_ids + [None], e.labels + [IGNORE]):
        if t is not None and lab != IGNORE:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs


# ------------------------------------------------------------------ the registry and the cache key


def test_registry_matches_the_recipe_and_names_dataconfig_columns():
    assert ("auto", *formats.FORMATS) == FORMATS
    names = {f.name for f in dataclasses.fields(DataConfig)}
    for fmt in formats.FORMATS.values():
        assert set(fmt.required) <= set(fmt.fields) <= names, fmt.name
        assert set(fmt.aliases) <= set(fmt.fields)
        assert all(f.endswith("_field") for f in fmt.fields)
    # every column a format reads can be renamed per data.mix source
    used = {f[: -len("_field")] for fmt in formats.FORMATS.values() for f in fmt.fields}
    assert used <= set(MIX_COLUMNS) and "domain" in MIX_COLUMNS


def test_detection_order_and_alpaca_alias():
    c = DataConfig()
    assert formats.detect(["messages", "text"], c).name == "chat"
    assert formats.detect(["conversations"], c).name == "sharegpt"
    assert formats.detect(["instruction", "prompt", "completion"], c).name == "instruction"
    assert formats.detect(["prompt", "completion", "text"], c).name == "prompt_completion"
    assert formats.detect(["prompt", "text"], c).name == "text"
    assert formats.detect(["q"], DataConfig(format="text")).name == "text"
    with pytest.raises(DataError, match=r"cannot tell the format from the columns \(q, a\)"):
        formats.detect(["q", "a"], c)
    inst = formats.FORMATS["instruction"]
    assert inst.resolve(["instruction", "input", "output"], c).response_field == "output"
    assert inst.resolve(["instruction", "response", "output"], c).response_field == "response"
    assert inst.resolve(["instruction", "output"], DataConfig(response_field="answer")).response_field == "answer"


def _other(v):
    """A different value of the same kind."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, (int, float)):
        return v + 1
    if isinstance(v, str):
        return v + "_x"
    if v is None:
        return "x"
    if isinstance(v, list):
        return v + [MixSource(path="x")]
    raise AssertionError(f"no other value for {v!r}")


def test_cache_key_covers_every_token_shaping_field():
    base = DataConfig()
    names = [f.name for f in dataclasses.fields(DataConfig)]
    assert set(NOT_TOKEN_FIELDS) <= set(names), "NOT_TOKEN_FIELDS names a field DataConfig does not have"
    ref = cache_key(["src"], "tok", base, None)
    assert cache_key(["src"], "tok", DataConfig(), None) == ref
    for name in names:
        changed = cache_key(["src"], "tok", dataclasses.replace(base, **{name: _other(getattr(base, name))}), None)
        assert (changed == ref) == (name in NOT_TOKEN_FIELDS), name
    # the old hand-kept list is a subset of what is keyed now
    for name in ("format", "instruction_field", "input_field", "response_field", "messages_field",
                 "conversations_field", "text_field", "domain_field", "template", "system_prompt", "max_length",
                 "mask_history", "skip_bad_rows", "prompt_field", "completion_field"):
        assert name not in NOT_TOKEN_FIELDS
    assert cache_key(["src2"], "tok", base, None) != ref and cache_key(["src"], "tok2", base, None) != ref
    assert cache_key(["src"], "tok", base, "math") != ref


def test_excluded_fields_really_leave_the_tokens_alone(tmp_path, tok):
    p = write_jsonl(tmp_path / "t.jsonl", make_rows(8, 1))
    ref = [dataclasses.asdict(e) for e in load_examples(str(p), tok, cfg(tmp_path))]
    for kw in ({"packing": True}, {"group_by_length": True}, {"seed": 5}, {"validation_split": 0.2},
               {"max_train_examples": 3}, {"num_proc": 2}, {"hub_split": "other"}):
        es = load_examples(str(p), tok, cfg(tmp_path, **kw))
        assert [dataclasses.asdict(e) for e in es] == ref, kw
    assert len(list((tmp_path / "c").iterdir())) == 1  # one cache entry served them all


# ------------------------------------------------------------------ prompt / completion


def test_plain_prompt_completion_trains_the_completion_only_without_a_template(tmp_path, tok, plain_tok):
    rows = [{"prompt": "The sky is", "completion": " blue."}, {"prompt": "Add 1 and 2:", "completion": " 3"}]
    p = write_jsonl(tmp_path / "pc.jsonl", rows)
    for t in (tok, plain_tok):
        es = load_examples(str(p), t, cfg(tmp_path))
        assert es.info["format"] == "prompt_completion"
        for e, r in zip(es, rows):
            prompt = t(r["prompt"])["input_ids"]            # the raw text: no chat template, no '### Instruction'
            completion = t(r["completion"] + t.eos_token, add_special_tokens=False)["input_ids"]
            assert e.input_ids == prompt + completion
            assert e.labels == [IGNORE] * len(prompt) + completion
            assert e.prompt_ids == prompt and e.reference == r["completion"]
            assert "<|im_start|>" not in t.decode(e.input_ids)


def test_conversational_prompt_completion(tmp_path, tok):
    prompt = [{"role": "system", "content": "Be loud."}, {"role": "user", "content": "Shout red"}]
    completion = [{"role": "assistant", "content": "RED"}]
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": prompt, "completion": completion}])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": prompt + completion}])
    a = [dataclasses.asdict(e) for e in load_examples(str(pc), tok, cfg(tmp_path))]
    assert a == [dataclasses.asdict(e) for e in load_examples(str(chat), tok, cfg(tmp_path))]
    # an assistant turn inside the prompt is context: the chat format trains it, prompt/completion does not
    history = [{"role": "user", "content": "Shout red"}, {"role": "assistant", "content": "RED"},
               {"role": "user", "content": "Shout blue"}]
    pc2 = write_jsonl(tmp_path / "pc2.jsonl", [{"prompt": history, "completion": [{"role": "assistant",
                                                                                     "content": "BLUE"}]}])
    chat2 = write_jsonl(tmp_path / "chat2.jsonl", [{"messages": history + [{"role": "assistant", "content": "BLUE"}]}])
    (e,), (c,) = load_examples(str(pc2), tok, cfg(tmp_path)), load_examples(str(chat2), tok, cfg(tmp_path))
    assert e.input_ids == c.input_ids
    assert tok.decode(e.input_ids) == tok.apply_chat_template(history + [{"role": "assistant", "content": "BLUE"}],
                                                              tokenize=False)
    assert [r.rstrip("\n") for r in trained_text(tok, e)] == ["BLUE<|im_end|>"]
    assert [r.rstrip("\n") for r in trained_text(tok, c)] == ["RED<|im_end|>", "BLUE<|im_end|>"]


def test_prompt_completion_errors_name_the_row(tmp_path, tok):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}]
    p = tmp_path / "mixed.json"
    p.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"mixed.json item 2 \(counting from 1\): 'completion' is a list, but text in "
                                        r".*mixed.json item 1 \(counting from 1\)\. A column must hold one kind"):
        load_examples(str(p), tok, cfg(tmp_path))
    p.write_text(json.dumps(rows[1:]))
    with pytest.raises(DataError, match=r"mixed.json item 1 \(counting from 1\): 'prompt' and 'completion' must "
                                        r"both be text \(plain\) or both lists of messages"):
        load_examples(str(p), tok, cfg(tmp_path))
    p2 = write_jsonl(tmp_path / "u.jsonl", [{"prompt": [{"role": "user", "content": "x"}],
                                            "completion": [{"role": "user", "content": "y"}]}])
    with pytest.raises(DataError, match="u.jsonl line 1: the last completion message must be the assistant's"):
        load_examples(str(p2), tok, cfg(tmp_path))


# ------------------------------------------------------------------ tool messages

CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOLS_CHAT = [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "tool_calls": [CALL]},
              {"role": "tool", "name": "get_weather", "content": "22 C, sunny"},
              {"role": "assistant", "content": "It is 22 C and sunny."}]


def test_tool_calls_and_results_render_and_only_assistant_turns_train(tmp_path, tool_tok):
    plain = {"messages": [{"role": "user", "content": "Shout red"}, {"role": "assistant", "content": "RED"}]}
    # arguments as OpenAI's JSON text in one row; Arrow gives the other rows' messages null tool keys
    as_text = json.loads(json.dumps(TOOLS_CHAT))
    as_text[1]["tool_calls"][0]["function"]["arguments"] = '{"city": "Paris"}'
    p = write_jsonl(tmp_path / "tools.jsonl", [{"messages": TOOLS_CHAT}, plain, {"messages": as_text}])
    a, b, c = load_examples(str(p), tool_tok, cfg(tmp_path))
    text = tool_tok.apply_chat_template(TOOLS_CHAT, tokenize=False)
    assert tool_tok.decode(a.input_ids) == text == tool_tok.decode(c.input_ids)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    runs = [r.rstrip("\n") for r in trained_text(tool_tok, a)]
    assert runs == ['<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>',
                    "It is 22 C and sunny.<|im_end|>"]
    untrained = tool_tok.decode([t for t, lab in zip(a.input_ids, a.labels) if lab == IGNORE])
    assert "22 C, sunny" in untrained and "<|im_start|>tool" in untrained
    assert tool_tok.decode(b.input_ids) == tool_tok.apply_chat_template(plain["messages"], tokenize=False)
    assert a.reference == "It is 22 C and sunny."


def test_tool_messages_a_template_cannot_render_name_the_row(tmp_path, tok, plain_tok):
    hello = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    p = write_jsonl(tmp_path / "t.jsonl", [hello, {"messages": TOOLS_CHAT}])
    assert tok.chat_template == CHATML  # renders m['content'], which a tool-call message does not have
    with pytest.raises(DataError, match=r"t.jsonl line 2: the chat template cannot render this conversation"):
        load_examples(str(p), tok, cfg(tmp_path))
    # a template that drops tool calls silently is caught too
    dropping = build_tokenizer(chat=True)
    dropping.chat_template = TOOL_TEMPLATE.replace("{% if m.tool_calls is defined %}", "{% if false %}")
    with pytest.raises(DataError, match=r"t.jsonl line 2: the chat template of this tokenizer does not render tool "
                                        r"calls \(the call to 'get_weather'"):
        load_examples(str(p), dropping, cfg(tmp_path))
    with pytest.raises(DataError, match="t.jsonl line 2: tool definitions, calls and results need a chat template"):
        load_examples(str(p), plain_tok, cfg(tmp_path))
    es = load_examples(str(p), plain_tok, cfg(tmp_path, skip_bad_rows=True))
    assert len(es) == 1 and es.info["bad_rows"] == 1


def _tool(name: str, arg: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": f"{name} tool",
                                             "parameters": {"type": "object", "properties": {arg: {"type": "string"}},
                                                            "required": [arg]}}}


def test_tools_column_goes_to_the_template_untrained(tmp_path, tool_tok):
    weather, search = _tool("get_weather", "city"), _tool("search", "query")
    rows = [{"messages": TOOLS_CHAT, "tools": [weather]},
            {"messages": TOOLS_CHAT, "tools": json.dumps([weather])},        # the list as JSON text
            {"messages": TOOLS_CHAT[:1] + [{"role": "assistant", "content": "No."}], "tools": [search]},
            {"messages": TOOLS_CHAT[:1] + [{"role": "assistant", "content": "No."}]}]
    p = tmp_path / "tools.json"
    p.write_text(json.dumps(rows[::2] + [rows[3]]))  # .json: Arrow unifies the two schemas' properties
    q = write_jsonl(tmp_path / "tools.jsonl", rows[1:2])
    a, c, d = load_examples(str(p), tool_tok, cfg(tmp_path, max_length=2048))
    (b,) = load_examples(str(q), tool_tok, cfg(tmp_path, max_length=2048))
    assert a.input_ids == b.input_ids
    assert tool_tok.decode(a.input_ids) == tool_tok.apply_chat_template(TOOLS_CHAT, tools=[weather], tokenize=False)
    text_c = tool_tok.decode(c.input_ids)
    assert text_c == tool_tok.apply_chat_template(rows[2]["messages"], tools=[search], tokenize=False)
    assert "city" not in text_c and "null" not in text_c    # no key of the other row's schema leaks in
    assert "Tools:" not in tool_tok.decode(d.input_ids)
    assert not any("Tools:" in r or "get_weather tool" in r for r in trained_text(tool_tok, a))
    # a template that ignores `tools` is caught, naming the row
    ignoring = build_tokenizer(chat=True)
    ignoring.chat_template = TOOL_TEMPLATE.replace("{% if tools %}", "{% if false %}")
    with pytest.raises(DataError, match=r"tools.json item 1 \(counting from 1\): the chat template of this "
                                        r"tokenizer does not render tool definitions \(the 'tools' column; "
                                        r"'get_weather' is not"):
        load_examples(str(p), ignoring, cfg(tmp_path))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": TOOLS_CHAT, "tools": "get_weather"}])
    with pytest.raises(DataError, match=r"bad.jsonl line 1: 'tools' is text but not JSON"):
        load_examples(str(bad), tool_tok, cfg(tmp_path))


def test_tool_message_shapes_are_checked(tmp_path, tool_tok):
    bad = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}]
    p = write_jsonl(tmp_path / "b.jsonl", [{"messages": bad}])
    with pytest.raises(DataError, match=r"b.jsonl line 1: message 1 tool call 0 must be \{'type': 'function'"):
        load_examples(str(p), tool_tok, cfg(tmp_path))
    bad[1] = {"role": "user", "tool_calls": [CALL], "content": "x"}
    with pytest.raises(DataError, match="message 1: 'tool_calls' must be a list, on an assistant message"):
        load_examples(str(write_jsonl(tmp_path / "c.jsonl", [{"messages": bad}])), tool_tok, cfg(tmp_path))


# ------------------------------------------------------------------ errors


def test_non_utf8_files_name_file_line_and_byte(tmp_path, tok, monkeypatch, capsys):
    row = json.dumps({"instruction": "café", "response": "x"}, ensure_ascii=False)
    good = json.dumps({"instruction": "a", "response": "b"})
    p = tmp_path / "latin1.jsonl"
    p.write_bytes((good + "\n" + row + "\n").encode("latin-1"))
    with pytest.raises(DataError) as ei:
        load_examples(str(p), tok, cfg(tmp_path))
    offset = len(good) + 1 + row.index("é")
    msg = str(ei.value)
    assert msg.startswith(f"{p} line 2 (byte {offset}: 0xe9): not UTF-8 text.")
    assert "iconv -f cp1252 -t utf-8" in msg and "latin1-utf8.jsonl" in msg
    for name, text in (("l.json", json.dumps([{"instruction": "a", "response": "b"},
                                              {"instruction": "café", "response": "x"}], indent=1,
                                             ensure_ascii=False)),
                       ("l.csv", "instruction,response\na,b\ncafé,x\n")):
        f = tmp_path / name
        f.write_bytes(text.encode("latin-1"))
        with pytest.raises(DataError, match=rf"{name} line (3|7) \(byte \d+: 0xe9\): not UTF-8 text"):
            load_examples(str(f), tok, cfg(tmp_path))
    # validate: one paragraph, exit 2, no traceback
    code = cli(monkeypatch, "validate", "recipes/default.yaml", f"data.train={p}", "data.validation=null",
               "data.test=null", "eval.split=validation")
    err = capsys.readouterr().err
    assert code == 2 and "not UTF-8 text" in err and "line 2" in err and "Traceback" not in err


def test_null_and_missing_values_are_told_apart(tmp_path, tok):
    p = tmp_path / "n.jsonl"
    p.write_text(json.dumps({"instruction": "a", "response": "b"}) + "\n" +
                 json.dumps({"instruction": "a", "response": None, "domain": "x"}) + "\n")
    with pytest.raises(DataError, match=r"n.jsonl line 2: 'response' is null\."):
        load_examples(str(p), tok, cfg(tmp_path))
    p.write_text(json.dumps({"instruction": "a", "response": "b"}) + "\n" + json.dumps({"instruction": "a"}) + "\n")
    with pytest.raises(DataError, match=r"n.jsonl line 2: missing key 'response' \(row keys: instruction\)\."):
        load_examples(str(p), tok, cfg(tmp_path))
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": None, "text": "x"}])
    with pytest.raises(DataError, match=r"c.jsonl line 1: 'messages' is null"):
        load_examples(str(chat), tok, cfg(tmp_path, format="chat"))


def test_alpaca_row_without_output_names_output_and_only_its_own_keys(tmp_path, tok, monkeypatch, capsys):
    rows = [{"instruction": "Shout red", "input": "", "output": "RED"}, {"instruction": "Shout blue", "input": ""}]
    p = tmp_path / "alpaca.json"
    p.write_text(json.dumps(rows, indent=1))
    want = (f"{p} item 2 (counting from 1): missing key 'output' (row keys: instruction, input). If that column "
            "has another name here, set data.response_field to it.")
    with pytest.raises(DataError) as ei:
        load_examples(str(p), tok, cfg(tmp_path))
    assert str(ei.value) == want
    code = cli(monkeypatch, "validate", "recipes/default.yaml", f"data.train={p}", "data.validation=null",
               "data.test=null", "eval.split=validation")
    assert code == 2 and want in " ".join(capsys.readouterr().err.split())


def test_locations_count_from_one_everywhere(tmp_path, tok):
    rows = make_rows(3, 0)
    del rows[0]["response"]
    pq.write_table(pa.Table.from_pylist(rows[::-1]), tmp_path / "r.parquet")
    (tmp_path / "r.json").write_text(json.dumps(rows))
    write_jsonl(tmp_path / "r.jsonl", rows)
    datasets.Dataset.from_list(rows[::-1]).save_to_disk(str(tmp_path / "saved"))
    for name, where in (("r.json", "item 1 (counting from 1)"), ("r.jsonl", "line 1"),
                        ("r.parquet", "row 3 (counting from 1)"), ("saved", "row 3 (counting from 1)")):
        with pytest.raises(DataError, match=rf"{name} {where.replace('(', '[(]').replace(')', '[)]')}: "):
            load_examples(str(tmp_path / name), tok, cfg(tmp_path))
    assert [loc.split("/")[-1] for _, loc in read_file(tmp_path / "r.json")] == [
        f"r.json item {i} (counting from 1)" for i in (1, 2, 3)]
    assert [(r["instruction"], loc.split("/")[-1]) for r, loc in read_file(tmp_path / "saved")] == [
        (r["instruction"], f"saved row {i} (counting from 1)") for i, r in enumerate(rows[::-1], 1)]


def test_bad_json_prints_no_datasets_or_pyarrow_line(tmp_path, tok):
    """`datasets` logs pyarrow's parse error ('Failed to load JSON ... ArrowInvalid') before moetune's own."""
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "a", "response": \n')
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("datasets")
    logger.addHandler(handler)
    try:
        with pytest.raises(DataError, match=r"bad.jsonl line 2: not valid JSON"):
            load_examples(str(p), tok, cfg(tmp_path))
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if r.levelno >= logging.WARNING], [r.getMessage() for r in records]


def test_a_column_of_mixed_kinds_names_the_row(tmp_path, tok):
    p = tmp_path / "k.json"
    p.write_text(json.dumps([{"instruction": "a", "response": "b"}, {"instruction": "c", "response": 3}]))
    with pytest.raises(DataError, match=r"k.json item 2 \(counting from 1\): 'response' is a number, but text in "
                                        r".*k.json item 1 \(counting from 1\)\. A column must hold one kind of value "
                                        r"in every row \(e.g. quote numbers"):
        load_examples(str(p), tok, cfg(tmp_path))
    q = write_jsonl(tmp_path / "k.jsonl", [{"instruction": "a", "response": "b"},
                                           {"instruction": "d", "response": [1]}])
    with pytest.raises(DataError, match=r"k.jsonl line 2: 'response' must be text, got list"):
        load_examples(str(q), tok, cfg(tmp_path))


def test_json_columns_are_the_union_of_every_rows_keys(tmp_path, tok):
    rows = [{"instruction": "Shout red", "response": "RED"},
            {"instruction": "Shout blue", "input": "loudly", "response": "BLUE"}]
    p = tmp_path / "u.json"
    p.write_text(json.dumps(rows))
    es = load_examples(str(p), tok, cfg(tmp_path))
    assert "loudly" in tok.decode(es[1].prompt_ids) and "loudly" not in tok.decode(es[0].prompt_ids)


def test_byte_order_mark_is_skipped(tmp_path, tok):
    ref = [dataclasses.asdict(e) for e in
           load_examples(str(write_jsonl(tmp_path / "r.jsonl", make_rows(2, 0))), tok, cfg(tmp_path))]
    p = tmp_path / "bom.csv"
    p.write_bytes(b"\xef\xbb\xbfinstruction,response,domain\n" + "".join(
        f"{r['instruction']},{r['response']},{r['domain']}\n" for r in make_rows(2, 0)).encode())
    assert [dataclasses.asdict(e) for e in load_examples(str(p), tok, cfg(tmp_path))] == ref


# ------------------------------------------------------------------ the recipe's sources


def test_iter_sources_walks_mix_and_splits():
    c = DataConfig(train="t.jsonl", validation="v.jsonl", test=None,
                   mix=[MixSource(path="a.jsonl", columns={"prompt": "q", "completion": "a"}, domain="qa"),
                        MixSource(path="b.jsonl", format="sharegpt")])
    parts = list(iter_sources(c, ("train", "validation", "test")))
    assert [(p.key, p.spec, p.split, p.domain) for p in parts] == [
        ("mix[0]", "a.jsonl", "train", "qa"), ("mix[1]", "b.jsonl", "train", None),
        ("validation", "v.jsonl", "validation", None)]
    assert (parts[0].cfg.prompt_field, parts[0].cfg.completion_field, parts[0].cfg.mix) == ("q", "a", [])
    assert parts[1].cfg.format == "sharegpt" and parts[2].cfg is c
    assert [p.key for p in iter_sources(dataclasses.replace(c, mix=[]))] == ["train"]


def test_validate_counts_prompt_completion_mix_and_skipped_rows(tiny_llama, tmp_path, monkeypatch, capsys):
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"q": "a", "a": "b"}, {"q": "c", "a": None}, {"q": "e", "a": "f"}])
    mix = f"data.mix=[{{path: {pc}, columns: {{prompt: q, completion: a}}}}]"
    common = ["validate", "recipes/default.yaml", f"model.path={tiny_llama}", "data.validation=null",
              "data.test=null", "eval.split=validation", mix]
    assert cli(monkeypatch, *common) == 2
    assert "pc.jsonl line 2: 'a' is null" in capsys.readouterr().err
    assert cli(monkeypatch, *common, "data.skip_bad_rows=true") in (0, None)
    line = next(x for x in capsys.readouterr().err.splitlines() if "data.mix[0]" in x)
    assert line.split("│")[2].strip() == "2 rows"
