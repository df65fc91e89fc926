"""`curves.png`: training and validation loss vs step from metrics.jsonl, plus the auxiliary losses,
the routing entropy (mean over routed modules, band = range over transformer blocks, dashed
line = log N, uniform routing) and the preference metrics (reward margin and accuracy, train and
validation: train.objective dpo/orpo) when the run logged them. Agg backend, no pyplot state."""
from __future__ import annotations

import json
import math
from pathlib import Path

from moetune.core.files import save_figure


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl file (unreadable lines skipped: a run may have been killed mid-write)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def curve_series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{'train', 'validation', 'aux/<name>', 'routing', 'routing_min', 'routing_max'}: (step, value) lists
    sorted by step; a step logged twice (a resumed run) keeps its last value."""
    series: dict[str, dict[int, float]] = {}

    def put(name: str, step: int, v) -> None:
        if isinstance(v, (int, float)) and math.isfinite(v):
            series.setdefault(name, {})[step] = float(v)

    for r in rows:
        step = r.get("step")
        if not isinstance(step, int) or "event" in r:
            continue
        if r.get("split") == "validation":
            put("validation", step, r.get("val_loss"))
            for k in ("rewards/margins", "rewards/accuracies"):
                put(f"validation {k}", step, r.get(k))
            continue
        put("train", step, r.get("loss"))
        for k in ("rewards/margins", "rewards/accuracies"):
            put(f"train {k}", step, r.get(k))
        for k, v in (r.get("aux") or {}).items():
            put(f"aux/{k}", step, v)
        rt = r.get("routing")
        if rt:
            put("routing", step, rt.get("entropy"))
            blocks = list((rt.get("entropy_by_block") or {}).values())
            if blocks:
                put("routing_min", step, min(blocks))
                put("routing_max", step, max(blocks))
            loads = list((rt.get("load_by_block") or {}).values())
            if loads:
                put("num_experts", step, len(loads[0]))
    return {k: sorted(v.items()) for k, v in series.items()}


def save_curves(metrics_path: str | Path, out: str | Path) -> Path | None:
    """Draw the curves of `metrics_path` into `out` (PNG, written atomically); None when no train loss."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    s = curve_series(read_metrics(metrics_path))
    if not s.get("train"):
        return None
    aux = sorted(k for k in s if k.startswith("aux/"))
    pref = [k for k in ("train rewards/margins", "validation rewards/margins", "train rewards/accuracies",
                        "validation rewards/accuracies") if s.get(k)]
    panels = 1 + bool(aux) + bool(s.get("routing")) + bool(pref)
    fig = Figure(figsize=(4.2 * panels, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ax = axes[0]
    ax.plot(*zip(*s["train"]), label="train", color="tab:blue", lw=1.4)
    if s.get("validation"):
        ax.plot(*zip(*s["validation"]), "o-", label="validation", color="tab:orange", lw=1.4, ms=4)
    ax.set(title="loss (preference pairs)" if pref else "loss (response tokens)", xlabel="step", ylabel="loss")
    ax.legend(fontsize=8)
    i = 1
    if aux:
        for k in aux:
            axes[i].plot(*zip(*s[k]), label=k[4:], lw=1.2)
        axes[i].set(title="auxiliary losses (weighted)", xlabel="step")
        axes[i].legend(fontsize=8)
        i += 1
    if s.get("routing"):
        a = axes[i]
        steps, mean = zip(*s["routing"])
        a.plot(steps, mean, color="tab:green", lw=1.4, label="mean over modules")
        if s.get("routing_min") and s.get("routing_max"):
            a.fill_between([x for x, _ in s["routing_min"]], [v for _, v in s["routing_min"]],
                           [v for _, v in s["routing_max"]], color="tab:green", alpha=0.2, label="range over blocks")
        if s.get("num_experts"):
            a.axhline(math.log(s["num_experts"][-1][1]), ls="--", color="gray", lw=1, label="log N (uniform)")
        a.set(title="routing entropy (nats)", xlabel="step")
        a.legend(fontsize=8)
        i += 1
    if pref:
        a = axes[i]
        for k in pref:
            a.plot(*zip(*s[k]), marker="o" if k.startswith("validation") else None, ms=3, lw=1.2,
                   ls="--" if k.endswith("accuracies") else "-", label=k)
        a.set(title="preference: reward margin, accuracy", xlabel="step")
        a.legend(fontsize=7)
    for a in axes:
        a.grid(alpha=0.3)
        a.tick_params(labelsize=8)
    return save_figure(fig, out, dpi=100)
