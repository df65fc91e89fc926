"""`moetune runs`: one row per run directory, read from the files a run leaves behind (recipe.yaml,
summary.json, metrics.jsonl, collapsed-*/collapse.json); nothing is loaded or recomputed. Runs scored
on preference pairs add the objective, the preference accuracy (before -> after) and the reward margin.

A run directory is a directory with `recipe.yaml` and `summary.json` (an export directory has a
recipe.yaml but no summary.json, so it is not listed). Each DIR argument is a run directory or a
folder searched for them (four levels deep: the runs of `moetune compare` are
<out>/runs/<variant>-s<seed>, e.g. runs/compare/<recipe>/runs/lora-s0).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from moetune.core.files import read_json_object
from moetune.recipe.experts import EXPERT_CONFIGS

COLUMNS = ("run", "type", "trainable", "steps", "seconds", "tokens_per_s", "train_loss", "val_loss",
           "em_before", "em_after", "collapsed", "objective", "pref_before", "pref_after", "reward_margin")
SEARCH_DEPTH = 4


def find_runs(dirs: list[Path]) -> list[Path]:
    """Run directories in or under `dirs` (sorted, each once)."""
    found: set[Path] = set()

    def is_run(d: Path) -> bool:
        return (d / "recipe.yaml").is_file() and (d / "summary.json").is_file()

    def visit(d: Path, depth: int) -> None:
        if is_run(d):
            found.add(d)
            return
        if depth < SEARCH_DEPTH:
            for sub in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
                visit(sub, depth + 1)

    for d in dirs:
        if d.is_dir():
            visit(d, 0)
    return sorted(found)



def collapse_info(run_dir: Path, summary: dict | None = None) -> list[dict]:
    """The collapsed exports of a routed run: [{'dir', 'mode', 'adapters': {name: {'kl', 'loss_change',
    'exact_match_change'}}}], from <run>/collapsed-*/collapse.json and summary.json's 'collapse' entry."""
    out: dict[str, dict] = {}
    for path in sorted(Path(run_dir).glob("collapsed-*/collapse.json")):
        c = read_json_object(path)
        adapters = {k: {"kl": v["fidelity"].get("kl"), "loss_change": v["fidelity"].get("loss_change"),
                        "exact_match_change": v["fidelity"].get("exact_match_change")}
                    for k, v in (c.get("adapters") or {}).items() if isinstance(v, dict) and "fidelity" in v}
        out[str(path.parent.resolve())] = {"dir": str(path.parent), "mode": c.get("mode"), "adapters": adapters}
    s = summary if summary is not None else read_json_object(Path(run_dir) / "summary.json")
    c = s.get("collapse")
    if isinstance(c, dict) and c.get("dir") and (Path(c["dir"]) / "collapse.json").is_file():
        out.setdefault(str(Path(c["dir"]).resolve()), {"dir": c["dir"], "mode": c.get("mode"),
                                                       "adapters": c.get("adapters") or {}})
    return list(out.values())


def collapse_text(info: list[dict]) -> str:
    """'mean: KL 0.0123, EM -0.010' per collapsed export (the mean over its adapters for per-domain)."""
    parts = []
    for c in info:
        fids = list(c["adapters"].values())
        if not fids:
            continue
        kl = sum(f["kl"] for f in fids if f.get("kl") is not None) / len(fids)
        dem = [f["exact_match_change"] for f in fids if f.get("exact_match_change") is not None]
        em = f", EM {sum(dem) / len(dem):+.3f}" if dem else ""
        parts.append(f"{c['mode']}: KL {kl:.4f}{em}")
    return "; ".join(parts)


