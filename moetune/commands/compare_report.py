"""`moetune compare`: the numbers of every run, their statistics, and comparison.{json,md,png} + a table.

Per variant (mean ± sd over its seeds): every metric of METRICS that its runs report, the trainable
parameters counted for its budget, and per domain the exact match and loss. Against the first variant
(the reference): the paired difference of every metric with per-example results (exact match; the
token-weighted test loss; per domain the exact match), with its 95% interval (moetune/eval/paired.py), and
one sentence of conclusion per variant that never claims more than the interval.

METRICS is the place for more columns: a `Metric` reads one number per run (`RunResult`: the run's
eval.json, summary.json, metrics.jsonl); its column shows when some run has a value, so a metric of one kind
of training (e.g. preference accuracy for a dpo/orpo objective) appears only in comparisons that have it.
Give it `paired` (per-example numerators, and denominators for a ratio) to get a paired interval too.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from moetune.commands.compare_jobs import Job
from moetune.core.checkpoint import write_json
from moetune.core.errors import RecipeError
from moetune.core.files import read_json_object
from moetune.core.ui import console, plural, table
from moetune.eval import paired as P


@dataclass
class RunResult:
    """What one finished run left: eval.json, summary.json, logged tokens/s, training seconds incl. its experts'."""

    job: Job
    eval: dict
    summary: dict
    tokens_per_s: list[float] = field(default_factory=list)
    seconds: float | None = None

    @property
    def scores(self) -> dict:
        return self.eval.get("scores") or {}

    @property
    def examples(self) -> dict:
        return self.eval.get("per_example") or {}


@dataclass(frozen=True)
class Metric:
    """One number per run: a column (mean ± sd over seeds); with `paired`, a paired difference too."""

    key: str
    label: str
    read: Callable[[RunResult], float | None]
    fmt: str = ".3f"
    higher_is_better: bool | None = None
    paired: Callable[[RunResult], tuple[np.ndarray, np.ndarray | None] | None] | None = None


def _em_pairs(r: RunResult):
    c = r.examples.get("correct")
    return (np.frombuffer(c.encode(), np.uint8) - ord("0"), None) if c else None


def _preferred_pairs(r: RunResult):
    c = r.examples.get("preferred")
    return (np.frombuffer(c.encode(), np.uint8) - ord("0"), None) if c else None


def _preference(r: RunResult, key: str) -> float | None:
    """A number of eval's preference scores (TRL's rewards/* need the adapter's reference: absent for a merged model)."""
    return (r.scores.get("preference") or {}).get(key)


def _loss_pairs(r: RunResult):
    e = r.examples
    return (np.asarray(e["loss_sum"], float), np.asarray(e["tokens"], float)) if "loss_sum" in e else None


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


METRICS: list[Metric] = [
    Metric("exact_match", "EM", lambda r: r.scores.get("exact_match"), ".3f", True, _em_pairs),
    Metric("loss", "test loss", lambda r: r.scores.get("loss"), ".4f", False, _loss_pairs),
    Metric("preference_accuracy", "pref acc", lambda r: r.scores.get("preference_accuracy"), ".3f", True,
           _preferred_pairs),
    Metric("reward_accuracy", "reward acc", lambda r: _preference(r, "rewards/accuracies"), ".3f", True),
    Metric("reward_margin", "reward margin", lambda r: _preference(r, "rewards/margins"), ".3f", True),
    Metric("specialisation", "specialisation", lambda r: (r.eval.get("routing") or {}).get("specialisation"), ".4f"),
    Metric("tokens_per_s", "train tok/s", lambda r: _median(r.tokens_per_s), ",.0f"),
    Metric("seconds", "train s", lambda r: r.seconds, ",.0f"),
]
"""The comparison's columns, in order (see the module docstring)."""


def mc_metrics(results: list[RunResult]) -> list[Metric]:
    """One column per multiple-choice file the runs scored (eval.multiple_choice): its accuracy. A file is
    keyed by its absolute path, so runs that recorded it relative (older runs) and absolute share a column."""
    paths = sorted({p for r in results for p in _mc(r)})
    return [Metric(f"mc:{p}", f"MC {Path(p).stem}", lambda r, p=p: (_mc(r).get(p) or {}).get("accuracy"), ".3f", True)
            for p in paths]


