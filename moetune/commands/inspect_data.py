"""`moetune data inspect RECIPE`: what the recipe's data becomes once tokenised.

Row counts per split and domain, bad rows skipped, a token-length histogram with how many
rows `data.max_length` cuts, and a few examples rendered through the template with the
trained (loss) tokens marked ⟦like this⟧ (a preference pair: its chosen and its rejected sequence). It goes through the same cached pipeline as
training, so it also builds the cache a later `moetune train` reuses.
"""
from __future__ import annotations

import json

import numpy as np
from rich.text import Text

from moetune.core.ui import console, plural, table
from moetune.data.examples import ExampleSet
from moetune.data.packing import layout_efficiency
from moetune.data.pipeline import load_splits
from moetune.data.rows import IGNORE, Pair
from moetune.models.load import load_tokenizer
from moetune.recipe import Recipe

OPEN, CLOSE = "⟦", "⟧"


def histogram(lengths: np.ndarray, max_length: int) -> list[dict]:
    """Counts of token lengths in power-of-two buckets up to max_length."""
    edges = [0]
    while edges[-1] < max_length:
        edges.append(min(max(8, edges[-1] * 2), max_length))
    out = []
    for lo, hi in zip(edges, edges[1:]):
        out.append({"from": lo + 1, "to": hi, "rows": int(((lengths > lo) & (lengths <= hi)).sum())})
    return out


def marked(tokenizer, input_ids: list[int], labels: list[int]) -> tuple[str, list[str]]:
    """The decoded example with trained runs wrapped in ⟦ ⟧, and those runs."""
    text, runs, cur, prev = "", [], [], []
    for t, lab in zip(input_ids + [None], labels + [IGNORE]):
        if t is not None and lab != IGNORE:
            if prev:
                text += tokenizer.decode(prev)
                prev = []
            cur.append(t)
            continue
        if cur:
            runs.append(tokenizer.decode(cur))
            text += OPEN + runs[-1] + CLOSE
            cur = []
        if t is not None:
            prev.append(t)
    return text + tokenizer.decode(prev), runs


def split_report(name: str, es: ExampleSet, tokenizer, max_length: int, n_show: int, batch_size: int = 8) -> dict:
    lengths = es.column("length")
    domains = es.column("domain")
    dom, cnt = np.unique(domains, return_counts=True)
    info = es.info
    shown = []
    for e in es.take(range(min(n_show, len(es)))):
        text, runs = marked(tokenizer, e.input_ids, e.labels)
        shown.append({"domain": e.domain, "tokens": len(e.input_ids), "text": text, "trained": runs})
        if isinstance(e, Pair):  # a preference pair: its chosen sequence above, the rejected one too
            shown[-1]["side"] = "chosen"
            text, runs = marked(tokenizer, e.rejected_ids, e.rejected_labels)
            shown.append({"domain": e.domain, "tokens": len(e.rejected_ids), "text": text, "trained": runs,
                          "side": "rejected"})
    return {"split": name, "rows": len(es), "source_rows": info.get("rows"), "format": info.get("format"),
            "bad_rows_skipped": info.get("bad_rows", 0), "bad_examples": info.get("bad_examples", []),
            "domains": {str(d): int(c) for d, c in zip(dom, cnt)},
            "tokens": {"total": int(lengths.sum()), "mean": float(lengths.mean()) if len(lengths) else 0.0,
                       "max": int(lengths.max()) if len(lengths) else 0},
            "truncated": int(es.column("truncated").sum()), "max_length": max_length,
            "dropped_no_trained_token": info.get("dropped_no_target", 0),
            "trained_tokens": int(es.column("n_targets").sum()),
            "histogram": histogram(lengths, max_length), "examples": shown,
            "real_tokens": layout_efficiency(lengths, max_length, batch_size)}


def inspect(recipe: Recipe, n_show: int = 2) -> dict:
    """The report of every split the recipe names (train after the validation carve-out)."""
    tok = load_tokenizer(recipe.model, log=lambda *a, **k: None)
    need = ("train", "validation") + (("test",) if recipe.data.test else ())
    splits = load_splits(recipe.data, tok, need)
    return {"splits": [split_report(k, splits[k], tok, recipe.data.max_length, n_show, recipe.train.batch_size)
                       for k in need if k in splits], "packing": recipe.data.packing,
            "batch_size": recipe.train.batch_size}


def show(report: dict) -> None:
    """Print the report in the terminal."""
    for s in report["splits"]:
        head = (f"[bold]{s['split']}[/]: {plural(s['rows'], 'example')} ({s['format']}; {plural(s['source_rows'], 'source row')}"
                f"{', ' + plural(s['bad_rows_skipped'], 'bad row') + ' skipped' if s['bad_rows_skipped'] else ''}), "
                f"{plural(s['tokens']['total'], 'token')}, mean {s['tokens']['mean']:.1f}, max {s['tokens']['max']}, "
                f"{s['trained_tokens']:,} trained; {s['truncated']:,} cut by data.max_length={s['max_length']}"
                f"{', ' + str(s['dropped_no_trained_token']) + ' dropped (cut before any trained token)' if s['dropped_no_trained_token'] else ''}")
        console.print(head, highlight=False)
        for b in s["bad_examples"]:
            console.print(f"  skipped: {b}", highlight=False)
        eff = s["real_tokens"]
        console.print(f"  real tokens of the computed positions (train.batch_size={report.get('batch_size', '?')}): "
                      f"{eff['unpacked']:.0%} unpacked, {eff['true']:.0%} with data.packing=true, {eff['dataset']:.0%} "
                      f"with data.packing=dataset (this recipe: {report.get('packing')})", highlight=False)
        console.print(table("domains", ["domain", "examples"], [[d, f"{c:,}"] for d, c in s["domains"].items()]))
        top = max((h["rows"] for h in s["histogram"]), default=0) or 1
        console.print(table("token lengths", ["tokens", "examples", ""],
                            [[f"{h['from']}-{h['to']}", f"{h['rows']:,}", "█" * round(30 * h["rows"] / top)]
                             for h in s["histogram"]]))
        for ex in s["examples"]:
            side = f"{ex['side']}, " if "side" in ex else ""
            console.print(f"[dim]example ({side}{ex['domain']}, {plural(ex['tokens'], 'token')}; trained tokens in {OPEN} {CLOSE}):[/]")
            txt = Text()
            for i, part in enumerate(ex["text"].replace(CLOSE, OPEN).split(OPEN)):
                txt.append(part if i % 2 == 0 else OPEN + part + CLOSE, style="" if i % 2 == 0 else "bold green")
            console.print(txt)


def run(recipe: Recipe, as_json: bool, n_show: int) -> dict:
    report = inspect(recipe, n_show)
    if as_json:
        print(json.dumps(report, indent=1, ensure_ascii=False))
    else:
        show(report)
    return report
