"""`moetune compare ... --report`: the comparison so far, from the runs finished by now; trains nothing.

A study of many runs takes hours to days; its table should not wait for the last run. `--report` reads the
comparison in --out (its plan.json must name the runs this command would plan: the same settings), and writes
comparison.{json,md,png} from the finished runs only, marked interim. The pairing stays honest: a variant is
paired with the reference at the seeds where both have finished (the first k planned seeds, k the smaller of
their counts of finished leading seeds), so variants may carry different numbers of seeds, and the table says
how many. The reference's own row uses all of its finished leading seeds. A variant with no finished run at the
first seed is listed as pending. The final report (the comparison's last run finishing) overwrites these files.
It only reads the runs, so it may run while the comparison trains (another terminal, or `--jobs N` in progress).
"""
from __future__ import annotations

import dataclasses

from moetune.commands.compare_jobs import Job, state
from moetune.commands.compare_plan import Variant
from moetune.commands.compare_report import METRICS, statistics_of
from moetune.core.errors import RecipeError
from moetune.core.ui import plural


def finished_seeds(variants: list[Variant], done: set[tuple[str, int]], seeds: list[int]) -> dict[str, int]:
    """variant -> k: its runs at the first k planned seeds have all finished ((variant, seed) in `done`)."""
    out = {}
    for v in variants:
        k = 0
        while k < len(seeds) and (v.name, seeds[k]) in done:
            k += 1
        out[v.name] = k
    return out


def interim_statistics(s, variants: list[Variant], jobs: list[Job], sizes: dict) -> tuple[dict, dict]:
    """(statistics as `statistics_of` returns them, the 'interim' record) from the finished runs: each group of
    variants with the same k is paired with the reference at the first k seeds (the module docstring)."""
    ref = variants[0]
    done = {(j.variant, j.seed) for j in jobs if state(j) == "done"}  # state() reads each run's files once
    ks, n_done = finished_seeds(variants, done, s.seeds), len(done)
    if ks[ref.name] == 0:
        raise RecipeError(f"--report: the reference {ref.name!r} has no finished run at seed {s.seeds[0]} yet "
                          f"({n_done} of {plural(len(jobs), 'run')} finished), so nothing can be paired. Allowed: --report "
                          "once its first run has finished.")

    def stats(k: int, group: list[Variant]) -> dict:
        sub = dataclasses.replace(s, seeds=s.seeds[:k])
        names = {v.name for v in group}
        return statistics_of(sub, group, [j for j in jobs if j.variant in names and j.seed in sub.seeds], sizes)

    out = stats(ks[ref.name], [ref])
    rows, paired, conclusions, metrics = {ref.name: out["variants"][ref.name]}, {}, {}, list(out["metrics"])
    groups: dict[int, list[Variant]] = {}
    for v in variants[1:]:
        k = min(ks[v.name], ks[ref.name])
        if k:
            groups.setdefault(k, []).append(v)
    for k, group in groups.items():
        got = stats(k, [ref, *group])
        note = "" if k == len(s.seeds) else f" (paired at {k} of {len(s.seeds)} seeds)"
        for v, sentence in zip(group, got["conclusions"]):
            rows[v.name], paired[v.name], conclusions[v.name] = got["variants"][v.name], got["paired"][v.name], sentence + note
        metrics += [m for m in got["metrics"] if m["key"] not in {x["key"] for x in metrics}]
    order = [v.name for v in variants if v.name in rows]
    known = [m.key for m in METRICS]
    metrics.sort(key=lambda m: known.index(m["key"]) if m["key"] in known else len(known))  # stable: MC files last
    out.update(variants={n: rows[n] for n in order}, paired={n: paired[n] for n in order if n in paired},
               conclusions=[conclusions[n] for n in order if n in conclusions], metrics=metrics)
    interim = {"finished": n_done, "planned": len(jobs), "seeds": {n: len(rows[n]["seeds"]) for n in order},
               "pending": [v.name for v in variants if v.name not in rows]}
    return out, interim


__all__ = ["finished_seeds", "interim_statistics"]
