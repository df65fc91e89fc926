"""The routing report (moetune/eval/report.py): masked load and entropy, dead experts, per-domain gates, heatmap."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import randomise_routed
from transformers import AutoModelForCausalLM, AutoTokenizer

from moetune.adapters.inject import expert_layers, inject
from moetune.data.pipeline import load_examples
from moetune.data.rows import collate
from moetune.eval.report import (GateSums, batch_sums, collect_gates, domain_gates, eval_routing, mean_gates,
                                 routing_report, row_groups, save_heatmap, table_rows)
from moetune.experts import routing
from moetune.experts import config_class
from moetune.experts.base import ExpertConfig
from moetune.recipe import DataConfig, RouterConfig

torch.set_num_threads(1)


def routed_model(path, etype: str = "hydralora", router: RouterConfig | None = None):
    """The tiny model with a routed adapter, random experts and a decisive random router."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    kw = {} if etype == "mov" else {"rank": 4, "alpha": 8}
    inject(model, config_class(etype)(type=etype, num_experts=3, **kw), router or RouterConfig())
    randomise_routed(model)
    return model


def examples(path, data_file):
    return load_examples(str(data_file), AutoTokenizer.from_pretrained(path), DataConfig())


@pytest.fixture(scope="module")
def held_out(tiny_llama, tiny_data):
    return examples(tiny_llama, tiny_data["validation"])


def test_load_sums_to_one_and_padding_does_not_count(tiny_llama, held_out):
    model = routed_model(tiny_llama)
    pad = AutoTokenizer.from_pretrained(tiny_llama).pad_token_id
    e = held_out[0]
    long = dataclasses.replace(e, input_ids=e.input_ids * 3, labels=e.labels * 3)  # pads the others to 3x
    held_out = [*held_out, long]
    lengths = [len(e.input_ids) for e in held_out]
    assert max(lengths) * len(held_out) > 2 * sum(lengths)  # one batch is mostly padding
    alone = routing_report(collect_gates(model, held_out, pad, 1, "cpu"))          # no padding at all
    padded = routing_report(collect_gates(model, held_out, pad, len(held_out), "cpu"))
    assert alone["tokens"] == padded["tokens"] == sum(lengths)
    for name, lay in padded["layers"].items():
        assert math.isclose(sum(lay["load"]), 1.0, abs_tol=1e-6)  # float32 gates
        torch.testing.assert_close(torch.tensor(lay["load"]), torch.tensor(alone["layers"][name]["load"]),
                                   atol=1e-5, rtol=0)
        assert abs(lay["entropy"] - alone["layers"][name]["entropy"]) < 1e-5
        assert 0 <= lay["entropy"] <= padded["max_entropy"] == math.log(3)
    # Cross-check with routing.stats on one layer's gates of the padded batch, masked and unmasked.
    b = collate(held_out, pad)
    with torch.no_grad():
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    name, layer = next(iter(expert_layers(model).items()))
    w = layer.router._last[2]                                                     # (B, T, N)
    masked = routing.stats(w, b["attention_mask"])
    torch.testing.assert_close(torch.tensor(masked["load"]), torch.tensor(padded["layers"][name]["load"]),
                               atol=1e-5, rtol=0)
    unmasked = routing.stats(w)["load"]                                            # padding counted
    assert max(abs(a - c) for a, c in zip(unmasked, masked["load"])) > 1e-4       # so the mask matters


def test_batch_sums_ignores_padding_and_splits_domains():
    g = torch.Generator().manual_seed(0)
    w = torch.softmax(torch.randn(2, 3, 5, 4, generator=g), -1)                     # (L, B, T, N)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    gate, ent, tok = batch_sums(w, mask, torch.tensor([1, 0, 1]), 2)
    assert tok.tolist() == [5.0, 4.0]
    torch.testing.assert_close(gate[1, 0], w[0, 0, :3].sum(0).double() + w[0, 2, 0].double())
    h = -(w[1, 1] * w[1, 1].log()).sum(-1).sum()
    torch.testing.assert_close(ent[0, 1], h.double())
    garbage = w.clone()
    garbage[:, 0, 3:] = torch.tensor([1.0, 0, 0, 0])                                # change padded positions only
    assert torch.equal(batch_sums(garbage, mask, torch.tensor([1, 0, 1]), 2)[0], gate)


