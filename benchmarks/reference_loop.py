"""Loop-over-experts reference implementations, written the way published research code does it.

Each class computes exactly the function of the matching moetune layer (same gates, same
scaling), but with one `nn.Linear` (or vector) per expert and a Python `for` loop:

- `LoopHydraLoRA`: shared `lora_A`, a ModuleList of B heads; `A x` is recomputed inside
  the loop for every head, as the HydraLoRA authors' released layer does;
- `LoopMoLoRA` (soft): every expert runs on every token, weighted by its gate;
- `LoopMoLoRA` (top-k): per expert, boolean-index the tokens that selected it, run the
  expert on those rows only and scatter-add them back (the MixLoRA / HF-Mixtral pattern);
- `LoopMoV`: the (IA)^3 mixture built as a sum over the expert vectors;
- `LoopMoLE`: one frozen `nn.Linear` pair per trained LoRA, run one after another, their
  outputs concatenated for the gate and summed in a loop (the official MoLE code's pattern).

`from_layer(layer)` builds the reference from a moetune layer, sharing its frozen base
and copying its adapter and router weights, so the two can be checked against each other
(tests/test_reference_loop.py) and timed on the same problem (benchmarks/bench.py).
"""
from __future__ import annotations

import torch
from torch import nn

import torch.nn.functional as F

from moetune.experts.hydralora import HydraLoRALayer
from moetune.experts.mole import MoLELayer
from moetune.experts.molora import MoLoRALayer
from moetune.experts.mov import MoVLayer


