"""One optimizer step: the micro-batch forwards and backwards of one global batch, then the update.

A step is built from components, so that a new kind of training adds a component, not an `if`:

- the **objective** (`SFT` here; `DPO` and `ORPO` in train/preference.py, chosen by `train.objective`): the
  loss module the strategy prepares (`module`), this process's examples as device batches (`batch`), the
  global batch's normalising units (`units`: target tokens, or pairs), one micro-batch's forward to the SUM
  of its per-unit losses, the experts' auxiliary losses and the SUMS of any metrics it reports per unit
  (`forward`: DPO's rewards/*, logps/*), and the held-out scores after training (`validate`);
- the **strategy** (train/strategy.py): gradient synchronisation over the processes;
- the optimizer, its scheduler and the gradient clipping (`train.max_grad_norm`).

The loss that is backpropagated on micro-batch j of M (this process) is

    loss_j = task_sum_j * world / units + sum(aux_j) / M

with `units` counted over the whole global batch (every process, every micro-batch), so the summed
gradient (averaged over the `world` processes by DDP/FSDP) is exactly that of the global mean: one
process and N processes with the same global batch compute the same update.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from moetune.data.packing import pack
from moetune.data.rows import Example, collate
from moetune.experts.routing import scheduled_temperature, set_temperature
from moetune.train.loss import CausalLMLoss
from moetune.train.precision import compute_autocast, compute_precision


def validation_loss(model, examples: list[Example], batch_size: int, pad_id: int, device) -> float:
    """Token-weighted mean loss on `examples` (response tokens only)."""
    lm = CausalLMLoss(model)
    was = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            b = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
            s, c, _ = lm(**b)
            total, n = total + float(s), n + int(c)
    model.train(was)
    return total / max(n, 1)


def seed_step(seed: int, step: int, rank: int, world: int) -> None:
    """Reseed dropout/jitter RNG per step so a resumed run draws exactly the same numbers."""
    s = (seed * 1_000_003 + step * world + rank) % (2 ** 31)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s)


def token_domains(examples: list[Example], index: dict[str, int] | None, attention_mask: torch.Tensor,
                  example_index: torch.Tensor | None = None):
    """(B, T) domain index of every real token (-1 on padding), or None without an index. A packed batch
    (moetune/data/packing.py) gives each token's example in `example_index` (R, T), -1 on padding."""
    if index is None:
        return None
    dom = torch.tensor([index.get(e.domain, -1) for e in examples], device=attention_mask.device)  # (B,)
    if example_index is not None:                                                                   # packed rows
        return dom[example_index.clamp(min=0)].masked_fill(example_index < 0, -1)                  # (R, T)
    return dom.unsqueeze(1).expand_as(attention_mask).masked_fill(attention_mask == 0, -1)         # (B, T)


