"""The one real end-to-end run: recipes/default.yaml on the embedded SmolLM2-135M-Instruct.

It must show a clear gain on the held-out split and leave an export that stock PEFT
loads and that reproduces the merged model's logits.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("default-run")
    # the recipe as shipped but half its steps (60 of 120), scored on the first 100 of its 200 test rows
    # (all five domains): `make demo` runs it whole (EM 0 -> 0.47 over 200 rows); here 0 -> 0.29
    proc = subprocess.run([sys.executable, "-m", "moetune", "train", "recipes/default.yaml", f"output_dir={out}",
                           "train.max_steps=60", "eval.max_examples=100"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "before vs after training" in proc.stderr  # the summary table was printed
    return out


def test_default_recipe_shows_a_clear_gain(default_run):
    s = json.loads((default_run / "summary.json").read_text())
    before, after = s["before"], s["after"]
    print(json.dumps({"before": {k: before[k] for k in ("loss", "exact_match")},
                      "after": {k: after[k] for k in ("loss", "exact_match")}}))
    assert after["model"] == "merged"
    assert after["loss"] < 0.5 * before["loss"]
    assert after["exact_match"] >= before["exact_match"] + 0.2
    assert set(after["per_domain"]) == {"arithmetic", "cipher", "facts", "strings", "units"}
    assert s["merge"]["max_logit_diff"] < 1e-3


def test_default_export_loads_in_peft_and_reproduces_merged_logits(default_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from moetune.models.load import ensure_builtin
    export = default_run / "export"
    for f in ("adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "README.md"):
        assert (export / f).is_file(), f
    base_dir = ensure_builtin("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(default_run / "merged")
    x = tok(["Compute 12 + 30.", "Translate to Blorp: cat sun"], return_tensors="pt", padding=True)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), export).eval()
    merged = AutoModelForCausalLM.from_pretrained(default_run / "merged").eval()
    with torch.no_grad():
        a, b = peft_model(**x).logits, merged(**x).logits
    mask = x["attention_mask"].bool()
    assert float((a - b).abs()[mask].max()) < 1e-2
    # adapter_config.json names a base stock tools resolve: PEFT finds it from the adapter alone
    from peft import AutoPeftModelForCausalLM
    assert json.loads((export / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    with torch.no_grad():
        c = AutoPeftModelForCausalLM.from_pretrained(export).eval()(**x).logits
    torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-5)
