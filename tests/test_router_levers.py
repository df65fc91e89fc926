"""Router levers (recipe `router:` keys): own optimizer param group, temperature schedule,
sequence-level routing, weak domain supervision, top-k with balance losses."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import randomise_routed, tiny_overrides
from transformers import AutoModelForCausalLM, AutoTokenizer

from moetune.adapters.inject import aux_losses, expert_layers, inject, trainable_parameters
from moetune.commands.stages import run_recipe
from moetune.data.rows import IGNORE, collate
from moetune.experts import routing as R
from moetune.experts import config_class
from moetune.recipe import RecipeError, RouterConfig, load_recipe
from moetune.train.loop import build_optimizer, build_scheduler, domain_indices, param_groups
from moetune.train.loss import CausalLMLoss
from test_report import examples

torch.set_num_threads(1)


def routed(path, router: RouterConfig, etype: str = "hydralora"):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    inject(model, config_class(etype)(type=etype, num_experts=3, rank=4, alpha=8), router)
    randomise_routed(model)
    return model


def test_router_param_group_holds_exactly_the_router_params(tiny_llama, tiny_data, tmp_path):
    rc = load_recipe(None, tiny_overrides(tiny_llama, tiny_data, tmp_path, "expert.type=hydralora", "train.lr=1e-3",
                                          "train.weight_decay=0.0", "router.lr_multiplier=10",
                                          "router.weight_decay=0.1"))
    model = routed(tiny_llama, rc.router)
    params = trainable_parameters(model)
    opt = build_optimizer(param_groups(model, params, rc), rc.train)
    build_scheduler(opt, rc.train, 10)
    routers = [m.router.weight for m in expert_layers(model).values()]
    assert len(opt.param_groups) == 2
    rest, mine = opt.param_groups
    assert {id(p) for p in mine["params"]} == {id(p) for p in routers} and len(mine["params"]) == len(routers)
    assert {id(p) for p in rest["params"]} == {id(p) for p in params} - {id(p) for p in routers}
    assert mine["lr"] == pytest.approx(1e-2) and mine["weight_decay"] == 0.1
    assert rest["lr"] == pytest.approx(1e-3) and rest["weight_decay"] == 0.0
    plain = load_recipe(None, tiny_overrides(tiny_llama, tiny_data, tmp_path, "expert.type=hydralora"))
    assert len(build_optimizer(param_groups(model, params, plain), plain.train).param_groups) == 1


def test_temperature_schedule_is_geometric_and_sharpens_gates(tiny_llama):
    cfg = RouterConfig(temperature=2.0, temperature_end=0.5)
    assert [R.scheduled_temperature(cfg, s, 11) for s in (0, 5, 10)] == pytest.approx([2.0, 1.0, 0.5])
    assert R.scheduled_temperature(RouterConfig(temperature=1.5), 7, 11) == 1.5
    model = routed(tiny_llama, cfg).eval()
    assert {m.router.temperature for m in expert_layers(model).values()} == {0.5}  # eval uses the end value
    ids = torch.randint(3, 60, (2, 6))
    ent = {}
    for t in (2.0, 0.5):
        R.set_temperature(model, t)
        model(input_ids=ids)
        ent[t] = sum(float(R.entropy(m.router._last[2].detach())) for m in expert_layers(model).values())
    assert ent[0.5] < ent[2.0] - 0.1


def test_prompt_mask_stops_at_first_target_of_each_segment():
    targets = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 0]], dtype=torch.bool)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])
    assert R.prompt_mask(targets, mask).long().tolist() == [[1, 1, 0, 0, 0, 0, 0, 0]]
    seg = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])                        # packed: a second sequence at 4
    assert R.prompt_mask(targets, mask, seg).long().tolist() == [[1, 1, 0, 0, 1, 1, 0, 0]]


def test_sequence_router_gives_one_gate_vector_per_sequence_and_segment():
    torch.manual_seed(0)
    router = R.Router(8, 4, RouterConfig(level="sequence", init_std=1.0))
    x = torch.randn(2, 6, 8)                                             # (B, T, d)
    pool = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    with R.routing_context(pool_mask=pool):
        w = router(x)                                                    # (B, T, N)
    assert torch.equal(w, w[:, :1].expand_as(w)) and not torch.allclose(w[0, 0], w[1, 0])
    want = torch.softmax((x[0, :3].mean(0)) @ router.weight.t(), -1)     # gates of the mean prompt input
    torch.testing.assert_close(w[0, 0], want)
    seg = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    pool = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    with R.routing_context(pool_mask=pool, segment_ids=seg):
        w = router(x)
    assert torch.equal(w[0, :3], w[0, :1].expand(3, -1)) and torch.equal(w[0, 3:], w[0, 3:4].expand(3, -1))
    torch.testing.assert_close(w[0, 3], torch.softmax(x[0, 3] @ router.weight.t(), -1))
    assert not torch.allclose(w[0, 0], w[0, 3])


def test_sequence_routing_in_a_model_ignores_the_answer(tiny_llama, tiny_data):
    model = routed(tiny_llama, RouterConfig(level="sequence")).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ex = examples(tiny_llama, tiny_data["validation"])[:4]
    b = collate(ex, tok.pad_token_id)
    lm = CausalLMLoss(model)
    lm(**b)
    gates = [m.router._last[2] for m in expert_layers(model).values()]  # (B, T, N) each
    real = b["attention_mask"].bool()
    for w in gates:
        for i in range(len(ex)):
            rows = w[i][real[i]]                                         # real tokens of sequence i
            assert torch.equal(rows, rows[:1].expand_as(rows))          # one gate vector per sequence
    changed = b["input_ids"].clone()
    answer = (b["labels"] != IGNORE) & real
    changed[answer] = (changed[answer] + 1) % 50 + 3                     # other answer tokens
    lm(input_ids=changed, attention_mask=b["attention_mask"], labels=b["labels"])
    after = [m.router._last[2] for m in expert_layers(model).values()]
    for w0, w1 in zip(gates, after):
        assert torch.equal(w0, w1)                                       # gates come from the prompt only


def test_sequence_routing_generation_reuses_the_prompt_gates(tiny_llama):
    """generate() with the context's cache equals a greedy loop that recomputes everything each step
    with the pool restricted to the prompt."""
    model = routed(tiny_llama, RouterConfig(level="sequence")).eval()
    ids = torch.randint(3, 60, (2, 5))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0                                                      # left padding
    with torch.no_grad():
        with R.routing_context(pool_mask=mask.bool(), cache={}):
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=4,
                                 pad_token_id=0, eos_token_id=None)
        seq, m = ids, mask
        for _ in range(4):
            pool = torch.cat([mask.bool(), torch.zeros(2, seq.shape[1] - ids.shape[1], dtype=torch.bool)], 1)
            pos = (m.cumsum(1) - 1).clamp_min(0)
            with R.routing_context(pool_mask=pool):
                logits = model(input_ids=seq, attention_mask=m, position_ids=pos).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
            m = torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], 1)
    assert torch.equal(out, seq)


def test_domain_loss_values_and_gradient_reaches_routers_only(tiny_llama, tiny_data):
    aligned = torch.eye(3)[torch.tensor([0, 1, 2, 0])]                   # domains 0..3, a(3) = 0
    assert float(R.domain_loss(aligned, torch.tensor([0, 1, 2, 3]))) == pytest.approx(0.0, abs=1e-6)
    flat = torch.full((4, 3), 1 / 3)
    assert float(R.domain_loss(flat, torch.tensor([0, 1, -1, 1]))) == pytest.approx(math.log(3))
    model = routed(tiny_llama, RouterConfig(domain_loss_weight=0.5)).train()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ex = examples(tiny_llama, tiny_data["train"])[:6]
    b = collate(ex, tok.pad_token_id)
    index = {"add": 0, "shout": 1}
    dom = torch.tensor([index[e.domain] for e in ex])[:, None].expand_as(b["attention_mask"])
    dom = dom.masked_fill(b["attention_mask"] == 0, -1)
    with R.routing_context(token_domain=dom):
        CausalLMLoss(model)(**b)
    loss = aux_losses(model)["domain"]
    assert float(loss.detach()) > 0
    params = trainable_parameters(model)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    routers = {id(m.router.weight) for m in expert_layers(model).values()}
    for p, g in zip(params, grads):
        if id(p) in routers:
            assert g is not None and g.abs().sum() > 0
        else:
            assert g is None or not g.any()


def test_domain_loss_needs_two_domains(tiny_llama, tiny_data, tmp_path):
    rc = load_recipe(None, tiny_overrides(tiny_llama, tiny_data, tmp_path, "router.domain_loss_weight=0.1"))
    ex = examples(tiny_llama, tiny_data["train"])
    assert domain_indices(rc, ex) == {"add": 0, "shout": 1}
    with pytest.raises(RecipeError, match="router.domain_loss_weight"):
        domain_indices(rc, [e for e in ex if e.domain == "add"])


def test_training_with_every_lever(tiny_llama, tiny_data, tmp_path):
    """top-k routing with the switch balance loss, sequence level, a temperature schedule, a router
    param group and the domain loss train together; the losses are logged and the report has the MI."""
    out = tmp_path / "run"
    s = run_recipe(load_recipe(None, tiny_overrides(
        tiny_llama, tiny_data, out, "expert.type=hydralora", "expert.num_experts=2", "router.type=top_k",
        "router.top_k=1", "router.balance_loss=switch", "router.balance_weight=0.01", "router.level=sequence",
        "router.temperature=2.0", "router.temperature_end=0.5", "router.lr_multiplier=5",
        "router.domain_loss_weight=1.0", "stages=[train,eval]", "eval.generation=false", "train.max_steps=8")))
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    aux = [r["aux"] for r in steps if "aux" in r]
    assert len(aux) == 8 and all({"balance", "domain"} <= set(a) for a in aux)
    assert aux[-1]["domain"] < aux[0]["domain"]                          # the routers learn the assignment
    rep = json.loads((out / "eval.json").read_text())["routing"]
    assert rep["specialisation_measure"] == "assignments" and 0.0 <= rep["specialisation"] <= 1.0
    assert s["after"]["loss"] < s["before"]["loss"]
