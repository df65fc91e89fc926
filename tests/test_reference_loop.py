"""The benchmark's loop-over-experts references (benchmarks/reference_loop.py) compute the same
function as moetune's vectorised layers: outputs and gradients agree on random inputs with copied
weights. Also checks the benchmark's CPU peak-memory tracker on a step whose allocations are known."""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from harness import PeakTensorMemory  # noqa: E402
from reference_loop import from_layer, trainable  # noqa: E402

from moetune.experts import REGISTRY, config_class  # noqa: E402
from moetune.recipe import RouterConfig  # noqa: E402

torch.set_num_threads(1)

ROUTERS = {"soft": RouterConfig(type="soft"), "top2": RouterConfig(type="top_k", top_k=2, temperature=0.7)}
CASES = [("hydralora", "soft"), ("hydralora", "top2"), ("molora", "soft"), ("molora", "top2"),
         ("mov", "soft"), ("mov", "top2")]


def _layer(etype: str, rc: RouterConfig, name: str, d_in=12, d_out=20, n=4):
    torch.manual_seed(0)
    kw = {} if etype == "mov" else dict(rank=3, alpha=6.0)
    layer = REGISTRY[etype](nn.Linear(d_in, d_out), config_class(etype)(type=etype, num_experts=n, **kw), rc, name)
    layer.base.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial experts and a decisive router, so mixing errors would show
        for key, p in layer.adapter_state().items():
            noise = torch.randn(p.shape, generator=g)
            p.copy_({"router.weight": noise, "ia3_l": 1 + 0.3 * noise}.get(key, 0.3 * noise))
    return layer


# down_proj: MoV scales the projection's input there (the FFN activation); other types wrap it like any linear
PLACES = [(e, r, "mlp.up_proj") for e, r in CASES] + [(e, r, "mlp.down_proj") for e, r in CASES if e == "mov"]


@pytest.mark.parametrize("etype,router,name", PLACES)
def test_loop_reference_matches_moetune_layer(etype, router, name):
    layer = _layer(etype, ROUTERS[router], name)
    ref = from_layer(layer)
    assert sum(p.numel() for p in trainable(ref)) == sum(p.numel() for p in layer.adapter_state().values())
    x = torch.randn(3, 7, layer.d_in, generator=torch.Generator().manual_seed(2), requires_grad=True)
    ours, theirs = layer(x), ref(x)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    # the same function also backwards: input and router gradients agree
    upstream = torch.randn(ours.shape, generator=torch.Generator().manual_seed(3))
    g_ours = torch.autograd.grad(ours, [x, layer.router.weight], upstream)
    g_ref = torch.autograd.grad(theirs, [x, ref.gate.route.weight], upstream)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_top2_reference_indexes_only_selected_tokens():
    layer = _layer("molora", ROUTERS["top2"], "mlp.up_proj")
    ref = from_layer(layer)
    seen = []
    for a in ref.lora_A:
        a.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    ref(torch.randn(10, layer.d_in))
    assert sum(seen) == 10 * 2  # each token visits exactly its 2 experts


def test_peak_tensor_memory_counts_a_known_step():
    w = torch.randn(64, 32, requires_grad=True)       # exists before: not counted
    x = torch.randn(100, 64)
    with PeakTensorMemory() as mem:
        y = x @ w                                      # 100x32 floats
        loss = y.square().sum()                        # + 100x32 (square) + scalar
        del y
        loss.backward()                                # grad of w: 64x32, plus transient backward buffers
    assert mem.peak >= 4 * (2 * 100 * 32 + 64 * 32)
    assert mem.peak <= 4 * (4 * 100 * 32 + 2 * 64 * 32) + 64
    assert mem.current <= mem.peak


@pytest.mark.parametrize("granularity", ["matrix", "layer", "network"])
def test_loop_mole_reference_matches_moetune_mole_on_a_model(tiny_llama, tmp_path, granularity):
    """MoLE: moetune's factored gate + rank-N*r mix vs one nn.Linear pair per expert in a loop, the
    gate reading LayerNorm of the concatenated outputs; followers reuse their place's gate."""
    from methods import install, mole_method, write_lora_experts
    from reference_loop import loop_set
    from transformers import AutoModelForCausalLM
    from moetune.adapters.inject import inject

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval().requires_grad_(False)
    m = mole_method(write_lora_experts(model, 8, 4, ["all-linear"], tmp_path), granularity)
    layers = inject(model, m.expert, m.router)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in (p for layer in layers.values() for p in layer.adapter_state().values()):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    ids = torch.randint(5, model.config.vocab_size, (2, 9), generator=g)
    ours = model(ids).logits
    refs = loop_set(layers)
    assert sum(p.numel() for r in refs.values() for p in trainable(r)) == sum(
        p.numel() for layer in layers.values() for p in layer.adapter_state().values())
    install(model, refs)
    theirs = model(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    lead = next(n for n, layer in layers.items() if hasattr(layer, "router"))
    install(model, layers)
    g_ours = torch.autograd.grad(model(ids).logits.square().mean(), layers[lead].router.weight)[0]
    install(model, refs)
    g_ref = torch.autograd.grad(model(ids).logits.square().mean(), refs[lead].gate.weight)[0]
    torch.testing.assert_close(g_ref, g_ours, atol=1e-5, rtol=1e-3)
    assert float(g_ours.abs().max()) > 0
