"""scripts/expert_diversity.py: the experts' Gram matrix against the d_out x d_in deltas formed by hand, and its
cosine / spread on experts that are identical, scaled copies, or orthogonal, read from an adapter file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from scripts_loader import load_script

ed = load_script("expert_diversity")


@pytest.mark.parametrize("shared", [True, False])
def test_gram_equals_the_deltas_inner_products(shared):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 7, generator=g) if shared else torch.randn(3, 5, 7, generator=g)  # HydraLoRA / MoLoRA A
    b = torch.randn(3, 11, 5, generator=g)                                                 # (N, d_out, r)
    w = [b[i].double() @ (a if shared else a[i]).double() for i in range(3)]              # (d_out, d_in) each
    want = torch.tensor([[float((w[i] * w[j]).sum()) for j in range(3)] for i in range(3)], dtype=torch.double)
    torch.testing.assert_close(ed.gram(a, b), want)


def test_cosine_and_spread_of_identical_scaled_and_orthogonal_experts(tmp_path):
    a = torch.eye(4, 6)                                                                    # shared A (r=4, d_in=6)
    same = torch.ones(3, 8, 4)                                                             # 3 identical experts
    scaled = torch.ones(3, 8, 4) * torch.tensor([1.0, 2.0, 3.0])[:, None, None]
    orth = torch.zeros(3, 8, 4)
    for i in range(3):
        orth[i, i, i] = 1.0                                                                # disjoint single entries
    assert ed.diversity(ed.gram(a, same)) == pytest.approx({"cosine": 1.0, "spread": 0.0}, abs=1e-9)
    d = ed.diversity(ed.gram(a, scaled))                   # same direction; sizes 1, 2, 3 around a mean of 2
    assert d["cosine"] == pytest.approx(1.0) and d["spread"] == pytest.approx((2 / 3) ** 0.5 / 2)
    d = ed.diversity(ed.gram(a, orth))                     # orthonormal deltas: mean norm^2 1/3, spread^2 2/3
    assert d["cosine"] == pytest.approx(0.0, abs=1e-12) and d["spread"] == pytest.approx(2 ** 0.5)

    run = tmp_path / "hydralora-s0"
    (run / "adapter").mkdir(parents=True)
    save_file({"model.layers.0.self_attn.q_proj.lora_A": a, "model.layers.0.self_attn.q_proj.lora_B": same,
               "model.layers.1.mlp.up_proj.lora_A": a.clone(), "model.layers.1.mlp.up_proj.lora_B": orth,
               "model.layers.1.mlp.up_proj.router.weight": torch.zeros(3, 6)},
              str(run / "adapter" / "adapter_model.safetensors"))
    (run / "eval.json").write_text(json.dumps({"routing": {"specialisation": 0.25}}))
    rows = ed.main([str(run), "--json", str(tmp_path / "d.json"), "--plot", str(tmp_path / "d.png")])
    assert rows[0]["modules"] == 2 and rows[0]["specialisation"] == 0.25
    assert rows[0]["per_block"]["0"]["spread"] == pytest.approx(0.0, abs=1e-9)
    assert rows[0]["per_block"]["1"]["cosine"] == pytest.approx(0.0, abs=1e-12)
    assert json.loads((tmp_path / "d.json").read_text()) == rows and (tmp_path / "d.png").stat().st_size > 2000


@pytest.mark.parametrize("init_std, identical", [(0.0, True), (0.5, False)])
def test_hydralora_heads_stay_copies_under_uniform_gates(init_std, identical):
    """The mechanism behind a random-init router's lack of specialisation, at its fixed point: HydraLoRA's heads
    start at B_i = 0; with uniform gates (a zero router) every head gets the same gradient, so after training
    steps they are still exactly equal and the router has had no gradient at all (its output cannot change the
    layer). A router that starts off-uniform (std 0.5) gives the heads different gradients from the first step."""
    from conftest import build_model
    from moetune.adapters.inject import expert_layers, inject, trainable_parameters
    from moetune.experts import config_class
    from moetune.recipe import RouterConfig

    torch.manual_seed(0)
    model = build_model("llama", 64).float()
    inject(model, config_class("hydralora")(type="hydralora", num_experts=2, rank=4, alpha=8),
           RouterConfig(init_std=init_std))
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    x = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
    layers = list(expert_layers(model).values())
    heads = [layer.lora_B for layer in layers]                                   # (N, d_out, r) each
    routers = [layer.router.weight for layer in layers]
    assert all(h.abs().max() > 0 for h in heads)                                 # the heads did train
    if identical:
        assert all(torch.equal(h[0], h[1]) for h in heads)
        assert all(r.grad is not None and not r.grad.any() and not r.any() for r in routers)
        assert ed.diversity(ed.gram(layers[0].lora_A.detach(), heads[0].detach()))["spread"] == 0.0
    else:
        assert all(not torch.equal(h[0], h[1]) for h in heads)
        assert min(ed.diversity(ed.gram(l.lora_A.detach(), l.lora_B.detach()))["spread"] for l in layers) > 1e-3
