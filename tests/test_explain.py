"""`moetune explain`: every key of every section and of every expert type (issue 28, bug 6), one key, one
section, one type; and the names people bring from other tools (axolotl, LLaMA-Factory, TRL, transformers'
TrainingArguments) answered with moetune's key, never accepted silently (issue 28, did-you-mean)."""
from __future__ import annotations

import dataclasses
import sys

import pytest

from moetune.core.schema import allowed_text, field_docs, schema_keys
from moetune.recipe import MixSource, Recipe, RecipeError, explain, load_recipe
from moetune.recipe.aliases import FOREIGN_KEYS, FOREIGN_VALUES
from moetune.recipe.experts import EXPERT_CONFIGS, ExpertConfig
from cli_main import run_main as _main



def _entries(text: str) -> dict[str, list[tuple[str, str]]]:
    """Dotted key -> [(the text after ' = ' on its line, the docstring line under it)] for each entry of `text`."""
    lines = text.splitlines()
    out: dict[str, list[tuple[str, str]]] = {}
    for line, doc in zip(lines, lines[1:] + [""]):
        if line.startswith("  ") and not line.startswith("   ") and " = " in line:
            key, rest = line.strip().split(" = ", 1)
            out.setdefault(key, []).append((rest, doc.strip()))
    return out


def _entry(value, f: dataclasses.Field) -> str:
    allowed = allowed_text(f)
    return f"{value!r}" + (f"  [{allowed}]" if allowed else "")


def _sections():
    """(prefix, settings class, instance) of every section of the recipe but `expert`, and data.mix[i]."""
    recipe = Recipe()
    for name, cls in schema_keys(Recipe).items():
        if cls is not None and name != "expert":
            yield f"{name}.", cls, getattr(recipe, name)
    yield "data.mix[i].", MixSource, MixSource()


def _type_fields(etype: str):
    cls = EXPERT_CONFIGS[etype]
    inst = cls(type=etype)
    for f in dataclasses.fields(cls):
        yield f, getattr(inst, f.name), field_docs(cls)[f.name]


def test_every_field_of_every_config_class_is_explained():
    """Every field of every section class, of every expert type's settings class and of data.mix[i] is in the
    full reference with its default (the type's own), allowed values and docstring."""
    entries = _entries(explain())
    for prefix, cls, inst in _sections():
        for f in dataclasses.fields(cls):
            key = prefix + f.name
            assert (_entry(getattr(inst, f.name), f), field_docs(cls)[f.name]) in entries.get(key, []), key
    for etype in EXPERT_CONFIGS:
        for f, value, doc in _type_fields(etype):
            key = f"expert.{f.name}"
            want = (_entry(value, f), doc)
            if f.name == "type":  # one entry, the default type and every type allowed
                want = (f"'lora'  [one of {', '.join(map(repr, EXPERT_CONFIGS))}]", doc)
            assert want in entries.get(key, []), (etype, key)
    for top in ("output_dir", "stages"):
        assert top in entries, top


def test_type_specific_keys_are_grouped_by_type():
    text = explain()
    for etype, cls in EXPERT_CONFIGS.items():
        assert f"\nexpert.{etype}:" in text, etype
    # expert.num_experts: one entry per routed type, each with its own default
    defaults = {rest.split()[0] for rest, _ in _entries(text)["expert.num_experts"]}
    assert defaults == {"3", "4"}
    hydra = text.split("\nexpert.hydralora:", 1)[1].split("\nexpert.molora:", 1)[0]
    assert "  expert.num_experts = 3  [a number >= 1]" in hydra
    assert "Number N of B heads sharing one A" in hydra
    lora = text.split("\nexpert.lora:", 1)[1].split("\nexpert.hydralora:", 1)[0]
    for variant in ("expert.use_dora", "expert.init", "train.lora_plus_ratio", "expert.use_rslora"):
        assert variant in lora, variant


