#!/usr/bin/env python
"""Issue 25's decisions, applied to the routing-balance studies' comparison.json files as README fixed them
before the tables were complete ("How the defaults will follow"). `make study-decision-routing-balance`.

1. The aim, on the multidomain study: a variant meets it when its mean specialisation over seeds is >= 0.05 and
   the lower end of its paired EM interval against LoRA is >= -0.005. Per type (hydralora, molora), the winner
   is the variant meeting it with the largest EM difference; recipes/<type>.yaml would take its settings. A type
   with none keeps its recipe, and its closest variant (spec >= 0.05 with the highest interval low end; if none
   reaches 0.05, the highest spec) is the documented opt-in.
2. router.balance_scope: each `<type>-global<rest>` is paired with `<type>-micro<rest>` (rest: '', +cluster, +seq,
   +cluster+seq). The default becomes 'global' if, on every data set, for each type the four twins' EM
   differences (global - micro, the mean over the seeds both finished) average >= -0.005 and global's
   specialisation is higher in at least 3 of the 4; otherwise it stays 'micro'.

A study still running (comparison.json from `compare --report`, marked interim) gives a provisional verdict,
said so on its first line; twins or variants without finished runs are listed as missing. Step 2 is settled
early, whatever the running study shows, once a finished study has every twin and a type there does not pass:
'global' needs every type to pass on every data set, so no later run can make it the default.

    python scripts/routing_decision.py benchmarks/results/studies/routing-balance-{multidomain,disjoint}/comparison.json \\
        --json decision.json > decision.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

SPEC_AIM, EM_FLOOR = 0.05, -0.005
TYPES = ("hydralora", "molora")
TWINS = ("", "+cluster", "+seq", "+cluster+seq")
DATA_SETS = ("multidomain", "disjoint")      # step 2 needs both


def _per_seed(doc: dict, name: str, key: str) -> dict[str, float]:
    v = doc["variants"].get(name)
    return dict(((v or {}).get("metrics", {}).get(key) or {}).get("per_seed") or {})


def aim(doc: dict) -> dict:
    """Step 1 of the module docstring on one comparison (its reference is LoRA)."""
    rows, out = [], {}
    for name, v in doc["variants"].items():
        if name == doc["reference"]:
            continue
        spec = (v["metrics"].get("specialisation") or {}).get("mean")
        em = doc["paired"].get(name, {}).get("exact_match")
        if spec is None or em is None:
            continue
        rows.append({"variant": name, "type": name.split("-")[0], "spec": spec, "em_diff": em["difference"],
                     "em_low": em["low"], "em_high": em["high"], "seeds": em.get("seeds"),
                     "meets": spec >= SPEC_AIM and em["low"] >= EM_FLOOR})
    for t in TYPES:
        mine = [r for r in rows if r["type"] == t]
        winners = sorted((r for r in mine if r["meets"]), key=lambda r: -r["em_diff"])
        reach = [r for r in mine if r["spec"] >= SPEC_AIM]
        closest = (max(reach, key=lambda r: r["em_low"]) if reach else
                   max(mine, key=lambda r: r["spec"]) if mine else None)
        out[t] = {"winner": winners[0]["variant"] if winners else None,
                  "closest": None if winners or closest is None else closest["variant"]}
    return {"variants": rows, "types": out}


def scope(doc: dict) -> dict:
    """Step 2's numbers on one comparison: per type, the twins' EM differences and who specialises more."""
    out = {}
    for t in TYPES:
        twins, missing = [], []
        for rest in TWINS:
            g, m = f"{t}-global{rest}", f"{t}-micro{rest}"
            ge, me = _per_seed(doc, g, "exact_match"), _per_seed(doc, m, "exact_match")
            seeds = sorted(ge.keys() & me.keys())
            if not seeds:
                missing.append(rest or "(plain)")
                continue
            gs, ms = _per_seed(doc, g, "specialisation"), _per_seed(doc, m, "specialisation")
            twins.append({"twin": rest or "(plain)", "seeds": len(seeds),
                          "em_diff": statistics.fmean(ge[s] - me[s] for s in seeds),
                          "spec_global": statistics.fmean(gs[s] for s in seeds),
                          "spec_micro": statistics.fmean(ms[s] for s in seeds)})
        mean = statistics.fmean(x["em_diff"] for x in twins) if twins else None
        more = sum(x["spec_global"] > x["spec_micro"] for x in twins)
        out[t] = {"twins": twins, "missing": missing, "mean_em_diff": mean, "global_specialises_more": more,
                  "passes": not missing and mean >= EM_FLOOR and more >= 3}
    return out


def decide(docs: dict[str, dict]) -> dict:
    """Both steps over the studies named in `docs` (data set -> comparison.json); the aim on 'multidomain'."""
    interim = {k: d["interim"] for k, d in docs.items() if d.get("interim") and
               d["interim"]["finished"] < d["interim"]["planned"]}
    scopes = {k: scope(d) for k, d in docs.items()}
    complete = set(docs) >= set(DATA_SETS) and all(not s[t]["missing"] for s in scopes.values() for t in TYPES)
    # a finished study where a type, every twin present, does not pass: no later run can make 'global' win
    settled_by = [{"data_set": k, "type": t} for k in DATA_SETS if k in docs and k not in interim
                  for t in TYPES if not scopes[k][t]["missing"] and not scopes[k][t]["passes"]]
    if settled_by:
        default = "micro"
    elif complete:
        default = "global" if all(s[t]["passes"] for s in scopes.values() for t in TYPES) else "micro"
    else:
        default = None
    return {"provisional": bool(interim), "interim": interim, "aim": aim(docs["multidomain"]) if "multidomain" in docs else None,
            "scope": scopes, "balance_scope_default": default,
            "scope_settled": bool(settled_by) or (complete and not interim), "scope_settled_by": settled_by}


def markdown(d: dict) -> str:
    lines = []
    if d["provisional"]:
        done = ", ".join(f"{k} {v['finished']} of {v['planned']} runs" for k, v in d["interim"].items())
        lines += [f"**Provisional** (studies still running: {done}): the decisions below are the rule applied to "
                  "the runs finished so far, not the decisions" + (", except the balance_scope default, which is "
                  "settled (last line)." if d["scope_settled"] else "."), ""]
    if d["aim"]:
        lines += ["## The aim on multidomain (specialisation >= 0.05, EM − LoRA interval low end >= −0.005)", "",
                  "| variant | seeds | specialisation | EM − lora [95% CI] | meets the aim |", "|---|---|---|---|---|"]
        for r in sorted(d["aim"]["variants"], key=lambda r: (not r["meets"], -r["spec"])):
            lines.append(f"| {r['variant']} | {r['seeds']} | {r['spec']:.4f} | {r['em_diff']:+.3f} "
                         f"[{r['em_low']:+.3f}, {r['em_high']:+.3f}] | {'yes' if r['meets'] else 'no'} |")
        lines.append("")
        for t, v in d["aim"]["types"].items():
            lines.append(f"- recipes/{t}.yaml: " + (f"takes {v['winner']}'s settings (it meets the aim)." if v["winner"]
                         else f"keeps its settings; closest to the aim: {v['closest'] or 'none finished'} (the opt-in)."))
        lines.append("")
    lines += ["## router.balance_scope: each global variant against its micro twin", "",
              "| data set | type | twin | seeds | EM global − micro | spec global | spec micro |", "|---|---|---|---|---|---|---|"]
    for k, s in d["scope"].items():
        for t, v in s.items():
            for x in v["twins"]:
                lines.append(f"| {k} | {t} | {x['twin']} | {x['seeds']} | {x['em_diff']:+.3f} | {x['spec_global']:.4f} "
                             f"| {x['spec_micro']:.4f} |")
    lines.append("")
    for k, s in d["scope"].items():
        for t, v in s.items():
            miss = f"; missing twins: {', '.join(v['missing'])}" if v["missing"] else ""
            mean = "-" if v["mean_em_diff"] is None else f"{v['mean_em_diff']:+.3f}"
            lines.append(f"- {k}, {t}: mean EM difference {mean}, global specialises more in "
                         f"{v['global_specialises_more']} of {len(v['twins'])}{miss}: "
                         f"{'passes' if v['passes'] else 'does not pass'}.")
    verdict, absent = d["balance_scope_default"], [k for k in DATA_SETS if k not in d["scope"]]
    by = d["scope_settled_by"]
    why = "" if not d["provisional"] else " (provisional)" if not by else (
        f" (settled: {' and '.join(sorted({x['data_set'] for x in by}))} has finished and "
        f"{' and '.join(x['type'] for x in by)} {'do' if len(by) > 1 else 'does'} not pass there; "
        "'global' needs every type to pass on both data sets, so the runs still to come cannot change it)")
    lines += ["", f"**router.balance_scope default: {verdict}**{why}." if verdict
              else "**router.balance_scope default: not decided** (the rule needs every twin on both data sets; "
              + (f"no comparison of {', '.join(absent)})." if absent else "twins missing)."), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("comparisons", nargs="+", type=Path, help="comparison.json of routing-balance-<data set>")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    docs = {}
    for p in args.comparisons:
        if not p.is_file():
            print(f"{p}: no such file (run `make study-report-<study>` first).", file=sys.stderr)
            return 1
        docs[p.parent.name.removeprefix("routing-balance-")] = json.loads(p.read_text())
    d = decide(docs)
    print(markdown(d))
    if args.json:
        args.json.write_text(json.dumps(d, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