class LoopGate(nn.Module):
    """Router W_g as an nn.Linear; gates like moetune's `routing.gates` (softmax / top-k renormalised)."""

    def __init__(self, d_in: int, n: int, kind: str = "soft", k: int = 2, temperature: float = 1.0) -> None:
        super().__init__()
        self.route = nn.Linear(d_in, n, bias=False)                      # W_g: (N, d_in)
        self.kind, self.k, self.temperature = kind, min(k, n), temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:                  # (..., d_in) -> (..., N) probs
        return torch.softmax(self.route(x).float() / self.temperature, dim=-1)

    def top(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(renormalised top-k gates (T, k), expert ids (T, k)) of probs (T, N)."""
        top, idx = probs.topk(self.k, dim=-1)
        return top / top.sum(-1, keepdim=True), idx


def _gate_from(router) -> LoopGate:
    c = router.cfg
    if c.jitter > 0:
        raise ValueError("the loop references do not implement router jitter (benchmarks use jitter 0)")
    n, d_in = router.weight.shape
    gate = LoopGate(d_in, n, c.type, c.top_k, c.temperature)
    with torch.no_grad():
        gate.route.weight.copy_(router.weight)
    return gate


class LoopHydraLoRA(nn.Module):
    """y = W0 x + s * sum_i w_i(x) B_i(A(x)), one nn.Linear per head, A x recomputed per head."""

    def __init__(self, base: nn.Module, d_in: int, d_out: int, r: int, n: int, scale: float, gate: LoopGate) -> None:
        super().__init__()
        self.base, self.scale, self.gate = base, scale, gate
        self.lora_A = nn.Linear(d_in, r, bias=False)                     # (r, d_in)
        self.lora_B = nn.ModuleList(nn.Linear(r, d_out, bias=False) for _ in range(n))  # N x (d_out, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                  # (..., d_in) -> (..., d_out)
        y = self.base(x)
        w = self.gate(x).to(y.dtype)                                     # (..., N)
        if self.gate.kind != "soft":                                     # dense top-k gates, as moetune's layer
            top, idx = self.gate.top(w.reshape(-1, w.shape[-1]).float())
            w = torch.zeros_like(w.reshape(-1, w.shape[-1])).scatter(-1, idx, top.to(w.dtype)).reshape(w.shape)
        for i in range(len(self.lora_B)):
            y = y + w[..., i:i + 1] * self.lora_B[i](self.lora_A(x)) * self.scale   # (..., d_out) per head
        return y


class LoopMoLoRA(nn.Module):
    """y = W0 x + s * sum_i w_i(x) B_i(A_i(x)) with N (A_i, B_i) nn.Linear pairs."""

    def __init__(self, base: nn.Module, d_in: int, d_out: int, r: int, n: int, scale: float, gate: LoopGate) -> None:
        super().__init__()
        self.base, self.scale, self.gate = base, scale, gate
        self.lora_A = nn.ModuleList(nn.Linear(d_in, r, bias=False) for _ in range(n))   # N x (r, d_in)
        self.lora_B = nn.ModuleList(nn.Linear(r, d_out, bias=False) for _ in range(n))  # N x (d_out, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                  # (..., d_in) -> (..., d_out)
        y = self.base(x)
        if self.gate.kind == "soft":
            w = self.gate(x).to(y.dtype)                                 # (..., N)
            for i in range(len(self.lora_A)):
                y = y + w[..., i:i + 1] * self.lora_B[i](self.lora_A[i](x)) * self.scale
            return y
        xf = x.reshape(-1, x.shape[-1])                                  # (T, d_in)
        top, idx = self.gate.top(self.gate(xf))                          # (T, k), (T, k)
        delta = torch.zeros(xf.shape[0], y.shape[-1], dtype=y.dtype, device=y.device)  # (T, d_out)
        for i in range(len(self.lora_A)):
            hit = idx == i                                               # (T, k) bool
            rows = hit.any(-1)                                           # (T,) tokens routed to expert i
            if not rows.any():
                continue
            w_i = (top * hit).sum(-1)[rows].unsqueeze(-1).to(y.dtype)    # (T_i, 1)
            out = self.lora_B[i](self.lora_A[i](xf[rows])) * w_i * self.scale  # (T_i, d_out)
            delta = delta.index_add(0, rows.nonzero().squeeze(1), out)
        return y + delta.reshape(y.shape)


class LoopMoV(nn.Module):
    """h' = h * sum_i w_i(x) l_i on the projection's output (or input), one vector per expert."""

    def __init__(self, base: nn.Module, d: int, n: int, scale_input: bool, gate: LoopGate) -> None:
        super().__init__()
        self.base, self.gate, self.scale_input = base, gate, scale_input
        self.ia3_l = nn.ParameterList(nn.Parameter(torch.ones(d)) for _ in range(n))  # N x (d,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                  # (..., d_in) -> (..., d_out)
        w = self.gate(x)                                                 # (..., N)
        if self.gate.kind != "soft":
            top, idx = self.gate.top(w.reshape(-1, w.shape[-1]))
            w = torch.zeros_like(w.reshape(-1, w.shape[-1])).scatter(-1, idx, top).reshape(w.shape)
        mix = sum(w[..., i:i + 1] * self.ia3_l[i] for i in range(len(self.ia3_l)))  # (..., d)
        if self.scale_input:
            return self.base(x * mix.to(x.dtype))
        y = self.base(x)
        return y * mix.to(y.dtype)


class LoopMoLE(nn.Module):
    """y = W0 x + sum_i G_i(x) E_i(x), E_i = s_i B_i A_i x, one frozen nn.Linear pair per expert;
    G = softmax((W_g LayerNorm([E_1; ...; E_N]) + b) / tau). A follower (`_leader` set to another
    LoopMoLE of the same gated place) reuses its leader's gate of this forward, as MoLE does."""

    def __init__(self, base: nn.Module, d_in: int, d_out: int, r: int, n: int, temperature: float) -> None:
        super().__init__()
        self.base, self.temperature = base, temperature
        self.lora_A = nn.ModuleList(nn.Linear(d_in, r, bias=False) for _ in range(n)).requires_grad_(False)
        self.lora_B = nn.ModuleList(nn.Linear(r, d_out, bias=False) for _ in range(n)).requires_grad_(False)
        self.gate = nn.Linear(n * d_out, n)                              # W_g: (N, N*d_out), b: (N,)
        self._leader: tuple[nn.Module, ...] = ()
        self._gate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:                  # (..., d_in) -> (..., d_out)
        y = self.base(x)
        xf = x.float()
        outs = [self.lora_B[i](self.lora_A[i](xf)) for i in range(len(self.lora_A))]  # N x (..., d_out)
        lead = self._leader[0] if self._leader else self
        if lead is self:
            e = torch.cat(outs, dim=-1)                                  # (..., N*d_out)
            self._gate = torch.softmax(self.gate(F.layer_norm(e, e.shape[-1:])) / self.temperature, dim=-1)
        w = lead._gate                                                   # (..., N)
        delta = sum(w[..., i:i + 1] * outs[i] for i in range(len(outs)))  # (..., d_out)
        return y + delta.to(y.dtype)


def loop_set(layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Loop references of a model's moetune layers (name -> ref); MoLE followers point at their leader's ref."""
    refs = {name: from_layer(layer) for name, layer in layers.items()}
    for name, layer in layers.items():
        if isinstance(layer, MoLELayer) and layer._leader[0] is not layer:
            refs[name]._leader = (refs[layer._leader[0].name],)
    return refs


def from_layer(layer: nn.Module) -> nn.Module:
    """The loop reference of a moetune HydraLoRA / MoLoRA / MoV / MoLE layer: same base, copied weights."""
    if isinstance(layer, MoLELayer):
        n, r, d_in = layer.expert_A.shape
        lead = layer._leader[0]
        ref = LoopMoLE(layer.base, d_in, layer.d_out, r, n, lead.router.temperature)
        with torch.no_grad():
            for i in range(n):
                ref.lora_A[i].weight.copy_(layer.expert_A[i])
                ref.lora_B[i].weight.copy_(layer.expert_B[i])
            if lead is layer:
                ref.gate.weight.copy_(lead.router.weight)
                ref.gate.bias.copy_(lead.router.bias)
        if lead is not layer:  # a follower: `loop_set` points it at its leader's reference
            del ref.gate
        return ref.to(layer.expert_A.device)
    gate = _gate_from(layer.router)
    with torch.no_grad():
        if isinstance(layer, HydraLoRALayer):
            n, d_out, r = layer.lora_B.shape
            ref = LoopHydraLoRA(layer.base, layer.d_in, d_out, r, n, layer.scale, gate)
            ref.lora_A.weight.copy_(layer.lora_A)
            for i in range(n):
                ref.lora_B[i].weight.copy_(layer.lora_B[i])
        elif isinstance(layer, MoLoRALayer):
            n, d_out, r = layer.lora_B.shape
            ref = LoopMoLoRA(layer.base, layer.d_in, d_out, r, n, layer.scale, gate)
            for i in range(n):
                ref.lora_A[i].weight.copy_(layer.lora_A[i])
                ref.lora_B[i].weight.copy_(layer.lora_B[i])
        elif isinstance(layer, MoVLayer):
            n, d = layer.ia3_l.shape
            ref = LoopMoV(layer.base, d, n, layer.scale_input, gate)
            for i in range(n):
                ref.ia3_l[i].copy_(layer.ia3_l[i])
        else:
            raise TypeError(f"no loop reference for {type(layer).__name__}")
    return ref.to(layer.router.weight.device)


def trainable(ref: nn.Module) -> list[nn.Parameter]:
    """The reference's trainable adapter and router parameters (never the shared frozen base)."""
    return [p for n, p in ref.named_parameters() if not n.startswith("base.") and p.requires_grad]
