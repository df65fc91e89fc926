"""Router initialisation fitted to clusters: `moetune cluster-heads --init-router` with any embedder.

The clusters come from sentence embeddings (default `minilm`), a space the routers never see:
each router reads its own projection's per-token input. So instead of copying centroids, every
router's weight is FITTED: for the clustered training rows, take the base model's input to the
wrapped projection, averaged over the prompt tokens (x_j (d_in,), row j), and solve the ridge
regression of the centred one-hot cluster ids on them,

    W = argmin_W sum_j |W x_j - y_j|^2 + lam |W|^2,   y_j = onehot(c_j) - 1/K   (K,)
      = Y^T X (X^T X + lam I)^-1,                     lam = RIDGE * trace(X^T X) / d_in

so a prompt's mean router logits W x_j are about 1 - 1/K for its cluster and -1/K for the others
(gates e = 2.7 times larger for its own cluster at temperature 1). Least squares is the closed
form, deterministic, cheap (one d_in x d_in solve per projection) and needs no learning rate; the
centring makes the targets sum to zero per row, which the softmax ignores anyway. The fit is
linear in x, so it holds exactly for sequence-level routing (`router.level: sequence`, which pools
the same prompt tokens) and for per-token routing on average over a prompt's tokens.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from moetune.core.files import ordinary_mode
from moetune.data.rows import IGNORE, Example, collate
from moetune.experts.context import prompt_mask

RIDGE = 1e-3


@torch.no_grad()
def pooled_inputs(model, examples: list[Example], names: list[str], pad_id: int, batch_size: int = 16
                  ) -> dict[str, torch.Tensor]:
    """name -> (n, d_in): each row's input to projection `name`, averaged over its prompt tokens.

    Projections that read the same input (a block's q/k/v, its gate/up) get one shared tensor: on the first
    batch each projection's pooled input is compared with those kept so far, and an equal one makes it an
    alias (equal means over a batch of real prompts come from one input tensor, which q/k/v read from one
    normed hidden state, so they stay equal on every row; `test_projections_that_read_one_input_share_it`).
    Each kept result is one tensor allocated at the first batch and filled in place: thousands of small
    per-batch tensors kept alive between the forwards' large temporary buffers fragment the C heap
    (1,600 rows of SmolLM2's 210 projections held 13 GB that way instead of 3)."""
    device = next(model.parameters()).device
    store: dict[str, torch.Tensor] = {}   # kept name -> (n, d_in), on the CPU
    alias: dict[str, str] = {}            # every name -> the kept name whose tensor it shares
    ctx: dict = {}

    def hook(name):
        def fn(module, args):
            s = ctx["start"]
            if s > 0 and alias[name] != name:
                return
            x = args[0].float()                                          # (B, T, d_in)
            m = ctx["pool"].to(x.dtype).unsqueeze(-1)                    # (B, T, 1)
            pooled = ((x * m).sum(1) / m.sum(1).clamp_min(1.0)).cpu()   # (B, d_in)
            if s == 0:
                alias[name] = next((k for k, v in store.items() if v.shape[1] == pooled.shape[1]
                                    and torch.equal(v[:pooled.shape[0]], pooled)), name)
                if alias[name] != name:
                    return
                store[name] = torch.empty(len(examples), pooled.shape[1])
            store[name][s:s + pooled.shape[0]] = pooled
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for s in range(0, len(examples), batch_size):
            b = {k: v.to(device) for k, v in collate(examples[s:s + batch_size], pad_id).items()}
            ctx["pool"] = prompt_mask(b["labels"] != IGNORE, b["attention_mask"])  # (B, T)
            ctx["start"] = s
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: store[alias[n]] for n in names}


def fit_weight(x: torch.Tensor, labels: torch.Tensor, k: int, ridge: float = RIDGE) -> torch.Tensor:
    """Ridge least squares W (K, d) with W x_j ~ onehot(labels_j) - 1/K, for x (n, d), labels (n,)."""
    x = x.double()                                                       # (n, d)
    y = torch.nn.functional.one_hot(labels.long(), k).double() - 1.0 / k  # (n, K)
    g = x.t() @ x                                                        # (d, d)
    lam = ridge * float(g.diagonal().sum()) / g.shape[0]
    w_t = torch.linalg.solve(g + lam * torch.eye(g.shape[0], dtype=g.dtype), x.t() @ y)  # (d, K)
    return w_t.t().float().contiguous()                                  # (K, d)


def fit_router_file(model, examples: list[Example], labels, names: list[str], pad_id: int, path: Path) -> dict:
    """Fit one router weight per projection in `names` and save them as 'weight.<name>' (K, d_in)
    tensors in a safetensors file; return {name: training accuracy of argmax W x_j vs the cluster}."""
    lab = torch.as_tensor(labels).long()                                 # (n,)
    k = int(lab.max()) + 1
    xs = pooled_inputs(model, examples, names, pad_id)
    weights, acc, done = {}, {}, {}
    for n in names:
        if id(xs[n]) not in done:                # projections sharing an input share its fit
            w = fit_weight(xs[n], lab, k)                                # (K, d_in)
            done[id(xs[n])] = (w, float(((xs[n] @ w.t()).argmax(-1) == lab).float().mean()))
        w, acc[n] = done[id(xs[n])]
        weights[f"weight.{n}"] = w.clone()       # safetensors refuses tensors that share memory
    save_file(weights, str(path))
    ordinary_mode(path)                         # safetensors writes 0600
    return acc
