"""The stand-alone commands on a trained tiny run: merge-lora, eval, export (in-process CLI)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import cli, tiny_overrides
from moetune.adapters.io import load_adapter
from moetune.recipe import load_recipe

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained_run(tiny_llama, tiny_data, tmp_path_factory):
    from moetune.commands.stages import run_recipe
    out = tmp_path_factory.mktemp("run")
    run_recipe(load_recipe(None, tiny_overrides(tiny_llama, tiny_data, out, "train.max_steps=10",
                                                "stages=[train]", "train.eval_before=false")))
    return out


def _logits(model, vocab):
    x = torch.randint(5, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x).logits


def test_merge_lora_from_run_and_from_adapter_dir(trained_run, tiny_llama, tmp_path, monkeypatch):
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    load_adapter(ref_model, trained_run / "adapter")
    ref = _logits(ref_model.eval(), ref_model.config.vocab_size)
    assert cli(monkeypatch, "merge-lora", trained_run, "--out", tmp_path / "m1") == 0
    # A bare adapter directory: the base model is read from its moetune.json.
    assert cli(monkeypatch, "merge-lora", trained_run / "adapter", "--out", tmp_path / "m2") == 0
    for d in ("m1", "m2"):
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / d).eval()
        torch.testing.assert_close(_logits(merged, merged.config.vocab_size), ref, atol=1e-4, rtol=1e-4)
        assert (tmp_path / d / "tokenizer_config.json").is_file()
    assert json.loads((trained_run / "summary.json").read_text())["merge"]["max_logit_diff"] < 1e-4


def test_eval_writes_json_with_domains(trained_run, monkeypatch):
    assert cli(monkeypatch, "eval", trained_run, "eval.max_new_tokens=3") == 0
    res = json.loads((trained_run / "eval.json").read_text())
    scores = res["scores"]
    assert res["model"] == "adapter" and 0 <= scores["exact_match"] <= 1
    assert set(scores["per_domain"]) == {"add", "shout"}
    assert all("loss" in v and "exact_match" in v for v in scores["per_domain"].values())


def test_export_both_writes_peft_adapter_merged_model_and_card(trained_run, tiny_llama, tmp_path, monkeypatch):
    from peft import PeftModel
    out = tmp_path / "exp"
    assert cli(monkeypatch, "export", trained_run, "--kind", "both", "--out", out) == 0
    for f in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "merged/config.json",
              "recipe.yaml", "README.md"):
        assert (out / f).is_file(), f
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    v = merged.config.vocab_size
    torch.testing.assert_close(_logits(peft_model, v), _logits(merged, v), atol=1e-4, rtol=1e-4)
    assert "Base model" in (out / "README.md").read_text()


def test_failed_export_keeps_previous_export(trained_run, tmp_path, monkeypatch):
    out = tmp_path / "exp"
    assert cli(monkeypatch, "export", trained_run, "--out", out) == 0
    before = sorted(p.name for p in out.iterdir())
    import moetune.commands.stages as stages
    from moetune.run.session import Run
    monkeypatch.setattr(stages, "model_card", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        stages.stage_export(Run(load_recipe(trained_run / "recipe.yaml", [f"output_dir={trained_run}"])),
                            out=out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".exp")]


def test_bad_run_dir_is_a_clear_error(tmp_path, monkeypatch, capsys):
    assert cli(monkeypatch, "eval", tmp_path) == 2
    assert "not a moetune run directory" in capsys.readouterr().err


def test_eval_scores_multiple_choice_files(trained_run, tmp_path, monkeypatch):
    rows = [{"question": f"Add {a} and {b}", "choices": [str(a + b), str(a + b + 1), "RED", "BLUE"],
             "answer": "A", "subject": "toy_math"} for a, b in [(1, 2), (3, 1), (0, 4), (2, 2)]]
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(monkeypatch, "eval", trained_run, f"eval.multiple_choice=[{mc}]", "eval.generation=false") == 0
    res = json.loads((trained_run / "eval.json").read_text())["multiple_choice"][str(mc)]
    assert res["n"] == 4 and res["accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert res["per_subject"]["toy_math"]["n"] == 4
