"""Multi-LoRA merging (moetune/export/multimerge.py): each method against hand-computed 2x2 matrices, then the
`merge-lora --adapters` command on saved adapters (moetune + stock PEFT), loaded back with peft."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from moetune.export.multimerge import LoRA, dare_drop, dense_merge, disjoint_mean, merge_adapters, svd_ab, trim
from moetune.recipe import RecipeError
from test_mole import make_lora, make_peft_lora
from test_stages_cli import cli

torch.set_num_threads(1)
T = torch.tensor
R2 = math.sqrt(2.0)
H = math.sqrt(0.5)

# Two rank-1 adapters on one 2x2 module:  D1 = s1 B1 A1 = 2 [[1, 2], [0, 0]],  D2 = s2 B2 A2 = [[0, 1], [0, 1]]
A1, B1, A2, B2 = T([[1.0, 2.0]]), T([[1.0], [0.0]]), T([[0.0, 1.0]]), T([[1.0], [1.0]])
# Three dense deltas with sign conflicts, for TIES / DARE
D = T([[[3.0, -1.0], [0.5, 2.0]],
       [[-2.0, 4.0], [1.0, -0.2]],
       [[1.0, -3.0], [-0.1, 0.3]]])


def _pair(extra_module: bool = False) -> list[LoRA]:
    ab1, ab2 = {"m": (A1, B1)}, {"m": (A2, B2)}
    if extra_module:  # only adapter 1 adapts 'n'
        ab1["n"] = (T([[1.0, 0.0]]), T([[0.0], [3.0]]))
    return [LoRA("one", "one", 2.0, 1, "base", False, ab1), LoRA("two", "two", 1.0, 1, "base", False, ab2)]


def _ba(merged, m="m"):
    a, b = merged[m]
    return b @ a


def test_linear_averages_the_factors_like_peft():
    merged, r, _ = merge_adapters(_pair(), "linear", [0.5, 0.5])
    a, b = merged["m"]                      # w*s = [1, 0.5]: A = 1*A1 + sqrt(.5)*A2, B = 1*B1 + sqrt(.5)*B2
    torch.testing.assert_close(a, T([[1.0, 2.0 + H]]))
    torch.testing.assert_close(b, T([[1.0 + H], [H]]))
    assert r == 1
    merged, _, _ = merge_adapters(_pair(), "linear", [1.0, -1.0])  # w*s = [2, -1]: the sign goes on A only
    torch.testing.assert_close(merged["m"][0], T([[R2, 2 * R2 - 1.0]]))
    torch.testing.assert_close(merged["m"][1], T([[R2 + 1.0], [1.0]]))


def test_cat_is_the_exact_weighted_sum_of_deltas():
    merged, r, _ = merge_adapters(_pair(extra_module=True), "cat", [0.5, 0.5])
    a, b = merged["m"]
    torch.testing.assert_close(a, T([[1.0, 2.0], [0.0, 1.0]]))
    torch.testing.assert_close(b, T([[1.0, 0.5], [0.0, 0.5]]))
    torch.testing.assert_close(b @ a, T([[1.0, 2.5], [0.0, 0.5]]))   # 0.5 D1 + 0.5 D2
    torch.testing.assert_close(_ba(merged, "n"), T([[0.0, 0.0], [3.0, 0.0]]))  # 0.5 * 2 * [[0,0],[3,0]]; adapter 2: 0
    assert r == 2 and merged["n"][0].shape == (2, 2)


def test_mole_method_is_cat_with_per_module_gates():
    loras = _pair(extra_module=True)
    merged, r, _ = merge_adapters(loras, "mole", {"m": T([0.25, 0.75]), "n": T([1.0, 0.0])})
    torch.testing.assert_close(_ba(merged), T([[0.5, 1.75], [0.0, 0.75]]))  # 0.25 D1 + 0.75 D2
    torch.testing.assert_close(_ba(merged, "n"), T([[0.0, 0.0], [6.0, 0.0]]))
    assert r == 2


def test_ties_trims_elects_and_takes_the_disjoint_mean():
    torch.testing.assert_close(trim(D[0], 0.5), T([[3.0, 0.0], [0.0, 2.0]]))
    torch.testing.assert_close(trim(D[1], 0.5), T([[-2.0, 4.0], [0.0, 0.0]]))
    torch.testing.assert_close(dense_merge(D, T([1.0, 1.0, 1.0]), "ties", 0.5), T([[2.0, 4.0], [0.0, 2.0]]))
    torch.testing.assert_close(dense_merge(D, T([1.0, 2.0, 1.0]), "ties", 0.5), T([[0.0, 8.0], [0.0, 2.0]]))
    torch.testing.assert_close(disjoint_mean(D), T([[2.0, 0.0], [0.75, 1.15]]))


def test_dare_drops_rescales_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    x = dare_drop(torch.ones(100, 100), 0.25, g)
    assert set(x.unique().tolist()) == {0.0, 4.0} and abs(float((x > 0).float().mean()) - 0.25) < 0.03
    assert torch.equal(dare_drop(torch.ones(3, 3), 0.5, torch.Generator().manual_seed(7)),
                       dare_drop(torch.ones(3, 3), 0.5, torch.Generator().manual_seed(7)))
    w = T([1.0, 0.5, 2.0])
    torch.testing.assert_close(dense_merge(D, w, "dare_linear", 1.0), T([[4.0, -5.0], [0.8, 2.5]]))  # sum w_i D_i
    torch.testing.assert_close(dense_merge(D, T([1.0, 1.0, 1.0]), "dare_ties", 1.0), T([[2.0, 0.0], [0.75, 1.15]]))
    # density 0.5: the kept entries (the masks drawn in order from the seeded generator) doubled
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    keep = torch.stack([torch.rand((2, 2), generator=g2) < 0.5 for _ in range(3)])
    torch.testing.assert_close(dense_merge(D, w, "dare_linear", 0.5, g1), (w[:, None, None] * D * keep * 2).sum(0))


def test_svd_refactorisation_and_its_error():
    a, b, err = svd_ab(T([[3.0, 0.0], [0.0, 1.0]]), 1)
    torch.testing.assert_close(b @ a, T([[3.0, 0.0], [0.0, 0.0]]))
    assert err == pytest.approx(1 / math.sqrt(10))
    a, b, err = svd_ab(T([[3.0, 0.0], [0.0, 1.0]]), 2)
    torch.testing.assert_close(a.abs(), T([[math.sqrt(3.0), 0.0], [0.0, 1.0]]))  # S^(1/2) V^T: balanced factors
    torch.testing.assert_close(b @ a, T([[3.0, 0.0], [0.0, 1.0]]))
    assert err == pytest.approx(0.0, abs=1e-7)
    merged, r, errors = merge_adapters(_pair(), "ties", [1.0, 1.0], density=0.5)
    # trimmed: D1 -> [[2, 4], [0, 0]], D2 -> [[0, 1], [0, 1]]; disjoint mean [[2, 2.5], [0, 1]]; rank 1 (max input)
    m = T([[2.0, 2.5], [0.0, 1.0]])
    s = torch.linalg.svdvals(m)
    assert r == 1 and errors["m"] == pytest.approx(float(s[1] / s.norm()), rel=1e-5)


def test_bad_settings_are_clear_errors():
    loras = _pair()
    loras[1] = LoRA("two", "two", 1.0, 2, "base", False, {"m": (torch.ones(2, 2), torch.ones(2, 2))})
    with pytest.raises(RecipeError, match="needs equal ranks"):
        merge_adapters(loras, "linear", [0.5, 0.5])
    with pytest.raises(RecipeError, match="--density"):
        merge_adapters(_pair(), "ties", [1, 1], density=0.0)
    with pytest.raises(RecipeError, match="--method"):
        merge_adapters(_pair(), "svd", [1, 1])


def _fold(base, adapters, weights):
    """Reference: a plain model with W0 + sum_i w_i s_i B_i A_i (from the adapter files)."""
    from moetune.adapters.io import read_adapter
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        for path, w in zip(adapters, weights):
            meta, st = read_adapter(path)
            s = meta["expert"]["alpha"] / meta["expert"]["rank"]
            for key in [k for k in st if k.endswith(".lora_A")]:
                mod = key[: -len(".lora_A")]
                model.get_submodule(mod).weight += w * s * st[f"{mod}.lora_B"] @ st[key]
    return model


def _logits(model):
    x = torch.randint(5, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x).logits


def test_merge_lora_command_writes_peft_adapters_and_merged_models(tiny_llama, tmp_path, monkeypatch):
    from peft import PeftModel
    a = make_lora(tiny_llama, tmp_path / "a", 2, 1)
    b = make_peft_lora(tiny_llama, tmp_path / "b", 3, 2, ["q_proj", "v_proj", "down_proj"])
    c = make_lora(tiny_llama, tmp_path / "c", 2, 3, ["q_proj", "o_proj"])
    ref = _logits(_fold(tiny_llama, [a, b, c], [0.2, 0.3, 0.5]))
    assert cli(monkeypatch, "merge-lora", "--adapters", a, b, c, "--method", "cat", "--weights", "0.2,0.3,0.5",
               "--out", tmp_path / "cat") == 0
    cfg = json.loads((tmp_path / "cat" / "adapter_config.json").read_text())
    assert cfg["r"] == 7 and cfg["lora_alpha"] == 7
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "cat").eval()
    torch.testing.assert_close(_logits(peft), ref, rtol=0, atol=1e-4)
    assert cli(monkeypatch, "merge-lora", "--adapters", a, b, c, "--method", "cat", "--weights", "0.2,0.3,0.5",
               "--into-base", "--out", tmp_path / "full") == 0
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    torch.testing.assert_close(_logits(full), ref, rtol=0, atol=1e-4)
    assert json.loads((tmp_path / "full" / "merge.json").read_text())["method"] == "cat"
    assert not list(tmp_path.glob(".full*"))
    for method in ("ties", "dare_linear", "dare_ties"):
        assert cli(monkeypatch, "merge-lora", "--adapters", a, b, c, "--method", method, "--density", "0.7",
                   "--seed", "1", "--rank", "2", "--out", tmp_path / method) == 0
        info = json.loads((tmp_path / method / "merge.json").read_text())
        assert info["rank"] == 2 and info["density"] == 0.7 and info["seed"] == 1
        assert info["weights"] == pytest.approx([1 / 3] * 3 if method == "dare_linear" else [1.0] * 3)
        assert 0 < info["svd_relative_error"]["mean"] <= info["svd_relative_error"]["max"] < 1
        m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / method).eval()
        assert _logits(m).isfinite().all()
    assert cli(monkeypatch, "merge-lora", "--adapters", a, c, "--method", "linear", "--out", tmp_path / "lin") == 0
    assert json.loads((tmp_path / "lin" / "merge.json").read_text())["weights"] == [0.5, 0.5]
    assert cli(monkeypatch, "merge-lora", "--adapters", a, b, "--method", "linear", "--out", tmp_path / "x") == 2
    assert cli(monkeypatch, "merge-lora", "--adapters", a, b, "--method", "cat", "--weights", "1", "--out",
               tmp_path / "x") == 2
    assert cli(monkeypatch, "merge-lora", "--adapters", a, "--method", "cat", "--out", tmp_path / "x") == 2
