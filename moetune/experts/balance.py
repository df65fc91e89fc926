"""Balance losses as functions of load statistics, and their global-batch form (`router.balance_scope`).

Every balance loss of moetune is a function L(f, P) of two load statistics per expert i (N experts):

    P_i = sum_t m_t p_t,i / sum_t m_t      mean gate probability (carries the gradient)
    f_i = sum_t m_t a_t,i / sum_t m_t      fraction of top-k choices, a_t = one-hot(top-k of p_t) / k (a count)

over the tokens t the loss is taken on (m_t = 1 for a real token, 0 for padding and packed-row filler).
The z-loss is the token mean Z = sum_t m_t lse_t^2 / sum_t m_t, lse_t = logsumexp of t's router logits.

**Micro scope** (`router.balance_scope: micro`, the papers' usual implementation): the tokens are
those of one forward, i.e. one micro-batch of one process, and the step averages the losses over
micro-batches (and DDP/FSDP over processes). Since L is nonlinear in (f, P), that is not the loss of
the global batch, and it pushes every micro-batch, not the whole batch, towards uniform load.

**Global scope** (`global`; Qiu et al. 2025, "Demons in the Detail: On Implementing Load Balancing
Loss for Training Specialized Mixture-of-Expert Models"): the tokens are all tokens of the optimizer
step, over every gradient-accumulation micro-batch and every process. Each micro-batch b contributes
the sums S_b = (sum m p (N,), sum m a (N,), sum m lse^2, sum m) (`load_sums`); the global statistics
are G = sum_b S_b (all-reduced over processes). The gradient of L at the global statistics is

    dL/dtheta = sum_i dL/dP_i (G) * dP_i/dtheta = sum_b sum_i c_i * d(S_b,i)/dtheta / T,   c_i = dL/dP_i (G)

(f carries no gradient; T = sum m, the global token count): a sum over micro-batches of a LINEAR
surrogate of each micro-batch's own sums, with fixed coefficients c computed from G. `global_terms`
builds that surrogate for one micro-batch, with the VALUE of the global loss L(G) and the gradient
of sum_i c_i S_b,i / T, so summing the micro-batches' gradients gives exactly dL/dtheta of the
global batch (train/global_balance.py computes G before each micro-batch's backward).
"""
from __future__ import annotations

import torch


def balance_from_stats(kind: str, f: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor:
    """L(f, P) for the balance loss named by `router.balance_loss`, from load statistics f, P (N,):
    'mole' -sum_i log P_i (Wu et al. 2024), 'switch' N sum_i f_i P_i (Fedus et al. 2021; f needed),
    'cv2' var(P) / mean(P)^2 (population variance; Shazeer et al. 2017)."""
    if kind == "mole":
        return -p.clamp_min(1e-12).log().sum()
    if kind == "switch":
        return p.shape[-1] * (f * p).sum()
    if kind == "cv2":
        return p.var(unbiased=False) / p.mean().pow(2).clamp_min(1e-12)
    raise ValueError(f"unknown balance loss {kind!r}: 'mole', 'switch' or 'cv2'")


def top_k_assignments(probs: torch.Tensor, k: int = 1) -> torch.Tensor:
    """a (..., N): one-hot of the top-k experts of each row of probs, divided by k (no gradient)."""
    idx = probs.detach().topk(min(k, probs.shape[-1]), dim=-1).indices  # (..., k)
    return torch.zeros_like(probs, dtype=torch.float32).scatter(-1, idx, 1.0 / idx.shape[-1])  # (..., N)


def load_sums(logits: torch.Tensor, probs: torch.Tensor, k: int = 1,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """(2N + 2,) float32 sums over the counted tokens of one forward, logits and probs (..., N), mask (...)
    (None: every token): [sum m p (N, with gradient), sum m a (N, none), sum m lse^2 (with gradient), sum m]."""
    n = probs.shape[-1]
    p = probs.float().reshape(-1, n)                                     # (T, N)
    m = (torch.ones(p.shape[0], device=p.device) if mask is None
         else mask.reshape(-1).to(p.device, torch.float32))              # (T,)
    a = top_k_assignments(p, k)                                          # (T, N)
    lse2 = torch.logsumexp(logits.float().reshape(-1, n), -1).pow(2)     # (T,)
    return torch.cat([m @ p, m @ a, (m * lse2).sum().view(1), m.sum().view(1)])  # (2N + 2,)


def stats_of(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P (N,), f (N,), z-loss (), tokens ()) from load sums (2N + 2,) (`load_sums`, summed over micro-batches)."""
    n = (sums.shape[-1] - 2) // 2
    t = sums[-1].clamp_min(1.0)
    return sums[:n] / t, sums[n:2 * n] / t, sums[2 * n] / t, sums[-1]


def global_terms(cfg, local: torch.Tensor, total: torch.Tensor) -> dict[str, torch.Tensor]:
    """One micro-batch's weighted global-scope losses {'balance', 'z_loss'} (those the recipe turns on).

    local (2N + 2,): this micro-batch's `load_sums` (with gradient); total: the global batch's sums (detached,
    every micro-batch of every process). Each term's value is the global loss, weight * L(G); its gradient is
    weight * sum_i c_i dS_i / T (the module docstring): summed over all micro-batches and processes, exactly
    the gradient of weight * L(G)."""
    n = (local.shape[-1] - 2) // 2
    p, f, z, tokens = stats_of(total.detach().float())
    t = tokens.clamp_min(1.0)
    out = {}
    if cfg.balance_loss != "none" and cfg.balance_weight > 0:
        with torch.enable_grad():
            leaf = p.clone().requires_grad_(True)                        # (N,)
            value = balance_from_stats(cfg.balance_loss, f, leaf)
            (c,) = torch.autograd.grad(value, leaf)                      # (N,): dL/dP_i at the global statistics
        s = local[:n]                                                    # (N,) sum m p of this micro-batch
        out["balance"] = cfg.balance_weight * (value.detach() + (c * (s - s.detach())).sum() / t)
    if cfg.z_loss_weight > 0:
        zs = local[2 * n]
        out["z_loss"] = cfg.z_loss_weight * (z + (zs - zs.detach()) / t)
    return out
