"""Causal-LM task loss on response tokens only, plus the experts' auxiliary losses.

The output head runs only on positions whose next token is a target, which on short
instruction data skips most of the (large) vocabulary projection. Models whose head
does more than a linear map (logit soft-capping, scaling) use the full forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moetune.adapters.inject import aux_losses
from moetune.data.rows import IGNORE
from moetune.experts.context import batch_routing


def plain_head(model: nn.Module) -> bool:
    """Whether the model's logits are a plain linear head on the last hidden states (no soft-capping or
    scaling), so that `target_logits` may apply the head to the target positions only."""
    cfg = getattr(model, "config", None)
    special = any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"))
    if getattr(model, "moetune_full_forward", False):  # FSDP-sharded: only the root forward all-gathers (fsdp.py)
        return False
    return (not special and hasattr(model, "base_model") and model.base_model is not model
            and isinstance(model.get_output_embeddings(), nn.Linear))


def target_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  keep: torch.Tensor, sliced: bool, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (N, V) at the positions where keep (B, T-1) is true, i.e. those predicting a target.

    With `position_ids` (a packed batch, see moetune.data.packing) the model gets no attention mask:
    transformers then keeps attention inside each run of increasing positions."""
    kw = {"attention_mask": attention_mask} if position_ids is None else {"position_ids": position_ids}
    if sliced:
        hidden = model.base_model(input_ids=input_ids, use_cache=False, **kw).last_hidden_state  # (B, T, D)
        return model.get_output_embeddings()(hidden[:, :-1][keep])           # (N, V)
    logits = model(input_ids=input_ids, use_cache=False, **kw).logits
    return logits[:, :-1][keep]                                              # (N, V)


class CausalLMLoss(nn.Module):
    """forward(batch) -> (sum of token losses, number of target tokens, aux losses dict).

    Wrapping the model in this module lets DDP see one forward per micro-batch.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.sliced = plain_head(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                segment_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                example_index: torch.Tensor | None = None, token_domain: torch.Tensor | None = None):
        """segment_ids (B, T): packed rows, for sequence-level routing (`router.level`) per segment; a packed
        batch's example_index (B, T, -1 on padding) gives them. position_ids (B, T): packed rows (no mask).
        token_domain (B, T): each token's domain for `router.domain_loss_weight` (train.step). All of them
        reach the routers through the routing context (moetune.experts.context), entered here."""
        target = labels[:, 1:]                                               # (B, T-1)
        keep = target != IGNORE                                              # (B, T-1)
        with batch_routing(labels, attention_mask, segment_ids, example_index, token_domain):
            logits = target_logits(self.model, input_ids, attention_mask, keep, self.sliced, position_ids)
        loss_sum = F.cross_entropy(logits.float(), target[keep], reduction="sum")
        return loss_sum, keep.sum(), aux_losses(self.model)


@torch.no_grad()
def per_example_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum per example (B,), target tokens per example (B,)) for evaluation."""
    target = batch["labels"][:, 1:]                                          # (B, T-1)
    keep = target != IGNORE                                                  # (B, T-1)
    with batch_routing(batch["labels"], batch["attention_mask"], batch.get("segment_ids")):
        logits = target_logits(model, batch["input_ids"], batch["attention_mask"], keep, plain_head(model))
    tok = F.cross_entropy(logits.float(), target[keep], reduction="none")    # (N,)
    rows = keep.nonzero()[:, 0]                                              # (N,) example of each token
    per_ex = torch.zeros(keep.shape[0], device=tok.device).index_add_(0, rows, tok)  # (B,)
    return per_ex, keep.sum(1)
