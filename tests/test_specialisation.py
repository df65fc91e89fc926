"""Routing specialisation: domain -> expert mutual information (routing.domain_expert_mi) and its
place in the routing report (report.specialisation, eval.json)."""
from __future__ import annotations

import math

import pytest
import torch
from test_report import held_out, routed_model  # noqa: F401  (module fixture reused)
from transformers import AutoTokenizer

from moetune.adapters.inject import expert_layers
from moetune.eval.report import GateSums, assignment_sums, collect_gates, routing_report, specialisation, table_rows
from moetune.experts.routing import domain_expert_mi
from moetune.recipe import RouterConfig

torch.set_num_threads(1)


def test_mi_fully_specialised_is_one_and_uniform_is_zero():
    eye = torch.eye(3)                                                   # domain d -> expert d
    mi, norm = domain_expert_mi(eye, torch.ones(3))
    assert float(mi) == pytest.approx(math.log(3)) and float(norm) == pytest.approx(1.0)
    flat = torch.tensor([[0.2, 0.3, 0.5]]).repeat(3, 1)                  # every domain routes alike
    mi, norm = domain_expert_mi(flat, torch.tensor([5.0, 1.0, 2.0]))
    assert float(mi) == pytest.approx(0.0, abs=1e-12) and float(norm) == pytest.approx(0.0, abs=1e-12)
    _, single = domain_expert_mi(torch.tensor([[1.0, 0.0]]), torch.ones(1))   # H(D) = 0
    assert float(single) == 0.0


def test_mi_hand_computed_case_and_more_domains_than_experts():
    # p(d) = (1/2, 1/2), p(e|0) = (1, 0), p(e|1) = (1/2, 1/2): p(e) = (3/4, 1/4)
    mi, norm = domain_expert_mi(torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([3.0, 3.0]))
    want = 0.5 * math.log(1 / 0.75) + 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    assert float(mi) == pytest.approx(want) and float(norm) == pytest.approx(want / math.log(2))
    eight = torch.eye(4)[torch.arange(8) % 4]                            # 8 domains, 2 per expert
    _, norm = domain_expert_mi(eight, torch.ones(8))
    assert float(norm) == pytest.approx(math.log(4) / math.log(8))       # the ceiling log N / H(D)
    per_layer = torch.stack([torch.eye(3), torch.full((3, 3), 1 / 3)], 1)  # (D, L=2, N)
    _, norm = domain_expert_mi(per_layer, torch.ones(3))
    assert norm.tolist() == pytest.approx([1.0, 0.0])


def test_assignments_count_top_k_choices_and_skip_padding():
    w = torch.tensor([[[[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]]])            # (L=1, B=1, T=2, N=3)
    a1 = assignment_sums(w, torch.tensor([[1, 0]]), torch.tensor([0]), 1, k=1)
    assert a1.tolist() == [[[1.0, 0.0, 0.0]]]                            # the padded token adds nothing
    a2 = assignment_sums(w, torch.tensor([[1, 1]]), torch.tensor([0]), 1, k=2)
    assert a2[0, 0].tolist() == pytest.approx([0.5, 0.5 + 0.5, 0.5])


def test_specialisation_reads_gates_for_soft_and_assignments_for_top_k():
    # soft gates that lean (0.6 vs 0.4) but whose argmax separates the two domains perfectly
    gate = torch.tensor([[[6.0, 4.0]], [[4.0, 6.0]]], dtype=torch.float64)     # (D=2, L=1, N=2) sums
    assign = torch.tensor([[[10.0, 0.0]], [[0.0, 10.0]]], dtype=torch.float64)
    tokens = torch.tensor([10.0, 10.0], dtype=torch.float64)
    soft = specialisation(GateSums(["l"], ["a", "b"], gate, torch.zeros(2, 1), tokens, assign, 1, "soft"))
    top = specialisation(GateSums(["l"], ["a", "b"], gate, torch.zeros(2, 1), tokens, assign, 1, "top_k"))
    assert soft["measure"] == "gates" and top["measure"] == "assignments"
    assert top["mean"] == pytest.approx(1.0) and soft["mi_norm_assignments"] == pytest.approx([1.0])
    want = math.log(2) - (-0.6 * math.log(0.6) - 0.4 * math.log(0.4))   # I = H(E) - H(E|D)
    assert soft["mean"] == pytest.approx(want / math.log(2))
    torch.testing.assert_close(torch.tensor(soft["domain_expert"]), torch.tensor([[0.6, 0.4], [0.4, 0.6]]))


def test_report_of_routers_forced_to_route_by_domain(tiny_llama, held_out):  # noqa: F811
    """Hooks make every router send domain 'add' to expert 0 and 'shout' to expert 2: specialisation 1,
    the domain x expert table is one-hot; the plain random routers of the same model score far lower."""
    model = routed_model(tiny_llama, "hydralora", RouterConfig(type="top_k", top_k=1))
    pad = AutoTokenizer.from_pretrained(tiny_llama).pad_token_id
    free = routing_report(collect_gates(model, held_out, pad, 8, "cpu"))
    order = sorted(held_out, key=lambda e: e.domain)                     # batches of one domain each
    state = {}

    def force(mod, inp, out):
        e = 0 if state["domain"] == "add" else 2
        return torch.nn.functional.one_hot(torch.full(out.shape[:-1], e), out.shape[-1]).float()

    hooks = [m.router.register_forward_hook(force) for m in expert_layers(model).values()]
    sums = None
    try:
        for d in ("add", "shout"):
            state["domain"] = d
            part = collect_gates(model, [e for e in order if e.domain == d], pad, 8, "cpu")
            if sums is None:
                sums = part
            else:  # join the two single-domain collections into one two-domain GateSums
                sums = GateSums(sums.names, sums.domains + part.domains, torch.cat([sums.gate, part.gate]),
                                torch.cat([sums.entropy, part.entropy]), torch.cat([sums.tokens, part.tokens]),
                                torch.cat([sums.assign, part.assign]), 1, "top_k")
    finally:
        for h in hooks:
            h.remove()
    rep = routing_report(sums)
    assert rep["specialisation"] == pytest.approx(1.0)
    assert rep["specialisation_measure"] == "assignments"
    assert rep["domain_expert"] == {"add": [1.0, 0.0, 0.0], "shout": [0.0, 0.0, 1.0]}
    assert all(lay["mi_norm"] == pytest.approx(1.0) for lay in rep["layers"].values())
    assert all(r[4] == pytest.approx(1.0) for r in table_rows(rep))
    assert 0.0 <= free["specialisation"] < 0.5