class SFT:
    """`sft`, supervised fine-tuning: the causal-LM loss on response tokens (train/loss.py's CausalLMLoss,
    the `lm` the strategy prepared), normalised by the global batch's number of target tokens.

    Batches are right-padded (`collate`) or packed (`data.packing`, moetune/data/packing.py: true packs each
    micro-batch, 'dataset' lays out the rows a token-budget plan chose); with `router.domain_loss_weight`
    each batch carries its tokens' domains (`token_domain`), which the loss hands to the routers through
    the routing context."""

    def __init__(self, packing: bool | str, max_length: int, pad_id: int, domains: dict[str, int] | None = None) -> None:
        self.packing, self.max_length, self.pad_id, self.domains = packing, max_length, pad_id, domains

    def module(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module whose forward computes the loss (what DDP wraps: one forward per micro-batch)."""
        return CausalLMLoss(model)

    def units(self, rows: list[Example]) -> int:
        """Target tokens of the whole global batch (the first label of a row is never predicted)."""
        return sum(sum(1 for lab in e.labels[1:] if lab >= 0) for e in rows)

    def batch(self, examples: list[Example], device, sizes: list[int] | None = None) -> dict[str, torch.Tensor]:
        """One micro-batch of `examples` as the loss's keyword arguments, on `device`; `sizes`: the packed rows a
        token-budget plan chose (examples per row, train/plan.py's `Rows`)."""
        if sizes is not None or self.packing:
            b = pack(examples, self.max_length, self.pad_id, sizes)
        else:
            b = collate(examples, self.pad_id)
        batch = {k: v.to(device) for k, v in b.items()}
        doms = token_domains(examples, self.domains, batch["attention_mask"], batch.get("example_index"))  # (B, T)
        if doms is not None:
            batch["token_domain"] = doms  # reaches the routers through the loss's routing context
        return batch

    def forward(self, lm, batch: dict[str, torch.Tensor]):
        """(sum of this micro-batch's token losses, the experts' auxiliary losses, no metrics)."""
        s, _, aux = lm(**batch)
        return s, aux, {}

    def validate(self, model, examples: list[Example], batch_size: int, device) -> dict[str, float]:
        """{'val_loss': the token-weighted mean loss on `examples`}."""
        return {"val_loss": validation_loss(model, examples, batch_size, self.pad_id, device)}


@dataclass
class StepResult:
    """What one step reports: the global batch's mean task loss, the auxiliary losses (mean over this
    process's micro-batches), the gradient norm before clipping, and the tokens it read."""

    loss: float
    aux: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's, per unit (DPO: rewards/*, logps/*)
    grad_norm: torch.Tensor | None = None
    tokens: int = 0                            # real tokens of the global batch (this process's times world)
    slots: int = 0                             # token positions computed, padding included (the same scale)
    mask: torch.Tensor | None = None           # the last micro-batch's attention mask (B, T): routing statistics


class TrainStep:
    """step(step, rows, micro_batches) runs one optimizer step of the global batch `rows`, of which this
    process takes `micro_batches` (lists of row positions); the parts are separate methods so that a
    step with another shape (a pass over the micro-batches before the backward ones, a budget of tokens
    instead of examples) overrides one of them."""

    def __init__(self, model, lm, objective, strategy, optimizer, scheduler, params: list, recipe,
                 total_steps: int, accelerator) -> None:
        self.model, self.lm, self.objective, self.strategy = model, lm, objective, strategy
        self.optimizer, self.scheduler, self.params = optimizer, scheduler, params
        self.cfg, self.router_cfg, self.total_steps, self.accelerator = recipe.train, recipe.router, total_steps, accelerator
        self.precision = compute_precision(recipe)

    def __call__(self, step: int, rows: list[Example], micro_batches: list[list[int]]) -> StepResult:
        acc = self.accelerator
        seed_step(self.cfg.seed, step, acc.process_index, self.strategy.world)
        set_temperature(self.model, scheduled_temperature(self.router_cfg, step, self.total_steps))
        units = self.objective.units(rows)
        loss_sum, result = self.forward_backward(rows, micro_batches, units)
        result.grad_norm = self.update()
        result.loss = float(acc.reduce(loss_sum, "sum")) / max(units, 1)
        if result.metrics:  # summed over this process's micro-batches: summed over processes, per unit
            names = sorted(result.metrics)
            total = acc.reduce(torch.stack([result.metrics[k] for k in names]), "sum")
            result.metrics = {k: round(float(v) / max(units, 1), 6) for k, v in zip(names, total)}
        return result

    def forward_backward(self, rows: list[Example], micro_batches: list[list[int]],
                         units: int) -> tuple[torch.Tensor, StepResult]:
        """Forward and backward of each of this process's micro-batches (gradients accumulate); (this
        process's summed task loss, the result without loss and norm)."""
        acc, world, device = self.accelerator, self.strategy.world, self.accelerator.device
        loss_sum = torch.zeros((), device=device)
        aux_sum: dict[str, float] = {}
        metrics: dict[str, torch.Tensor] = {}
        tokens, slots, batch = 0, 0, None
        for j, mb in enumerate(micro_batches):
            batch = self.objective.batch([rows[i] for i in mb], device, getattr(mb, "sizes", None))
            tokens += int(batch["attention_mask"].sum()) * world
            slots += batch["attention_mask"].numel() * world
            with self.strategy.sync(self.lm, self.model, j == len(micro_batches) - 1), self.autocast():
                s, aux, sums = self.objective.forward(self.lm, batch)
                acc.backward(self.micro_loss(s, aux, units, len(micro_batches)))
            loss_sum += s.detach()
            for k, v in aux.items():
                aux_sum[k] = aux_sum.get(k, 0.0) + float(v.detach()) / len(micro_batches)
            for k, v in sums.items():
                metrics[k] = metrics[k] + v.detach().float() if k in metrics else v.detach().float()
        return loss_sum, StepResult(float("nan"), aux_sum, metrics, tokens=tokens, slots=slots,
                                    mask=None if batch is None else batch["attention_mask"])

    def autocast(self):
        """bf16: torch's autocast, the same on CPU and GPU (train/precision.py); else accelerate's (fp16 on GPU)."""
        if self.precision == "bf16":
            return compute_autocast(self.accelerator.device, "bf16")
        return self.accelerator.autocast()

    def micro_loss(self, task_sum: torch.Tensor, aux: dict[str, torch.Tensor], units: int, n_micro: int) -> torch.Tensor:
        """The loss one micro-batch backpropagates: its share of the global mean task loss plus the mean of
        the auxiliary losses over this process's micro-batches (the module docstring's formula)."""
        # DDP/FSDP average gradients over processes: scale so the sum over the global batch is exact.
        zero = torch.zeros((), device=self.accelerator.device)
        return task_sum * self.strategy.world / max(units, 1) + sum(aux.values(), zero) / n_micro

    def update(self) -> torch.Tensor | None:
        """Clip (train.max_grad_norm), step the optimizer and the schedule, clear the gradients; the norm."""
        cfg = self.cfg
        grad_norm = (self.accelerator.clip_grad_norm_(self.params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm
