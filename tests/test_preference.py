"""Preference tuning (issue 27): DPO equals TRL's DPOTrainer on a fixed batch (sigmoid and IPO, reference =
adapters off or a copy of an adapter), the reference switches every expert type off without a second copy
of the weights, chosen and rejected go through one forward, the policy learns a tiny preference set (LoRA
and HydraLoRA), DPO after SFT starts at the reference and resumes exactly, ORPO's loss is the paper's."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import cli, randomise_routed, tiny_overrides, train_default, write_jsonl
from moetune.adapters.inject import AdapterCopy, adapters_off, expert_layers, inject, trainable_parameters
from moetune.adapters.io import save_adapter
from moetune.commands.runs import run_row
from moetune.commands.stages import run_recipe
from moetune.data.examples import ExampleSet
from moetune.data.pipeline import load_examples
from moetune.data.rows import collate_pairs
from moetune.experts import routing
from moetune.models.load import load_tokenizer
from moetune.recipe import DataConfig, RecipeError, RouterConfig, load_recipe
from moetune.recipe.experts import EXPERT_CONFIGS
from moetune.train.loggers import flatten
from moetune.train.preference import DPO, SequenceLogps, dpo_loss, orpo_loss
from test_preference_data import pair_rows

torch.set_num_threads(1)
trl = pytest.importorskip("trl", reason="TRL is in the dev extra (requirements/lock.txt)")


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("pref-data")
    return {"train": write_jsonl(d / "train.jsonl", pair_rows(48, 1)),
            "validation": write_jsonl(d / "validation.jsonl", pair_rows(16, 2)),
            "test": write_jsonl(d / "test.jsonl", pair_rows(32, 3))}


def _model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _randomise_b(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in expert_layers(model).values():
            layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=g))


# ------------------------------------------------------------------ equal to TRL's DPOTrainer

@pytest.fixture
def fresh_accelerate():
    """TRL's trainer sets accelerate's process-wide state up; the runs of later tests build their own."""
    from accelerate.state import AcceleratorState
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("conversational", [True, False])
def test_dpo_loss_and_gradients_equal_trl_dpo_trainer(tiny_llama, tmp_path, conversational, fresh_accelerate):
    """TRL tokenises and collates the same rows into the same batch; on it, TRL's `_compute_loss` (PEFT LoRA, the
    reference = adapters disabled, or a 'ref' copy of a pre-trained adapter) equals moetune's DPO loss to 1e-5 and
    its LoRA gradients equal moetune's."""
    from peft import LoraConfig, get_peft_model
    from trl import DPOConfig, DPOTrainer
    import datasets
    rows = pair_rows(4, 5, conversational)
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    tok = load_tokenizer(load_recipe(None, [f"model.path={tiny_llama}"]).model)
    pairs = load_examples(str(path), tok, DataConfig(train=str(path), cache_dir=str(tmp_path / "c"))).take(range(4))
    b = collate_pairs(pairs, tok.pad_token_id)                                      # (8, T): chosen, then rejected
    targets = ["q_proj", "v_proj", "down_proj"]
    cfg = EXPERT_CONFIGS["lora"](type="lora", rank=4, alpha=8, target_modules=targets)
    model = _model(tiny_llama)
    inject(model, cfg)
    _randomise_b(model, 1)
    ref_copy = AdapterCopy.of_model(model)                                          # a "pre-trained" adapter
    ref_state = {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in expert_layers(model).items()}
    _randomise_b(model, 2)                                                          # the policy has moved on

    def peft_state(state=None):
        src = state or {n: (m.lora_A.detach(), m.lora_B.detach()) for n, m in expert_layers(model).items()}
        return {f"base_model.model.{n}.lora_{k}.default.weight": t for n, ab in src.items() for k, t in zip("AB", ab)}

    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)
    rows_ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    lm = SequenceLogps(model)
    for loss_type in ("sigmoid", "ipo"):
        args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, loss_type=[loss_type], report_to=[],
                         use_cpu=True, bf16=False, max_length=None)
        for reference in ("adapters off", "adapter copy"):
            if reference == "adapters off":                                         # a new adapter: TRL disables it
                trainer = DPOTrainer(model=_model(tiny_llama), args=args, train_dataset=rows_ds,
                                     processing_class=tok, peft_config=lcfg)
                ctx = lambda: adapters_off(model)                                   # noqa: E731
            else:                                                                   # a PEFT model: TRL copies it to 'ref'
                pm = get_peft_model(_model(tiny_llama), lcfg)
                assert not pm.load_state_dict(peft_state(ref_state), strict=False).unexpected_keys
                trainer = DPOTrainer(model=pm, args=args, train_dataset=rows_ds, processing_class=tok)
                ctx = ref_copy.swapped
            assert not trainer.model.load_state_dict(peft_state(), strict=False).unexpected_keys
            batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
            assert torch.equal(batch["input_ids"], b["input_ids"])                  # the same tokens ...
            assert torch.equal(batch["completion_mask"], (b["labels"] != -100).long())   # ... and response tokens
            trl_loss = trainer._compute_loss(trainer.model, batch, False)
            trl_loss.backward()
            with torch.no_grad(), ctx():
                ref, _, _ = lm(**b)
            model.zero_grad()
            logps, n, _ = lm(**b)
            ours = dpo_loss(logps, ref, n, 0.1, loss_type)[0].mean()
            ours.backward()
            diff = abs(float(ours.detach()) - float(trl_loss.detach()))
            assert diff < 1e-5, (loss_type, reference, float(ours.detach()), float(trl_loss.detach()))
            peft_params = dict(trainer.model.named_parameters())
            for name, layer in expert_layers(model).items():
                for k in "AB":
                    g = peft_params[f"base_model.model.{name}.lora_{k}.default.weight"].grad
                    torch.testing.assert_close(getattr(layer, f"lora_{k}").grad, g, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ the reference model

@pytest.mark.parametrize("etype", ["lora", "hydralora", "molora", "mov", "mole", "calm"])
def test_adapters_off_is_the_base_for_every_type(etype, tiny_llama, tmp_path):
    x = torch.randint(5, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    base = _model(tiny_llama).eval()
    want = base(x).logits
    model = _model(tiny_llama).eval()
    if etype == "mole":                                                             # MoLE over two trained LoRAs
        for i in range(2):
            e = _model(tiny_llama)
            lcfg = EXPERT_CONFIGS["lora"](type="lora", rank=2)
            inject(e, lcfg)
            _randomise_b(e, i)
            save_adapter(tmp_path / f"e{i}", e, lcfg, None, str(tiny_llama))
        cfg = EXPERT_CONFIGS["mole"](type="mole", experts=[str(tmp_path / "e0"), str(tmp_path / "e1")])
    elif etype == "calm":
        cfg = EXPERT_CONFIGS["calm"](type="calm", augmenting_model=str(tiny_llama), num_compositions=2, num_heads=2)
    else:
        cfg = EXPERT_CONFIGS[etype](type=etype, **({} if etype == "lora" else {"num_experts": 3}))
    inject(model, cfg, RouterConfig())
    randomise_routed(model)                                                         # every adapter tensor non-trivial
    params = [p.detach().clone() for p in trainable_parameters(model)]
    on = model(x).logits
    assert (on - want).abs().max() > 1e-3                                           # the adapter acts ...
    with adapters_off(model):
        torch.testing.assert_close(model(x).logits, want, rtol=1e-5, atol=1e-5)    # ... and is switched off
    torch.testing.assert_close(model(x).logits, on, rtol=0, atol=0)                 # and on again
    assert all(torch.equal(p, q) for p, q in zip(params, trainable_parameters(model)))
    copy = AdapterCopy.of_model(model)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.mul_(0.5)
    moved = model(x).logits
    with copy.swapped():
        torch.testing.assert_close(model(x).logits, on, rtol=0, atol=0)            # the copy computes as before
    torch.testing.assert_close(model(x).logits, moved, rtol=0, atol=0)              # the policy's own values back


def test_chosen_and_rejected_share_one_forward_and_aux_losses_count_once(tiny_llama, pref_data, monkeypatch):
    """A DPO micro-batch of B pairs is ONE policy forward of 2B rows (the reference, adapters off, runs no router):
    every router sees its 2B rows once, and the step's aux loss is that forward's, not a sum of two."""
    rc = load_recipe(None, tiny_overrides(tiny_llama, pref_data, "unused", "expert.type=molora",
                                          "expert.num_experts=3", "router.balance_loss=switch",
                                          "router.balance_weight=0.1", "train.objective=dpo"))
    tok = load_tokenizer(rc.model)
    model = _model(tiny_llama)
    inject(model, rc.expert, rc.router)
    randomise_routed(model)
    pairs = load_examples(str(pref_data["train"]), tok, rc.data).take(range(4))
    obj = DPO(0.1, "sigmoid", tok.pad_token_id, lambda: adapters_off(model))
    lm = obj.module(model)
    batch = obj.batch(pairs, "cpu")
    calls = []
    real = routing.Router.forward

    def counting(self, x, logits=None):
        calls.append(x.shape[0])
        return real(self, x, logits)
    monkeypatch.setattr(routing.Router, "forward", counting)
    s, aux, sums = obj.forward(lm, batch)
    n_routers = len(expert_layers(model))
    assert calls == [8] * n_routers                                                 # one forward of 2B = 8 rows
    calls.clear()
    _, _, want = SequenceLogps(model)(**batch)                                      # the policy forward alone
    assert set(aux) == {"balance"} and torch.equal(aux["balance"], want["balance"])
    assert float(sums["rewards/accuracies"]) in range(0, 5) and s.ndim == 0


# ------------------------------------------------------------------ training

@pytest.mark.parametrize("etype", ["lora", "hydralora"])
def test_dpo_policy_learns_the_preferences(etype, tiny_llama, pref_data, tmp_path):
    """On the tiny preference set it trains on (48 pairs, scored as the test split), the policy's preference
    accuracy and TRL's reward accuracy rise above 0.9 in 30 steps."""
    out = tmp_path / etype
    extra = ["expert.num_experts=3"] if etype == "hydralora" else []
    s = run_recipe(load_recipe(None, tiny_overrides(
        tiny_llama, {**pref_data, "test": pref_data["train"]}, out, f"expert.type={etype}", *extra, "expert.rank=8", "train.objective=dpo",
        "train.beta=0.5", "train.max_steps=30", "train.lr=2e-2", "train.batch_size=8", "train.eval_every=15",
        "stages=[train,eval]", "eval.generation=false", "eval.batch_size=16")))
    before, after = s["before"], s["after"]
    assert after["preference_accuracy"] > 0.9 and after["preference"]["rewards/accuracies"] > 0.9, after["preference"]
    assert after["preference_accuracy"] > before["preference_accuracy"]
    assert after["preference"]["rewards/margins"] > 0 and before["preference"]["rewards/margins"] == 0
    assert set(after["per_domain"]) == {"add", "shout"} and "preference_accuracy" in after["per_domain"]["add"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected")
    assert all(k in r for r in steps for k in names)
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-5 and steps[0]["rewards/margins"] == 0   # a fresh adapter = ref
    assert steps[-1]["loss"] < 0.3 and steps[-1]["rewards/accuracies"] > 0.9
    val = [r for r in rows if r.get("split") == "validation"]
    assert [r["step"] for r in val] == [15, 30] and all("rewards/margins" in r for r in val)
    tags = flatten(steps[-1])
    assert tags["train/rewards/margins"] == steps[-1]["rewards/margins"] and "validation/rewards/accuracies" in flatten(val[-1])
    assert (out / "curves.png").is_file()
    row = run_row(out)
    assert row["pref_before"] == before["preference_accuracy"] and row["pref_after"] == after["preference_accuracy"]
    assert row["objective"] == "dpo"


@pytest.mark.parametrize("etype, extra", [
    ("molora", ["expert.num_experts=3", "router.balance_loss=switch", "router.balance_weight=0.01"]),
    ("mov", ["expert.num_experts=3"]),
    ("calm", ["expert.num_compositions=2", "expert.num_heads=2"]),
    ("mole", ["expert.experts_from=per_domain", "expert.expert_max_steps=3"])])
def test_dpo_trains_every_expert_type(etype, extra, tiny_llama, pref_data, tmp_path):
    """DPO end to end for the types the accuracy test leaves out: a fresh adapter starts at the reference (the loss
    log 2, margin 0), MoLE's mixture of trained per-domain LoRAs does not (its reference is the base); the policy
    moves, the balance loss is logged, eval scores the pairs with rewards against the reference."""
    if etype == "calm":
        extra = [*extra, f"expert.augmenting_model={tiny_llama}"]
    out = tmp_path / etype
    s = run_recipe(load_recipe(None, tiny_overrides(tiny_llama, pref_data, out, f"expert.type={etype}", *extra,
                                                    "train.objective=dpo", "train.max_steps=4", "stages=[train,eval]",
                                                    "eval.generation=false")))
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(steps) == 4 and all(math.isfinite(r["loss"]) for r in steps)
    first_at_reference = abs(steps[0]["loss"] - math.log(2)) < 1e-6 and steps[0]["rewards/margins"] == 0
    assert first_at_reference == (etype != "mole")
    assert steps[-1]["rewards/margins"] != steps[0]["rewards/margins"]
    assert ("aux" in steps[0]) == (etype == "molora")
    assert s["after"]["preference"]["rewards/margins"] != 0 and 0 <= s["after"]["preference_accuracy"] <= 1


def test_dpo_after_sft_starts_at_the_reference_and_resumes_exactly(tiny_llama, tiny_data, pref_data, tmp_path,
                                                                   monkeypatch):
    sft = tmp_path / "sft"
    run_recipe(load_recipe(None, tiny_overrides(tiny_llama, tiny_data, sft, "train.max_steps=6", "stages=[train]",
                                                "train.eval_before=false")))
    common = ("train.objective=dpo", f"train.reference={sft}", "train.max_steps=6", "stages=[train]",
              "train.save_every=2", "train.batch_size=4", "train.grad_accum=2")
    s = run_recipe(load_recipe(None, tiny_overrides(tiny_llama, pref_data, tmp_path / "nodrop", *common,
                                                    "train.eval_before=true")))
    rows = [json.loads(x) for x in (tmp_path / "nodrop" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "loss" in r)
    assert abs(first["loss"] - math.log(2)) < 1e-5 and first["rewards/margins"] == 0  # policy = reference at step 1
    assert s["before"]["preference"]["rewards/margins"] == 0                          # scored against the same adapter
    assert cli(monkeypatch, "eval", tmp_path / "nodrop", "eval.split=validation", "eval.generation=false") in (0, None)
    again = json.loads((tmp_path / "nodrop" / "summary.json").read_text())["before"]  # 'before' rescored on these rows:
    assert again["held_out"]["split"] == "validation" and again["preference"]["rewards/margins"] == 0  # the SFT adapter
    common += ("expert.dropout=0.1",)                                                 # a training setting: may differ
    run_recipe(load_recipe(None, tiny_overrides(tiny_llama, pref_data, tmp_path / "full", *common)))
    sft_ad = load_file(str(sft / "adapter" / "adapter_model.safetensors"))
    full = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    assert set(full) == set(sft_ad) and any((full[k] - sft_ad[k]).abs().max() > 1e-4 for k in full)
    split = tmp_path / "split"
    s = run_recipe(load_recipe(None, tiny_overrides(tiny_llama, pref_data, split, *common, "train.stop_after=3")))
    assert s["train"]["stopped"]
    run_recipe(load_recipe(None, tiny_overrides(tiny_llama, pref_data, split, *common)), resume=True)
    resumed = load_file(str(split / "adapter" / "adapter_model.safetensors"))
    for k in full:                                                                    # the reference is the SFT adapter
        torch.testing.assert_close(resumed[k], full[k], atol=1e-6, rtol=1e-5)       # again, not the checkpoint
    with pytest.raises(RecipeError, match=r"expert.rank: 8 here, 4 in the reference.*copy it from"):
        run_recipe(load_recipe(None, tiny_overrides(tiny_llama, pref_data, tmp_path / "bad", *common, "expert.rank=8")))


def test_orpo_loss_is_the_papers_and_trains(tiny_llama, pref_data, tmp_path):
    logps = torch.tensor([-2.0, -1.0, -6.0, -0.5])                                   # [chosen; rejected], 2 pairs
    counts = torch.tensor([2, 1, 3, 1])
    losses, nll, log_odds, _ = orpo_loss(logps, counts, 0.25)
    p = torch.exp(logps / counts)                                                   # mean per-token probability
    odds = p / (1 - p)
    want_or = -torch.log(torch.sigmoid(torch.log(odds[:2] / odds[2:])))
    torch.testing.assert_close(losses, -torch.log(p[:2]) + 0.25 * want_or)
    torch.testing.assert_close(log_odds, torch.log(odds[:2] / odds[2:]))
    out = tmp_path / "orpo"
    run_recipe(load_recipe(None, tiny_overrides(tiny_llama, pref_data, out, "train.objective=orpo", "train.max_steps=20",
                                                "train.lr=1e-2", "stages=[train]", "train.eval_before=false")))
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps[-1]["loss"] < steps[0]["loss"] - 1 and steps[-1]["nll_loss"] < steps[0]["nll_loss"]
    assert all("log_odds_ratio" in r and "rewards/accuracies" in r for r in steps)


def test_eval_of_a_merged_model_gives_the_reference_free_scores(tiny_llama, pref_data, tmp_path):
    out = tmp_path / "m"
    s = run_recipe(load_recipe(None, tiny_overrides(tiny_llama, pref_data, out, "train.objective=dpo",
                                                    "train.max_steps=4", "stages=[train,merge,eval]",
                                                    "eval.generation=false", "train.eval_before=false")))
    assert s["after"]["model"] == "merged" and 0 <= s["after"]["preference_accuracy"] <= 1
    assert "rewards/margins" not in s["after"]["preference"] and "logps/chosen" in s["after"]["preference"]
    es = ExampleSet(load_examples(str(pref_data["test"]), load_tokenizer(load_recipe(None, [f"model.path={tiny_llama}"]).model),
                                  DataConfig()).ds)
    assert es.pairs and len(es) == 32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA half of preference tuning needs a CUDA GPU")
@pytest.mark.parametrize("etype", ["lora", "hydralora"])
def test_dpo_on_cuda_in_bf16_learns_and_starts_at_log_2(etype, tiny_llama, pref_data, tmp_path):
    """CUDA, bf16 autocast: the reference (adapters off) and the policy run on the GPU, the first step's loss is
    log 2 (a fresh adapter), and the policy learns the tiny set it trains on."""
    out = tmp_path / etype
    extra = ["expert.num_experts=3"] if etype == "hydralora" else []
    s = run_recipe(load_recipe(None, tiny_overrides(
        tiny_llama, {**pref_data, "test": pref_data["train"]}, out, f"expert.type={etype}", *extra, "expert.rank=8",
        "model.device=cuda", "train.precision=bf16", "train.objective=dpo", "train.beta=0.5", "train.max_steps=30",
        "train.lr=2e-2", "train.batch_size=8", "stages=[train,eval]", "eval.generation=false", "eval.batch_size=16")))
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-3 and all(math.isfinite(r["loss"]) for r in steps)
    assert s["after"]["preference"]["rewards/accuracies"] > 0.9 and s["after"]["preference_accuracy"] > 0.9


def test_dpo_with_two_processes_matches_one(tiny_llama, pref_data, tmp_path):
    """DDP (2 CPU processes, gloo) with the same global batch of pairs gives the adapter of one process (HydraLoRA,
    routers included): the loss is normalised by the global batch's pairs, the reference forward bypasses the DDP
    wrapper. No balance loss here: the micro-scope one is computed on each process's own tokens (a non-linear
    function of them), so with it the runs differ by design (about 1e-3 on the routers). The global scope is
    tested with DPO over grad-accum micro-batches below, across processes for SFT in test_global_balance."""
    out = {}
    for name, port, batch in (("one", None, 4), ("two", 29531, 2)):
        train_default(tiny_overrides(tiny_llama, pref_data, tmp_path / name, f"train.batch_size={batch}",
                                     "stages=[train]", "train.eval_before=false", "train.objective=dpo",
                                     "expert.type=hydralora", "expert.num_experts=3", "router.balance_weight=0"), port)
        out[name] = load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    assert any(v.abs().max() > 1e-3 for k, v in out["one"].items() if "lora_B" in k)
    for k in out["one"]:
        torch.testing.assert_close(out["two"][k], out["one"][k], atol=1e-5, rtol=1e-4)
    rows = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    rows, one = [r for r in rows if "loss" in r], [r for r in one if "loss" in r]
    assert len(rows) == len(one) == 6 and one[-1]["rewards/margins"] > 0.01
    for a, b in zip(rows, one):
        assert abs(a["rewards/margins"] - b["rewards/margins"]) < 1e-4 and abs(a["loss"] - b["loss"]) < 1e-4


def test_compare_shows_the_preference_metrics(tiny_llama, pref_data, tmp_path, monkeypatch, capsys):
    """`moetune compare` of DPO variants: preference accuracy (with its paired interval from eval.json's per-pair
    results), TRL's reward accuracy and margin per variant, the conclusion on preference accuracy, the tables and
    the picture on it (no generation here), and `moetune runs` on the comparison shows them too."""
    path = tmp_path / "r.yaml"
    path.write_text("expert: {type: lora, rank: 4, alpha: 8}\n"
                    "train: {objective: dpo, beta: 0.5, max_steps: 8, lr: 2.0e-2, batch_size: 8}\n")
    over = [o for o in tiny_overrides(tiny_llama, pref_data, tmp_path / "unused")
            if not o.startswith(("expert.rank=", "output_dir=", "train.max_steps=", "train.lr=", "train.batch_size="))]
    out = tmp_path / "cmp"
    assert cli(monkeypatch, "compare", path, *over, "eval.generation=false", "--methods", "lora,hydralora",
               "--seeds", "1", "--out", out, "--bootstrap", "500") in (0, None)
    printed = capsys.readouterr().out
    doc = json.loads((out / "comparison.json").read_text())
    means = {}
    for name, v in doc["variants"].items():
        ev = json.loads((out / "runs" / f"{name}-s0" / "eval.json").read_text())
        pref, per = ev["scores"]["preference"], ev["per_example"]["preferred"]
        assert len(per) == 32 and per.count("1") / 32 == pytest.approx(ev["scores"]["preference_accuracy"])
        means[name] = v["metrics"]["preference_accuracy"]["mean"]
        assert means[name] == ev["scores"]["preference_accuracy"]
        assert v["metrics"]["reward_margin"]["mean"] == pref["rewards/margins"] != 0
        assert v["metrics"]["reward_accuracy"]["mean"] == pref["rewards/accuracies"]
        assert "exact_match" not in v["metrics"]
    d = doc["paired"]["hydralora"]["preference_accuracy"]
    assert d["difference"] == pytest.approx(means["hydralora"] - means["lora"]) and d["low"] <= d["difference"] <= d["high"]
    assert set(doc["paired"]["hydralora"]["per_domain"]["add"]) == {"preference_accuracy"}
    assert doc["conclusions"][0].count("preference accuracy") == 1 and "EM" not in doc["conclusions"][0]
    md = (out / "comparison.md").read_text()
    assert "| pref acc |" in md and "reward margin" in md and "## Preference accuracy per domain" in md
    assert "pref acc" in printed and "reward margin" in printed and (out / "comparison.png").stat().st_size > 5000
    assert cli(monkeypatch, "runs", out, "--json") in (0, None)
    rows = json.loads(capsys.readouterr().out)
    assert {r["objective"] for r in rows} == {"dpo"}
    assert sorted(r["pref_after"] for r in rows) == sorted(means.values())


def test_dpo_with_the_global_balance_grad_accum_2_equals_1(tiny_llama, pref_data, tmp_path):
    """router.balance_scope global under DPO (issue 25 with issue 27): the statistics pass and the surrogate see the
    pairs' forward, so 2 micro-batches of 2 pairs train the adapter 1 micro-batch of 4 does (to float rounding),
    unlike the micro scope; the preference metrics are logged and no routing snapshot is taken (pairs, not rows)."""
    from safetensors.torch import load_file
    got = {}
    for scope in ("global", "micro"):
        for bs, acc in ((4, 1), (2, 2)):
            out = tmp_path / f"{scope}{acc}"
            run_recipe(load_recipe(None, tiny_overrides(
                tiny_llama, pref_data, out, "expert.type=molora", "expert.num_experts=3", "expert.dropout=0.0",
                "router.balance_loss=switch", "router.balance_weight=0.5", f"router.balance_scope={scope}",
                "train.objective=dpo", "train.max_steps=3", f"train.batch_size={bs}", f"train.grad_accum={acc}",
                "stages=[train]", "train.eval_every=0")))
            got[scope, acc] = load_file(str(out / "adapter" / "adapter_model.safetensors"))
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            assert all("rewards/margins" in r and r["aux"]["balance"] > 0 for r in rows if "loss" in r)
            assert not any("val_routing" in r for r in rows)

    def gap(scope):
        return max(float((got[scope, 2][k] - got[scope, 1][k]).abs().max()) for k in got[scope, 1])
    assert gap("global") < 2e-5 and gap("micro") > 10 * gap("global")
