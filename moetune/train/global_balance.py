"""The optimizer step of `router.balance_scope: global`: balance loss and z-loss over the whole global batch.

The math is in moetune/experts/balance.py: the global loss L(G) is a function of load sums G over every
token of the step (all gradient-accumulation micro-batches, all processes), and its exact gradient is a
sum over micro-batches of a linear surrogate sum_i c_i S_b,i / T of each micro-batch's own sums S_b, with
c = dL/dP at G. So every micro-batch needs G BEFORE its backward:

- one micro-batch per process (train.grad_accum 1): its forward gives S_b; one all-reduce of the sums of
  every routed layer (2N + 2 numbers each) gives G; then the backward. No extra compute.
- M > 1 micro-batches: a statistics pass first, one forward WITHOUT gradients per micro-batch (the load
  sums only), all-reduced once; then the usual forward and backward of each micro-batch. Each forward of
  the second pass replays the RNG state its statistics forward started from, so dropout and router jitter
  draw the same numbers and the sums of the two passes agree exactly. Cost: one extra forward per
  micro-batch (benchmarks/balance_scope.py measures it).

The alternative, accumulating closed-form per-expert router-weight gradients dP_i/dW_g over micro-batches
and combining them at the step's end, needs no extra forward but holds only for the router weights (the
balance loss's gradient into the layer input, and so into the adapters of earlier layers, would be
dropped), has a closed form per gate kind (sequence pooling, top-k, MoLE's LayerNorm gates each need their
own), and changes the loss from the micro scope's in more than its scope; the statistics pass is exact for
every parameter and every routed type.

Each process backpropagates world * (its surrogate terms): DDP/FSDP average gradients over the processes
(as the task loss's scaling in train/step.py assumes), so the result is the sum over the global batch. The
terms' VALUE is the global loss, the same in every micro-batch, so the logged aux value is L(G).
"""
from __future__ import annotations

import torch

from moetune.adapters.inject import expert_layers, routed_layers
from moetune.data.rows import Example
from moetune.experts.balance import global_terms
from moetune.train.step import StepResult, TrainStep


def balance_groups(model: torch.nn.Module) -> list[tuple[object, torch.Tensor]]:
    """(router settings, load sums (2N + 2,) with gradient) of every router group's last forward, model order."""
    return [got for layer in expert_layers(model).values() if (got := layer.balance_sums()) is not None]


def global_aux(groups: list[tuple[object, torch.Tensor]], total: torch.Tensor) -> dict[str, torch.Tensor]:
    """The weighted global-scope losses of one micro-batch summed over router groups; `total`: every group's
    global sums, concatenated in the order of `groups` (detached)."""
    out: dict[str, torch.Tensor] = {}
    at = 0
    for cfg, local in groups:
        n = local.shape[-1]
        for k, v in global_terms(cfg, local, total[at:at + n]).items():
            out[k] = out[k] + v if k in out else v
        at += n
    return out


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class GlobalBalanceStep(TrainStep):
    """`TrainStep` with the balance loss and z-loss over the global batch (module docstring); the routers leave
    those two out of their own `aux_losses` under router.balance_scope 'global'."""

    def global_sums(self, groups: list[tuple[object, torch.Tensor]]) -> torch.Tensor:
        """The groups' load sums, concatenated, detached and summed over the processes (one all-reduce)."""
        flat = torch.cat([s.detach().float() for _, s in groups]) if groups else torch.zeros(0)  # (groups * (2N + 2),)
        return self.accelerator.reduce(flat.to(self.accelerator.device), "sum")

    @torch.no_grad()
    def statistics(self, batches: list[dict]) -> tuple[torch.Tensor, list[tuple]]:
        """The statistics pass over this process's micro-batches: (global load sums, the RNG state each
        forward started from)."""
        device, total, states = self.accelerator.device, None, []
        for batch in batches:
            states.append(_rng_state(device))
            with self.autocast():
                self.objective.forward(self.lm, batch)
            groups = balance_groups(self.model)
            sums = torch.cat([s.float() for _, s in groups]) if groups else torch.zeros(0, device=device)
            total = sums if total is None else total + sums
        return self.global_sums([(None, total)]), states

    def forward_backward(self, rows: list[Example], micro_batches: list[list[int]],
                         units: int) -> tuple[torch.Tensor, StepResult]:
        acc, world, device = self.accelerator, self.strategy.world, self.accelerator.device
        batches = [self.objective.batch([rows[i] for i in mb], device, getattr(mb, "sizes", None)) for mb in micro_batches]
        m = len(batches)
        total, states = self.statistics(batches) if m > 1 else (None, None)
        loss_sum = torch.zeros((), device=device)
        aux_sum: dict[str, float] = {}
        metrics: dict[str, torch.Tensor] = {}
        tokens, slots = 0, 0
        for j, batch in enumerate(batches):
            if states is not None:
                _set_rng_state(states[j], device)
            tokens += int(batch["attention_mask"].sum()) * world
            slots += batch["attention_mask"].numel() * world
            with self.strategy.sync(self.lm, self.model, j == m - 1), self.autocast():
                s, aux, sums = self.objective.forward(self.lm, batch)
                groups = balance_groups(self.model)
                glob = global_aux(groups, self.global_sums(groups) if total is None else total)
                zero = torch.zeros((), device=device)
                acc.backward(self.micro_loss(s, aux, units, m) + world * sum(glob.values(), zero))
            loss_sum += s.detach()
            for k, v in [*aux.items(), *glob.items()]:
                aux_sum[k] = aux_sum.get(k, 0.0) + float(v.detach()) / m
            for k, v in sums.items():
                metrics[k] = metrics[k] + v.detach().float() if k in metrics else v.detach().float()
        return loss_sum, StepResult(float("nan"), aux_sum, metrics, tokens=tokens, slots=slots,
                                    mask=batches[-1]["attention_mask"] if batches else None)


def step_class(recipe, model: torch.nn.Module) -> type[TrainStep]:
    """`GlobalBalanceStep` when router.balance_scope is 'global', the model routes tokens and the recipe turns a
    balance loss or the z-loss on; else the plain `TrainStep`."""
    rc = recipe.router
    on = (rc.balance_loss != "none" and rc.balance_weight > 0) or rc.z_loss_weight > 0
    return GlobalBalanceStep if rc.balance_scope == "global" and on and routed_layers(model) else TrainStep
