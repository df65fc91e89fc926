"""Routing over training: per-layer domain -> expert MI and gate histograms on the validation split.

At every validation point of a routed adapter's training (train.eval_every, and the end), when the
validation split has at least two domains, `routing_snapshot` runs its first `ROWS` examples through the
model (no gradient, no output head) and the training loop logs the result in that validation row of
metrics.jsonl under `val_routing`:

    specialisation     mean over routed modules of I(domain; expert) / H(domain)   (as eval's routing report)
    mi_norm            [L] that ratio per routed module (model order; `names` gives the modules)
    hist               {block: [BINS]} the distribution of gate values over the real tokens, all experts,
                       all modules of transformer block `block`: fraction of (token, expert) gates in each of
                       BINS equal bins of [0, 1] (uniform routing piles up at 1/N, sharp routing at 0 and 1)
    top_share          {block: [BINS]} the same for each token's LARGEST gate (in [1/N, 1])

p(e|d) is the mean gate over domain d's real tokens (soft routing) or its top-k choices, 1/k each (top_k),
p(d) the domain's share of the real tokens (moetune/eval/report.py's definitions; padding never counts).
`scripts/routing_curves.py` draws these rows: MI per layer vs step, gate histograms vs step.
"""
from __future__ import annotations

import torch

from moetune.adapters.inject import routed_layers
from moetune.data.rows import Example, collate
from moetune.experts.balance import top_k_assignments
from moetune.experts.context import batch_routing
from moetune.experts.routing import domain_expert_mi
from moetune.models.layers import layer_index
from moetune.train.loss import plain_head, target_logits

ROWS = 256   # validation rows per snapshot (the first ones: the same rows at every step)
BINS = 20


def _hooks(layers: dict, out: list) -> list:
    def hook(i):
        def fn(module, inputs, output):
            out[i] = output.detach()
        return fn
    return [m.router.register_forward_hook(hook(i)) for i, m in enumerate(layers.values())]


@torch.no_grad()
def routing_snapshot(model, examples: list[Example], pad_id: int, batch_size: int, device) -> dict | None:
    """The `val_routing` entry (module docstring) for `examples`, or None without routed layers or with
    fewer than two domains."""
    layers = routed_layers(model)
    examples = list(examples[:ROWS])
    domains = sorted({e.domain for e in examples})
    if not layers or len(domains) < 2:
        return None
    rc = next(iter(layers.values())).router.cfg
    k = rc.top_k if rc.type == "top_k" else 0
    index = {d: i for i, d in enumerate(domains)}
    n_layers, was = len(layers), model.training
    cond, tokens, hist, top = None, torch.zeros(len(domains), dtype=torch.float64), None, None
    gates: list = [None] * n_layers
    handles = _hooks(layers, gates)
    model.eval()
    try:
        for s in range(0, len(examples), batch_size):
            chunk = examples[s:s + batch_size]
            b = {key: v.to(device) for key, v in collate(chunk, pad_id).items()}
            ids, mask = b["input_ids"], b["attention_mask"]                          # (B, T)
            with batch_routing(b["labels"], mask):
                target_logits(model, ids, mask, torch.zeros_like(ids[:, 1:], dtype=torch.bool), plain_head(model))
            w = torch.stack([g.float().reshape(*ids.shape, g.shape[-1]) for g in gates]).cpu()  # (L, B, T, N)
            n = w.shape[-1]
            m = mask.bool().cpu()                                                     # (B, T)
            dom = torch.nn.functional.one_hot(torch.tensor([index[e.domain] for e in chunk]), len(domains)).double()
            picked = top_k_assignments(w, k) if k else w                              # (L, B, T, N)
            c = torch.einsum("bd,lbtn,bt->dln", dom, picked.double(), m.double())     # (D, L, N)
            real = w[:, m]                                                            # (L, R, N) real tokens
            h = torch.stack([torch.histc(x, BINS, 0.0, 1.0) for x in real])           # (L, BINS)
            t = torch.stack([torch.histc(x.max(-1).values, BINS, 0.0, 1.0) for x in real])  # (L, BINS)
            cond = c if cond is None else cond + c
            hist = h if hist is None else hist + h
            top = t if top is None else top + t
            tokens += dom.t() @ m.double().sum(1)
    finally:
        for hd in handles:
            hd.remove()
        model.train(was)
    _, norm = domain_expert_mi(cond / tokens.clamp_min(1.0)[:, None, None], tokens)  # (L,)
    names = list(layers)
    blocks: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        blk = layer_index(name)
        blocks.setdefault(str(blk) if blk is not None else name, []).append(i)

    def by_block(x: torch.Tensor) -> dict[str, list[float]]:
        return {b: [round(float(v), 5) for v in (x[idx].sum(0) / x[idx].sum().clamp_min(1.0))] for b, idx in blocks.items()}

    return {"specialisation": round(float(norm.mean()), 6), "mi_norm": [round(float(v), 6) for v in norm],
            "names": names, "num_experts": n, "bins": BINS, "hist": by_block(hist), "top_share": by_block(top),
            "rows": len(examples), "measure": "assignments" if k else "gates"}
