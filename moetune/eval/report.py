"""Routing report of a routed adapter (HydraLoRA, MoLoRA, MoV): expert load, gate entropy, dead
experts and per-domain gates, collected over held-out examples.

Notation: L routed layers (wrapped projections), N experts per layer, D domains, w_t (N,) the
gates a layer applied to token t (`Router` output), m_t = 1 for real tokens and 0 for padding.

    load_l      = sum_t m_t w_t / sum_t m_t                 (N,), sums to 1 per layer
    entropy_l   = sum_t m_t H(w_t) / sum_t m_t,  H(w) = -sum_i w_i log w_i  (nats, in [0, log N])
    dead_l      = {i : load_l,i < 0.01 / N}                  (routing.dead_experts)
    gates_d,l   = load_l restricted to the tokens of the examples of domain d
    assign_d,l  = the same mean of a_t instead of w_t, a_t = one-hot of the top-k experts of w_t / k
                  (k = router.top_k for top_k routing, 1 for soft: the argmax)
    MI_l        = I(D;E) / H(D) with p(d) = domain d's share of the tokens and p(e|d) = gates_d,l
                  (soft routing) or assign_d,l (top_k routing); see routing.domain_expert_mi.
                  The run's "routing specialisation" is the mean of MI_l over layers.

`collect_gates` runs the examples through the model in batches with forward hooks on the
routers and keeps only running sums (`GateSums`); everything else here is a pure function
of those sums. The same mean gates are what `moetune.export.collapse` fixes the routers at.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from moetune.adapters.inject import routed_layers
from moetune.core.files import save_figure, write_text_atomic
from moetune.core.ui import fmt, plural, table
from moetune.data.rows import Example, collate
from moetune.experts.context import batch_routing
from moetune.experts.routing import dead_experts, domain_expert_mi
from moetune.models.layers import layer_index
from moetune.train.loss import plain_head, target_logits

# matplotlib (a heavy, plotting-only import) is imported inside the function that draws the heatmap.

DEAD_THRESHOLD = 0.01
GROUP_ABOVE = 12  # more routed modules than this: table rows are grouped by layer index
HEATMAP_GROUP_ABOVE = 64  # the same for heatmap rows (one module per row reads well up to about this)


@dataclass
class GateSums:
    """Running sums of masked gates, per domain and layer (float64, CPU)."""

    names: list[str]          # L routed module names
    domains: list[str]        # D domain names (sorted)
    gate: torch.Tensor        # (D, L, N): sum_t m_t w_t over the tokens of domain d
    entropy: torch.Tensor     # (D, L):    sum_t m_t H(w_t)
    tokens: torch.Tensor      # (D,):      sum_t m_t (real tokens of domain d)
    assign: torch.Tensor | None = None  # (D, L, N): sum_t m_t a_t (top-k choices / k)
    top_k: int = 1            # k of the assignments (1 for soft routing); > 1 only for top_k routing
    kind: str = "soft"        # router.type of the routed layers: which p(e|d) the MI reads


def assignment_sums(weights: torch.Tensor, mask: torch.Tensor, domain: torch.Tensor, n_domains: int,
                    k: int = 1) -> torch.Tensor:
    """Masked per-domain sums (D, L, N) of a_t = one-hot of the top-k experts of w_t, divided by k,
    for weights (L, B, T, N), mask (B, T), domain (B,) indices."""
    idx = weights.topk(min(k, weights.shape[-1]), dim=-1).indices        # (L, B, T, k)
    a = torch.zeros_like(weights, dtype=torch.float64).scatter(-1, idx, 1.0 / idx.shape[-1])  # (L, B, T, N)
    onehot = torch.nn.functional.one_hot(domain, n_domains).double()       # (B, D)
    return torch.einsum("bd,lbtn,bt->dln", onehot, a, mask.double())       # (D, L, N)


def batch_sums(weights: torch.Tensor, mask: torch.Tensor, domain: torch.Tensor, n_domains: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked per-domain sums of one batch: weights (L, B, T, N), mask (B, T), domain (B,) indices.

    Returns (gate (D, L, N), entropy (D, L), tokens (D,)), float64: padding (m = 0) adds nothing."""
    w = weights.double()                                                   # (L, B, T, N)
    m = mask.double()                                                      # (B, T)
    onehot = torch.nn.functional.one_hot(domain, n_domains).double()       # (B, D)
    per_ex = torch.einsum("lbtn,bt->lbn", w, m)                            # (L, B, N)
    h = -torch.special.xlogy(w, w).sum(-1)                                 # (L, B, T), 0 log 0 = 0
    ent_ex = (h * m).sum(-1)                                               # (L, B)
    gate = torch.einsum("bd,lbn->dln", onehot, per_ex)                     # (D, L, N)
    ent = torch.einsum("bd,lb->dl", onehot, ent_ex)                        # (D, L)
    return gate, ent, onehot.t() @ m.sum(1)                                # ..., (D,)


