"""From data to MoLE with one `moetune train` (experts_from: per_domain) on a tiny model; then eval with the
routing report, --mask-experts on eval and export, and merge-lora --method mole (in-process CLI)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import tiny_overrides
from moetune.adapters.inject import expert_layers
from moetune.adapters.io import load_adapter, read_adapter
from test_stages_cli import cli

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mole_run(tiny_llama, tiny_data, tmp_path_factory):
    import sys
    out = tmp_path_factory.mktemp("mole-run")
    args = tiny_overrides(tiny_llama, tiny_data, out, "expert.type=mole", "expert.experts_from=per_domain",
                          "expert.expert_max_steps=8", "expert.expert_lr=1e-2", "expert.granularity=block",
                          "router.balance_loss=mole", "router.balance_weight=0.1", "train.lr=5e-2",
                          "train.eval_before=false", "stages=[train,eval]")
    mp = pytest.MonkeyPatch()
    mp.setattr(sys, "argv", ["moetune", "train", "recipes/mole.yaml", *args])
    from moetune.cli import main
    with pytest.raises(SystemExit) as e:
        main()
    mp.undo()
    assert e.value.code in (0, None)
    return out


def _logits(model):
    x = torch.randint(5, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x).logits


def test_train_goes_from_data_to_domain_loras_to_trained_gates(mole_run, tiny_llama):
    info = json.loads((mole_run / "experts" / "experts.json").read_text())
    assert sorted(info) == ["add", "shout"] and all(v["steps"] == 8 for v in info.values())
    assert info["add"]["rows"] + info["shout"]["rows"] == 64
    meta = json.loads((mole_run / "adapter" / "moetune.json").read_text())
    assert meta["expert"]["names"] == ["add", "shout"] and meta["expert"]["type"] == "mole"
    assert meta["train"]["steps"] == 6
    # the MoLE carries exact copies of the domain LoRAs, and training left them unchanged
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    load_adapter(model, mole_run / "adapter")
    layers = expert_layers(model)
    add_meta, add = read_adapter(mole_run / "experts" / "add" / "adapter")
    assert add_meta["expert"]["rank"] == 4 and add_meta["expert"]["alpha"] == 16  # expert.rank, recipe's alpha
    q = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(layers[q].expert_A[0], add[f"{q}.lora_A"], rtol=0, atol=0)
    torch.testing.assert_close(layers[q].expert_B[0], add[f"{q}.lora_B"] * 4.0, rtol=0, atol=0)  # s = 16 / 4
    gates = load_file(str(mole_run / "adapter" / "adapter_model.safetensors"))
    assert sorted(gates) == [f"model.layers.{i}.self_attn.q_proj.router.{p}" for i in (0, 1) for p in ("bias", "weight")]
    assert all(float(t.abs().max()) > 0 for t in gates.values())  # the gates trained away from 0
    log = [json.loads(line) for line in (mole_run / "metrics.jsonl").read_text().splitlines()]
    assert any("balance" in rec.get("aux", {}) for rec in log)


def test_eval_reports_routing_and_masks_an_expert(mole_run, monkeypatch):
    res = json.loads((mole_run / "eval.json").read_text())  # written by the train command's eval stage
    rep = res["routing"]
    assert rep["num_experts"] == 2 and len(rep["layers"]) == 2 and set(rep["per_domain"]) == {"add", "shout"}
    assert all(sum(v["load"]) == pytest.approx(1.0) for v in rep["layers"].values())
    assert (mole_run / "routing.png").is_file()
    assert cli(monkeypatch, "eval", mole_run, "--mask-experts", "shout", "eval.max_new_tokens=3") == 0
    res = json.loads((mole_run / "eval.json").read_text())
    assert res["scores"]["masked_experts"] == ["shout"]
    assert all(v["load"] == pytest.approx([1.0, 0.0]) for v in res["routing"]["layers"].values())
    assert cli(monkeypatch, "eval", mole_run, "--mask-experts", "nope") == 2


def test_export_with_mask_reloads_masked(mole_run, tiny_llama, tmp_path, monkeypatch):
    assert cli(monkeypatch, "export", mole_run, "--mask-experts", "add", "--out", tmp_path / "exp") == 0
    meta = json.loads((tmp_path / "exp" / "moetune.json").read_text())
    assert meta["expert"]["masked"] == ["add"]
    assert (tmp_path / "exp" / "experts" / "0_add" / "adapter_model.safetensors").is_file()
    masked = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    load_adapter(masked, tmp_path / "exp")
    only = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()  # gates renormalised to the one kept LoRA
    load_adapter(only, mole_run / "experts" / "shout" / "adapter")
    torch.testing.assert_close(_logits(masked), _logits(only), rtol=0, atol=1e-5)


def test_merge_lora_mole_method_writes_a_peft_adapter(mole_run, tiny_llama, tmp_path, monkeypatch, capsys):
    from peft import PeftModel
    out = tmp_path / "merged"
    assert cli(monkeypatch, "merge-lora", "--adapters", "--method", "mole", "--gates-from", mole_run,
               "--out", out) == 0
    info = json.loads((out / "merge.json").read_text())
    assert info["method"] == "mole" and info["names"] == ["add", "shout"] and info["rank"] == 8
    w = info["weights"]["model.layers.1.mlp.down_proj"]
    assert sum(w) == pytest.approx(1.0) and w == info["weights"]["model.layers.1.self_attn.q_proj"]  # one block gate
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out).eval()
    assert _logits(peft).isfinite().all()
    assert cli(monkeypatch, "merge-lora", "--adapters", "--method", "mole", "--gates-from", mole_run,
               "--weights", "1,2", "--out", tmp_path / "x") == 2
    assert cli(monkeypatch, "merge-lora", mole_run, "--out", tmp_path / "y") == 2  # per-token gates: not foldable
    assert "--method mole" in capsys.readouterr().err.replace("\n", " ")
