"""model.attn_implementation: eager and sdpa give the same logits (padding included); a kernel that
cannot run here (flash_attention_2 without flash-attn/CUDA) is a clear recipe error, exit code 2."""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import ROOT, tiny_overrides
from moetune.models.load import attn_implementation, load_model
from moetune.recipe import ModelConfig, RecipeError

torch.set_num_threads(1)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_eager_and_sdpa_give_equal_logits(arch, request):
    path = str(request.getfixturevalue(arch))
    ids = torch.randint(5, 300, (3, 13), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0                                                      # left padding
    logits = {}
    for kind in ("eager", "sdpa"):
        model = load_model(ModelConfig(path=path, device="cpu", attn_implementation=kind), log=lambda *_: None)
        assert model.config._attn_implementation == kind
        with torch.no_grad():
            logits[kind] = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=1e-5, atol=1e-5)


def test_auto_picks_an_available_kernel():
    cfg = ModelConfig(attn_implementation="auto")
    assert attn_implementation(cfg, torch.device("cpu")) is None         # transformers' default (sdpa) on CPU


def test_flash_attention_unavailable_is_a_recipe_error(tiny_llama, tiny_data, tmp_path, monkeypatch, capsys):
    with pytest.raises(RecipeError, match=r"model.attn_implementation.*flash_attention_2.*Allowed: auto"):
        load_model(ModelConfig(path=str(tiny_llama), device="cpu", attn_implementation="flash_attention_2"))
    from moetune.cli import main
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["moetune", "validate", "recipes/default.yaml",
                                      *tiny_overrides(tiny_llama, tiny_data, tmp_path / "run",
                                                      "model.attn_implementation=flash_attention_2")])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "model.attn_implementation" in err and "flash_attention_2" in err and "Traceback" not in err
