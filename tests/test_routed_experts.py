"""Routed experts (HydraLoRA, MoLoRA, MoV): no-op when fresh, vectorised forward = per-expert loop,
adapter round trip, only adapter + router train, the real loop learns and balance losses act."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_rows, randomise_routed, tiny_overrides
from moetune.adapters.inject import aux_losses, expert_layers, inject, trainable_parameters
from moetune.adapters.io import load_adapter, save_adapter
from moetune.commands.stages import run_recipe
from moetune.experts import REGISTRY, config_class
from moetune.models import projection
from moetune.recipe import RouterConfig, load_recipe

torch.set_num_threads(1)

TYPES = ["hydralora", "molora", "mov"]
ARCHS = ["tiny_llama", "tiny_gpt2"]
ROUTERS = {"soft": RouterConfig(type="soft"), "top2": RouterConfig(type="top_k", top_k=2, temperature=0.7)}


def _model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _cfg(etype: str, arch: str):
    kw = {"hydralora": dict(rank=4, alpha=8), "molora": dict(rank=2, alpha=6), "mov": {}}[etype]
    if etype == "mov" and arch == "tiny_gpt2":  # GPT-2 fuses q/k/v into c_attn
        kw["target_modules"] = ["c_attn", "mlp.c_proj"]
    return config_class(etype)(type=etype, num_experts=3, **kw)


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(5, vocab, (3, 11), generator=torch.Generator().manual_seed(0))




def _reference_gates(x, w_g, rc: RouterConfig) -> torch.Tensor:
    """softmax(W_g x / T); top-k by an explicit loop: expert i is kept when fewer than k beat it."""
    probs = torch.softmax((x @ w_g.t()) / rc.temperature, -1)
    if rc.type == "soft":
        return probs
    kept = [torch.where((probs > probs[..., i:i + 1]).sum(-1) < rc.top_k, probs[..., i], 0.0)
            for i in range(probs.shape[-1])]
    kept = torch.stack(kept, -1)
    return kept / kept.sum(-1, keepdim=True)


def _reference(layer, x, rc: RouterConfig, w: torch.Tensor | None = None) -> torch.Tensor:
    """The papers' formulas with a Python loop over experts (gates w, default `_reference_gates`)."""
    w = _reference_gates(x, layer.router.weight, rc) if w is None else w
    n = w.shape[-1]
    if hasattr(layer, "ia3_l"):  # MoV: h * sum_i w_i l_i on the input or the output
        mix = sum(w[..., i:i + 1] * layer.ia3_l[i] for i in range(n))
        return layer.base(x * mix) if layer.scale_input else layer.base(x) * mix
    y = layer.base(x)
    for i in range(n):
        a_i = layer.lora_A if layer.lora_A.dim() == 2 else layer.lora_A[i]  # HydraLoRA shares A
        y = y + layer.scale * w[..., i:i + 1] * (x @ a_i.t() @ layer.lora_B[i].t())
    return y


U = 2.0 ** -24  # float32 unit roundoff


