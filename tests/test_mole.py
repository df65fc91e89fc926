"""MoLE (expert.type mole): frozen LoRA experts (moetune and stock PEFT, mixed ranks) mixed by trained
gates; one expert = that LoRA, uniform gates = the mean of the experts, the gate formula and its
sharing per granularity against a loop over experts, balance-loss gradient, masking, save/load."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import make_rows
from moetune.adapters.inject import aux_losses, expert_layers, inject, trainable_parameters
from moetune.adapters.io import load_adapter, read_adapter, save_adapter
from moetune.experts import REGISTRY, ExpertConfig
from moetune.experts.mole import MoLEConfig, MoLELayer, place_of, set_mask
from moetune.recipe import RecipeError, RouterConfig, load_recipe

torch.set_num_threads(1)


def _model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(5, vocab, (2, 9), generator=torch.Generator().manual_seed(0))


def make_lora(base, out, rank: int, seed: int, targets=("all-linear",), alpha=None):
    """A moetune LoRA adapter with random non-zero A and B."""
    m = _model(base)
    cfg = ExpertConfig(type="lora", rank=rank, alpha=alpha or 2.0 * rank, target_modules=list(targets))
    inject(m, cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in expert_layers(m).values():
            layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=g))
    save_adapter(out, m, cfg, None, str(base))
    return out


def make_peft_lora(base, out, rank: int, seed: int, targets):
    """A stock PEFT LoRA directory (random A and B), saved by peft itself."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    pm = get_peft_model(_model(base), LoraConfig(r=rank, lora_alpha=3.0 * rank, target_modules=list(targets),
                                                 init_lora_weights=False, fan_in_fan_out="c_attn" in targets))
    pm.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_experts(tiny_llama, tmp_path_factory):
    """Three experts of ranks 2, 4 (q/v only) and 3 (stock PEFT, attention only)."""
    d = tmp_path_factory.mktemp("experts")
    return [make_lora(tiny_llama, d / "arith", 2, 1), make_lora(tiny_llama, d / "qv", 4, 2, ["q_proj", "v_proj"]),
            make_peft_lora(tiny_llama, d / "peft", 3, 3, ["q_proj", "k_proj", "v_proj", "o_proj"])]


def _mole(base, experts, granularity="layer", router=None, **kw):
    model = _model(base)
    cfg = MoLEConfig(type="mole", experts=[str(e) for e in experts], granularity=granularity, **kw)
    return model, cfg, inject(model, cfg, router or RouterConfig())


def _deltas(experts, module, x):
    """E_i(x) = s_i B_i A_i x for each expert, by a loop over the adapter files (0 where not adapted)."""
    out = []
    for e in experts:
        meta, st = read_adapter(e)
        s = meta["expert"]["alpha"] / meta["expert"]["rank"]
        a, b = st.get(f"{module}.lora_A"), st.get(f"{module}.lora_B")
        out.append(torch.zeros(()) if a is None else s * (x @ a.t() @ b.t()))
    return out


def _capture(model):
    """Forward hooks keeping every MoLE layer's (input, output)."""
    seen, handles = {}, []
    for n, m in expert_layers(model).items():
        handles.append(m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, (i[0], o))))
    return seen, handles


def _randomise_gates(model, seed=4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g))


def test_one_expert_mole_is_that_lora_exactly(tiny_llama, tiny_gpt2, llama_experts, tmp_path):
    from peft import PeftModel
    x = _ids(_model(tiny_llama).config.vocab_size)
    ref = _model(tiny_llama)
    load_adapter(ref, llama_experts[0])
    model, _, _ = _mole(tiny_llama, llama_experts[:1])
    _randomise_gates(model)  # softmax over one expert is 1 whatever the gate weights
    torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=1e-5)
    peft = PeftModel.from_pretrained(_model(tiny_llama), llama_experts[2]).eval()
    model, _, _ = _mole(tiny_llama, llama_experts[2:])
    torch.testing.assert_close(model(x).logits, peft(x).logits, rtol=0, atol=1e-5)
    # GPT-2 (Conv1D projections), a stock PEFT expert with fan_in_fan_out
    g = make_peft_lora(tiny_gpt2, tmp_path / "g", 2, 5, ["c_attn", "c_fc"])
    peft = PeftModel.from_pretrained(_model(tiny_gpt2), g).eval()
    model, _, layers = _mole(tiny_gpt2, [g])
    assert {n.rsplit(".", 1)[-1] for n in layers} == {"c_attn", "c_fc"}
    torch.testing.assert_close(model(x).logits, peft(x).logits, rtol=0, atol=1e-5)