@pytest.mark.parametrize("etype", list(EXPERT_CONFIGS))
def test_explain_one_type_lists_every_key_that_applies(etype):
    for query in (f"expert.{etype}", etype):
        text = explain(query)
        entries = _entries(text)
        want = {f"expert.{f.name}" for f, _, _ in _type_fields(etype)}
        assert set(entries) == want, query
        for f, value, doc in _type_fields(etype):
            rest, line = entries[f"expert.{f.name}"][0]
            assert line == doc
            if f.name != "type":
                assert rest == _entry(value, f), f.name
    if etype == "lora":  # LoRA+ is a train key: named beside the type's keys
        assert "train.lora_plus_ratio" in explain("expert.lora")


def test_explain_one_key():
    text = explain("train.lr")
    assert _entries(text) == {"train.lr": [("0.0002  [a number > 0]", "Peak learning rate.")]}
    assert _entries(explain("output_dir")).keys() == {"output_dir"}
    assert _entries(explain("data.mix[i].weight")).keys() == {"data.mix[i].weight"}
    # a key of several expert types: each type's default and docstring, the types named
    text = explain("expert.num_experts")
    assert [r.split()[0] for r, _ in _entries(text)["expert.num_experts"]] == ["3", "4", "4"]
    assert "hydralora" in text and "molora" in text and "mov" in text
    assert _entries(explain("expert.use_dora")).keys() == {"expert.use_dora"}
    assert _entries(explain("expert.rank"))["expert.rank"][0][0] == "8  [a number >= 1]"


def test_explain_one_section():
    text = explain("train")
    keys = set(_entries(text))
    assert keys == {f"train.{f.name}" for f in dataclasses.fields(Recipe().train)}
    assert set(_entries(explain("data.mix"))) == {f"data.mix[i].{f.name}" for f in dataclasses.fields(MixSource)}
    shared = {f"expert.{f.name}" for f in dataclasses.fields(ExpertConfig)}
    assert shared < set(_entries(explain("expert")))
    assert "expert.num_experts" in _entries(explain("expert"))


def test_explain_unknown_key_suggests():
    with pytest.raises(RecipeError, match=r"train\.lrr.*Did you mean 'train\.lr'"):
        explain("train.lrr")
    with pytest.raises(RecipeError, match="hydralora"):
        explain("expert.hydra")


def test_explain_a_foreign_name_explains_moetune_key():
    text = explain("learning_rate")
    assert "train.lr" in text.splitlines()[0]
    assert set(_entries(text)) == {"train.lr"}


def test_cli_explain_key_section_type_and_errors(monkeypatch, capsys):
    code, out, err = _main(monkeypatch, capsys, "explain", "train.lr")
    assert code == 0, err
    assert out.strip() == explain("train.lr").strip()
    code, out, err = _main(monkeypatch, capsys, "explain", "expert.hydralora")
    assert code == 0 and "expert.num_experts = 3" in out
    code, out, err = _main(monkeypatch, capsys, "explain", "aliases")
    assert code == 0 and "learning_rate" in out and "train.lr" in out
    code, out, err = _main(monkeypatch, capsys, "explain", "train.lrr")
    assert code == 2 and "Did you mean 'train.lr'" in err and "Traceback" not in err


# ------------------------------------------------------------------ names from other tools


@pytest.mark.parametrize("name", sorted(FOREIGN_KEYS))
def test_foreign_key_names_are_refused_with_moetune_key(name):
    """At the top level and inside a section alike: an error naming moetune's key (or flag)."""
    ours = FOREIGN_KEYS[name][0]
    for override in (f"{name}=1", f"train.{name}=1", f"expert.{name}=1"):
        with pytest.raises(RecipeError) as e:
            load_recipe(None, [override])
        msg = str(e.value)
        assert f"Unknown recipe key '{override.split('=')[0]}'" in msg
        assert ours in msg, (override, msg)


