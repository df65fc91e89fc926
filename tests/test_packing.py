"""Packing: a packed batch gives the unpacked per-example losses and gradients; length grouping."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import build_tokenizer, make_rows, randomise_routed
from moetune.adapters.inject import inject
from moetune.data.packing import first_fit, length_grouped, pack
from moetune.data.rows import IGNORE, Encoder, collate
from moetune.experts import config_class
from moetune.recipe import DataConfig, RecipeError, RouterConfig, load_recipe
from moetune.train.loss import CausalLMLoss
from moetune.train.loss import target_logits

torch.set_num_threads(1)


def _examples():
    """Instruction examples of varied length plus text-format ones (whose first label is trained)."""
    tok = build_tokenizer(chat=True)
    enc = Encoder(tok, DataConfig(train="x", validation=None, test=None))
    rows = make_rows(7, 3)
    convs = [[{"role": "user", "content": r["instruction"] + " please" * (i % 4)},
              {"role": "assistant", "content": r["response"]}] for i, r in enumerate(rows)]
    convs += [[{"role": "completion", "content": "red green blue cat dog"}],
              [{"role": "completion", "content": "one two three four five six"}]]
    return tok, enc.encode_batch(convs, ["d"] * len(convs))


def _token_losses(model, batch):
    """Per-token losses (N,) of the targets, with the example of each."""
    keep = batch["labels"][:, 1:] != IGNORE                                   # (B, T-1)
    logits = target_logits(model, batch["input_ids"], batch["attention_mask"] if "position_ids" not in batch
                           else None, keep, True, batch.get("position_ids"))   # (N, V)
    loss = F.cross_entropy(logits.float(), batch["labels"][:, 1:][keep], reduction="none")  # (N,)
    if "example_index" in batch:
        which = batch["example_index"][:, 1:][keep]                           # (N,)
    else:
        which = keep.nonzero()[:, 0]
    return loss, which


def _per_example_and_grads(model, batch, n):
    model.zero_grad(set_to_none=True)
    loss, which = _token_losses(model, batch)
    per = torch.zeros(n).index_add(0, which, loss)                            # (n,)
    per.sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return per.detach(), grads


def _expert(etype: str):
    kw = {"lora": dict(rank=4, alpha=8), "hydralora": dict(rank=4, alpha=8, num_experts=3),
          "molora": dict(rank=2, alpha=6, num_experts=3)}[etype]
    return config_class(etype)(type=etype, **kw)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("etype,router", [("lora", "soft"), ("hydralora", "soft"), ("hydralora", "top_k"),
                                          ("molora", "soft"), ("molora", "top_k")])  # plain LoRA has no router
def test_packed_equals_unpacked(etype, arch, attn, router, request):
    tok, exs = _examples()
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(arch), dtype=torch.float32,
                                                 attn_implementation=attn)
    inject(model, _expert(etype), RouterConfig(type=router, top_k=2))
    randomise_routed(model)
    model.eval()  # GPT-2 has dropout; gradients flow in eval mode too
    packed = pack(exs, 64, tok.pad_token_id)
    assert packed["input_ids"].shape[0] < len(exs)                       # several examples share a row
    assert int(packed["attention_mask"].sum()) == sum(len(e.input_ids) for e in exs)
    per_u, g_u = _per_example_and_grads(model, collate(exs, tok.pad_token_id), len(exs))
    per_p, g_p = _per_example_and_grads(model, packed, len(exs))
    assert torch.allclose(per_p, per_u, rtol=1e-5, atol=1e-5), (per_p - per_u).abs().max()
    assert per_u.min() > 0
    for k in g_u:  # float32 sums in another order: compare against the gradient's own size
        err = float((g_p[k] - g_u[k]).norm() / g_u[k].norm())
        assert err < 1e-5, (k, err)


def test_without_position_ids_examples_would_leak(tiny_llama):
    """The check above can fail: the same packed rows with a plain causal mask give other losses."""
    tok, exs = _examples()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    packed = pack(exs, 64, tok.pad_token_id)
    with torch.no_grad():
        per_u, _ = _per_example_rows(model, collate(exs, tok.pad_token_id), len(exs))
        leaky = dict(packed, attention_mask=torch.ones_like(packed["attention_mask"]))
        leaky.pop("position_ids")
        per_l, _ = _per_example_rows(model, leaky, len(exs))
    assert not torch.allclose(per_l, per_u, atol=1e-3)


def _per_example_rows(model, batch, n):
    loss, which = _token_losses(model, batch)
    return torch.zeros(n).index_add(0, which, loss), which


def test_pack_layout():
    tok, exs = _examples()
    b = pack(exs, 64, tok.pad_token_id)
    for r in range(b["input_ids"].shape[0]):
        idx = b["example_index"][r]
        for i in idx[idx >= 0].unique().tolist():
            at = (idx == i).nonzero()[:, 0]
            assert b["position_ids"][r, at].tolist() == list(range(len(exs[i].input_ids)))
            assert b["input_ids"][r, at].tolist() == exs[i].input_ids
            assert b["labels"][r, at[0]] == IGNORE                            # never predicted across examples
            assert b["labels"][r, at[1:]].tolist() == exs[i].labels[1:]
    assert sorted(sum(first_fit([5, 9, 3, 7, 2], 10), [])) == [0, 1, 2, 3, 4]
    assert all(sum([5, 9, 3, 7, 2][i] for i in b_) <= 10 for b_ in first_fit([5, 9, 3, 7, 2], 10))


def test_length_grouped_is_a_permutation_with_similar_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 512, 1000)
    order = rng.permutation(1000)
    out = length_grouped(order, lengths, 10, seed=1)
    assert sorted(out.tolist()) == list(range(1000))
    spread = lambda o: np.mean([np.ptp(lengths[o[i:i + 10]]) for i in range(0, 1000, 10)])  # noqa: E731
    assert spread(out) < spread(order) / 5
    assert (length_grouped(order, lengths, 10, seed=1) == out).all()


def test_packing_refused_for_calm():
    with pytest.raises(RecipeError, match="data.packing"):
        load_recipe("recipes/calm-kv-arithmetic.yaml", ["data.packing=true", "stages=[eval]"])
    with pytest.raises(RecipeError, match="group_by_length"):
        load_recipe(None, ["data.packing=true", "data.group_by_length=true"])


def test_packed_training_matches_unpacked(tiny_llama, tiny_data, tmp_path):
    """Whole training runs: packing changes no update (same examples per step, same loss)."""
    from safetensors.torch import load_file

    from conftest import tiny_overrides
    from moetune.commands.stages import run_recipe
    common = ("expert.type=hydralora", "expert.num_experts=3", "train.max_steps=4", "stages=[train]",
              "train.eval_before=false", "train.batch_size=8", "data.max_length=64")
    runs = {}
    for name, extra in (("plain", ()), ("packed", ("data.packing=true",))):
        out = tmp_path / name
        run_recipe(load_recipe(None, tiny_overrides(tiny_llama, tiny_data, out, *common, *extra)))
        runs[name] = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    for k in runs["plain"]:
        torch.testing.assert_close(runs["packed"][k], runs["plain"][k], atol=1e-5, rtol=1e-4)
    assert any(v.abs().max() > 0 for k, v in runs["plain"].items() if "lora_B" in k)  # it did train


def test_group_by_length_plan_covers_each_epoch_with_similar_lengths():
    from moetune.train.loop import Plan
    lengths = np.random.default_rng(3).integers(20, 512, 400)
    plain, grouped = Plan(400, 4, 2, 1, 2.0, 0), Plan(400, 4, 2, 1, 2.0, 0, lengths)
    for plan in (plain, grouped):
        for epoch in range(2):
            seen = sum((plan.step_indices(epoch * 50 + s, 0) for s in range(50)), [])
            assert sorted(seen) == list(range(400))
    spread = lambda p: np.mean([np.ptp(lengths[p.step_indices(s, 0)]) for s in range(50)])  # noqa: E731
    assert spread(grouped) < spread(plain) / 5


@pytest.mark.parametrize("etype", ["hydralora", "molora"])
def test_sequence_routing_packed_equals_unpacked(etype, tiny_llama):
    """router.level=sequence pools each example's own prompt inside a packed row (the packed batch's
    example_index reaches the routers as segment ids): the loss and every gradient equal the unpacked
    batch's, and without the segment ids the pooling would mix the row's examples."""
    tok, exs = _examples()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    inject(model, _expert(etype), RouterConfig(type="soft", level="sequence"))
    randomise_routed(model)
    model.eval()
    lm = CausalLMLoss(model)

    def run(batch):
        model.zero_grad(set_to_none=True)
        s, _, _ = lm(**batch)
        s.backward()
        return s.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    s_u, g_u = run(collate(exs, tok.pad_token_id))
    packed = pack(exs, 64, tok.pad_token_id)
    s_p, g_p = run(packed)
    assert torch.allclose(s_p, s_u, rtol=1e-5), (float(s_p), float(s_u))
    for k in g_u:
        err = float((g_p[k] - g_u[k]).norm() / g_u[k].norm())
        assert err < 1e-5, (k, err)
    with torch.no_grad():
        mixed, _, _ = lm(**{k: v for k, v in packed.items() if k != "example_index"})
    assert not torch.allclose(mixed, s_u, rtol=1e-4)
