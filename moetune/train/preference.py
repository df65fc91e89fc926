"""Preference tuning: DPO (sigmoid and IPO losses) and ORPO objectives, and scoring preference pairs.

The log-probability of a response y to a prompt x sums over its tokens (labels != -100, the response
tokens only):

    log pi(y|x) = sum_t log p(y_t | x, y_<t)

DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7), y_w chosen, y_l rejected, with the
reward margin

    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]

    loss_type sigmoid:  L = -log sigmoid(beta h)
    loss_type ipo:      L = (h' - 1 / (2 beta))^2       (Azar et al. 2023, "A General Theoretical Paradigm
                        to Understand Learning from Human Preferences", eq. 17; h' from log-probs averaged
                        over each response's tokens, as TRL computes it)

The implicit rewards are r = beta (log pi(y|x) - log pi_ref(y|x)); TRL's metric names are kept:
rewards/chosen, rewards/rejected (means), rewards/accuracies (the fraction of pairs with r_w > r_l),
rewards/margins (mean r_w - r_l), logps/chosen, logps/rejected (mean summed log-probs).

ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", eq. 6-8),
with the mean per-token log-probability a(y) = log pi(y|x) / |y|:

    log odds(y) = a(y) - log(1 - exp(a(y))),    L = -a(y_w) + beta * -log sigmoid(log odds(y_w) - log odds(y_l))

(beta is the paper's lambda); its rewards are TRL's ORPO ones, beta * a(y).

Chosen and rejected go through ONE forward: a micro-batch of B pairs is one batch of 2B rows, the B chosen
sequences then the B rejected (`moetune.data.rows.collate_pairs`), so routed experts' auxiliary losses
are computed once per pair and sequence-level routers pool each pair's (shared) prompt alike. DPO's
reference log-probs come from a no-grad forward of the same model in eval mode inside `reference()`
(the adapters switched off, or a reference adapter swapped in: `moetune.adapters`), run BEFORE the
policy forward so the routers keep the policy forward's state for the auxiliary losses.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

from moetune.adapters.inject import aux_losses
from moetune.data.rows import IGNORE, Pair, collate_pairs
from moetune.experts.context import batch_routing
from moetune.train.loss import plain_head, target_logits
from moetune.train.step import token_domains

Reference = Callable[[], AbstractContextManager]
"""A function giving the context in which the model computes the reference model."""


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                   sliced: bool, token_domain: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs of the labelled tokens per row (N,), labelled tokens per row (N,)) for a (N, T) batch."""
    target = labels[:, 1:]                                                   # (N, T-1)
    keep = target != IGNORE                                                  # (N, T-1)
    with batch_routing(labels, attention_mask, token_domain=token_domain):
        logits = target_logits(model, input_ids, attention_mask, keep, sliced)  # (M, V), M target tokens
    tok = -F.cross_entropy(logits.float(), target[keep], reduction="none")   # (M,) log p(y_t | ...)
    rows = keep.nonzero()[:, 0]                                              # (M,) row of each token
    logps = torch.zeros(keep.shape[0], device=tok.device, dtype=tok.dtype).index_add(0, rows, tok)  # (N,)
    return logps, keep.sum(1)


