"""`moetune compare`'s outputs: comparison.json, comparison.md (its tables), comparison.png, and the table and
conclusions printed at the end, from the statistics of moetune/commands/compare_report.py (final, or interim
from moetune/commands/compare_interim.py)."""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from moetune.commands.compare_jobs import Job
from moetune.commands.compare_report import read_run, statistics_of
from moetune.core.checkpoint import write_json
from moetune.core.files import save_figure
from moetune.core.ui import plural, table
from moetune.eval import paired as P


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
    if len(doc["seeds"]) > 1 and doc["paired"]:
        out["per_seed"] = per_seed(doc, key, short)
    return out


def per_seed(doc: dict, key: str, short: str) -> tuple[list[str], list[list[str]]]:
    """The headline metric at each seed, and beside it the difference to the reference at the same seed (the
    paired difference the interval pools over seeds: where one seed carries a difference, this shows it)."""
    ref = doc["reference"]
    seeds = [str(s) for s in doc["seeds"]]
    ref_at = (doc["variants"][ref]["metrics"].get(key) or {}).get("per_seed", {})

    def cell(name: str, s: str) -> str:
        x = (doc["variants"][name]["metrics"].get(key) or {}).get("per_seed", {}).get(s)
        if x is None:
            return "-"
        r = ref_at.get(s)
        return _num(x) if name == ref or r is None else f"{_num(x)} ({x - r:+.3f})"

    return (["variant", *[f"{short} seed {s}" for s in seeds]],
            [[n, *[cell(n, s) for s in seeds]] for n in doc["variants"]])


def headline(doc: dict) -> tuple[str, str]:
    """The metric of the per-domain tables and the picture: exact match, or preference accuracy when the runs
    scored preference pairs without generation (key, short label)."""
    has = {k for v in doc["variants"].values() for k in v["metrics"]}
    return ("preference_accuracy", "pref acc") if "exact_match" not in has and "preference_accuracy" in has else ("exact_match", "EM")


def _num(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _interim_lines(doc: dict) -> list[str]:
    interim = doc.get("interim")
    if not interim:
        return []
    pending = f" Pending (no finished run at the first seed): {', '.join(interim['pending'])}." if interim["pending"] else ""
    last = ("" if interim["finished"] == interim["planned"] else
            " Run the same command again for a later state." if doc.get("planned_reference") else
            " The comparison's last run replaces this report.")
    return [f"**{'Interim' if interim['finished'] < interim['planned'] else 'Report'}** (`--report`): "
            f"{interim['finished']} of {plural(interim['planned'], 'run')} finished. Each variant is "
            "paired with the reference at the seeds both have finished (column 'seeds'); the reference's row "
            f"uses all of its own.{pending}{last}", ""]


def markdown(doc: dict) -> str:
    b = doc["bootstrap"]
    # an interim report (--report) ran no runs: how many ran at a time is the comparison's own setting, not its
    jobs = "" if doc.get("interim") else f"; runs {doc['jobs']} at a time"
    lines = [f"# Comparison of {len(doc['variants'])} variants on `{doc['recipe']}`", "",
             f"Command: `{doc['command']}`", "", *_interim_lines(doc)]
    if doc.get("planned_reference"):
        lines += [f"**Paired with {doc['reference']}** (`--reference`): every difference below is against it. The "
                  f"comparison was planned against {doc['planned_reference']} (its Budgets table says how each "
                  f"variant was sized); its own report is comparison.md.", ""]
    lines += [f"{doc['date']}, {doc['machine']}; {plural(len(doc['seeds']), 'seed')} {doc['seeds']}"
              f"{' planned' if doc.get('interim') else ''}; budget `{doc['budget']}`; held-out: "
              f"{plural(doc['held_out']['n'], 'row')} of the {doc['held_out']['split']} split{jobs}. "
              f"Cells: mean ± sd over seeds. Intervals: 95% paired bootstrap over seeds and held-out examples "
              f"({b['resamples']:,} resamples, seed {b['seed']}), each on its own (not corrected for "
              f"{plural(max(len(doc['variants']) - 1, 1), 'comparison')}).", "", "## Results", ""]
    what = "Exact match" if headline(doc)[0] == "exact_match" else "Preference accuracy"
    names = {"results": "Results", "per_domain": f"{what} per domain (mean over seeds)",
             "per_domain_diff": f"{what} per domain, difference to {doc['reference']} [95% CI]",
             "per_seed": f"{what} per seed (in brackets: minus {doc['reference']}'s at the same seed)"}
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
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def _machine(jobs: list[Job]) -> str:
    device = (jobs[0].recipe.get("model") or {}).get("device", "auto")
    if device != "cpu" and torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    else:
        where = f"CPU {platform.machine()}, {os.cpu_count()} cores"
    return f"{where}, torch {torch.__version__}"


def report(s, variants, jobs: list[Job], sizes: dict, started: dict, stats: dict | None = None,
           interim: dict | None = None, planned_reference: str | None = None) -> dict:
    """Write comparison.json, .md and .png into --out, print the table and the conclusions; return the JSON.
    `stats` and `interim`: the statistics of the runs finished so far (moetune/commands/compare_interim.py).
    `planned_reference`: the comparison's own reference when `variants` puts another first (--reference NAME):
    the files are then comparison-vs-NAME.*, beside the comparison's own."""
    stats = stats or statistics_of(s, variants, jobs, sizes)
    ex = read_run(jobs[0]).examples
    ref = variants[0].name
    repaired = planned_reference is not None and planned_reference != ref
    doc = {"version": 1, "recipe": str(s.recipe), "command": "moetune " + " ".join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d", time.gmtime()), "machine": _machine(jobs), "jobs": s.jobs,
           "seeds": s.seeds, "steps": s.steps, "budget": s.budget, "reference": ref,
           **({"planned_reference": planned_reference} if repaired else {}),
           "held_out": {"split": (jobs[0].recipe.get("eval") or {}).get("split", "test"), "n": ex["n"],
                        "fingerprint": ex["fingerprint"]},
           "bootstrap": {"resamples": s.resamples, "seed": 0, "level": P.LEVEL},
           "reused": sorted(k for k, v in started.items() if v == "done"), **stats,
           **({"interim": interim} if interim else {})}
    stem = f"comparison-vs-{ref}" if repaired else "comparison"
    write_json(s.out / f"{stem}.json", doc)
    (s.out / f"{stem}.md").write_text(markdown(doc))
    plot(doc, s.out / f"{stem}.png")
    head, rows = tables(doc)["results"]
    out = wide_console()
    what = f"interim comparison ({interim['finished']} of {plural(interim['planned'], 'run')} finished" if interim else \
        f"comparison ({plural(len(s.seeds), 'seed')}"
    out.print(table(f"{what}, reference {ref})", head, rows))
    if interim and interim["pending"]:
        out.print(f"pending (no finished run at the first seed): {', '.join(interim['pending'])}", highlight=False)
    for c in doc["conclusions"]:
        out.print(f"- {c}.", highlight=False)
    out.print(f"Written: {s.out / (stem + '.md')}, {stem}.json, {stem}.png; the runs: moetune runs {s.out}",
              highlight=False)
    return doc


def wide_console():
    """A console on stdout as wide as the terminal, or 200 columns when it is not one (logs, pipes)."""
    return Console(width=None if sys.stdout.isatty() else 200)