def test_fresh_mole_is_the_mean_of_its_experts(tiny_llama, llama_experts):
    model, _, layers = _mole(tiny_llama, llama_experts, "network")
    base = _model(tiny_llama)
    with torch.no_grad():  # reference: W0 + (1/N) sum_i s_i B_i A_i folded into a plain model
        for name, layer in layers.items():
            eye = torch.eye(layer.d_in)
            mean_delta = sum(_deltas(llama_experts, name, eye)) / 3                  # (d_in, d_out)
            base.get_submodule(name).weight += mean_delta.t()
            r = {"q_proj": 4, "v_proj": 4, "k_proj": 3, "o_proj": 3}.get(name.rsplit(".", 1)[-1], 2)  # largest rank
            assert layer.expert_A.shape == (3, r, layer.d_in) and layer.expert_B.shape == (3, layer.d_out, r)
    x = _ids(base.config.vocab_size)
    torch.testing.assert_close(model(x).logits, base(x).logits, rtol=0, atol=1e-5)
    w = layers["model.layers.0.self_attn.q_proj"].routing_stats()["load"]
    assert w == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize("granularity, places", [("matrix", 14), ("layer", 4), ("block", 2), ("network", 1)])
def test_gates_follow_the_paper_formula_at_each_granularity(tiny_llama, llama_experts, granularity, places):
    tau = 0.7
    model, cfg, layers = _mole(tiny_llama, llama_experts, granularity, temperature=tau)
    leaders = [m for m in layers.values() if hasattr(m, "router")]
    assert len(leaders) == places and len({m.place for m in layers.values()}) == places
    n_params = sum(3 * 3 * m.d_out + 3 for m in leaders)                 # W_g (N, N*d_out) + b (N,) per place
    assert sum(p.numel() for p in trainable_parameters(model)) == n_params
    _randomise_gates(model)
    seen, handles = _capture(model)
    with torch.no_grad():
        model(_ids(model.config.vocab_size))
    for name, layer in layers.items():
        lead = layer._leader[0]
        x_lead = seen[lead.name][0]
        e = torch.cat([d.expand(*x_lead.shape[:-1], lead.d_out) for d in _deltas(llama_experts, lead.name, x_lead)], -1)
        z = F.layer_norm(e, e.shape[-1:])                                 # LayerNorm of the concatenation
        gate = torch.softmax((z @ lead.router.weight.t() + lead.router.bias) / tau, -1)  # (B, T, N)
        x, y = seen[name]
        ref = layer.base(x) + sum(gate[..., i:i + 1] * d for i, d in enumerate(_deltas(llama_experts, name, x)))
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    for h in handles:
        h.remove()
    assert place_of("model.layers.12.mlp.up_proj", granularity) == {
        "matrix": "model.layers.12.mlp.up_proj", "layer": "model.layers.12.mlp", "block": "model.layers.12",
        "network": ""}[granularity]


def test_factored_gate_equals_layernorm_of_the_expert_outputs():
    """MoLEGate works on h_n = A_n x only; it must equal the paper's softmax(W_g LN([B_1 h_1; ...]) + b)."""
    from moetune.experts.mole import MoLEGate
    g = torch.Generator().manual_seed(0)
    n, d_out, r = 4, 96, 5
    b = torch.randn(n, d_out, r, generator=g) + 0.5                       # (N, d_out, r): non-zero mean outputs
    b[1, :, 3:] = 0                                                       # a zero-padded lower-rank expert
    h = 3 * torch.randn(2, 7, n, r, generator=g)                          # (B, T, N, r)
    gate = MoLEGate(d_out, n, temperature=0.6)
    with torch.no_grad():
        gate.weight.normal_(0, 0.05, generator=g)
        gate.bias.normal_(0, 1.0, generator=g)
        e = torch.einsum("...nr,nor->...no", h, b).flatten(-2)             # (B, T, N*d_out)
        ref = torch.softmax((F.layer_norm(e, e.shape[-1:]) @ gate.weight.t() + gate.bias) / 0.6, -1)
        torch.testing.assert_close(gate(h, b), ref, rtol=1e-4, atol=1e-5)
        assert float((ref - 1 / n).abs().max()) > 0.05                    # gates far from uniform: a real check


