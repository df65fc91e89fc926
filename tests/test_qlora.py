"""QLoRA: LoRA on a 4-bit NF4 base (CUDA + bitsandbytes only; skipped with a reason otherwise)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import tiny_overrides

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs a CUDA GPU; none is present"),
    pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                       reason="QLoRA needs bitsandbytes: pip install 'moetune[gpu]'"),
]


def test_qlora_trains_and_merges_with_dequantisation(tiny_llama, tiny_data, tmp_path):
    from moetune.commands.stages import run_recipe
    from moetune.recipe import load_recipe
    out = tmp_path / "run"
    s = run_recipe(load_recipe(None, tiny_overrides(
        tiny_llama, tiny_data, out, "model.device=cuda", "model.quantization=nf4", "merge.dequantize=true",
        "train.max_steps=30", "train.lr=1e-2", "stages=[train,merge,eval]", "eval.generation=false")))
    assert s["after"]["loss"] < s["before"]["loss"] - 0.3
    assert s["merge"]["dequantized"] and s["merge"]["max_logit_diff"] < 0.5
    from moetune.models.load import load_model
    from moetune.recipe import ModelConfig
    m = load_model(ModelConfig(path=str(tiny_llama), quantization="nf4", device="cuda"))
    assert any(type(x).__name__ == "Linear4bit" for x in m.modules())
