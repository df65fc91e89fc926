"""Exports load in stock tools: adapter_config.json names a base that exists, and the model card's snippet,
run as written (offline, without moetune), reproduces the run's merged-model logits."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import tiny_overrides
from moetune.adapters.io import load_adapter
from moetune.commands.stages import run_recipe
from moetune.models.load import builtin_dir, load_model, stock_base_name
from moetune.recipe import ModelConfig, load_recipe

torch.set_num_threads(1)

PROBE = """
# --- appended by the test: the logits of fixed ids, and proof that moetune was never imported
import sys
from safetensors.torch import save_file
ids = torch.tensor({ids})
with torch.no_grad():
    save_file({{"logits": model(input_ids=ids).logits.float().contiguous()}}, {path!r})
assert "moetune" not in sys.modules
"""


def _snippet(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(blocks) == 1
    return blocks[0]


def _run_snippet(code: str, tmp_path, ids: list[list[int]]) -> torch.Tensor:
    path = tmp_path / "snippet_logits.safetensors"
    script = tmp_path / "snippet.py"
    script.write_text(code + PROBE.format(ids=ids, path=str(path)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(path))["logits"]


@pytest.fixture(scope="module")
def exported(tiny_llama, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stock") / "run"
    run_recipe(load_recipe(None, tiny_overrides(tiny_llama, tiny_data, out, "train.max_steps=4", "train.lr=2e-2",
                                                "stages=[train,merge,export]", "export.kind=both",
                                                "train.eval_before=false")))
    return out


def test_adapter_config_names_a_base_stock_tools_resolve(exported, tiny_llama, monkeypatch, tmp_path):
    cfg = json.loads((exported / "export" / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_llama.resolve())
    assert json.loads((exported / "adapter" / "moetune.json").read_text())["base_model"] == str(tiny_llama)
    monkeypatch.setenv("MOETUNE_HOME", str(tmp_path))
    assert stock_base_name("smollm2-135m-instruct") == str(tmp_path / "models" / "smollm2-135m-instruct")
    assert stock_base_name("smollm2-135m-instruct") == str(builtin_dir("smollm2-135m-instruct"))
    assert stock_base_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_adapter_with_the_old_alias_still_loads_in_moetune(exported, tiny_llama, tmp_path):
    """Adapters written before: adapter_config.json naming moetune's alias; moetune still loads them."""
    old = tmp_path / "old"
    old.mkdir()
    for f in (exported / "adapter").iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((old / "adapter_config.json").read_text())
    (old / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "smollm2-135m-instruct"}))
    ids = torch.tensor([[5, 9, 13, 17, 21]])
    a, b = (load_model(ModelConfig(path=str(tiny_llama), device="cpu")) for _ in range(2))
    load_adapter(a, exported / "adapter")
    load_adapter(b, old)
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, atol=0, rtol=0)


def test_model_card_snippet_reproduces_the_merged_logits_offline(exported, tmp_path):
    card = (exported / "export" / "README.md").read_text()
    code = _snippet(card)
    assert "from peft import PeftModel" in code and "moetune" not in code
    ids = [[5, 9, 13, 17, 21, 25, 29], [30, 4, 8, 12, 16, 20, 24]]
    got = _run_snippet(code, tmp_path, ids)
    merged = AutoModelForCausalLM.from_pretrained(exported / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        want = merged(input_ids=torch.tensor(ids)).logits
        base = AutoModelForCausalLM.from_pretrained(code.split("BASE = ")[1].split("'")[1]).eval()
        assert (want - base(input_ids=torch.tensor(ids)).logits).abs().max() > 1e-3   # the adapter matters
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_merged_export_snippet_runs_offline(exported, tmp_path):
    run_recipe(load_recipe(exported / "recipe.yaml", [f"output_dir={exported}", "stages=[export]",
                                                       "export.kind=merged", f"export.dir={tmp_path / 'm'}"]))
    code = _snippet((tmp_path / "m" / "README.md").read_text())
    assert "peft" not in code and str((tmp_path / "m").resolve()) in code
    ids = [[5, 9, 13, 17, 21]]
    got = _run_snippet(code, tmp_path, ids)
    merged = AutoModelForCausalLM.from_pretrained(exported / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(got, merged(input_ids=torch.tensor(ids)).logits, atol=1e-5, rtol=1e-5)