class _GateHooks:
    """Forward hooks on the routers of `layers`: the gates (..., N) of each one's last call."""

    def __init__(self, layers: dict) -> None:
        self.out: list[torch.Tensor | None] = [None] * len(layers)
        self.handles = [m.router.register_forward_hook(self._hook(i)) for i, m in enumerate(layers.values())]

    def _hook(self, i: int):
        def fn(module, inputs, output):
            self.out[i] = output.detach()
        return fn

    def take(self, shape: tuple[int, int]) -> torch.Tensor:
        """Stacked gates (L, B, T, N) of the last forward, for a (B, T) batch."""
        if any(o is None for o in self.out):
            raise RuntimeError("a routed layer's router did not run in this forward")
        w = torch.stack([o.float().reshape(*shape, o.shape[-1]) for o in self.out])  # (L, B, T, N)
        self.out = [None] * len(self.out)
        return w

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def collect_gates(model, examples: list[Example], pad_id: int, batch_size: int, device) -> GateSums | None:
    """Run `examples` through `model` in right-padded batches (data.collate), summing the routers'
    gates over real tokens per domain and layer. None when the model has no routed layer."""
    layers = routed_layers(model)
    if not layers or not examples:
        return None
    ns = {m.router.weight.shape[0] for m in layers.values()}
    if len(ns) != 1:
        raise ValueError(f"routed layers disagree on the number of experts: {sorted(ns)}")
    n, L = ns.pop(), len(layers)
    domains = sorted({e.domain for e in examples})
    index = {d: i for i, d in enumerate(domains)}
    rc = next(iter(layers.values())).router.cfg
    kind = "top_k" if rc.type == "top_k" else "soft"
    sums = GateSums(list(layers), domains, torch.zeros(len(domains), L, n, dtype=torch.float64),
                    torch.zeros(len(domains), L, dtype=torch.float64), torch.zeros(len(domains), dtype=torch.float64),
                    torch.zeros(len(domains), L, n, dtype=torch.float64), rc.top_k if kind == "top_k" else 1, kind)
    model.eval()
    sliced = plain_head(model)
    hooks = _GateHooks(layers)
    try:
        for s in range(0, len(examples), batch_size):
            chunk = examples[s:s + batch_size]
            b = collate(chunk, pad_id)
            ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)   # (B, T)
            none = torch.zeros_like(ids[:, 1:], dtype=torch.bool)                   # (B, T-1): no head output
            with batch_routing(b["labels"].to(device), mask):                       # router.level: sequence
                target_logits(model, ids, mask, none, sliced)
            w = hooks.take(tuple(ids.shape)).cpu()                                  # (L, B, T, N)
            dom = torch.tensor([index[e.domain] for e in chunk])                    # (B,)
            g, h, t = batch_sums(w, b["attention_mask"], dom, len(domains))
            sums.assign += assignment_sums(w, b["attention_mask"], dom, len(domains), sums.top_k)
            sums.gate += g
            sums.entropy += h
            sums.tokens += t
    finally:
        hooks.remove()
    return sums


def mean_gates(sums: GateSums) -> torch.Tensor:
    """Mean gate weight per layer and expert over all real tokens: (L, N); rows sum to 1."""
    return sums.gate.sum(0) / sums.tokens.sum().clamp_min(1.0)


def domain_gates(sums: GateSums) -> torch.Tensor:
    """Mean gate weight per domain, layer and expert: (D, L, N); rows sum to 1."""
    return sums.gate / sums.tokens.clamp_min(1.0)[:, None, None]


def specialisation(sums: GateSums) -> dict:
    """Domain -> expert mutual information per layer (see the module docstring).

    {'measure': 'gates' | 'assignments', 'mi' (L,) nats, 'mi_norm' (L,) = I/H(D), 'mi_norm_gates',
    'mi_norm_assignments' (L,) both ways, 'mean' (the run's single specialisation figure: mean of
    mi_norm over layers), 'domain_expert' (D, N): p(e|d) of the measure averaged over layers}."""
    tok = sums.tokens.clamp_min(1.0)[:, None, None]
    gates = sums.gate / tok                                                # (D, L, N) p(e|d), soft
    assign = (sums.assign if sums.assign is not None else sums.gate) / tok  # (D, L, N) p(e|d), choices
    mi_g, norm_g = domain_expert_mi(gates, sums.tokens)                    # (L,), (L,)
    mi_a, norm_a = domain_expert_mi(assign, sums.tokens)                   # (L,), (L,)
    use_gates = sums.kind != "top_k"
    mi, norm, cond = (mi_g, norm_g, gates) if use_gates else (mi_a, norm_a, assign)
    return {"measure": "gates" if use_gates else "assignments", "mi": mi.tolist(), "mi_norm": norm.tolist(),
            "mi_norm_gates": norm_g.tolist(), "mi_norm_assignments": norm_a.tolist(),
            "mean": float(norm.mean()), "domain_expert": cond.mean(1).tolist()}


