"""`moetune compare`: the numbers of every run and their statistics (written out by compare_output.py).

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
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from moetune.commands.compare_jobs import Job
from moetune.core.errors import RecipeError
from moetune.core.files import read_json_object
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
