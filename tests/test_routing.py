"""Routing: gates, auxiliary losses (gradient to the router, minimum at uniform load), statistics."""
from __future__ import annotations

import math

import pytest
import torch

from moetune.experts import routing as R
from moetune.recipe import RouterConfig

torch.set_num_threads(1)

N = 4
LOSSES = {"mole": lambda lg, p: R.mole_balance(p), "switch": lambda lg, p: R.switch_balance(p, 1),
          "switch_top2": lambda lg, p: R.switch_balance(p, 2), "cv2": lambda lg, p: R.cv2_balance(p),
          "z_loss": lambda lg, p: R.z_loss(lg)}
UNIFORM_MIN = {"mole": N * math.log(N), "switch": 1.0, "cv2": 0.0}


@pytest.mark.parametrize("kind", ["soft", "top_k"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_aux_loss_sends_gradient_to_router(loss, kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 8, generator=g)                                # (B, T, d)
    w_g = (torch.randn(N, 8, generator=g) * 0.5).requires_grad_(True)  # leaf router weight
    logits = x @ w_g.t()                                                 # (B, T, N)
    _, probs = R.gates(logits, kind, k=2)
    value = LOSSES[loss](logits, probs)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert w_g.grad is not None and w_g.grad.abs().sum() > 0


def _balanced_one_hot(t: int) -> torch.Tensor:
    return torch.eye(N)[torch.arange(t) % N]                             # (t, N), every expert 1/N of tokens


def _skewed_cases() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    bias = torch.tensor([3.0, 0.0, 0.0, -1.0])
    return [torch.softmax(torch.randn(16, N, generator=g) + bias, -1),   # one expert favoured
            torch.eye(N)[torch.zeros(16, dtype=torch.long)],             # everything to expert 0
            torch.eye(N)[torch.arange(16) % 2],                          # two experts share all tokens
            torch.tensor([[0.4, 0.3, 0.2, 0.1]]).repeat(16, 1)]          # soft but uneven


@pytest.mark.parametrize("loss", sorted(UNIFORM_MIN))
def test_balance_losses_minimal_at_uniform_load(loss):
    fn = LOSSES[loss]
    uniform = [torch.full((16, N), 1.0 / N), _balanced_one_hot(16) * 0.97 + 0.03 / N]
    for p in uniform:  # uniform load, with flat or with peaked per-token gates
        assert float(fn(p.log(), p)) == pytest.approx(UNIFORM_MIN[loss], abs=1e-5)
    for p in _skewed_cases():
        assert float(fn(p.log(), p)) > UNIFORM_MIN[loss] + 1e-3


def test_mask_skips_padding():
    p = torch.cat([torch.full((8, N), 1.0 / N), torch.eye(N)[torch.zeros(8, dtype=torch.long)]])
    mask = torch.cat([torch.ones(8), torch.zeros(8)])
    assert float(R.mole_balance(p, mask)) == pytest.approx(N * math.log(N))
    assert float(R.cv2_balance(p, mask)) == pytest.approx(0.0, abs=1e-7)
    assert float(R.mole_balance(p)) > N * math.log(N) + 0.1
    torch.testing.assert_close(R.load(p, mask), torch.full((N,), 1.0 / N))


def test_switch_fraction_and_z_loss_values():
    p = torch.tensor([[0.7, 0.2, 0.06, 0.04], [0.1, 0.6, 0.2, 0.1]])
    torch.testing.assert_close(R.assignment_fraction(p, 1), torch.tensor([0.5, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(R.assignment_fraction(p, 2), torch.tensor([0.25, 0.5, 0.25, 0.0]))
    expected = N * (0.5 * 0.4 + 0.5 * 0.4)  # f = (1/2, 1/2, 0, 0), P = (0.4, 0.4, 0.13, 0.07)
    assert float(R.switch_balance(p, 1)) == pytest.approx(expected)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert float(R.z_loss(logits)) == pytest.approx(float(torch.logsumexp(logits[0], 0)) ** 2)
    assert float(R.z_loss(torch.full((3, N), -math.log(N)))) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_gates(k):
    logits = torch.randn(5, 6, 8, generator=torch.Generator().manual_seed(k))
    w, p = R.gates(logits, "top_k", k=k)
    torch.testing.assert_close(w.sum(-1), torch.ones(5, 6))
    assert ((w > 0).sum(-1) == k).all()
    top = p.topk(k, -1).indices
    assert (w.gather(-1, top) > 0).all()
    kept = torch.zeros_like(p).scatter(-1, top, 1.0) * p
    torch.testing.assert_close(w, kept / kept.sum(-1, keepdim=True))  # renormalised probabilities
    ws, ps = R.gates(logits, "soft")
    torch.testing.assert_close(ws, torch.softmax(logits, -1))
    torch.testing.assert_close(ps, p)


def test_temperature():
    logits = torch.randn(10, N, generator=torch.Generator().manual_seed(3)) * 2
    torch.testing.assert_close(R.gates(logits, temperature=2.0)[0], torch.softmax(logits / 2, -1))
    ents = [float(R.entropy(R.gates(logits, temperature=t)[0])) for t in (0.01, 0.5, 1.0, 4.0, 100.0)]
    assert ents == sorted(ents)                                          # hotter: flatter gates
    assert ents[0] < 0.05 and ents[-1] == pytest.approx(math.log(N), abs=1e-3)


def test_stats_on_hand_built_gates():
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.5, 0.496, 0.004, 0.0]])
    torch.testing.assert_close(R.load(w), torch.tensor([0.5, 0.499, 0.001, 0.0]))
    assert float(R.entropy(w[:2])) == 0.0
    assert float(R.entropy(torch.full((3, N), 0.25))) == pytest.approx(math.log(N))
    assert float(R.entropy(w[2:3])) == pytest.approx(math.log(2))
    assert R.dead_experts(R.load(w)).tolist() == [False, False, True, True]      # < 1% of 1/N = 0.0025
    assert R.dead_experts(torch.tensor([0.5, 0.49, 0.006, 0.004])).tolist() == [False] * 4
    s = R.stats(w)
    assert s["dead"] == [2, 3] and s["max_entropy"] == pytest.approx(math.log(N))
    assert s["load"] == pytest.approx([0.5, 0.499, 0.001, 0.0])


def test_jitter():
    x = torch.randn(50, 8)
    y = R.jitter(x, 0.1)
    assert not torch.equal(x, y) and ((y / x - 1).abs() <= 0.1 + 1e-6).all()
    assert R.jitter(x, 0.0) is x


def test_router_module_losses_and_modes():
    cfg = RouterConfig(type="top_k", top_k=2, jitter=0.5, init_std=1.0, balance_loss="mole",
                       balance_weight=0.5, z_loss_weight=0.1)
    router = R.Router(8, N, cfg)
    assert router.aux_losses() == {} and router.stats() is None
    x = torch.randn(3, 5, 8)
    router.eval()
    w = router(x)
    assert w.shape == (3, 5, N) and ((w > 0).sum(-1) == 2).all()
    torch.testing.assert_close(router(x), w)                             # no jitter in eval mode
    logits = x @ router.weight.t()
    aux = router.aux_losses()
    torch.testing.assert_close(aux["balance"], 0.5 * R.mole_balance(torch.softmax(logits, -1)))
    torch.testing.assert_close(aux["z_loss"], 0.1 * R.z_loss(logits))
    router.train()
    assert not torch.equal(router(x), w)                                 # jitter in training
    assert set(router.stats()) == {"load", "entropy", "max_entropy", "dead"}
    assert R.Router(8, N, RouterConfig()).aux_losses() == {}             # no loss configured
