"""LoRA: fresh adapters change nothing; PEFT export/import round trips; merging matches."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moetune.adapters.inject import expert_layers, inject, trainable_parameters
from moetune.adapters.io import load_adapter, save_adapter
from moetune.experts import ExpertConfig
from moetune.export.merge import merge_into_base

torch.set_num_threads(1)


def _model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (3, 11), generator=g)


def _randomise(model) -> None:
    """Give B non-zero values so the adapter actually changes the output."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_fresh_adapter_leaves_logits_unchanged(arch, request):
    path = request.getfixturevalue(arch)
    model = _model(path)
    x = _ids(model.config.vocab_size)
    ref = model(x).logits
    layers = inject(model, ExpertConfig(rank=4, alpha=8))
    assert len(layers) > 0 and all(layer.lora_B.abs().sum() == 0 for layer in layers.values())
    torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=0)
    # Only adapter parameters train; the base is frozen.
    trainable = {id(p) for p in trainable_parameters(model)}
    assert all((id(p) in trainable) == p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in trainable_parameters(model)) == sum(
        4 * (layer.d_in + layer.d_out) for layer in layers.values())


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_lora_math_matches_definition(arch, request):
    model = _model(request.getfixturevalue(arch))
    layers = inject(model, ExpertConfig(rank=2, alpha=6))
    _randomise(model)
    layer = next(iter(layers.values()))
    x = torch.randn(5, layer.d_in)
    expected = layer.base(x) + 3.0 * x @ layer.lora_A.t() @ layer.lora_B.t()   # s = 6 / 2
    torch.testing.assert_close(layer(x), expected)
    w0 = layer.base.weight.t() if type(layer.base).__name__ == "Conv1D" else layer.base.weight
    torch.testing.assert_close(layer.delta_weight(), 3.0 * layer.lora_B @ layer.lora_A)
    torch.testing.assert_close(x @ (w0 + layer.delta_weight()).t() + (layer.base.bias if layer.base.bias is not None else 0),
                               layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_peft_loads_export_and_reproduces_logits(arch, request, tmp_path):
    from peft import PeftModel
    path = request.getfixturevalue(arch)
    model = _model(path)
    inject(model, ExpertConfig(rank=4, alpha=8))
    _randomise(model)
    x = _ids(model.config.vocab_size)
    ours = model(x).logits
    save_adapter(tmp_path / "adapter", model, ExpertConfig(rank=4, alpha=8), None, str(path))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    peft_model = PeftModel.from_pretrained(_model(path), tmp_path / "adapter").eval()
    theirs = peft_model(x).logits
    assert (ours - _model(path)(x).logits).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)

    # Reload into moetune: identical logits.
    again = _model(path)
    load_adapter(again, tmp_path / "adapter")
    torch.testing.assert_close(again(x).logits, ours, atol=0, rtol=0)


def test_import_stock_peft_adapter(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model
    base = _model(tiny_llama)
    peft_model = get_peft_model(base, LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.eval()
    x = _ids(base.config.vocab_size)
    theirs = peft_model(x).logits
    peft_model.save_pretrained(tmp_path / "peft")
    ours = _model(tiny_llama)
    meta = load_adapter(ours, tmp_path / "peft")
    assert meta["format"] == "peft-lora" and meta["expert"]["rank"] == 3
    assert sorted(n.rsplit(".", 1)[-1] for n in expert_layers(ours)) == ["q_proj"] * 2 + ["v_proj"] * 2
    torch.testing.assert_close(ours(x).logits, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_merged_model_matches_adapter_model(arch, request, tmp_path):
    path = request.getfixturevalue(arch)
    model = _model(path)
    inject(model, ExpertConfig(rank=4, alpha=8))
    _randomise(model)
    x = _ids(model.config.vocab_size)
    with torch.no_grad():
        ref = model(x).logits
    merge_into_base(model)
    assert not expert_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref, atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(_model(tmp_path / "merged")(x).logits, ref, atol=1e-4, rtol=1e-4)
