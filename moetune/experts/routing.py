"""Token-level routing for mixtures of experts: gates, auxiliary losses, statistics, a router.

Notation: `logits` (..., N) are router scores W_g x of one token per leading index,
`probs` = softmax(logits / T), `weights` the gates actually applied (= probs for soft
routing; top-k renormalised otherwise). Every loss below is a differentiable function
of `probs` or `logits` (never of detached statistics), so it trains the router.
`mask` (...,) optionally marks the tokens to count (1) and padding to skip (0); the
`Router` of an expert layer reads it from the routing context (`token_mask`: real tokens, not
padding or packed-row filler) and passes it to every loss and statistic.

Losses (see docs/METHODS.md, "Auxiliary losses"):
- MoLE gating balance (Wu et al., ICLR 2024):   L = -log prod_i q_i = -sum_i log q_i,
  q_i = mean probability of expert i. Since sum_i q_i = 1, L >= N log N (AM-GM), with
  equality exactly at uniform load q_i = 1/N.
- Switch load balancing (Fedus et al., 2021):    L = N * sum_i f_i * P_i, f_i = fraction of
  token assignments (top-1, or top-k divided by k) that go to i (no gradient), P_i = mean
  probability of i (carries the gradient). L = 1 at uniform load (f = P = 1/N); it can
  dip a little below 1 only where the hard choices f and the probabilities P disagree.
- Router z-loss (Zoph et al., 2022, ST-MoE):      L = mean_t logsumexp(logits_t)^2.
- CV^2 of the load (Shazeer et al., 2017):      L = var_i(P_i) / mean_i(P_i)^2 (population
  variance), P_i = mean probability of i; L >= 0, 0 exactly at uniform load.
The balance losses and the z-loss are taken per forward (`router.balance_scope: micro`) or over the
whole global batch (`global`: moetune/experts/balance.py, moetune/train/global_balance.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moetune.core.recompute import recomputing
from moetune.experts.balance import balance_from_stats, load_sums, top_k_assignments
from moetune.experts.base import compute_input
from moetune.experts.router_init import init_routers, router_init_weight  # noqa: F401 (re-exported)
from moetune.experts.context import current_context, prompt_mask, routing_context  # noqa: F401 (the last two re-exported)
from moetune.recipe import RouterConfig


def gates(logits: torch.Tensor, kind: str = "soft", k: int = 2,
          temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (..., N), probs (..., N)) from router logits (..., N), in float32.

    probs = softmax(logits / T). 'soft': weights = probs (Zadouri et al.'s soft merging).
    'top_k': keep the k largest probabilities, renormalise them to sum to 1, zero the rest
    (gradient flows through the kept probabilities)."""
    logits = logits.float()
    probs = torch.softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)  # (..., N)
    if kind == "soft":
        return probs, probs
    if kind != "top_k":
        raise ValueError(f"unknown gate kind {kind!r}: 'soft' or 'top_k'")
    top, idx = probs.topk(min(k, probs.shape[-1]), dim=-1)               # (..., k), (..., k)
    weights = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))  # (..., N)
    return weights, probs


