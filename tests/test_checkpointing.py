"""Activation checkpointing (train.gradient_checkpointing) for every expert type: with and without it,
the task loss, every auxiliary loss, the routing statistics and every trainable gradient are equal;
the blocks really are recomputed (each expert layer runs twice), and the recompute leaves the
routers' state of the original forward in place (aux losses counted once, statistics recorded once)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import randomise_routed, tiny_overrides
from moetune.adapters.inject import expert_layers, inject, trainable_parameters
from moetune.commands.stages import run_recipe
from moetune.experts import config_class
from moetune.experts.calm import CALMConfig
from moetune.experts.mole import MoLEConfig
from moetune.models.load import load_model
from moetune.recipe import ModelConfig, RouterConfig, load_recipe
from moetune.train.activation_checkpointing import disable_checkpointing, enable_checkpointing
from moetune.train.loss import CausalLMLoss
from test_calm import pair  # noqa: F401  (fixture: anchor + augmenting model)
from test_mole import llama_experts  # noqa: F401  (fixture: three LoRA experts for MoLE)

torch.set_num_threads(1)

SWITCH = dict(balance_loss="switch", balance_weight=0.1, z_loss_weight=0.01, jitter=0.05)
CASES = {
    "lora": (dict(type="lora", rank=4, alpha=8, dropout=0.1), None),
    "hydralora": (dict(type="hydralora", rank=4, alpha=8, num_experts=3, dropout=0.1), RouterConfig(**SWITCH)),
    "molora_soft": (dict(type="molora", rank=2, alpha=4, num_experts=3), RouterConfig(**SWITCH)),
    "molora_top2": (dict(type="molora", rank=2, alpha=4, num_experts=4),
                    RouterConfig(type="top_k", top_k=2, temperature=0.7, **SWITCH)),
    "mov": (dict(type="mov", num_experts=3), RouterConfig(**{**SWITCH, "balance_loss": "cv2"})),
    # the recompute runs after the loss left its routing context: it must pool the same prompt tokens
    "molora_sequence": (dict(type="molora", rank=2, alpha=4, num_experts=3), RouterConfig(level="sequence", **SWITCH)),
}


def _batch(vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                                                      # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100                                                 # prompt tokens
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _step(model, batch) -> dict:
    """One training forward + backward from a fixed RNG state; everything the loop would read."""
    for p in trainable_parameters(model):
        p.grad = None
    layers = expert_layers(model)
    calls = {n: 0 for n in layers}
    hooks = [m.base.register_forward_pre_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1))
             for n, m in layers.items()]  # the wrapped module: inside the checkpointed block (CALM: the block)
    model.train()
    torch.manual_seed(123)
    s, n, aux = CausalLMLoss(model)(**batch)
    loss = s / n + sum(aux.values(), torch.zeros(()))
    routers = {k: m.router for k, m in layers.items() if getattr(m, "router", None) is not None}
    before = {k: r._last[0] for k, r in routers.items()}
    loss.backward()
    for h in hooks:
        h.remove()
    return {"loss": s.detach() / n, "aux": {k: v.detach() for k, v in aux.items()},
            "stats": {k: m.routing_stats() for k, m in layers.items()},
            "grads": {f"{k}.{pn}": p.grad.clone() for k, m in layers.items() for pn, p in m.adapter_state().items()
                      if p.grad is not None},
            "kept": all(r._last[0] is before[k] for k, r in routers.items()),
            "calls": calls}


def _compare(model, batch, routed: bool) -> None:
    ref = _step(model, batch)
    assert enable_checkpointing(model) > 0
    ckpt = _step(model, batch)
    disable_checkpointing(model)
    again = _step(model, batch)
    assert all(c == 1 for c in ref["calls"].values()) and all(c == 1 for c in again["calls"].values())
    assert all(c == 2 for c in ckpt["calls"].values()), ckpt["calls"]   # the backward recomputed every block
    torch.testing.assert_close(ckpt["loss"], ref["loss"], rtol=1e-6, atol=1e-6)
    assert ckpt["aux"].keys() == ref["aux"].keys() and (bool(ref["aux"]) == routed)
    for k in ref["aux"]:
        torch.testing.assert_close(ckpt["aux"][k], ref["aux"][k], rtol=1e-6, atol=1e-7)
    for k, st in ref["stats"].items():
        if st is not None:
            assert ckpt["stats"][k]["dead"] == st["dead"]
            assert ckpt["stats"][k]["load"] == pytest.approx(st["load"], rel=1e-5, abs=1e-7)
            assert ckpt["stats"][k]["entropy"] == pytest.approx(st["entropy"], rel=1e-5)
    assert ckpt["kept"], "a recompute replaced a router's state of the original forward"
    assert ckpt["grads"].keys() == ref["grads"].keys()
    assert len(ref["grads"]) == len(trainable_parameters(model))        # every trainable tensor got a gradient
    for k in ref["grads"]:
        assert ref["grads"][k].abs().max() > 0, k
        torch.testing.assert_close(ckpt["grads"][k], ref["grads"][k], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(again["loss"], ref["loss"])              # disabling restores the plain forward


@pytest.mark.parametrize("case", list(CASES))
def test_checkpointing_changes_nothing_but_memory(case, tiny_llama):
    kw, router = CASES[case]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    inject(model, config_class(kw["type"])(**kw), router, seed=0)
    randomise_routed(model)
    _compare(model, _batch(model.config.vocab_size), routed=router is not None)


@pytest.mark.parametrize("granularity", ["layer", "network"])
def test_checkpointing_mole(granularity, tiny_llama, llama_experts):  # noqa: F811
    """MoLE: one gate per block, or one gate read by every block (crossing checkpoint regions)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    cfg = MoLEConfig(type="mole", experts=[str(e) for e in llama_experts], granularity=granularity)
    inject(model, cfg, RouterConfig(balance_loss="mole", balance_weight=0.1, z_loss_weight=0.01))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    _compare(model, _batch(model.config.vocab_size), routed=True)


def test_checkpointing_calm(pair):  # noqa: F811
    """CALM: each composed list entry is a CALMLayer (frozen block + cross-attention), checkpointed whole."""
    model = load_model(ModelConfig(path=str(pair["anchor"]), device="cpu"))
    inject(model, CALMConfig(type="calm", augmenting_model=str(pair["aug"]), num_compositions=2, dropout=0.1), seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    _compare(model, _batch(model.config.vocab_size), routed=False)


def test_recipe_key_trains_the_same_adapter(tiny_llama, tiny_data, tmp_path):
    """train.gradient_checkpointing through the real loop: the same HydraLoRA adapter (balance loss on)."""
    out = {}
    for flag in ("false", "true"):
        run = tmp_path / flag
        run_recipe(load_recipe(None, tiny_overrides(
            tiny_llama, tiny_data, run, "expert.type=hydralora", "expert.num_experts=3", "stages=[train]",
            "train.eval_before=false", "router.balance_loss=switch", "router.balance_weight=0.1",
            "router.jitter=0.05", "expert.dropout=0.1", "train.max_steps=3", f"train.gradient_checkpointing={flag}")))
        out[flag] = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert out["true"].keys() == out["false"].keys()
    for k in out["false"]:
        torch.testing.assert_close(out["true"][k], out["false"][k], rtol=1e-5, atol=1e-6)