def short_names(names: list[str]) -> list[str]:
    """Module names without their shared leading components but the last one
    ('model.layers.0.mlp.up_proj' -> 'layers.0.mlp.up_proj' when every name starts with 'model.')."""
    parts = [n.split(".") for n in names]
    k = 0
    while all(len(p) > k + 2 and p[k] == parts[0][k] for p in parts):
        k += 1
    return [".".join(p[max(k - 1, 0):]) for p in parts]


def row_groups(names: list[str], limit: int = GROUP_ABOVE) -> list[tuple[str, list[int]]]:
    """(label, module indices) per display row: one row per module, or, with more than `limit`
    modules that all carry a block index, one row per block index."""
    idx = [layer_index(n) for n in names]
    if len(names) <= limit or None in idx:
        return [(n, [i]) for i, n in enumerate(short_names(names))]
    blocks: dict[int, list[int]] = {}
    for i, k in enumerate(idx):
        blocks.setdefault(k, []).append(i)
    return [(f"layer {k} ({plural(len(v), 'module')})", v) for k, v in sorted(blocks.items())]


def routing_report(sums: GateSums, threshold: float = DEAD_THRESHOLD) -> dict:
    """All report numbers as JSON-ready lists (layer order = `sums.names`)."""
    load = mean_gates(sums)                                                # (L, N)
    n = load.shape[-1]
    tokens = sums.tokens.sum().clamp_min(1.0)
    entropy = sums.entropy.sum(0) / tokens                                 # (L,)
    dead = dead_experts(load, threshold)                                   # (L, N) bool
    dom = domain_gates(sums)                                               # (D, L, N)
    dom_ent = sums.entropy / sums.tokens.clamp_min(1.0)[:, None]           # (D, L)
    spec = specialisation(sums)
    return {
        "specialisation": spec["mean"], "specialisation_measure": spec["measure"],
        "domain_expert": {d: spec["domain_expert"][j] for j, d in enumerate(sums.domains)},
        "num_experts": n, "max_entropy": math.log(n), "tokens": int(sums.tokens.sum()),
        "dead_threshold": threshold, "dead_total": int(dead.sum()),
        "layers": {name: {"load": load[i].tolist(), "entropy": float(entropy[i]),
                          "dead": dead[i].nonzero().flatten().tolist(), "mi": spec["mi"][i],
                          "mi_norm": spec["mi_norm"][i], "mi_norm_gates": spec["mi_norm_gates"][i],
                          "mi_norm_assignments": spec["mi_norm_assignments"][i]}
                   for i, name in enumerate(sums.names)},
        "per_domain": {d: {"tokens": int(sums.tokens[j]), "gates": dom[j].tolist(), "entropy": dom_ent[j].tolist()}
                       for j, d in enumerate(sums.domains)},
    }


def table_rows(report: dict) -> list[list]:
    """Per display row: [label, load min, load max, mean entropy, mean I(D;E)/H(D), dead count]
    (see `row_groups`)."""
    names = list(report["layers"])
    load = torch.tensor([report["layers"][k]["load"] for k in names])     # (L, N)
    ent = torch.tensor([report["layers"][k]["entropy"] for k in names])   # (L,)
    dead = torch.tensor([len(report["layers"][k]["dead"]) for k in names])  # (L,)
    mi = torch.tensor([report["layers"][k].get("mi_norm", 0.0) for k in names])  # (L,)
    rows = []
    for label, idx in row_groups(names):
        sel = torch.tensor(idx)
        rows.append([label, float(load[sel].min()), float(load[sel].max()), float(ent[sel].mean()),
                     float(mi[sel].mean()), int(dead[sel].sum())])
    return rows


TABLE_COLUMNS = ["layer", "load min", "load max", "entropy", "MI/H(D)", "dead"]


def _titles(report: dict) -> tuple[str, str | None]:
    """The titles of the per-layer table and (with several domains) of the domain -> expert table."""
    layers = (f"routing: {plural(report['num_experts'], 'expert')}, {plural(report['tokens'], 'token')}, entropy "
              f"in nats (max log N = {report['max_entropy']:.4f}), {plural(report['dead_total'], 'dead expert')} "
              f"(load < {report['dead_threshold']:g}/N)")
    if len(report.get("domain_expert", {})) <= 1:
        return layers, None
    return layers, (f"routing specialisation {report['specialisation']:.3f} (mean over layers of I(domain; expert) "
                    f"/ H(domain), from {report['specialisation_measure']}); p(expert | domain), mean over layers")