def test_foreign_key_targets_exist():
    """Every alias names a real recipe key (or a command-line flag), and no alias is a name moetune uses
    itself (a name of another section is found by the key index: `train.output_dir` -> `output_dir`)."""
    from moetune.recipe.reference import key_index
    index = key_index(Recipe)
    keys = {k for ks in index.values() for k in ks}
    assert not set(FOREIGN_KEYS) & set(index)
    for name, (ours, _) in FOREIGN_KEYS.items():
        for target in ours.split(" + "):
            target = target.split("=")[0]
            assert target.startswith("--") or target in keys, (name, target)


@pytest.mark.parametrize("override, ours", [
    ("learning_rate=1e-4", "train.lr"), ("num_train_epochs=3", "train.epochs"),
    ("per_device_train_batch_size=4", "train.batch_size"), ("gradient_accumulation_steps=4", "train.grad_accum"),
    ("lora_r=16", "expert.rank"), ("lora_alpha=32", "expert.alpha"), ("lora_dropout=0.1", "expert.dropout"),
    ("lora_target_modules=[q_proj]", "expert.target_modules"), ("warmup_ratio=0.1", "train.warmup_steps"),
    ("max_seq_length=512", "data.max_length"), ("bf16=true", "train.precision=bf16"),
    ("train.output_dir=x", "output_dir"), ("expert.r=8", "expert.rank"), ("model_name_or_path=m", "model.path"),
    ("load_in_4bit=true", "model.quantization=nf4")])
def test_named_foreign_keys(override, ours):
    with pytest.raises(RecipeError) as e:
        load_recipe(None, [override])
    assert ours in str(e.value) and "Unknown recipe key" in str(e.value)


def test_key_in_another_section_is_named():
    with pytest.raises(RecipeError, match=r"Unknown recipe key 'lr'.*'train\.lr'"):
        load_recipe(None, ["lr=1e-3"])
    with pytest.raises(RecipeError, match=r"Unknown recipe key 'expert\.lr'.*'train\.lr'"):
        load_recipe(None, ["expert.lr=1e-3"])


def test_key_of_another_expert_type_is_named():
    with pytest.raises(RecipeError) as e:
        load_recipe(None, ["expert.num_experts=4"])
    msg = str(e.value)
    assert "expert.num_experts" in msg and "hydralora, molora, mov" in msg and "'lora'" in msg


@pytest.mark.parametrize("override, want", [("stages=[train,evaluate]", "'eval'"), ("stages=[training]", "'train'"),
                                            ("train.optimizer=adamw_torch", "'adamw'"),
                                            ("train.precision=bfloat16", "'bf16'"),
                                            ("train.scheduler=constant_with_warmup", "'constant'"),
                                            ("data.format=alpaca", "'instruction'"), ("expert.type=qlora", "'lora'")])
def test_foreign_values_suggest_ours(override, want):
    with pytest.raises(RecipeError) as e:
        load_recipe(None, [override])
    msg = str(e.value)
    assert f"Did you mean {want}" in msg or f"moetune's is {want}" in msg, msg


def test_foreign_value_table_values_are_allowed():
    for key, table in FOREIGN_VALUES.items():
        section, name = key.split(".") if "." in key else ("", key)
        if key == "expert.type":
            choices = tuple(EXPERT_CONFIGS)
        else:
            cls = Recipe if not section else schema_keys(Recipe)[section]
            choices = next(f for f in dataclasses.fields(cls) if f.name == name).metadata["choices"]
        for theirs, ours in table.items():
            assert ours in choices and theirs not in choices, (key, theirs)


def test_a_schedule_moetune_lacks_gets_no_guess():
    with pytest.raises(RecipeError) as e:
        load_recipe(None, ["train.scheduler=cosine_with_restarts"])
    assert "Did you mean" not in str(e.value) and "one of 'cosine', 'linear', 'constant'" in str(e.value)