def _mc(r: RunResult) -> dict[str, dict]:
    """A run's multiple-choice results by absolute file path (relative ones: from the working directory)."""
    return {os.path.abspath(p): v for p, v in (r.eval.get("multiple_choice") or {}).items() if isinstance(v, dict)}


# ------------------------------------------------------------------ reading the runs



def _train_seconds(run_dir: Path) -> float | None:
    """Training seconds of a run plus those of the per-domain runs inside it (experts/*/)."""
    own = (read_json_object(run_dir / "summary.json").get("train") or {}).get("seconds")
    nested = [(read_json_object(p).get("train") or {}).get("seconds") for p in sorted(run_dir.glob("experts/*/summary.json"))]
    vals = [x for x in [own, *nested] if isinstance(x, (int, float))]
    return float(sum(vals)) if vals else None


def read_run(job: Job) -> RunResult:
    d = Path(job.run_dir)
    tps = []
    for line in (d / "metrics.jsonl").read_text().splitlines() if (d / "metrics.jsonl").is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "loss" in row and isinstance(row.get("tokens_per_s"), (int, float)):
            tps.append(float(row["tokens_per_s"]))
    seconds = _train_seconds(d)
    if job.source_dir and job.kind in ("type", "recipe"):  # mixes another run's per-domain LoRAs: their cost too
        nested = [(read_json_object(p).get("train") or {}).get("seconds") for p in Path(job.source_dir).glob("experts/*/summary.json")]
        seconds = (seconds or 0.0) + sum(x for x in nested if isinstance(x, (int, float)))
    return RunResult(job, read_json_object(d / "eval.json"), read_json_object(d / "summary.json"), tps, seconds)


def _stack(results: list[RunResult], fn) -> tuple[np.ndarray, np.ndarray | None] | None:
    pairs = [fn(r) for r in results]
    if any(p is None for p in pairs):
        return None
    num = np.stack([p[0] for p in pairs])
    den = np.stack([p[1] for p in pairs]) if pairs[0][1] is not None else None
    return num, den


def _ms(vals: list) -> dict | None:
    vals = [v for v in vals if isinstance(v, (int, float))]
    if not vals:
        return None
    return {"mean": statistics.mean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals)}


# ------------------------------------------------------------------ statistics


def statistics_of(s, variants, jobs: list[Job], sizes: dict) -> dict:
    """comparison.json's 'variants', 'paired', 'conclusions' (see the module docstring)."""
    results = {v.name: [read_run(j) for j in jobs if j.variant == v.name] for v in variants}
    allruns = [r for rs in results.values() for r in rs]
    prints = {r.examples.get("fingerprint") for r in allruns}
    if len(prints) != 1 or None in prints:
        raise RecipeError("The runs were not all scored on the same held-out rows (eval.json per_example "
                          "fingerprints differ or are missing), so they cannot be paired. Rerun with --overwrite.")
    ex = allruns[0].examples
    domains, dom = ex["domains"], np.asarray(ex["domain"])
    metrics = METRICS + mc_metrics(allruns)
    ref = variants[0].name
    ref_n = sizes[ref]["trainable"]
    seeds_d, ex_d = P.draws(len(s.seeds), ex["n"], s.resamples, seed=0)
    dom_draws = {d: P.draws(len(s.seeds), int((dom == i).sum()), s.resamples, seed=[0, 1 + i])
                 for i, d in enumerate(domains)}
    out = {"variants": {}, "paired": {}, "conclusions": []}
    for v in variants:
        rs = results[v.name]
        n = sizes[v.name]["trainable"]
        row = {"method": v.spec, "kind": v.kind, "trainable": n, "budget": sizes[v.name].get("how"),
               "vs_reference": n / ref_n if n and ref_n else None,
               "size": sizes[v.name].get("keys"), "seeds": [r.job.seed for r in rs],
               "runs": [r.job.run_dir for r in rs], "metrics": {}, "per_domain": {}}
        for m in metrics:
            got = _ms([m.read(r) for r in rs])
            if got:
                got["per_seed"] = {str(r.job.seed): m.read(r) for r in rs}
                row["metrics"][m.key] = got
        for d in domains:
            row["per_domain"][d] = {k: (_ms([(r.scores.get("per_domain", {}).get(d) or {}).get(k) for r in rs]) or {}).get("mean")
                                    for k in ("exact_match", "loss", "preference_accuracy")}
        em = _stack(rs, _em_pairs)
        if em is not None:
            row["em_interval"] = list(P.mean_interval(em[0], seeds_d, ex_d))
        pref = _stack(rs, _preferred_pairs)
        if pref is not None:
            row["preference_interval"] = list(P.mean_interval(pref[0], seeds_d, ex_d))
        out["variants"][v.name] = row
        if v.name == ref:
            continue
        out["paired"][v.name] = _paired(metrics, rs, results[ref], seeds_d, ex_d, dom, domains, dom_draws)
        out["conclusions"].append(_sentence(v.name, ref, out["paired"][v.name], row["vs_reference"]))
    out["metrics"] = [{"key": m.key, "label": m.label, "fmt": m.fmt, "higher_is_better": m.higher_is_better}
                      for m in metrics if any(m.key in r["metrics"] for r in out["variants"].values())]
    out["domains"] = domains
    return out