def print_report(report: dict, console) -> None:
    """A compact rich table: per layer load min/max, mean entropy vs log N, dead experts."""
    layers, domains = _titles(report)
    console.print(table(layers, TABLE_COLUMNS, table_rows(report)))
    if domains:
        n = report["num_experts"]
        console.print(table(domains, ["domain", *[f"e{i}" for i in range(n)]],
                            [[d, *row] for d, row in report["domain_expert"].items()]))


def report_markdown(report: dict) -> str:
    """routing.md: the tables `print_report` draws, as markdown (one row per layer: often dozens of rows)."""
    def rows(header: list[str], body: list[list]) -> list[str]:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                *["| " + " | ".join(fmt(v) for v in r) + " |" for r in body]]
    layers, domains = _titles(report)
    lines = ["# Routing report", "", layers + ".", "", "Heatmap: `routing.png`; every number: `eval.json`, key "
             "`routing`.", "", *rows(TABLE_COLUMNS, table_rows(report))]
    if domains:
        lines += ["", f"## {domains}", "", *rows(["domain", *[f"e{i}" for i in range(report["num_experts"])]],
                                                 [[d, *r] for d, r in report["domain_expert"].items()])]
    return "\n".join(lines) + "\n"


def report_digest(report: dict) -> str:
    """The routing report in one line, naming the files that hold the rest."""
    ent = [v["entropy"] for v in report["layers"].values()]
    spec = (f", specialisation {report['specialisation']:.3f} (I(domain; expert)/H(domain))"
            if len(report.get("domain_expert", {})) > 1 else "")
    return (f"routing: {plural(report['num_experts'], 'expert')} in {plural(len(ent), 'module')}, mean entropy "
            f"{sum(ent) / max(len(ent), 1):.3f} of max {report['max_entropy']:.3f} nats, "
            f"{plural(report['dead_total'], 'dead expert')}{spec}; per-layer table {report.get('table', '-')}, "
            f"heatmap {report.get('heatmap', '-')}")


def save_markdown(report: dict, path: str | Path) -> Path:
    """Write `report_markdown` to `path` (core.files.write_text_atomic)."""
    path = Path(path)
    write_text_atomic(path, report_markdown(report))
    return path


def heatmap_rows(report: dict) -> tuple[list[str], dict[str, torch.Tensor]]:
    """(row labels, {panel: (rows, N) mean gates}): the panels are 'all' and each domain; grouped rows
    average their modules' gates."""
    names = list(report["layers"])
    groups = row_groups(names, HEATMAP_GROUP_ABOVE)
    # (G, L) averaging matrix: row g puts 1/|group| on each of its modules
    avg = torch.zeros(len(groups), len(names))
    for g, (_, idx) in enumerate(groups):
        avg[g, idx] = 1.0 / len(idx)
    panels = {"all": torch.tensor([report["layers"][k]["load"] for k in names])}    # (L, N)
    if len(report["per_domain"]) > 1:
        panels.update({d: torch.tensor(v["gates"]) for d, v in report["per_domain"].items()})
    return [g[0] for g in groups], {k: avg @ v for k, v in panels.items()}   # (G, N) each


def save_heatmap(report: dict, path: str | Path) -> Path:
    """PNG heatmap, layer rows x expert columns of mean gate weight, one panel per domain (Agg backend,
    no pyplot state); written to a temp file and renamed into place."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    labels, panels = heatmap_rows(report)
    n = report["num_experts"]
    vmax = max(float(p.max()) for p in panels.values())
    fig = Figure(figsize=(1.2 + 0.45 * n * len(panels) + 1.6, 1.4 + 0.22 * len(labels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (title, grid) in zip(axes, panels.items()):
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(n))
        ax.set_xlabel("expert", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_yticks(range(len(labels)))
    axes[0].set_yticklabels(labels)
    fig.colorbar(im, ax=list(axes), label="mean gate weight", shrink=0.8)
    return save_figure(fig, path, dpi=110)


def eval_routing(model, examples: list[Example], pad_id: int, batch_size: int, device, run_dir: str | Path,
                 console=None) -> dict | None:
    """The eval stage's routing report: collect, summarise, save `routing.png` and the tables as `routing.md`
    (`console` given: print the tables too). None (and nothing written) for adapters without routed layers,
    e.g. plain LoRA."""
    sums = collect_gates(model, examples, pad_id, batch_size, device)
    if sums is None:
        return None
    report = routing_report(sums)
    report["heatmap"] = str(save_heatmap(report, Path(run_dir) / "routing.png"))
    report["table"] = str(save_markdown(report, Path(run_dir) / "routing.md"))
    if console is not None:
        print_report(report, console)
    return report