def jitter(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Switch-style router jitter: x * u, u ~ U(1 - eps, 1 + eps) per element (use in training only)."""
    if eps <= 0:
        return x
    return x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)


def _token_mean(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of t (..., N) over all leading dims -> (N,); masked tokens (mask == 0) skipped."""
    t = t.reshape(-1, t.shape[-1])                                       # (T, N)
    if mask is None:
        return t.mean(0)
    m = mask.reshape(-1, 1).to(t.dtype)                                  # (T, 1)
    return (t * m).sum(0) / m.sum().clamp_min(1.0)


def mole_balance(probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MoLE gating balance -sum_i log q_i (q: mean gate probability); minimum N log N at uniform load."""
    return balance_from_stats("mole", None, _token_mean(probs, mask))


def assignment_fraction(probs: torch.Tensor, k: int = 1, mask: torch.Tensor | None = None) -> torch.Tensor:
    """f (N,): fraction of top-k assignments per expert (sums to 1; a count, so no gradient)."""
    return _token_mean(top_k_assignments(probs, k), mask)


def switch_balance(probs: torch.Tensor, k: int = 1, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch load balancing N * sum_i f_i P_i (f from top-k choices, P mean probability); 1 at uniform load."""
    return balance_from_stats("switch", assignment_fraction(probs, k, mask), _token_mean(probs, mask))


def z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss mean_t logsumexp(logits_t)^2: keeps router logits small (ST-MoE)."""
    lse2 = torch.logsumexp(logits.float(), dim=-1) ** 2                 # (...,)
    return _token_mean(lse2.unsqueeze(-1), mask)[0]


def cv2_balance(probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Squared coefficient of variation of the load var(P) / mean(P)^2; 0 at uniform load."""
    return balance_from_stats("cv2", None, _token_mean(probs, mask))


def balance_loss(kind: str, probs: torch.Tensor, k: int = 1, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The balance loss named by `router.balance_loss`: 'mole', 'switch' (top-k f) or 'cv2'."""
    f = assignment_fraction(probs, k, mask) if kind == "switch" else None
    return balance_from_stats(kind, f, _token_mean(probs, mask))

# ---------------------------------------------------------------- statistics (for reports)

def load(weights: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-expert load (N,): mean gate weight over tokens (sums to 1)."""
    return _token_mean(weights.float(), mask)


def entropy(weights: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean per-token entropy (nats) of the gate distribution; between 0 and log N."""
    w = weights.float()
    h = -torch.special.xlogy(w, w).sum(-1, keepdim=True)                # (..., 1), 0 log 0 = 0
    return _token_mean(h, mask)[0]


def dead_experts(load_: torch.Tensor, threshold: float = 0.01) -> torch.Tensor:
    """Bool (N,): experts whose load is below `threshold` times the uniform load 1/N."""
    return load_ < threshold / load_.shape[-1]


def stats(weights: torch.Tensor, mask: torch.Tensor | None = None, threshold: float = 0.01) -> dict:
    """{'load': [N floats], 'entropy', 'max_entropy' (log N), 'dead': [indices]} for reports."""
    ld = load(weights, mask)
    return {"load": ld.tolist(), "entropy": float(entropy(weights, mask)),
            "max_entropy": math.log(weights.shape[-1]),
            "dead": dead_experts(ld, threshold).nonzero().flatten().tolist()}


# ---------------------------------------------------------------- the router of one layer

class Router(nn.Module):
    """w(x) = gates(W_g x) per token, W_g: (N, d_in) ~ N(0, init_std^2); `router:` settings.

    Keeps the logits and gates of its last forward (not of an activation-checkpointing
    recompute) and that forward's token mask (the routing context's `token_mask`: padding and
    packed-row filler count nowhere), from which `aux_losses` builds the recipe's weighted losses,
    `load_sums` the global-batch statistics and `stats` the report. Each routed layer returns its own
    weighted losses; the training loss adds them up, so the total is a SUM over layers."""

    def __init__(self, d_in: int, num_experts: int, cfg=None) -> None:
        super().__init__()
        if cfg is None:
            cfg = RouterConfig()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(num_experts, d_in))      # (N, d_in)
        nn.init.normal_(self.weight, std=cfg.init_std)
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._sup: tuple[torch.Tensor, torch.Tensor] | None = None
        self._mask: torch.Tensor | None = None
        # the softmax temperature in use: the schedule's end value outside training (`set_temperature`)
        self.temperature = cfg.temperature if cfg.temperature_end is None else cfg.temperature_end

    def forward(self, x: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Gates (..., N) in float32 from x (..., d_in), also under autocast (Switch's "selective
        precision"). `logits` (..., N): W_g x already computed by the caller (`low_rank_and_gates`)."""
        with torch.autocast(x.device.type, enabled=False):
            if logits is None:
                x = x.float()
                if self.training and self.cfg.jitter > 0:
                    x = jitter(x, self.cfg.jitter)
                logits = F.linear(x, self.weight.float())                # (..., N)
            logits = self.pool(logits)                                   # sequence level: one row per sequence
            weights, probs = gates(logits, self.cfg.type, self.cfg.top_k, self.temperature)
            sup = self.supervision_probs(lambda: F.linear(x.detach().float(), self.weight.float())) \
                if self.training and self.cfg.domain_loss_weight > 0 else None
        if not recomputing():  # a checkpoint recompute keeps the original forward's state (recompute.py)
            self._last = (logits, probs, weights)  # with their graph: aux_losses() must backprop into W_g
            self._sup = sup
            self._mask = forward_mask(weights)
        return weights

    def pool(self, logits: torch.Tensor, use_cache: bool = True) -> torch.Tensor:
        """Per-token logits (B, T, N) as the gates use them: with router.level 'sequence', each sequence's
        mean over its prompt (`sequence_logits`; `use_cache`: this router's row in a generation cache);
        unchanged for 'token' or without a time axis."""
        if self.cfg.level == "sequence" and logits.dim() >= 3:
            return sequence_logits(logits, self if use_cache else None)
        return logits

    def supervision_probs(self, detached_logits) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(probs (B, T, N), token domains (B, T)) for the domain loss, or None outside a batch with
        domains. `detached_logits()` recomputes this router's logits (B, T, N) from the DETACHED layer
        input, so that loss trains the router only and never the adapters of earlier layers."""
        dom = current_context().token_domain
        if dom is None:
            return None
        logits = self.pool(detached_logits(), use_cache=False)           # (B, T, N)
        return torch.softmax(logits / self.temperature, -1), dom

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """{'balance': weight * balance loss, 'z_loss': weight * z-loss, 'domain': ...} of the last forward,
        over its real tokens. With router.balance_scope 'global' the balance loss and the z-loss are left to
        the training step, which takes them over the global batch from `load_sums` (train/global_balance.py).

        The switch loss counts top-1 choices for soft routing and top-k choices for top_k; the
        z-loss is taken on the raw logits W_g x (before the temperature)."""
        if self._last is None:
            return {}
        logits, probs, _ = self._last
        return router_losses(self.cfg, logits, probs, self._mask, [self._sup] if self._sup is not None else [],
                             assigned_k(self.cfg))

    def load_sums(self) -> torch.Tensor | None:
        """(2N + 2,) load sums of the last forward's real tokens (moetune.experts.balance.load_sums), or None."""
        if self._last is None:
            return None
        return load_sums(self._last[0], self._last[1], assigned_k(self.cfg), self._mask)

    def stats(self) -> dict | None:
        return None if self._last is None else stats(self._last[2].detach(), self._mask)


def forward_mask(weights: torch.Tensor) -> torch.Tensor | None:
    """The routing context's token mask (B, T) when it fits the gates (B, T, N) of this forward, else None."""
    m = current_context().token_mask
    return m if m is not None and tuple(m.shape) == tuple(weights.shape[:-1]) else None


def assigned_k(cfg) -> int:
    """The k of the switch loss's f: router.top_k for top_k routing, 1 (the argmax) for soft routing."""
    return cfg.top_k if cfg.type == "top_k" else 1


def router_losses(cfg, logits: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor | None,
                  sups: list, k: int = 1) -> dict[str, torch.Tensor]:
    """The weighted losses of one router group (one layer; MoLE: all its places stacked), logits and probs
    (..., N), mask (...) (None: every token), sups: the (probs, domains) pairs of the domain loss, k: the
    switch loss's top-k. Balance and z-loss only with router.balance_scope 'micro' (see `Router.aux_losses`)."""
    out = {}
    micro = getattr(cfg, "balance_scope", "micro") == "micro"
    if micro and cfg.balance_loss != "none" and cfg.balance_weight > 0:
        out["balance"] = cfg.balance_weight * balance_loss(cfg.balance_loss, probs, k, mask)
    if micro and cfg.z_loss_weight > 0:
        out["z_loss"] = cfg.z_loss_weight * z_loss(logits, mask)
    if cfg.domain_loss_weight > 0 and sups:  # summed over the group's routers, as the layers' losses are
        out["domain"] = cfg.domain_loss_weight * sum(domain_loss(*s) for s in sups)
    return out


# ---------------------------------------------------------------- sequence gates

def sequence_logits(logits: torch.Tensor, router: nn.Module | None) -> torch.Tensor:
    """Per-token logits (B, T, N) -> each sequence's mean logits over its pool tokens, repeated at
    all its tokens (B, T, N). W_g is linear, so this equals W_g applied to the mean input.

    Uses the routing context's pool_mask and segment_ids (moetune.experts.context); without a
    pool_mask every position of this forward counts. In generation (context `cache`), the first call
    per router pools the prompt and the later calls (one new token each) reuse that row. A segment
    with no pool token gets logits 0 (uniform gates)."""
    ctx = current_context()
    cache = ctx.cache
    if cache is not None and router is not None and id(router) in cache:
        row = cache[id(router)]                                          # (B, N)
        return row.unsqueeze(1).expand(-1, logits.shape[1], -1)
    b, t, n = logits.shape
    pool = ctx.pool_mask
    if pool is None or tuple(pool.shape) != (b, t):
        pool = torch.ones(b, t, dtype=torch.bool, device=logits.device)
    seg = ctx.segment_ids
    seg = torch.zeros(b, t, dtype=torch.long, device=logits.device) if seg is None else seg.long()
    oh = F.one_hot(seg, int(seg.max()) + 1).float() * pool.unsqueeze(-1).float()  # (B, T, S)
    num = torch.einsum("bts,btn->bsn", oh, logits)                        # (B, S, N)
    pooled = num / oh.sum(1).clamp_min(1.0).unsqueeze(-1)                # (B, S, N)
    if cache is not None and router is not None:
        cache[id(router)] = pooled[:, 0]
    return pooled.gather(1, seg.unsqueeze(-1).expand(-1, -1, n))         # (B, T, N)


def domain_loss(probs: torch.Tensor, token_domain: torch.Tensor) -> torch.Tensor:
    """Weak supervision -mean_d log q_d,a(d): q_d (N,) the mean gate over the tokens of domain d
    (present in the batch), a(d) = d mod N a FIXED domain -> expert assignment. Minimum 0 when every
    token of domain d puts all its gate on expert a(d). probs (..., N), token_domain (...) (-1: skip)."""
    n = probs.shape[-1]
    p = probs.reshape(-1, n)                                             # (T, N)
    d = token_domain.reshape(-1).to(p.device)                            # (T,)
    keep = d >= 0
    if not bool(keep.any()):
        return probs.sum() * 0.0
    p, d = p[keep], d[keep]
    oh = F.one_hot(d, int(d.max()) + 1).float()                          # (T, D)
    count = oh.sum(0)                                                    # (D,)
    q = (oh.t() @ p) / count.clamp_min(1.0).unsqueeze(-1)                # (D, N)
    present = count > 0
    target = torch.arange(q.shape[0], device=p.device) % n               # (D,): a(d)
    picked = q.gather(1, target.unsqueeze(-1)).squeeze(-1)               # (D,)
    return -(picked.clamp_min(1e-12).log() * present).sum() / present.sum()


def scheduled_temperature(cfg, step: int, total: int) -> float:
    """Router temperature at optimizer step `step` of `total`: geometric from router.temperature
    (step 0) to router.temperature_end (last step); constant when temperature_end is None."""
    if cfg.temperature_end is None:
        return cfg.temperature
    frac = min(max(step / max(total - 1, 1), 0.0), 1.0)
    return cfg.temperature * (cfg.temperature_end / cfg.temperature) ** frac


def set_temperature(model: nn.Module, value: float) -> None:
    """Set the temperature of every `Router` of `model` whose recipe has a schedule (temperature_end)."""
    for m in model.modules():
        if isinstance(m, Router) and m.cfg.temperature_end is not None:
            m.temperature = value


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of every `Router` in `model` (W_g, MoLE's bias), each once."""
    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, Router):
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


# ---------------------------------------------------------------- specialisation (domain vs expert)

def domain_expert_mi(cond: torch.Tensor, p_domain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(I(D;E) nats (...,), I(D;E) / H(D) (...,)) from p(e|d) cond (D, ..., N) and p(d) (D,).

    The joint is p(d, e) = p(d) p(e|d): draw a token of domain d, then an expert from its gates
    (soft routing: p(e|d) is the mean gate over d's tokens) or its top-k choices (1/k each).
    I = sum_d,e p(d,e) log(p(e|d) / p(e)), p(e) = sum_d p(d) p(e|d). Normalised by the domain
    entropy H(D): 1 when the expert determines the domain (no expert serves two domains), 0 when
    every domain routes alike, and 0 when H(D) = 0 (a single domain). With more domains than
    experts it is at most log N / H(D) (2/3 for 8 equal domains on 4 experts)."""
    pd = (p_domain / p_domain.sum()).double()                            # (D,)
    c = cond.double()                                                    # (D, ..., N)
    shape = (-1,) + (1,) * (c.dim() - 1)
    pe = (pd.view(shape) * c).sum(0)                                     # (..., N)
    ratio = torch.where(c > 0, c / pe.unsqueeze(0).clamp_min(1e-300), torch.ones_like(c))
    mi = (pd.view(shape) * torch.special.xlogy(c, ratio)).sum((0, -1)).clamp_min(0.0)  # (...,)
    h = float(-torch.special.xlogy(pd, pd).sum())
    return mi, (mi / h if h > 0 else torch.zeros_like(mi))


FUSE_ROUTER_MATMUL = True  # False: always the separate path (tests compare the two)


def low_rank_and_gates(x: torch.Tensor, a: torch.Tensor, router: Router,
                       dropout: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(h = dropout(x) @ a^T (..., k), gates (..., N)) for a routed low-rank layer (HydraLoRA, MoLoRA).

    a: (k, d_in), the layer's (stacked) A. When the adapter and the router read the same x in
    float32 (no adapter dropout or router jitter in this mode, no autocast), both come out of ONE
    matmul x @ [a; W_g]^T (..., k + N), split into h and the logits: one matmul and one weight
    gradient instead of two each per layer, which matters at small layer sizes where routed layers
    otherwise pay a third of LoRA's matmul calls again. Same values as the separate path."""
    drops = dropout.training and getattr(dropout, "p", 0.0) > 0                # nn.Identity: never
    fused = (FUSE_ROUTER_MATMUL and not drops and not (router.training and router.cfg.jitter > 0)
             and not torch.is_autocast_enabled(x.device.type)
             and x.dtype == a.dtype == router.weight.dtype == torch.float32)
    if not fused:
        return dropout(compute_input(x, a)) @ a.t(), router(x)       # under autocast: bf16 from the fp32 master
    k = a.shape[0]
    z = x @ torch.cat([a, router.weight]).t()                            # (..., k + N)
    h, logits = z.split([k, z.shape[-1] - k], dim=-1)                    # (..., k), (..., N)
    return h, router(x, logits)