def _paired(metrics, rs, refs, seeds_d, ex_d, dom, domains, dom_draws) -> dict:
    res = {"per_domain": {}}
    for m in metrics:
        if m.paired is None:
            continue
        a, b = _stack(rs, m.paired), _stack(refs, m.paired)
        if a is None or b is None:
            continue
        res[m.key] = (P.mean_difference(a[0], b[0], seeds_d, ex_d) if a[1] is None else
                      P.ratio_difference(a[0], a[1], b[0], b[1], seeds_d, ex_d))
    for key, fn in (("exact_match", _em_pairs), ("preference_accuracy", _preferred_pairs)):
        a, b = _stack(rs, fn), _stack(refs, fn)
        if a is not None and b is not None:
            for i, d in enumerate(domains):
                cols = np.flatnonzero(dom == i)
                res["per_domain"].setdefault(d, {})[key] = P.mean_difference(a[0][:, cols], b[0][:, cols], *dom_draws[d])
    return res


def _separates(d: dict) -> bool:
    return d["low"] > 0 or d["high"] < 0


def _sentence(name: str, ref: str, diffs: dict, ratio: float | None) -> str:
    """The EM sentence; when EM does not separate the two but the test loss does, the loss sentence after it;
    on preference pairs, the preference accuracy's sentence first (what a DPO/ORPO run is trained for)."""
    note = f" ({ratio:.2f}x the reference's trainable parameters)" if ratio and abs(ratio - 1) > 0.05 else ""
    parts = []
    if "preference_accuracy" in diffs:
        parts.append(P.conclusion(name, ref, diffs["preference_accuracy"], "preference accuracy", True, note))
    if "exact_match" in diffs:
        parts.append(P.conclusion(name, ref, diffs["exact_match"], "EM", True, "" if parts else note))
    if "loss" in diffs and (not parts or ("exact_match" in diffs and not _separates(diffs["exact_match"])
                                          and _separates(diffs["loss"]))):
        parts.append(P.conclusion(name, ref, diffs["loss"], "test loss", False, "" if parts else note))
    return "; ".join(parts) or f"{name}: no paired results to compare with {ref}"


# ------------------------------------------------------------------ outputs


def _cell(m: dict | None, fmt: str) -> str:
    if not m:
        return "-"
    sd = f" ± {format(m['sd'], fmt)}" if m.get("sd") is not None else ""
    return f"{format(m['mean'], fmt)}{sd}"