class SequenceLogps(nn.Module):
    """forward(batch) -> (summed response log-probs per row (N,), response tokens per row (N,), aux losses).
    The module the strategy prepares (DDP sees one forward per micro-batch)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.sliced = plain_head(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                token_domain: torch.Tensor | None = None):
        logps, n = sequence_logps(self.model, input_ids, attention_mask, labels, self.sliced, token_domain)
        return logps, n, aux_losses(self.model)


# ------------------------------------------------------------------ the losses (pure functions)

def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor, beta: float,
             loss_type: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses (B,), chosen rewards (B,), rejected rewards (B,)) from summed log-probs of the 2B rows
    [chosen; rejected] under the policy and the reference, (2B,) each, and their response tokens (2B,)."""
    ratio = policy - reference                                               # (2B,) log pi/pi_ref
    chosen, rejected = ratio.chunk(2)                                        # (B,), (B,)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen - rejected))
    elif loss_type == "ipo":
        n_c, n_r = counts.clamp(min=1).to(ratio.dtype).chunk(2)
        losses = (chosen / n_c - rejected / n_r - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")
    return losses, beta * chosen.detach(), beta * rejected.detach()


def orpo_loss(policy: torch.Tensor, counts: torch.Tensor, beta: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses (B,), chosen NLL per token (B,), log odds ratio (B,), mean log-probs a (2B,)) from the
    summed log-probs (2B,) of [chosen; rejected] and their response tokens (2B,)."""
    a = policy / counts.clamp(min=1).to(policy.dtype)                       # (2B,) mean log-prob per token
    log1m = torch.log(-torch.expm1(a.clamp(max=-1e-6)))                      # (2B,) log(1 - P), P = exp(a)
    a_c, a_r = a.chunk(2)
    l_c, l_r = log1m.chunk(2)
    log_odds = (a_c - a_r) - (l_c - l_r)                                     # (B,)
    return -a_c + beta * -F.logsigmoid(log_odds), -a_c.detach(), log_odds.detach(), a.detach()


def reward_stats(policy: torch.Tensor, r_c: torch.Tensor, r_r: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's metrics as SUMS over the pairs (the step divides by the pairs of the global batch)."""
    p_c, p_r = policy.detach().chunk(2)
    return {"rewards/chosen": r_c.sum(), "rewards/rejected": r_r.sum(),
            "rewards/accuracies": (r_c > r_r).float().sum(), "rewards/margins": (r_c - r_r).sum(),
            "logps/chosen": p_c.sum(), "logps/rejected": p_r.sum()}


# ------------------------------------------------------------------ the objectives (train/step.py's interface)

class _Pairs(ABC):
    """What DPO and ORPO share: the units are pairs, a micro-batch is its pairs as one batch of 2B rows."""

    def __init__(self, beta: float, pad_id: int, domains: dict[str, int] | None = None) -> None:
        self.beta, self.pad_id, self.domains = beta, pad_id, domains
        self.model: nn.Module | None = None

    def module(self, model: nn.Module) -> nn.Module:
        self.model = model
        return SequenceLogps(model)

    def units(self, rows: list[Pair]) -> int:
        """Pairs of the whole global batch: the loss is the mean over pairs."""
        return len(rows)

    def batch(self, pairs: list[Pair], device, sizes: list[int] | None = None) -> dict[str, torch.Tensor]:
        """The pairs as one batch of 2B rows (`sizes`, token-budget packing's rows, never comes: pairs are not
        packed, the recipe check refuses data.packing with a preference objective)."""
        batch = {k: v.to(device) for k, v in collate_pairs(pairs, self.pad_id).items()}          # (2B, T) each
        doms = token_domains(list(pairs) * 2, self.domains, batch["attention_mask"])              # (2B, T)
        if doms is not None:
            batch["token_domain"] = doms
        return batch

    reference: Reference | None = None

    @abstractmethod
    def pair_losses(self, logps: torch.Tensor, ref: torch.Tensor | None, counts: torch.Tensor) -> torch.Tensor:
        """(B,) loss of each pair from the policy's (2B,) summed log-probs (chosen rows first), the reference's
        (2B,) or None, and the (2B,) response token counts: DPO's or ORPO's formula."""

    def validate(self, model: nn.Module, pairs: list[Pair], batch_size: int, device) -> dict[str, float]:
        """{'val_loss': the mean pair loss, 'preference_accuracy', and the TRL metrics `score_pairs` gives}."""
        s = score_pairs(model, pairs, self.pad_id, batch_size, device, self.beta, self.reference, self.pair_losses)
        return {"val_loss": s["loss"], "preference_accuracy": s["preference_accuracy"],
                **{k: v for k, v in s.items() if "/" in k}}


class DPO(_Pairs):
    """`dpo`: the DPO loss (sigmoid or IPO) against the reference model (see the module docstring)."""

    def __init__(self, beta: float, loss_type: str, pad_id: int, reference: Reference,
                 domains: dict[str, int] | None = None) -> None:
        super().__init__(beta, pad_id, domains)
        self.loss_type, self.reference = loss_type, reference

    def module(self, model: nn.Module) -> nn.Module:
        self.ref_lm = SequenceLogps(model)  # not prepared by the strategy: no-grad forwards only
        return super().module(model)

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed response log-probs (2B,) under the reference: no grad, eval mode (no dropout or jitter)."""
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.reference():
                logps, _, _ = self.ref_lm(**{k: v for k, v in batch.items() if k != "token_domain"})
        finally:
            self.model.train(was)
        return logps

    def pair_losses(self, logps: torch.Tensor, ref: torch.Tensor | None, counts: torch.Tensor) -> torch.Tensor:
        return dpo_loss(logps, ref, counts, self.beta, self.loss_type)[0]

    def forward(self, lm, batch: dict[str, torch.Tensor]):
        """(summed per-pair losses, aux losses of the one policy forward, summed TRL metrics)."""
        ref = self.reference_logps(batch)
        logps, n, aux = lm(**batch)
        losses, r_c, r_r = dpo_loss(logps, ref, n, self.beta, self.loss_type)
        return losses.sum(), aux, reward_stats(logps, r_c, r_r)


class ORPO(_Pairs):
    """`orpo`: chosen NLL plus beta times the odds-ratio loss; no reference model (see the module docstring)."""

    def pair_losses(self, logps: torch.Tensor, ref: torch.Tensor | None, counts: torch.Tensor) -> torch.Tensor:
        return orpo_loss(logps, counts, self.beta)[0]

    def forward(self, lm, batch: dict[str, torch.Tensor]):
        logps, n, aux = lm(**batch)
        losses, nll, log_odds, a = orpo_loss(logps, n, self.beta)
        a_c, a_r = a.chunk(2)
        stats = reward_stats(logps, self.beta * a_c, self.beta * a_r)
        stats.update({"nll_loss": nll.sum(), "log_odds_ratio": log_odds.sum()})
        return losses.sum(), aux, stats


# ------------------------------------------------------------------ scoring held-out pairs

@torch.no_grad()
def score_pairs(model: nn.Module, pairs: list[Pair], pad_id: int, batch_size: int, device, beta: float,
                reference: Reference | None, loss: Callable | None = None) -> dict:
    """Preference scores of `model` on `pairs` (eval mode, no grad):

    - preference_accuracy: the fraction of pairs whose chosen response the model finds more likely than the
      rejected one (log pi(y_w|x) > log pi(y_l|x), summed log-probs): reference-free, comparable before and
      after training and between runs; per domain too;
    - with a `reference` (a function giving its context): TRL's rewards/* metrics (beta log pi/pi_ref);
    - logps/chosen, logps/rejected; with `loss` (per-pair losses from (policy, reference, counts)) its mean;
    - preferred: per pair, in order, whether the chosen response is the more likely (paired comparisons).
    """
    was = model.training
    model.eval()
    sliced = plain_head(model)
    sums: dict[str, float] = defaultdict(float)
    hits, totals = defaultdict(int), defaultdict(int)
    preferred: list[bool] = []                                               # per pair, in order
    for i in range(0, len(pairs), batch_size):
        chunk = list(pairs[i:i + batch_size])
        b = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}                     # (2B, T)
        logps, n = sequence_logps(model, b["input_ids"], b["attention_mask"], b["labels"], sliced)
        ref = None
        if reference is not None:
            with reference():
                ref, _ = sequence_logps(model, b["input_ids"], b["attention_mask"], b["labels"], sliced)
            _, r_c, r_r = dpo_loss(logps, ref, n, beta)
            for k, v in reward_stats(logps, r_c, r_r).items():
                sums[k] += float(v)
        else:
            p_c, p_r = logps.chunk(2)
            sums["logps/chosen"] += float(p_c.sum())
            sums["logps/rejected"] += float(p_r.sum())
        if loss is not None:
            sums["loss"] += float(loss(logps, ref, n).sum())
        p_c, p_r = logps.chunk(2)
        for p, ok in zip(chunk, (p_c > p_r).tolist()):
            preferred.append(ok)
            hits[p.domain] += ok
            totals[p.domain] += 1
    model.train(was)
    n_pairs = max(sum(totals.values()), 1)
    return {"preference_accuracy": sum(hits.values()) / n_pairs, "pairs": sum(totals.values()), "preferred": preferred,
            **{k: v / n_pairs for k, v in sums.items()},
            "per_domain": {d: {"preference_accuracy": hits[d] / totals[d], "pairs": totals[d]} for d in sorted(totals)}}
