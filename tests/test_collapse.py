"""Collapsing routed adapters into stock PEFT LoRA / IA3 (moetune/export/collapse.py) and the CLI around it."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import cli, tiny_overrides
from moetune.adapters.inject import expert_layers, inject
from moetune.adapters.inject import routed_layers
from moetune.adapters.io import load_adapter
from moetune.eval.report import collect_gates, mean_gates
from moetune.experts import config_class
from moetune.experts.molora import molora_ab
from moetune.export.collapse import collapse_layers, install, kl_by_domain, save_collapsed
from moetune.export.merge import merge_into_base
from moetune.recipe import DataConfig, RecipeError, RouterConfig, load_recipe

torch.set_num_threads(1)
TYPES = ["hydralora", "molora", "mov"]
ARCHS = ["tiny_llama", "tiny_gpt2"]


def _base(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _routed(path, etype: str, arch: str, zero_router: bool, router: RouterConfig | None = None):
    """A routed adapter with random experts; the router is random, or zero (uniform gates 1/N)."""
    model = _base(path)
    kw = {"hydralora": dict(rank=4, alpha=8), "molora": dict(rank=2, alpha=6), "mov": {}}[etype]
    if etype == "mov" and arch == "tiny_gpt2":
        kw["target_modules"] = ["c_attn", "mlp.c_proj"]
    inject(model, config_class(etype)(type=etype, num_experts=3, **kw), router or RouterConfig())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in expert_layers(model).values():
            for name, p in layer.adapter_state().items():
                noise = torch.randn(p.shape, generator=g)
                router = 0.0 * noise if zero_router else noise
                p.copy_({"router.weight": router, "ia3_l": 1 + 0.3 * noise}.get(name, 0.2 * noise))
    return model


def _examples(path, data):
    from moetune.data.pipeline import load_examples
    return load_examples(str(data["validation"]), AutoTokenizer.from_pretrained(path), DataConfig())


def _logits(model, vocab: int) -> torch.Tensor:
    x = torch.randint(5, vocab, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x).logits


def _collapse(model, path, data):
    ex = _examples(path, data)
    pad = AutoTokenizer.from_pretrained(path).pad_token_id
    routed = routed_layers(model)
    w = mean_gates(collect_gates(model, ex, pad, 8, "cpu"))                 # (L, N)
    return routed, collapse_layers(routed, w), w, ex, pad


def test_molora_concatenation_equals_weighted_sum_of_experts():
    g = torch.Generator().manual_seed(0)
    a, b, w = torch.randn(3, 2, 5, generator=g), torch.randn(3, 7, 2, generator=g), torch.tensor([0.5, 0.2, 0.3])
    a_cat, b_cat = molora_ab(a, b, w)
    torch.testing.assert_close(b_cat @ a_cat, sum(w[i] * b[i] @ a[i] for i in range(3)))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("etype", TYPES)
def test_constant_gates_collapse_exactly(etype, arch, request, tiny_data):
    path = request.getfixturevalue(arch)
    model = _routed(path, etype, arch, zero_router=True)
    v = model.config.vocab_size
    ref = _logits(model, v)
    routed, collapsed, w, ex, pad = _collapse(model, path, tiny_data)
    torch.testing.assert_close(w, torch.full_like(w, 1 / 3), atol=1e-6, rtol=0)
    install(model, collapsed)
    assert (_logits(model, v) - ref).abs().max() < 1e-5
    kl = kl_by_domain(model, routed, collapsed, ex, pad, 8, "cpu")
    assert kl["tokens"] > 0 and abs(kl["kl"]) < 1e-6 and set(kl["per_domain"]) == {"add", "shout"}


@pytest.mark.parametrize("etype", ["hydralora", "molora"])
def test_fidelity_of_sequence_routing_pools_each_prompt(etype, tiny_llama, tiny_data):
    """The fidelity KL's forwards enter the batch's routing context: with router.level 'sequence' each example's
    gates pool its prompt, as in training and eval, so the KL does not depend on the padding of its batch."""
    model = _routed(tiny_llama, etype, "tiny_llama", zero_router=False, router=RouterConfig(level="sequence"))
    routed, collapsed, w, ex, pad = _collapse(model, tiny_llama, tiny_data)
    batched = kl_by_domain(model, routed, collapsed, ex, pad, 8, "cpu")
    alone = kl_by_domain(model, routed, collapsed, ex, pad, 1, "cpu")
    assert batched["tokens"] == alone["tokens"] > 0 and batched["kl"] > 1e-3
    assert batched["kl"] == pytest.approx(alone["kl"], rel=1e-4)
    for d, v in alone["per_domain"].items():
        assert batched["per_domain"][d]["kl"] == pytest.approx(v["kl"], rel=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("etype", TYPES)
def test_collapsed_adapter_loads_in_peft_and_merges(etype, arch, request, tiny_data, tmp_path):
    from peft import PeftModel
    path = request.getfixturevalue(arch)
    model = _routed(path, etype, arch, zero_router=False)
    v = model.config.vocab_size
    routed_logits = _logits(model, v)
    routed, collapsed, w, ex, pad = _collapse(model, path, tiny_data)
    assert (w - 1 / 3).abs().max() > 0.02                                   # really non-uniform gates
    # The collapse equals the routed model with every router's gates pinned at w-bar.
    pins = [layer.router.register_forward_hook(lambda m, i, out, wi=w[k].float(): wi.expand_as(out))
            for k, layer in enumerate(routed.values())]
    pinned = _logits(model, v)
    for h in pins:
        h.remove()
    install(model, collapsed)
    ours = _logits(model, v)
    torch.testing.assert_close(ours, pinned, atol=1e-5, rtol=0)
    assert (ours - routed_logits).abs().max() > 1e-3
    kl = kl_by_domain(model, routed, collapsed, ex, pad, 8, "cpu")
    assert kl["kl"] > 1e-2, kl["kl"]  # measured: 0.09 (mov, gpt2) to 1.08 (molora, llama)
    peft_cfg = save_collapsed(tmp_path / "c", model, collapsed, str(path), {"mode": "mean"})
    cfg = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == peft_cfg["peft_type"] == ("IA3" if etype == "mov" else "LORA")
    if etype != "mov":
        rank = {"hydralora": 4, "molora": 3 * 2}[etype]
        assert cfg["r"] == rank and cfg["lora_alpha"] / cfg["r"] == {"hydralora": 8 / 4, "molora": 6 / 2}[etype]
    peft_model = PeftModel.from_pretrained(_base(path), tmp_path / "c").eval()
    torch.testing.assert_close(_logits(peft_model, v), ours, atol=1e-5, rtol=0)
    if etype != "mov":  # moetune reads it back as a plain LoRA and folds it into the base
        again = _base(path)
        load_adapter(again, tmp_path / "c")
        torch.testing.assert_close(_logits(merge_into_base(again), v), ours, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ the CLI on a tiny trained run


@pytest.fixture(scope="module")
def molora_run(tiny_llama, tiny_data, tmp_path_factory):
    from moetune.commands.stages import run_recipe
    out = tmp_path_factory.mktemp("molora-run")
    run_recipe(load_recipe(None, tiny_overrides(tiny_llama, tiny_data, out, "expert.type=molora",
                                                "expert.num_experts=3", "expert.rank=2", "router.init_std=0.5",
                                                "train.max_steps=4", "stages=[train]", "train.eval_before=false")))
    return out


def test_eval_reports_routing_and_export_collapse_mean(molora_run, tiny_llama, tmp_path, monkeypatch, capsys):
    from peft import PeftModel
    assert cli(monkeypatch, "eval", molora_run, "eval.max_new_tokens=3") == 0
    res = json.loads((molora_run / "eval.json").read_text())
    rt = res["routing"]
    assert rt["num_experts"] == 3 and len(rt["layers"]) == 14 and set(rt["per_domain"]) == {"add", "shout"}
    assert all(abs(sum(v["load"]) - 1) < 1e-6 for v in rt["layers"].values())
    assert (molora_run / "routing.png").stat().st_size > 2000
    assert json.loads((molora_run / "summary.json").read_text())["eval"]["routing"]["tokens"] == rt["tokens"]
    assert "dead" in capsys.readouterr().err                                 # the routing table was printed

    out = tmp_path / "collapsed"
    assert cli(monkeypatch, "export", molora_run, "--collapse", "mean", "--out", out, "eval.max_new_tokens=3") == 0
    rep = json.loads((out / "collapse.json").read_text())
    fid = rep["adapters"]["mean"]["fidelity"]
    assert rep["expert_type"] == "molora" and rep["adapters"]["mean"]["r"] == 6 and fid["kl"] > 0
    assert set(fid["per_domain"]) == {"add", "shout"} and "exact_match_change" in fid
    assert "KL" in capsys.readouterr().err
    assert json.loads((molora_run / "summary.json").read_text())["collapse"]["adapters"]["mean"]["kl"] == fid["kl"]
    peft_model = PeftModel.from_pretrained(_base(tiny_llama), out).eval()
    ref = _logits(peft_model, peft_model.config.vocab_size)
    assert cli(monkeypatch, "merge-lora", out, "--out", tmp_path / "merged", "--base", tiny_llama) == 0
    torch.testing.assert_close(_logits(_base(tmp_path / "merged"), ref.shape[-1]), ref, atol=1e-4, rtol=1e-4)

    assert cli(monkeypatch, "export", molora_run, "--collapse", "per-domain", "--out", tmp_path / "pd",
               "eval.generation=false") == 0
    rep = json.loads((tmp_path / "pd" / "collapse.json").read_text())
    assert set(rep["adapters"]) == {"add", "shout"}
    for d in ("add", "shout"):
        assert set(rep["adapters"][d]["fidelity"]["per_domain"]) == {d}
        PeftModel.from_pretrained(_base(tiny_llama), tmp_path / "pd" / d)


def test_merge_of_a_routed_run_points_to_collapse(molora_run, tiny_llama, tiny_data, tmp_path, monkeypatch, capsys):
    assert cli(monkeypatch, "merge-lora", molora_run, "--out", tmp_path / "m") == 2
    assert "--collapse mean" in capsys.readouterr().err and not (tmp_path / "m").exists()
    from moetune.commands.stages import run_recipe
    with pytest.raises(RecipeError, match="--collapse"):  # refused before training starts
        run_recipe(load_recipe(None, tiny_overrides(tiny_llama, tiny_data, tmp_path / "r", "expert.type=hydralora",
                                                    "stages=[train,merge]")))
    assert not (tmp_path / "r" / "checkpoints").exists()