def test_dead_experts_on_a_router_forced_to_one_expert(tiny_llama, held_out):
    model = routed_model(tiny_llama, "molora")
    layers = expert_layers(model)
    force = [m.router.register_forward_hook(lambda mod, i, out: torch.nn.functional.one_hot(
        torch.zeros(out.shape[:-1], dtype=torch.long), out.shape[-1]).float()) for m in layers.values()]
    pad = AutoTokenizer.from_pretrained(tiny_llama).pad_token_id
    rep = routing_report(collect_gates(model, held_out, pad, 8, "cpu"))
    for h in force:
        h.remove()
    assert rep["dead_total"] == 2 * len(layers)
    for lay in rep["layers"].values():
        assert lay["load"] == [1.0, 0.0, 0.0] and lay["dead"] == [1, 2] and lay["entropy"] == 0.0
    rows = table_rows(rep)  # 14 modules: grouped per layer index, dead counts add up
    assert [r[-1] for r in rows] == [2 * len(idx) for _, idx in row_groups(list(rep["layers"]))] == [14, 14]
    assert all(r[1] == 0.0 and r[2] == 1.0 and r[3] == 0.0 for r in rows)
    free = routing_report(collect_gates(model, held_out, pad, 8, "cpu"))       # hooks removed: nobody dead
    assert free["dead_total"] == 0


def test_per_domain_gates_differ_when_inputs_differ(tiny_llama, held_out):
    model = routed_model(tiny_llama, "mov")
    pad = AutoTokenizer.from_pretrained(tiny_llama).pad_token_id
    sums = collect_gates(model, held_out, pad, 8, "cpu")
    assert sums.domains == ["add", "shout"]
    dom = domain_gates(sums)                                                       # (D, L, N)
    torch.testing.assert_close(dom.sum(-1), torch.ones(dom.shape[:2], dtype=torch.float64))
    assert (dom[0] - dom[1]).abs().max() > 1e-3
    overall = (dom * sums.tokens[:, None, None]).sum(0) / sums.tokens.sum()       # token-weighted mean
    torch.testing.assert_close(overall, mean_gates(sums))
    rep = routing_report(sums)
    assert set(rep["per_domain"]) == {"add", "shout"}
    assert rep["per_domain"]["add"]["tokens"] + rep["per_domain"]["shout"]["tokens"] == rep["tokens"]
    assert len(rep["per_domain"]["add"]["gates"]) == len(rep["layers"])


def test_heatmap_png_and_grouping_by_layer_index(tiny_llama, held_out, tmp_path):
    model = routed_model(tiny_llama)
    pad = AutoTokenizer.from_pretrained(tiny_llama).pad_token_id
    rep = eval_routing(model, held_out, pad, 8, "cpu", tmp_path)
    png = tmp_path / "routing.png"
    assert rep["heatmap"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 2000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]        # no temp file left
    # 14 modules (2 layers x 7 projections): rows are grouped per layer index.
    names = [f"model.layers.{i}.{p}" for i in range(2) for p in "abcdefg"]
    assert [(lab, idx) for lab, idx in row_groups(names)] == [("layer 0 (7 modules)", list(range(7))),
                                                              ("layer 1 (7 modules)", list(range(7, 14)))]
    gate = torch.rand(2, 14, 3, dtype=torch.float64)
    sums = GateSums(names, ["x", "y"], gate / gate.sum(-1, keepdim=True) * 10, torch.ones(2, 14, dtype=torch.float64),
                    torch.full((2,), 10.0, dtype=torch.float64))
    big = routing_report(sums)
    assert len(table_rows(big)) == 2
    assert save_heatmap(big, tmp_path / "big.png").stat().st_size > 2000


def test_plain_lora_has_no_routing_report(tiny_llama, held_out, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    inject(model, ExpertConfig(rank=4), None)
    pad = AutoTokenizer.from_pretrained(tiny_llama).pad_token_id
    assert collect_gates(model, held_out, pad, 8, "cpu") is None
    assert eval_routing(model, held_out, pad, 8, "cpu", tmp_path) is None
    assert not (tmp_path / "routing.png").exists()