def _diff_cell(d: dict | None) -> str:
    return "–" if not d else f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def tables(doc: dict) -> dict[str, tuple[list[str], list[list[str]]]]:
    """The comparison's tables as (header, rows) of strings: results, per-domain EM, per-domain differences."""
    ref = doc["reference"]
    metrics = doc["metrics"]
    seeds = (doc.get("interim") or {}).get("seeds")
    head = ["variant", *(["seeds"] if seeds else []), "trainable"]
    for m in metrics:
        head.append(m["label"])
        if any(m["key"] in p for p in doc["paired"].values()):
            head.append(f"{m['label']} − {ref} [95% CI]")
    rows = []
    for name, v in doc["variants"].items():
        n = v["trainable"]
        cells = [name, *([str(seeds[name])] if seeds else []), "-" if n is None else f"{n:,}" + (f" ({v['vs_reference']:.2f}x)" if v.get("vs_reference")
                                                          and abs(v["vs_reference"] - 1) > 0.005 else "")]
        for m in metrics:
            cells.append(_cell(v["metrics"].get(m["key"]), m["fmt"]))
            if any(m["key"] in p for p in doc["paired"].values()):
                cells.append(_diff_cell(doc["paired"].get(name, {}).get(m["key"])))
        rows.append(cells)
    out = {"results": (head, rows)}
    doms = doc["domains"]
    key, short = headline(doc)
    if len(doms) > 1:
        out["per_domain"] = (["variant", *[f"{short} {d}" for d in doms]],
                             [[n, *[_num(v["per_domain"][d].get(key)) for d in doms]] for n, v in doc["variants"].items()])
        if doc["paired"]:
            out["per_domain_diff"] = (["variant", *[f"{short} {d} − {ref}" for d in doms]],
                                      [[n, *[_diff_cell(p["per_domain"].get(d, {}).get(key)) for d in doms]]
                                       for n, p in doc["paired"].items()])
    return out


def headline(doc: dict) -> tuple[str, str]:
    """The metric of the per-domain tables and the picture: exact match, or preference accuracy when the runs
    scored preference pairs without generation (key, short label)."""
    has = {k for v in doc["variants"].values() for k in v["metrics"]}
    return ("preference_accuracy", "pref acc") if "exact_match" not in has and "preference_accuracy" in has else ("exact_match", "EM")


