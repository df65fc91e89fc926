"""adapter_files: the torch-free metadata read (`read_meta`, used by MoLE's recipe check) agrees with
`read_adapter`, for a stock PEFT LoRA directory and a moetune adapter, and imports no torch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from moetune.adapters.inject import inject
from moetune.adapters.io import save_adapter
from moetune.core.adapter_files import read_adapter, read_meta
from moetune.core.errors import RecipeError
from moetune.recipe.experts import ExpertConfig
from conftest import ROOT, repo_env


def _peft_dir(d: Path) -> Path:
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    m = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{m}.lora_A.weight": torch.randn(2, 8, generator=g).bfloat16(),
               f"{m}.lora_B.weight": torch.randn(8, 2, generator=g).bfloat16()}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4.0,
                                                       "base_model_name_or_path": "some/base"}))
    return d


def test_read_meta_matches_read_adapter_for_peft_and_moetune_dirs(tiny_llama, tmp_path):
    peft = _peft_dir(tmp_path / "peft")
    meta, state = read_adapter(peft)
    assert read_meta(peft) == meta
    assert meta["expert"]["rank"] == 2 and meta["modules"] == ["model.layers.0.self_attn.q_proj"]
    assert sorted(state) == ["model.layers.0.self_attn.q_proj.lora_A", "model.layers.0.self_attn.q_proj.lora_B"]
    assert state["model.layers.0.self_attn.q_proj.lora_A"].dtype == torch.bfloat16

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    cfg = ExpertConfig(type="lora", rank=2, target_modules=["q_proj"])
    inject(model, cfg, None)
    save_adapter(tmp_path / "ours", model, cfg, None, str(tiny_llama))
    meta, state = read_adapter(tmp_path / "ours")
    assert read_meta(tmp_path / "ours") == meta and meta["expert"]["rank"] == 2 and len(state) == 2 * 2

    with pytest.raises(RecipeError, match="not an adapter directory"):
        read_meta(tmp_path)
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(RecipeError, match="moetune imports LORA adapters only"):
        read_meta(peft)


def test_read_meta_imports_no_torch(tmp_path):
    peft = _peft_dir(tmp_path / "peft")
    code = (f"import sys\nfrom moetune.core.adapter_files import read_meta\nm = read_meta({str(peft)!r})\n"
            "print(m['expert']['rank'], 'torch' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=repo_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["2", "False"]