def test_only_gates_train_and_balance_loss_sends_gradient_to_them(tiny_llama, llama_experts):
    rc = RouterConfig(balance_loss="mole", balance_weight=0.5)
    model, _, layers = _mole(tiny_llama, llama_experts, "layer", rc)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".router." not in n)
    assert all(not b.requires_grad for m in layers.values() for b in (m.expert_A, m.expert_B))
    x = _ids(model.config.vocab_size)
    model(x)
    assert float(aux_losses(model)["balance"].detach()) == pytest.approx(0.5 * 3 * math.log(3), abs=1e-6)  # uniform: N log N
    _randomise_gates(model)
    model(x)
    bal = aux_losses(model)["balance"]
    probs = torch.stack([m.router._last[1] for m in layers.values() if hasattr(m, "router")])  # (P, B, T, N)
    q = probs.detach().reshape(-1, 3).mean(0)                          # mean over tokens and places
    assert float(bal.detach()) == pytest.approx(float(-0.5 * q.log().sum()), rel=1e-5)
    bal.backward()
    grads = [p.grad for p in trainable_parameters(model)]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 1e-3
    with torch.no_grad():  # one gradient step lowers the balance loss
        for p in trainable_parameters(model):
            p -= 0.05 * p.grad
    model(x)
    assert float(aux_losses(model)["balance"].detach()) < float(bal.detach())


def test_masked_experts_get_zero_gate_and_the_rest_renormalise(tiny_llama, llama_experts):
    model, cfg, layers = _mole(tiny_llama, llama_experts, "block")
    _randomise_gates(model)
    x = _ids(model.config.vocab_size)
    seen, handles = _capture(model)
    with torch.no_grad():
        model(x)
        full = {n: m.router._last[1].clone() for n, m in layers.items() if hasattr(m, "router")}
        set_mask(layers.values(), ["qv"])
        model(x)
    first = "model.layers.0.self_attn.q_proj"  # block 0's gate: the same input with and without the mask
    kept = full[first] * torch.tensor([1.0, 0.0, 1.0])
    torch.testing.assert_close(layers[first].router._last[1], kept / kept.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)
    b = layers[first].expert_B                                            # (N, d_out, r)
    h = torch.randn(2, 3, 3, b.shape[-1], generator=torch.Generator().manual_seed(5))  # (B, T, N, r)
    gate = layers[first].router
    with torch.no_grad():
        masked = gate(h, b)
        gate.keep.fill_(True)
        kept = gate(h, b) * torch.tensor([1.0, 0.0, 1.0])
    torch.testing.assert_close(masked, kept / kept.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)
    assert float(masked[..., 1].abs().max()) == 0.0
    set_mask(layers.values(), ["qv"])
    name = "model.layers.1.mlp.down_proj"  # its place's gate is the masked one of 'model.layers.1'
    xin, y = seen[name]
    gate = layers["model.layers.1.self_attn.q_proj"].router._last[1]
    d = _deltas(llama_experts, name, xin)
    torch.testing.assert_close(y, layers[name].base(xin) + gate[..., :1] * d[0], rtol=1e-4, atol=1e-5)
    for h in handles:
        h.remove()
    with pytest.raises(RecipeError, match="not experts of this MoLE.*arith, qv, peft"):
        set_mask(layers.values(), ["nope"])
    with pytest.raises(RecipeError, match="every expert"):
        set_mask(layers.values(), ["arith", "qv", "peft"])


def test_save_load_is_self_contained_and_reproduces_logits(tiny_llama, llama_experts, tmp_path):
    experts = [shutil.copytree(e, tmp_path / "src" / e.name) for e in llama_experts]
    model, cfg, _ = _mole(tiny_llama, experts, "matrix", names=["a", "b", "c"], masked=["b"])
    _randomise_gates(model)
    x = _ids(model.config.vocab_size)
    ref = model(x).logits
    save_adapter(tmp_path / "mole", model, cfg, RouterConfig(), str(tiny_llama))
    shutil.rmtree(tmp_path / "src")  # the saved adapter carries copies of its experts
    meta = json.loads((tmp_path / "mole" / "moetune.json").read_text())
    assert meta["expert"]["experts"] == ["experts/0_a", "experts/1_b", "experts/2_c"]
    assert meta["expert"]["masked"] == ["b"]
    fresh = _model(tiny_llama)
    load_adapter(fresh, tmp_path / "mole")
    torch.testing.assert_close(fresh(x).logits, ref, rtol=0, atol=0)
    assert all(type(m) is MoLELayer for m in expert_layers(fresh).values())
    assert REGISTRY["mole"] is MoLELayer and not MoLELayer.mergeable


def test_routing_report_covers_mole(tiny_llama, llama_experts, tmp_path):
    from moetune.data.pipeline import load_splits
    from moetune.eval.report import eval_routing
    from moetune.recipe import DataConfig
    from transformers import AutoTokenizer
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_rows(6, 0)))
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ex = load_splits(DataConfig(train=str(tmp_path / "t.jsonl"), validation=None, test=None, validation_split=0.5),
                     tok, ("validation",))["validation"]
    model, _, _ = _mole(tiny_llama, llama_experts, "layer")
    rep = eval_routing(model, ex, tok.pad_token_id, 4, torch.device("cpu"), tmp_path)
    assert rep["num_experts"] == 3 and len(rep["layers"]) == 4
    assert all(v["load"] == pytest.approx([1 / 3] * 3) for v in rep["layers"].values())
    assert (tmp_path / "routing.png").is_file()