def _tokens_per_s(run_dir: Path) -> float | None:
    """Mean tokens/s over the logged training steps of metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    vals = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and isinstance(r.get("tokens_per_s"), (int, float)):
            vals.append(float(r["tokens_per_s"]))
    return sum(vals) / len(vals) if vals else None


def run_row(run_dir: Path) -> dict:
    """The runs-table numbers of one run directory (None where the run did not produce them)."""
    s = read_json_object(run_dir / "summary.json")
    try:
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        recipe = {}
    etype = (recipe.get("expert") or {}).get("type")
    t, before, after = s.get("train") or {}, s.get("before") or {}, s.get("after") or {}
    domains = sorted(set(before.get("per_domain") or {}) | set(after.get("per_domain") or {}))
    per_domain = {d: {"em_before": ((before.get("per_domain") or {}).get(d) or {}).get("exact_match"),
                      "em_after": ((after.get("per_domain") or {}).get(d) or {}).get("exact_match")} for d in domains}
    routed = etype in EXPERT_CONFIGS and EXPERT_CONFIGS[etype].collapsible  # has it a collapsed export?
    info = collapse_info(run_dir, s) if routed else []
    train_cfg = recipe.get("train") or {}
    return {"run": str(run_dir), "type": etype, "objective": train_cfg.get("objective", "sft"),
            "pref_before": before.get("preference_accuracy"), "pref_after": after.get("preference_accuracy"),
            "reward_margin": (after.get("preference") or {}).get("rewards/margins"),
            "trainable": t.get("trainable_parameters"), "steps": t.get("steps"),
            "seconds": t.get("seconds"), "tokens_per_s": _tokens_per_s(run_dir),
            "train_loss": t.get("final_train_loss"), "val_loss": t.get("val_loss"),
            "em_before": before.get("exact_match"), "em_after": after.get("exact_match"),
            "collapsed": (collapse_text(info) or "no") if routed else None, "collapse": info,
            "per_domain": per_domain}


def sort_rows(rows: list[dict], column: str | None) -> list[dict]:
    """Rows sorted by `column` (numbers descending except loss/seconds, which sort ascending; None last)."""
    if not column:
        return rows
    ascending = column in ("run", "type", "collapsed", "seconds", "objective") or column.endswith("loss")
    have = [r for r in rows if r.get(column) is not None]
    none = [r for r in rows if r.get(column) is None]
    return sorted(have, key=lambda r: r[column], reverse=not ascending) + none


def _num(v, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, fmt)


def has_preference(rows: list[dict]) -> bool:
    """Whether any run was scored on preference pairs (the table then shows the preference columns)."""
    return any(r.get("pref_after") is not None or r.get("pref_before") is not None for r in rows)


def table_cells(row: dict, domains: list[str], preference: bool = False) -> list[str]:
    """Display strings of one row: EM as 'before -> after', parameters with thousands separators; with
    `preference` the objective, the preference accuracy (before -> after) and the reward margin."""
    cells = [row["run"], row["type"] or "-", _num(row["trainable"], ","), _num(row["steps"], "d"),
             _num(row["seconds"], ".0f"), _num(row["tokens_per_s"], ",.0f"), _num(row["train_loss"], ".4f"),
             _num(row["val_loss"], ".4f"), f"{_num(row['em_before'], '.3f')} -> {_num(row['em_after'], '.3f')}",
             row["collapsed"] or "-"]
    if preference:
        cells += [row.get("objective") or "-",
                  f"{_num(row.get('pref_before'), '.3f')} -> {_num(row.get('pref_after'), '.3f')}",
                  _num(row.get("reward_margin"), ".3f")]
    for d in domains:
        v = row["per_domain"].get(d, {})
        cells.append(f"{_num(v.get('em_before'), '.2f')} -> {_num(v.get('em_after'), '.2f')}")
    return cells


HEADERS = ["run", "type", "trainable", "steps", "seconds", "tok/s", "train loss", "val loss", "EM before -> after",
           "collapsed (fidelity)"]
PREFERENCE_HEADERS = ["objective", "pref. acc. before -> after", "reward margin"]


def headers(domains: list[str], preference: bool = False) -> list[str]:
    return HEADERS + (PREFERENCE_HEADERS if preference else []) + [f"EM {d}" for d in domains]


def markdown(rows: list[dict], domains: list[str]) -> str:
    """The table as GitHub markdown (for READMEs)."""
    pref = has_preference(rows)
    head = headers(domains, pref)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(table_cells(r, domains, pref)) + " |" for r in rows]
    return "\n".join(lines)


def collapse_card(run_dir: Path, summary: dict | None = None) -> list[str]:
    """Model-card lines of a routed run: whether a collapsed export exists, and its fidelity."""
    info = collapse_info(run_dir, summary)
    if not info:
        return ["No collapsed export yet: `moetune export RUN_DIR --collapse mean` fixes the gates at their "
                "validation average and writes a stock PEFT adapter (with its fidelity in collapse.json)."]
    lines = ["| collapsed export | mode | adapters | mean KL (nats/token) | EM change |", "|---|---|---|---|---|"]
    for c in info:
        fids = list(c["adapters"].values())
        kl = [f["kl"] for f in fids if f.get("kl") is not None]
        dem = [f["exact_match_change"] for f in fids if f.get("exact_match_change") is not None]
        lines.append(f"| `{c['dir']}` | {c['mode']} | {len(fids)} | {_num(sum(kl) / len(kl) if kl else None, '.4f')} "
                     f"| {_num(sum(dem) / len(dem) if dem else None, '+.3f')} |")
    return lines