def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): a float32 sum of n products is within gamma_n times the sum of
    the absolute products ("Accuracy and Stability of Numerical Algorithms", ch. 3)."""
    return n * U / (1 - n * U)


def _magnitude(layer, x, w) -> torch.Tensor:
    """Every term of the loop in `_reference` in absolute value (elementwise) for gates w: the scale that
    bounds float32 rounding. LoRA types: |W0||x| + |b| + s sum_i w_i |B_i| |A_i| |x|; MoV: the base on |x|
    times 1 + sum_i w_i |l_i - 1| (on the input or the output)."""
    w0 = projection.dense_weight(layer.base).abs()                           # (d_out, d_in)
    b = layer.base.bias
    base = lambda v: v @ w0.t() + (b.abs() if b is not None else 0.0)       # noqa: E731
    if hasattr(layer, "ia3_l"):
        mix = 1 + sum(w[..., i:i + 1] * (layer.ia3_l[i] - 1).abs() for i in range(w.shape[-1]))
        return base(x.abs() * mix) if layer.scale_input else base(x.abs()) * mix
    m = base(x.abs())
    for i in range(w.shape[-1]):
        a_i = layer.lora_A if layer.lora_A.dim() == 2 else layer.lora_A[i]
        m = m + layer.scale * w[..., i:i + 1] * (x.abs() @ a_i.abs().t() @ layer.lora_B[i].abs().t())
    return m


def _assert_matches_loop(layer, x, rc: RouterConfig) -> None:
    """The vectorised float32 forward (and delta) against the loop of `_reference` in float64.

    1. Gates: the router's float32 logits W_g x are within dz = gamma_(d_in+2) |W_g| |x| of the exact ones,
       which moves softmax(z / T) by at most 2 dz / T relative, twice that after top-k renormalisation.
    2. Output: the float64 loop run with the gates the layer used; the float32 sums are then within
       gamma_K M, K = d_in + (N r or N) + 8 (x A^T, the mix, the adds), M = `_magnitude`.
    The old float32-vs-float32 comparison at a fixed 1e-5 failed by 1e-6 when the summation order of one
    side happened to round the other way (it carried both sides' rounding); the float64 side carries none."""
    l64, x64 = copy.deepcopy(layer).double(), x.double()
    y = layer(x).double()                                                       # (..., d_out), vectorised
    w32 = layer.router._last[2].double()                                        # the gates it used (..., N)
    w64 = _reference_gates(x64, l64.router.weight, rc)
    dz = gamma(layer.d_in + 2) * (x64.abs() @ l64.router.weight.abs().t()).amax(-1, keepdim=True)  # (..., 1)
    assert ((w32 - w64).abs() <= (4 * dz / rc.temperature + 16 * U) * w64 + 16 * U).all()
    ref = _reference(l64, x64, rc, w32)                                         # float64 loop
    n = layer.cfg.num_experts * (1 if hasattr(layer, "ia3_l") else layer.cfg.rank)
    bound = gamma(layer.d_in + n + 8) * _magnitude(l64, x64, w32)
    err = (y - ref).abs()
    assert (err <= bound).all(), f"error {float(err.max()):.3g} above its bound at {int((err > bound).sum())} outputs"
    err = (layer.delta(x).double() - (ref - l64.base(x64))).abs()
    assert (err <= 2 * bound).all(), f"delta error {float(err.max()):.3g} above its bound"


def _n_params(layer) -> int:
    n, d_in, d_out, r = layer.cfg.num_experts, layer.d_in, layer.d_out, layer.cfg.rank
    adapter = {"hydralora": r * d_in + n * d_out * r, "molora": n * r * (d_in + d_out),
               "mov": n * (d_in if getattr(layer, "scale_input", False) else d_out)}[layer.cfg.type]
    return adapter + n * d_in  # + router W_g


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("etype", TYPES)
def test_fresh_adapter_is_a_no_op_and_only_adapters_train(etype, arch, request):
    model = _model(request.getfixturevalue(arch))
    x = _ids(model.config.vocab_size)
    ref = model(x).logits
    layers = inject(model, _cfg(etype, arch), RouterConfig())
    assert len(layers) > 0 and all(type(m) is REGISTRY[etype] for m in layers.values())
    torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=0)
    trainable = {id(p) for p in trainable_parameters(model)}
    assert all((id(p) in trainable) == p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in trainable_parameters(model)) == sum(_n_params(m) for m in layers.values())
    assert all(m.delta_weight() is None and not m.mergeable for m in layers.values())
    if etype == "mov" and arch == "tiny_llama":
        modes = {n.rsplit(".", 1)[-1]: m.scale_input for n, m in layers.items()}
        assert modes == {"k_proj": False, "v_proj": False, "down_proj": True}


