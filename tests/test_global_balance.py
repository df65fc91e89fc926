"""router.balance_scope: global (moetune/experts/balance.py, moetune/train/global_balance.py): the balance loss
and z-loss over the whole global batch equal those of one forward over the concatenated batch, in value and
gradient; grad-accum 2 trains the same adapter as 1, and 2 processes (DDP, FSDP; gloo on CPU) as 1. And no
padding in routing: padding and packed-row filler change no router loss, gradient or statistic."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_overrides, train_default
from safetensors.torch import load_file
from test_report import examples
from test_router_levers import routed
from transformers import AutoTokenizer

from moetune.adapters.inject import trainable_parameters
from moetune.commands.stages import run_recipe
from moetune.data.packing import pack
from moetune.data.rows import IGNORE, collate
from moetune.experts import routing as R
from moetune.experts.context import batch_routing
from moetune.recipe import RouterConfig, load_recipe
from moetune.train import global_balance
from moetune.train.global_balance import balance_groups, global_aux
from moetune.train.loggers import routing_row
from moetune.train.loss import CausalLMLoss

torch.set_num_threads(1)


def _forward(model, batch: dict) -> None:
    with batch_routing(batch["labels"], batch["attention_mask"]):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def _reference_loss(model, cfg: RouterConfig) -> torch.Tensor:
    """The micro-scope formula over the last forward, summed over routed layers (real tokens only)."""
    total = torch.zeros(())
    for layer in model.modules():
        if isinstance(layer, R.Router) and layer._last is not None:
            logits, probs, _ = layer._last
            total = total + cfg.balance_weight * R.balance_loss(cfg.balance_loss, probs, R.assigned_k(cfg), layer._mask)
            total = total + cfg.z_loss_weight * R.z_loss(logits, layer._mask)
    return total


def _grads(model) -> list[torch.Tensor]:
    out = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in trainable_parameters(model)]
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("kind,rtype,level", [("switch", "soft", "token"), ("mole", "top_k", "token"),
                                              ("cv2", "soft", "sequence")])
def test_global_loss_and_gradient_equal_one_forward_over_the_concatenated_batch(tiny_llama, tiny_data, kind, rtype,
                                                                                 level):
    cfg = RouterConfig(balance_loss=kind, balance_weight=0.5, z_loss_weight=0.1, type=rtype, level=level)
    model = routed(tiny_llama, cfg)
    pad = AutoTokenizer.from_pretrained(tiny_llama).pad_token_id
    ex = examples(tiny_llama, tiny_data["train"])[:7]
    parts = [ex[:2], ex[2:3], ex[3:]]                                   # uneven micro-batches, other padding
    _forward(model, collate(ex, pad))
    want = _reference_loss(model, cfg)
    want.backward()
    g_want = _grads(model)
    # statistics pass, then each micro-batch's surrogate (what GlobalBalanceStep does on one process)
    total = 0
    for part in parts:
        with torch.no_grad():
            _forward(model, collate(part, pad))
        total = total + torch.cat([s.detach() for _, s in balance_groups(model)])
    values = []
    for part in parts:
        _forward(model, collate(part, pad))
        terms = global_aux(balance_groups(model), total)
        assert set(terms) == {"balance", "z_loss"}
        sum(terms.values()).backward()
        values.append(sum(terms.values()).detach())
    for v in values:                                                    # every micro-batch carries the global value
        torch.testing.assert_close(v, want.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(model), g_want):               # float32 sums in another order: 1e-5 of the largest entry
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()) + 1e-9)
    assert any(g.abs().max() > 1e-4 for g in g_want)
    # the micro scope's mean over micro-batches is another loss
    micro = []
    for part in parts:
        _forward(model, collate(part, pad))
        micro.append(_reference_loss(model, cfg).detach())
    assert abs(float(sum(micro) / len(micro) - want.detach())) > 1e-4


def _padded(batch: dict, extra: int, pad: int) -> dict:
    """`batch` with `extra` more filler positions at the end of every row."""
    out = {}
    for k, v in batch.items():
        fill = {"input_ids": pad, "labels": IGNORE, "attention_mask": 0, "example_index": -1}.get(k)
        if k == "position_ids":
            tail = v[:, -1:] + torch.arange(1, extra + 1)                # filler keeps counting, as pack's does
        else:
            tail = torch.full((v.shape[0], extra), fill, dtype=v.dtype)
        out[k] = torch.cat([v, tail], 1)
    return out


@pytest.mark.parametrize("packed", [False, True])
def test_padding_changes_no_router_loss_gradient_or_statistic(tiny_llama, tiny_data, packed):
    cfg = RouterConfig(balance_loss="switch", balance_weight=0.5, z_loss_weight=0.1)
    model = routed(tiny_llama, cfg)
    lm = CausalLMLoss(model)
    pad = AutoTokenizer.from_pretrained(tiny_llama).pad_token_id
    ex = examples(tiny_llama, tiny_data["train"])[:5]
    batch = pack(ex, 64, pad) if packed else collate(ex, pad)
    got = []
    for b in (batch, _padded(batch, 9, pad)):
        _, _, aux = lm(**b)
        row = routing_row(model, None)
        sum(aux.values()).backward()
        router_grads = [m.weight.grad.clone() for m in model.modules() if isinstance(m, R.Router)]
        model.zero_grad(set_to_none=True)
        got.append((aux, router_grads, row))
    (aux, grads, row), (aux_p, grads_p, row_p) = got
    assert set(aux) == {"balance", "z_loss"}
    for k in aux:
        torch.testing.assert_close(aux_p[k], aux[k], rtol=1e-5, atol=1e-7)
    for a, b in zip(grads_p, grads):                      # float32 rounding only: 1e-5 of the largest entry
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()) + 1e-9)
    assert row_p["entropy"] == pytest.approx(row["entropy"], abs=2e-5)
    for blk in row["load_by_block"]:
        assert row_p["load_by_block"][blk] == pytest.approx(row["load_by_block"][blk], abs=2e-5)


def _run(tiny_llama, tiny_data, out, *extra):
    return run_recipe(load_recipe(None, tiny_overrides(tiny_llama, tiny_data, out, *extra)))


BALANCED = ("expert.type=hydralora", "expert.num_experts=3", "router.balance_loss=switch", "router.balance_weight=0.5",
            "router.z_loss_weight=0.05", "router.init_std=0.5", "expert.dropout=0.0", "stages=[train]",
            "train.eval_before=false", "train.max_steps=4")


def _adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_grad_accum_2_equals_1_with_the_global_balance_and_not_with_the_micro(tiny_llama, tiny_data, tmp_path):
    runs = {}
    for scope in ("global", "micro"):
        for bs, acc in ((4, 1), (2, 2)):
            out = tmp_path / f"{scope}-{acc}"
            _run(tiny_llama, tiny_data, out, *BALANCED, f"router.balance_scope={scope}", f"train.batch_size={bs}",
                 f"train.grad_accum={acc}")
            runs[scope, acc] = _adapter(out)
    one, two = runs["global", 1], runs["global", 2]
    assert any(v.abs().max() > 1e-3 for k, v in one.items() if "router" in k)
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-6, rtol=1e-5)
    assert max(float((runs["micro", 2][k] - runs["micro", 1][k]).abs().max()) for k in one) > 1e-5
    rows = [json.loads(x) for x in (tmp_path / "global-2" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["aux"]["balance"] > 0 and r["aux"]["z_loss"] > 0 for r in rows if "loss" in r)


def test_statistics_pass_replays_dropout_and_jitter(tiny_llama, tiny_data, tmp_path, monkeypatch):
    """With adapter dropout and router jitter, the second pass's micro-batches sum to the statistics pass's
    global sums exactly: each replays the RNG state its statistics forward started from."""
    seen = []
    real = global_balance.global_aux

    def spy(groups, total):
        seen.append((torch.cat([s.detach() for _, s in groups]), total.clone()))
        return real(groups, total)

    monkeypatch.setattr(global_balance, "global_aux", spy)
    _run(tiny_llama, tiny_data, tmp_path / "run", *BALANCED[:-3], "expert.dropout=0.3", "router.jitter=0.2",
         "router.balance_scope=global", "train.batch_size=2", "train.grad_accum=3", "train.max_steps=2",
         "stages=[train]", "train.eval_before=false")
    assert len(seen) == 6
    for step in (seen[:3], seen[3:]):
        local = sum(s for s, _ in step)
        for _, total in step:
            torch.testing.assert_close(local, total, rtol=1e-6, atol=1e-5)


def _launch(port, tiny_llama, tiny_data, out, *extra):
    train_default(tiny_overrides(tiny_llama, tiny_data, out, *BALANCED, "router.balance_scope=global", *extra), port)
    return _adapter(out)


@pytest.mark.slow
def test_two_processes_equal_one_with_the_global_balance_ddp_and_fsdp(tiny_llama, tiny_data, tmp_path):
    """1 process (batch 4) vs DDP on 2 (batch 2 each: one all-reduce of the statistics per step) vs FSDP on 2
    (batch 1, grad_accum 2: the statistics pass, sharded routers): the same adapter with the balance loss on."""
    one = _launch(None, tiny_llama, tiny_data, tmp_path / "one", "train.batch_size=4")
    ddp = _launch(29561, tiny_llama, tiny_data, tmp_path / "ddp", "train.batch_size=2",
                  "train.distributed=ddp")
    fsdp = _launch(29562, tiny_llama, tiny_data, tmp_path / "fsdp", "train.batch_size=1",
                   "train.grad_accum=2", "train.distributed=fsdp")
    assert any(v.abs().max() > 1e-3 for k, v in one.items() if "router" in k)
    for other in (ddp, fsdp):
        assert other.keys() == one.keys()
        for k in one:
            torch.testing.assert_close(other[k], one[k], atol=1e-5, rtol=1e-4)


def test_global_balance_under_bf16_autocast_logs_real_token_share(tiny_llama, tiny_data, tmp_path):
    """train.precision bf16 (torch autocast on CPU too) with the global scope: both passes run under the step's
    autocast, grad_accum 2 stays close to 1 (bf16 rounding only), and the step reports its padded slots, so
    metrics.jsonl's real-token share is a fraction."""
    runs = {}
    for bs, acc in ((4, 1), (2, 2)):
        out = tmp_path / f"bf16-{acc}"
        _run(tiny_llama, tiny_data, out, *BALANCED, "router.balance_scope=global", "train.precision=bf16",
             f"train.batch_size={bs}", f"train.grad_accum={acc}")
        runs[acc] = _adapter(out)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        shares = [r["real_tokens"] for r in rows if "loss" in r]
        assert shares and all(0.3 < s <= 1.0 for s in shares)
    for k in runs[1]:
        torch.testing.assert_close(runs[2][k], runs[1][k], atol=2e-2, rtol=5e-2)