def _num(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _interim_lines(interim: dict | None) -> list[str]:
    if not interim:
        return []
    pending = f" Pending (no finished run at the first seed): {', '.join(interim['pending'])}." if interim["pending"] else ""
    return [f"**Interim** (`--report`): {interim['finished']} of "
            f"{plural(interim['planned'], 'run')} finished. Each variant is "
            "paired with the reference at the seeds both have finished (column 'seeds'); the reference's row "
            f"uses all of its own.{pending} The comparison's last run replaces this report.", ""]


def markdown(doc: dict) -> str:
    b = doc["bootstrap"]
    lines = [f"# Comparison of {len(doc['variants'])} variants on `{doc['recipe']}`", "",
             f"Command: `{doc['command']}`", "", *_interim_lines(doc.get("interim"))]
    lines += [f"{doc['date']}, {doc['machine']}; {plural(len(doc['seeds']), 'seed')} {doc['seeds']}"
              f"{' planned' if doc.get('interim') else ''}; budget `{doc['budget']}`; held-out: "
              f"{plural(doc['held_out']['n'], 'row')} of the {doc['held_out']['split']} split; runs {doc['jobs']} at a "
              f"time. Cells: mean ± sd over seeds. Intervals: 95% paired bootstrap over seeds and held-out examples "
              f"({b['resamples']:,} resamples, seed {b['seed']}), each on its own (not corrected for "
              f"{plural(max(len(doc['variants']) - 1, 1), 'comparison')}).", "", "## Results", ""]
    what = "Exact match" if headline(doc)[0] == "exact_match" else "Preference accuracy"
    names = {"results": "Results", "per_domain": f"{what} per domain (mean over seeds)",
             "per_domain_diff": f"{what} per domain, difference to {doc['reference']} [95% CI]"}
    for key, (head, rows) in tables(doc).items():
        if key != "results":
            lines += ["", f"## {names[key]}", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "## Budgets", "", "| variant | method | size | trainable | how |", "|---|---|---|---|---|"]
    for name, v in doc["variants"].items():
        size = ", ".join(f"{k} {x}" for k, x in (v.get("size") or {}).items()) or "-"
        lines.append(f"| {name} | `{v['method']}` | {size} | {'-' if v['trainable'] is None else format(v['trainable'], ',')} "
                     f"| {v['budget']} |")
    lines += ["", "## Conclusions", "", *[f"- {c}." for c in doc["conclusions"]], ""]
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    """comparison.png: exact match (without generation, on preference pairs: preference accuracy) per variant
    with its interval and each seed's value; per-domain heatmap."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(doc["variants"])
    doms = doc["domains"]
    key = headline(doc)[0]
    label, interval = (("exact match", "em_interval") if key == "exact_match" else
                       ("preference accuracy", "preference_interval"))
    fig, axes = plt.subplots(1, 2, figsize=(6 + 0.9 * len(doms), 1.2 + 0.45 * len(names)),
                             gridspec_kw={"width_ratios": [3, max(2, len(doms))]})
    ax = axes[0]
    for i, n in enumerate(names):
        v = doc["variants"][n]
        em = v["metrics"].get(key)
        if not em:
            continue
        lo, hi = v.get(interval) or (em["mean"], em["mean"])
        ax.errorbar(em["mean"], i, xerr=[[em["mean"] - lo], [hi - em["mean"]]], fmt="o", color="C0", capsize=3)
        ax.scatter(list(em["per_seed"].values()), [i] * len(em["per_seed"]), s=10, color="C1", zorder=3)
    ref = doc["variants"][names[0]]["metrics"].get(key)
    if ref:
        ax.axvline(ref["mean"], color="grey", lw=0.8, ls="--")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel(f"{label} (mean, 95% bootstrap interval; dots: seeds)")
    grid = np.array([[np.nan if (x := doc["variants"][n]["per_domain"][d].get(key)) is None else x for d in doms]
                     for n in names], float)
    axes[1].imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (i, j), x in np.ndenumerate(grid):
        if not np.isnan(x):
            axes[1].text(j, i, f"{x:.2f}", ha="center", va="center", color="w" if x < 0.6 else "k", fontsize=8)
    axes[1].set_xticks(range(len(doms)), doms, rotation=45, ha="right")
    axes[1].set_yticks(range(len(names)), [])
    axes[1].set_title(f"{label} per domain")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _machine(jobs: list[Job]) -> str:
    device = (jobs[0].recipe.get("model") or {}).get("device", "auto")
    if device != "cpu" and torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    else:
        where = f"CPU {platform.machine()}, {os.cpu_count()} cores"
    return f"{where}, torch {torch.__version__}"


def report(s, variants, jobs: list[Job], sizes: dict, started: dict, stats: dict | None = None,
           interim: dict | None = None) -> dict:
    """Write comparison.json, .md and .png into --out, print the table and the conclusions; return the JSON.
    `stats` and `interim`: the statistics of the runs finished so far (moetune/commands/compare_interim.py)."""
    stats = stats or statistics_of(s, variants, jobs, sizes)
    ex = read_run(jobs[0]).examples
    doc = {"version": 1, "recipe": str(s.recipe), "command": "moetune " + " ".join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d", time.gmtime()), "machine": _machine(jobs), "jobs": s.jobs,
           "seeds": s.seeds, "steps": s.steps, "budget": s.budget, "reference": variants[0].name,
           "held_out": {"split": (jobs[0].recipe.get("eval") or {}).get("split", "test"), "n": ex["n"],
                        "fingerprint": ex["fingerprint"]},
           "bootstrap": {"resamples": s.resamples, "seed": 0, "level": P.LEVEL},
           "reused": sorted(k for k, v in started.items() if v == "done"), **stats,
           **({"interim": interim} if interim else {})}
    write_json(s.out / "comparison.json", doc)
    (s.out / "comparison.md").write_text(markdown(doc))
    plot(doc, s.out / "comparison.png")
    head, rows = tables(doc)["results"]
    out = wide_console()
    what = f"interim comparison ({interim['finished']} of {plural(interim['planned'], 'run')} finished" if interim else \
        f"comparison ({plural(len(s.seeds), 'seed')}"
    out.print(table(f"{what}, reference {doc['reference']})", head, rows))
    if interim and interim["pending"]:
        out.print(f"pending (no finished run at the first seed): {', '.join(interim['pending'])}", highlight=False)
    for c in doc["conclusions"]:
        out.print(f"- {c}.", highlight=False)
    out.print(f"Written: {s.out / 'comparison.md'}, comparison.json, comparison.png; the runs: moetune runs {s.out}",
              highlight=False)
    return doc


def wide_console():
    """A console on stdout as wide as the terminal, or 200 columns when it is not one (logs, pipes)."""
    from rich.console import Console
    return Console(width=None if sys.stdout.isatty() else 200)