@pytest.mark.parametrize("router", sorted(ROUTERS))
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("etype", TYPES)
def test_vectorised_forward_matches_loop_over_experts(etype, arch, router, request):
    rc = ROUTERS[router]
    model = _model(request.getfixturevalue(arch))
    layers = inject(model, _cfg(etype, arch), rc)
    randomise_routed(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in layers.values():
            x = torch.randn(2, 5, layer.d_in, generator=g)
            _assert_matches_loop(layer, x, rc)
            stats = layer.routing_stats()
            assert len(stats["load"]) == 3 and 0 <= stats["entropy"] <= stats["max_entropy"] + 1e-6


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("etype", TYPES)
def test_save_load_round_trip(etype, arch, request, tmp_path):
    path = request.getfixturevalue(arch)
    cfg, rc = _cfg(etype, arch), ROUTERS["top2"]
    model = _model(path)
    inject(model, cfg, rc)
    randomise_routed(model)
    x = _ids(model.config.vocab_size)
    ours = model(x).logits
    assert (ours - _model(path)(x).logits).abs().max() > 1e-3  # the adapter does something
    save_adapter(tmp_path / "adapter", model, cfg, rc, str(path))
    meta = json.loads((tmp_path / "adapter" / "moetune.json").read_text())
    assert meta["expert"]["num_experts"] == 3 and meta["router"]["type"] == "top_k"
    again = _model(path)
    load_adapter(again, tmp_path / "adapter")
    layers = expert_layers(again)
    assert all(type(m.cfg) is type(cfg) and m.router.cfg == rc for m in layers.values())
    torch.testing.assert_close(again(x).logits, ours, atol=0, rtol=0)


# ------------------------------------------------------------------ the real training loop


def _train(tiny_llama, tiny_data, out, etype: str, *extra: str) -> dict:
    overrides = tiny_overrides(tiny_llama, tiny_data, out, f"expert.type={etype}", "expert.num_experts=3",
                               "stages=[train,eval]", "eval.generation=false", *extra)
    return run_recipe(load_recipe(None, overrides))


def _held_out_batch(tiny_llama) -> dict:
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    return tok([f"{r['instruction']} {r['response']}" for r in make_rows(16, 3)], return_tensors="pt", padding=True)


@pytest.mark.parametrize("etype", TYPES)
def test_training_lowers_loss_and_balance_loss_reaches_every_router(etype, tiny_llama, tiny_data, tmp_path):
    lr = "train.lr=3e-2" if etype == "mov" else "train.lr=1e-2"
    s = _train(tiny_llama, tiny_data, tmp_path / "run", etype, "router.balance_loss=switch",
               "router.balance_weight=0.1", "train.max_steps=20", lr)
    assert s["after"]["loss"] < s["before"]["loss"] - 1.0  # measured: 7.0 -> 3.1 (hydra), 2.9, 5.5 (mov)
    model = _model(tiny_llama)
    load_adapter(model, tmp_path / "run" / "adapter")
    model.train()
    model(**_held_out_batch(tiny_llama))
    aux = aux_losses(model)
    assert set(aux) == {"balance"} and float(aux["balance"].detach()) > 0
    aux["balance"].backward()
    layers = expert_layers(model)
    assert len(layers) > 0
    for name, layer in layers.items():
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0, name


def _mean_entropy(tiny_llama, adapter) -> float:
    model = _model(tiny_llama)
    load_adapter(model, adapter)
    with torch.no_grad():
        model(**_held_out_batch(tiny_llama))
    ents = [layer.routing_stats()["entropy"] for layer in expert_layers(model).values()]
    return sum(ents) / len(ents)


@pytest.fixture(scope="module")
def anisotropic_llama(tiny_llama, tmp_path_factory):
    """The tiny Llama with a shared direction added to every embedding, as real LMs' hidden states have
    one: a random router then sends most tokens to the same expert (an unbalanced load)."""
    out = tmp_path_factory.mktemp("aniso-llama")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.get_input_embeddings().weight += 3 * v / v.norm()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(out)
    return out


def test_balance_loss_raises_routing_entropy(anisotropic_llama, tiny_data, tmp_path):
    common = ("router.init_std=0.3", "train.max_steps=12", "train.eval_before=false", "train.lr=1e-2")
    _train(anisotropic_llama, tiny_data, tmp_path / "free", "hydralora", *common)
    _train(anisotropic_llama, tiny_data, tmp_path / "balanced", "hydralora", *common,
           "router.balance_loss=switch", "router.balance_weight=1.0")
    free = _mean_entropy(anisotropic_llama, tmp_path / "free" / "adapter")
    balanced = _mean_entropy(anisotropic_llama, tmp_path / "balanced" / "adapter")
    assert balanced > free + 0.1, (free, balanced)  # measured: 0.75 without, 0.99 with (max log 3 = 1.10)


@pytest.mark.parametrize("etype", ["hydralora", "molora"])
def test_fused_router_matmul_equals_separate_path(etype, monkeypatch):
    """A x and the router logits from one matmul (routing.low_rank_and_gates): same output, same
    gradients to x, A, B and W_g (balance loss included) as the separate router call."""
    from moetune.experts import routing
    torch.manual_seed(0)
    rc = RouterConfig(type="top_k", top_k=2, balance_loss="switch", balance_weight=0.5, z_loss_weight=0.1)
    base = torch.nn.Linear(12, 7, bias=False).requires_grad_(False)
    layer = REGISTRY[etype](base, config_class(etype)(type=etype, num_experts=3, rank=2, alpha=4), rc).train()
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.router.weight.normal_()
    x0 = torch.randn(2, 5, 12)
    calls = []
    linear = torch.nn.functional.linear

    def counting_linear(x, w, *a):
        calls.extend([1] if w is layer.router.weight else [])
        return linear(x, w, *a)
    monkeypatch.setattr(torch.nn.functional, "linear", counting_linear)

    def run(fuse: bool):
        monkeypatch.setattr(routing, "FUSE_ROUTER_MATMUL", fuse)
        x = x0.clone().requires_grad_(True)
        out = layer(x)
        (out.square().sum() + sum(layer.aux_losses().values())).backward()
        grads = [x.grad] + [p.grad for p in (layer.lora_A, layer.lora_B, layer.router.weight)]
        layer.zero_grad(set_to_none=True)
        return out.detach(), grads
    fused, g_fused = run(True)
    assert calls == []  # the router's own matmul (F.linear) was not used
    sep, g_sep = run(False)
    assert calls == [1]
    torch.testing.assert_close(fused, sep, rtol=1e-5, atol=1e-6)
    assert all(g is not None and g.abs().sum() > 0 for g in g_fused)
    for a, b in zip(g_fused, g_sep):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
