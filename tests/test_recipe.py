"""Recipes: every shipped recipe loads; overrides; one clear RecipeError per mistake; the CLI;
`explain` documents every key; target-module selection; model path resolution."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import ROOT, build_model, tiny_overrides
from moetune.core.schema import field_docs, schema_keys
from moetune.experts import REGISTRY, config_class
from moetune.models.load import ModelError, find_targets, load_tokenizer, resolve_path
from moetune.recipe import ModelConfig, Recipe, RecipeError, explain, load_recipe
from cli_main import run_main as _main

torch.set_num_threads(1)

DEFAULT = ROOT / "recipes" / "default.yaml"
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.fixture
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name their data relative to the repository root
    return ROOT


# ------------------------------------------------------------------ shipped recipes


def test_recipes_exist():
    assert DEFAULT in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads(path, in_root, monkeypatch):
    r = load_recipe(path)  # 4-bit recipes too: they run on CPU as well
    assert isinstance(r, Recipe)
    assert r.expert.type in REGISTRY
    assert isinstance(r.expert, config_class(r.expert.type))
    assert r.stages and len(set(r.stages)) == len(r.stages)


def test_default_recipe_values(in_root):
    r = load_recipe(DEFAULT)
    assert r.model.path == "smollm2-135m-instruct"
    assert r.expert.type == "lora" and r.expert.rank == 16 and r.expert.alpha == 32.0
    assert r.train.lr == 2.0e-3 and r.data.max_length == 96
    assert r.stages == ["train", "merge", "eval", "export"]


# ------------------------------------------------------------------ overrides


def test_overrides_apply_and_convert(in_root):
    r = load_recipe(DEFAULT, ["train.lr=1e-4", "train.batch_size=3", "train.epochs=2", "expert.dropout=0.1",
                              "data.validation=null", "eval.generation=false", "expert.target_modules=[q_proj,v_proj]",
                              "stages=[train,eval]", "output_dir=runs/x"])
    assert r.train.lr == 1e-4 and isinstance(r.train.lr, float)
    assert r.train.batch_size == 3 and isinstance(r.train.batch_size, int)
    assert r.train.epochs == 2.0 and isinstance(r.train.epochs, float)
    assert r.expert.dropout == 0.1
    assert r.data.validation is None
    assert r.eval.generation is False
    assert r.expert.target_modules == ["q_proj", "v_proj"]
    assert r.stages == ["train", "eval"]
    assert r.output_dir == "runs/x"
    assert r.expert.rank == 16  # untouched keys keep the recipe's value


def test_no_recipe_file_gives_defaults():
    r = load_recipe(None, ["stages=[eval]", "data.test=null", "eval.split=validation"])
    assert r.train == Recipe().train and r.stages == ["eval"]


# ------------------------------------------------------------------ errors


def _err(overrides, path=DEFAULT) -> str:
    with pytest.raises(RecipeError) as ei:
        load_recipe(path, overrides)
    return str(ei.value)


@pytest.mark.parametrize("override, key, suggestion", [
    ("trian.lr=1", "'trian'", "Did you mean 'train'?"),
    ("train.lrr=1", "'train.lrr'", "Did you mean 'train.lr'?"),
    ("expert.rnak=4", "'expert.rnak'", "Did you mean 'expert.rank'?"),
    ("data.max_lenght=4", "'data.max_lenght'", "Did you mean 'data.max_length'?"),
])
def test_unknown_key_did_you_mean(in_root, override, key, suggestion):
    msg = _err([override])
    assert "Unknown recipe key" in msg and key in msg and suggestion in msg


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("router:\n  temprature: 2.0\nstages: [eval]\ndata:\n  test: null\neval:\n  split: validation\n")
    msg = _err([], p)
    assert "'router.temprature'" in msg and "Did you mean 'router.temperature'?" in msg


def test_section_must_be_mapping(in_root):
    assert "'train' must be a section" in _err(["train=3"])


def test_unknown_expert_type(in_root):
    msg = _err(["expert.type=lroa"])
    assert "'expert.type'" in msg and "'lroa'" in msg and "Did you mean 'lora'?" in msg and "Allowed: lora" in msg


@pytest.mark.parametrize("override, key, allowed", [
    ("train.lr=abc", "'train.lr'", "'abc'"),
    ("train.batch_size=1.5", "'train.batch_size'", "Integer"),
    ("train.eval_before=maybe", "'train.eval_before'", "bool"),
])
def test_wrong_type(in_root, override, key, allowed):
    msg = _err([override])
    assert key in msg and allowed in msg


@pytest.mark.parametrize("override, key, allowed", [
    ("train.batch_size=0", "'train.batch_size'", ">= 1"),
    ("expert.dropout=2", "'expert.dropout'", ">= 0 and <= 1"),
    ("train.lr=0", "'train.lr'", "> 0"),
    ("data.validation_split=0.9", "'data.validation_split'", "<= 0.5"),
])
def test_out_of_range(in_root, override, key, allowed):
    msg = _err([override])
    assert key in msg and allowed in msg


def test_bad_choice(in_root):
    msg = _err(["train.optimizer=adam"])
    assert "'train.optimizer'" in msg and "'adam'" in msg and "'adamw'" in msg and "'sgd'" in msg
    msg = _err(["stages=[train,evaluate]"])
    assert "'stages'" in msg and "'eval'" in msg


def test_error_carries_field_doc(in_root):
    assert "Examples per micro-batch" in _err(["train.batch_size=0"])


def test_missing_data_file(in_root):
    msg = _err(["data.train=data/nope.jsonl"])
    assert "'data.train'" in msg and "data/nope.jsonl" in msg and "does not exist" in msg
    msg = _err(["data.validation=data/nope.jsonl"])
    assert "'data.validation'" in msg and "or null" in msg
    # data is only required by the train stage
    load_recipe(DEFAULT, ["data.train=data/nope.jsonl", "stages=[eval]"])


def test_4bit_recipes_load_on_any_machine(in_root):
    """A 4-bit base is not tied to CUDA any more: nf4/fp4 recipes load for CPU and auto alike."""
    for extra in ([], ["model.device=cpu"], ["model.quantization=fp4", "model.double_quantization=false"]):
        r = load_recipe(DEFAULT, ["model.quantization=nf4", "merge.dequantize=true", *extra])
        assert r.model.quantization in ("nf4", "fp4") and r.merge.dequantize
    assert load_recipe(DEFAULT, ["model.quantization=fp4", "model.double_quantization=false"]
                       + ["merge.dequantize=true"]).model.double_quantization is False
    msg = _err(["model.quantization=int4"])
    assert "'model.quantization'" in msg and "nf4" in msg and "fp4" in msg


def test_merge_into_4bit_needs_dequantize(in_root):
    msg = _err(["model.quantization=nf4"])
    assert "'merge.dequantize'" in msg and "merge" in msg
    r = load_recipe(DEFAULT, ["model.quantization=nf4", "merge.dequantize=true"])
    assert r.merge.dequantize and r.model.quantization == "nf4"
    r = load_recipe(DEFAULT, ["model.quantization=fp4", "stages=[train,eval]"])
    assert r.model.quantization == "fp4"


def test_duplicated_stage(in_root):
    msg = _err(["stages=[train,eval,train]"])
    assert "'stages'" in msg and "repeats" in msg


def test_malformed_override(in_root):
    msg = _err(["lr"])
    assert "'lr'" in msg and "key=value" in msg


def test_invalid_yaml(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("train:\n  lr: [1\n")
    msg = _err([], p)
    assert "broken.yaml" in msg and "not valid YAML" in msg


def test_yaml_list_is_not_a_recipe(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- train\n- eval\n")
    msg = _err([], p)
    assert "list.yaml" in msg and "mapping" in msg


def test_missing_recipe_file(tmp_path):
    msg = _err([], tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "does not exist" in msg


# ------------------------------------------------------------------ CLI


def _env() -> dict:
    return {**os.environ, "COLUMNS": "250", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def _lora_count(model: nn.Module, rank: int) -> tuple[int, int]:
    """Independent count: r * (d_in + d_out) over every nn.Linear / Conv1D except the head."""
    total, n = 0, 0
    for name, m in model.named_modules():
        if name == "lm_head":
            continue
        if isinstance(m, nn.Linear):
            d_in, d_out = m.in_features, m.out_features
        elif type(m).__name__ == "Conv1D":
            d_in, d_out = m.weight.shape
        else:
            continue
        total += rank * (d_in + d_out)
        n += 1
    return total, n


@pytest.fixture(scope="module")
def cli():
    """The two failing CLI calls as real processes, launched together (start-up dominates)."""
    calls = {
        "bad_key": ["validate", str(DEFAULT), "train.lrr=1"],
        "bad_value": ["train", str(DEFAULT), "train.batch_size=0"],
    }
    procs = {k: subprocess.Popen([sys.executable, "-m", "moetune", *args], cwd=ROOT, env=_env(), text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k, args in calls.items()}
    done = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        done[k] = subprocess.CompletedProcess(calls[k], p.returncode, stdout, stderr)
    return done


def test_cli_validate_unknown_key_exits_2(cli):
    r = cli["bad_key"]
    assert r.returncode == 2, r.stderr
    assert "train.lr" in r.stderr and "Did you mean" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_cli_train_bad_value_exits_2(cli):
    r = cli["bad_value"]
    assert r.returncode == 2, r.stderr
    assert "train.batch_size" in r.stderr and ">= 1" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout



def test_cli_validate_good_recipe_counts_parameters(tiny_llama, tiny_data, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM
    monkeypatch.chdir(ROOT)
    code, out, err = _main(monkeypatch, capsys, "validate", str(DEFAULT),
                           *tiny_overrides(tiny_llama, tiny_data, tmp_path / "run"))
    assert code == 0, err
    text = out + err
    assert "recipe OK" in text and "Traceback" not in text
    m = re.search(r"trainable parameters\D*([\d,]+)", text)
    assert m, text
    expected, n = _lora_count(AutoModelForCausalLM.from_pretrained(tiny_llama), rank=4)
    assert n == 14  # q, k, v, o, gate, up, down in each of 2 layers
    assert int(m.group(1).replace(",", "")) == expected
    assert "64 rows" in text and "16 rows" in text  # data.train, data.validation / test
    assert not (tmp_path / "run").exists()  # validate writes nothing


def test_cli_validate_bad_data_row_exits_2(tiny_llama, tiny_data, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(tiny_data["train"].read_text().splitlines()[0] + "\n{oops\n")
    code, out, err = _main(monkeypatch, capsys, "validate", str(DEFAULT),
                           *tiny_overrides(tiny_llama, tiny_data, tmp_path / "run", f"data.train={bad}"))
    assert code == 2
    assert "bad.jsonl line 2" in err


def test_estimate_counts_gpt2_conv1d(tiny_gpt2, tiny_data, tmp_path):
    from transformers import AutoModelForCausalLM
    from moetune.commands.validate import estimate
    rc = load_recipe(DEFAULT, tiny_overrides(tiny_gpt2, tiny_data, tmp_path / "run", "expert.rank=3"))
    est = estimate(rc)
    expected, n = _lora_count(AutoModelForCausalLM.from_pretrained(tiny_gpt2), rank=3)
    assert n == 8
    assert est["trainable"] == expected


def test_cli_explain_documents_every_key(monkeypatch, capsys):
    code, out, err = _main(monkeypatch, capsys, "explain")
    assert code == 0, err
    assert "train.grad_accum = 1" in out
    assert "Micro-batches per optimizer step; global batch = batch_size * grad_accum * processes." in out
    assert "data.template = 'auto'  [one of 'auto', 'chat', 'plain']" in out
    assert "expert.rank = 8" in out and "Rank r of each low-rank adapter" in out
    assert out.strip() == explain().strip()
    for section, cls in schema_keys(Recipe).items():
        if cls is None:
            assert f"  {section} = " in out
            continue
        cls = config_class("lora") if section == "expert" else cls
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            assert f"  {key} = " in out, key
            doc = field_docs(cls)[f.name]
            line = out.split(f"  {key} = ", 1)[1].splitlines()[1]
            assert line.strip() == doc, key


def _recipe_classes() -> set[type]:
    seen: set[type] = set()
    todo = [Recipe, *(config_class(t) for t in REGISTRY)]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        todo += [sub for sub in schema_keys(cls).values() if sub is not None]
    return seen


def test_every_field_documented():
    classes = _recipe_classes()
    assert len(classes) >= 9  # Recipe + 8 sections
    for cls in classes:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name, "").strip(), f"{cls.__name__}.{f.name} has no docstring"


# ------------------------------------------------------------------ target modules


@pytest.fixture(scope="module")
def llama():
    return build_model("llama", 400)


@pytest.fixture(scope="module")
def gpt2():
    return build_model("gpt2", 400)


def test_all_linear_excludes_head(llama, gpt2):
    names = find_targets(llama, ["all-linear"])
    assert len(names) == 14 and "lm_head" not in names
    assert all(isinstance(llama.get_submodule(n), nn.Linear) for n in names)
    g = find_targets(gpt2, ["all-linear"])
    assert len(g) == 8 and "lm_head" not in g
    assert {type(gpt2.get_submodule(n)).__name__ for n in g} == {"Conv1D"}


@pytest.mark.parametrize("patterns, expected", [
    (["q_proj"], ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
    (["q_proj", "v_proj"], ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                            "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]),
    (["layers.1.mlp.*"], ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
                          "model.layers.1.mlp.down_proj"]),
    (["*_proj"], None),  # every projection: 14
    (["re:.*layers\\.0\\.self_attn\\.[kv]_proj"], ["model.layers.0.self_attn.k_proj",
                                                    "model.layers.0.self_attn.v_proj"]),
    (["mlp.down_proj"], ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]),
])
def test_find_targets_llama(llama, patterns, expected):
    got = find_targets(llama, patterns)
    if expected is None:
        assert len(got) == 14 and "lm_head" not in got
    else:
        assert got == expected


@pytest.mark.parametrize("patterns, expected", [
    (["c_attn"], ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]),
    (["c_fc"], ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]),
    (["attn.c_proj"], ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]),
    (["c_proj"], ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj",
                  "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]),
    (["h.1.*"], ["transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj",
                 "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]),
    (["re:transformer\\.h\\.0\\.mlp\\..*"], ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]),
])
def test_find_targets_gpt2(gpt2, patterns, expected):
    assert find_targets(gpt2, patterns) == expected


def test_head_never_selected(llama):
    with pytest.raises(RecipeError):
        find_targets(llama, ["lm_head"])


def test_target_matching_nothing(llama, gpt2):
    with pytest.raises(RecipeError) as ei:
        find_targets(llama, ["qkv_proj"])
    msg = str(ei.value)
    assert "'expert.target_modules'" in msg and "qkv_proj" in msg
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in msg
    with pytest.raises(RecipeError) as ei:
        find_targets(gpt2, ["q_proj"])
    assert "c_attn" in str(ei.value) and "c_fc" in str(ei.value)
    # a regex must match the whole name
    with pytest.raises(RecipeError):
        find_targets(llama, ["re:q_proj"])


# ------------------------------------------------------------------ model paths


def test_hub_id_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    assert resolve_path("someorg/some-model") == "someorg/some-model"  # treated as a hub id
    with pytest.raises(ModelError) as ei:
        load_tokenizer(ModelConfig(path="someorg/some-model"))
    msg = str(ei.value)
    assert "someorg/some-model" in msg and "offline" in msg.lower()
    assert "Offline alternative" in msg and "model.path=DIR" in msg and "smollm2-135m-instruct" in msg


@pytest.mark.parametrize("path", ["./no/such/model", "/no/such/model", "no/such/model", "model.bin"])
def test_missing_local_path(path):
    with pytest.raises(ModelError) as ei:
        resolve_path(path)
    assert path in str(ei.value) and "not an existing directory" in str(ei.value)
    assert "merge" not in str(ei.value)


def test_missing_merged_model_says_which_run_writes_it(tmp_path):
    """A recipe built on another run's merged model (recipes/calm-kv-*.yaml) before that run exists: the message
    says how the folder is made."""
    with pytest.raises(ModelError) as ei:
        resolve_path("runs/calm-kv-anchor/merged")
    msg = str(ei.value)
    assert "'runs/calm-kv-anchor/merged', which is not an existing directory" in msg
    assert "output_dir is 'runs/calm-kv-anchor' with stages [train, merge]" in msg
    assert "moetune merge-lora runs/calm-kv-anchor --out runs/calm-kv-anchor/merged" in msg


def test_local_dir_resolves_to_itself(tiny_llama):
    assert resolve_path(str(tiny_llama)) == str(tiny_llama)
    tok = load_tokenizer(ModelConfig(path=str(tiny_llama)))
    assert tok.pad_token is not None and tok.chat_template


def test_hub_ids_with_dots_are_not_taken_for_paths():
    assert resolve_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert resolve_path("gpt2") == "gpt2"


@pytest.mark.parametrize("etype", ["hydralora", "molora", "mov"])
def test_merge_stage_of_a_routed_type_is_refused_at_load_time(etype):
    with pytest.raises(RecipeError, match="--collapse mean"):
        load_recipe(f"recipes/{etype}.yaml", ["stages=[train,merge,eval]"])


def test_default_stages_leave_out_merge(tmp_path):
    """The default stages merge nothing (a merged model is a full copy of the base: a deliberate choice), so a
    routed type, which cannot merge, runs them too."""
    path = tmp_path / "r.yaml"
    path.write_text("expert:\n  type: molora\n  num_experts: 2\n")
    assert load_recipe(path).stages == ["train", "eval", "export"]
    assert load_recipe(None).stages == ["train", "eval", "export"]