def test_recipe_and_adapter_mismatches_are_clear_errors(tiny_llama, tiny_gpt2, llama_experts, tmp_path,
                                                        monkeypatch):
    gpt = make_lora(tiny_gpt2, tmp_path / "gpt", 2, 1)
    with pytest.raises(RecipeError, match=r"MoLE expert 'gpt' .*adapts .* module\(s\) that this model"):
        _mole(tiny_llama, [llama_experts[0], gpt])
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(make_rows(1, 0)[0]) + "\n")
    base = [f"model.path={tiny_llama}", "expert.type=mole", f"data.train={data}", "data.validation=null",
            "data.test=null", "eval.split=validation", "stages=[train,eval]"]
    ok = load_recipe(None, [*base, f"expert.experts=[{llama_experts[0]},{llama_experts[2]}]"])
    assert ok.expert.granularity == "layer" and ok.expert.temperature == 1.0
    with pytest.raises(RecipeError, match=r"MoLE expert 'gpt' .*trained on base model .*but model.path"):
        load_recipe(None, [*base, f"expert.experts=[{llama_experts[0]},{gpt}]"])
    with pytest.raises(RecipeError, match="expert.names' has 1 name for 2 experts"):
        load_recipe(None, [*base, f"expert.experts=[{llama_experts[0]},{gpt}]", "expert.names=[x]"])
    with pytest.raises(RecipeError, match="is empty"):
        load_recipe(None, base)
    with pytest.raises(RecipeError, match="router.type"):
        load_recipe(None, [*base, f"expert.experts=[{llama_experts[0]}]", "router.type=top_k"])
    with pytest.raises(RecipeError, match="merge-lora --adapters"):
        load_recipe(None, [*base[:-1], "stages=[train,merge]", f"expert.experts=[{llama_experts[0]}]"])
    hydra = tmp_path / "hydra"
    m = _model(tiny_llama)
    hc = REGISTRY["hydralora"].config_cls(type="hydralora", num_experts=2)
    inject(m, hc, RouterConfig())
    save_adapter(hydra, m, hc, RouterConfig(), str(tiny_llama))
    with pytest.raises(RecipeError, match="'hydra' .*is a 'hydralora' adapter"):
        load_recipe(None, [*base, f"expert.experts=[{hydra}]"])


def test_mole_sequence_gates_and_domain_loss_train_the_gates_only(tiny_llama, llama_experts):
    """router.level=sequence: one gate vector per sequence, from its prompt's mean gate logits;
    router.domain_loss_weight: summed over places, zero when each domain's gate sits on its own
    expert (a(d) = d mod N), and its gradient reaches the gates, which alone train."""
    from moetune.experts import routing as R
    rc = RouterConfig(level="sequence", domain_loss_weight=0.5)
    model, _, layers = _mole(tiny_llama, llama_experts, "layer", rc)
    _randomise_gates(model)
    model.train()
    x = _ids(model.config.vocab_size)                                     # (2, 9)
    pool = torch.zeros(2, 9, dtype=torch.bool)
    pool[:, :4] = True                                                    # the "prompt": first 4 tokens
    dom = torch.tensor([[0] * 9, [2] * 9])                                # domains 0 and 2 (a(2) = 2)
    with R.routing_context(pool_mask=pool, token_domain=dom):
        model(x)
    leaders = [m for m in layers.values() if hasattr(m, "router")]
    for m in leaders:
        w = m.router._last[2]                                             # (B, T, N)
        assert torch.equal(w, w[:, :1].expand_as(w))                      # one gate vector per sequence
    loss = aux_losses(model)["domain"]
    want = 0.5 * sum(-(m.router._last[1][0, 0, 0].log() + m.router._last[1][1, 0, 2].log()) / 2 for m in leaders)
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    params = trainable_parameters(model)
    assert params and all(".router." in n for n, p in model.named_parameters() if p.requires_grad)
    grads = torch.autograd.grad(loss, params)
    assert all(float(g.abs().sum()) > 0 for g in grads)                   # W_g and b of every place
    for _ in range(30):  # steps on the domain loss alone put each domain on its own expert
        with R.routing_context(pool_mask=pool, token_domain=dom):
            model(x)
        step = torch.autograd.grad(aux_losses(model)["domain"], params)
        with torch.no_grad():
            for p, g in zip(params, step):
                p -= 2.0 * g
    for m in leaders:
        g = m.router._last[1].detach()  # the last forward's gates
        assert float(g[0, 0, 0]) > 0.9 and float(g[1, 0, 2]) > 0.9
