"""Summary, Markdown table and RESULTS.md section of `benchmarks/e2e.py`.

Ratios pair runs of the same round: a contender's seconds over moetune's in that round (same
precision), or a tool's fp32 seconds over its bf16 seconds; the median over rounds is reported
with the smallest and largest round ratio.
"""
from __future__ import annotations

import re
import statistics
from pathlib import Path



def markers(device: str) -> tuple[str, str]:
    """The RESULTS.md markers around the block of a `--device` (cpu and cuda runs keep a block each)."""
    return f"<!-- e2e:{device}:start (written by benchmarks/e2e.py --results-md) -->", f"<!-- e2e:{device}:end -->"


def _spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3),
            "rounds": len(values)}


def summarise(runs: list[dict]) -> dict:
    """Per (precision, contender): medians; ratios to moetune per round; bf16 gains; each tool at its best precision."""
    by: dict[tuple[str, str], dict[int, dict]] = {}
    for run in runs:
        by.setdefault((run["precision"], run["contender"]), {})[run["round"]] = run
    per = {}
    for (prec, name), rounds in by.items():
        rs = list(rounds.values())
        per[f"{prec}/{name}"] = {
            "train_seconds": round(statistics.median(r["train_seconds"] for r in rs), 2),
            "process_seconds": round(statistics.median(r["process_seconds"] for r in rs), 2),
            "steps": rs[0]["steps"],
            "final_loss": round(statistics.median(r["final_loss"] for r in rs), 4),
            "mean_loss": round(statistics.median(statistics.fmean(r["losses"]) for r in rs if r["losses"]), 4)}
        base = by.get((prec, "moetune"), {})
        pairs = [rounds[k]["train_seconds"] / base[k]["train_seconds"] for k in rounds if k in base]
        if pairs and name != "moetune":
            per[f"{prec}/{name}"]["vs_moetune"] = _spread(pairs)
    gains, best = {}, {}
    names = sorted({n for _, n in by})
    for name in names:
        fp, bf = by.get(("fp32", name), {}), by.get(("bf16", name), {})
        pairs = [fp[k]["train_seconds"] / bf[k]["train_seconds"] for k in fp if k in bf]
        if pairs:
            gains[name] = _spread(pairs)
        precs = [p for p in ("fp32", "bf16") if (p, name) in by]
        best[name] = min(precs, key=lambda p: per[f"{p}/{name}"]["train_seconds"])
    best_ratio = {}
    mo = by.get((best.get("moetune"), "moetune"), {})
    for name in names:
        if name == "moetune" or not mo:
            continue
        other = by[(best[name], name)]
        pairs = [other[k]["train_seconds"] / mo[k]["train_seconds"] for k in other if k in mo]
        if pairs:
            best_ratio[name] = {"precision": best[name], "moetune_precision": best["moetune"], **_spread(pairs)}
    return {"per_run_kind": per, "bf16_speedup": gains, "best_precision": best, "best_vs_best_moetune": best_ratio}


def _ratio(s: dict | None) -> str:
    return f"{s['median']:.2f}x [{s['min']:.2f}, {s['max']:.2f}]" if s else ""


def render_table(res: dict) -> str:
    """The Markdown section: what ran where, the table, bf16 gains, each tool at its best precision."""
    s, d = res["summary"], res["data"]
    shared = "shared with other work (ratios only)" if res["shared"] else "not shared"
    lines = [f"{res['date']}, {res['machine']}, {res['device']}, {res['threads']} threads, machine {shared}; "
             f"load average {res['load_avg_start'][0]:.1f} at the start, {res['load_avg_end'][0]:.1f} at the end; "
             f"{res['wall_seconds']:.0f} s in all. "
             + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + ".",
             "",
             f"`{res['command']}`",
             "",
             f"Data: {d['rows']} rows, {d['tokens']:,} tokens (mean {d['mean']}, median {d['median']}, p90 {d['p90']:.0f}, "
             f"max {d['max']}; {d['cut_at_max_length']} cut at max_length). TRL's batch: {res['trl_batch_size']} packed "
             f"rows of max_length tokens; Trainer: {res['settings']['batch_size']} examples; moetune: "
             + (f"{res['moetune_batch_size']} rows of max_length tokens (data.packing=dataset)."
                if any(x.replace(" ", "") == "data.packing=dataset" for x in res["settings"]["moetune_set"])
                else f"{res['settings']['batch_size']} examples.")
             + (f" moetune overrides: `{' '.join(res['settings']['moetune_set'])}`." if res['settings']['moetune_set'] else ""),
             ""]
    st = res["settings"]
    if st.get("rows", 160) < 160 or st.get("rounds", 2) < 2:
        lines += [f"**Smoke scale** ({d['rows']} rows, {st.get('rounds')} round): it shows that every contender runs "
                  "the same work to similar losses; its seconds and ratios are not a speed measurement.", ""]
    if res.get("skipped"):
        lines += ["Skipped: " + "; ".join(f"{k} ({v})" for k, v in res["skipped"].items()) + ".", ""]
    lines += ["| precision | contender | optimizer steps | train s (median) | process s | vs moetune [min, max] | final loss | mean loss |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key, v in s["per_run_kind"].items():
        prec, name = key.split("/", 1)
        lines.append(f"| {prec} | {name} | {v['steps']} | {v['train_seconds']:.1f} | {v['process_seconds']:.1f} | "
                     f"{_ratio(v.get('vs_moetune')) or '1.00x'} | {v['final_loss']:.4f} | {v['mean_loss']:.4f} |")
    if s["bf16_speedup"]:
        lines += ["", "bf16 speed-up (fp32 seconds / bf16 seconds, per round): "
                  + "; ".join(f"{k} {_ratio(v)}" for k, v in s["bf16_speedup"].items()) + "."]
    if s["best_vs_best_moetune"]:
        lines += ["", f"Each at its best precision (moetune {s['best_precision']['moetune']}), seconds over moetune's: "
                  + "; ".join(f"{k} ({v['precision']}) {_ratio(v)}" for k, v in s["best_vs_best_moetune"].items()) + "."]
    return "\n".join(lines) + "\n"


def update_results_md(path: Path, table: str, device: str = "cpu") -> None:
    """Replace the text between the `device`'s e2e markers of `path` with `table` (the markers are added at the end
    if absent)."""
    start, end = markers(device)
    text = path.read_text() if path.exists() else ""
    block = f"{start}\n{table}{end}"
    if start in text and end in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
