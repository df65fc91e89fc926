"""The commands of a run: train, validate, explain, cluster-heads, eval, export, runs, compare."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from moetune.cli.options import OVERRIDES, load, load_run, mask_overrides
from moetune.commands.runs import COLUMNS, find_runs, has_preference, headers, markdown, run_row, sort_rows, table_cells
from moetune.core.errors import RecipeError
from moetune.core.ui import plural, table
from moetune.recipe import explain as explain_text


def train(recipe: Path = typer.Argument(..., help="Recipe YAML file."), overrides: Optional[List[str]] = OVERRIDES,
          resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in output_dir."),
          overwrite: bool = typer.Option(False, "--overwrite", help="Start over in an output_dir that holds a run: "
                                         "the old run is moved aside to <output_dir>.old-<UTC time>, not deleted."),
          allow_changes: bool = typer.Option(False, "--allow-changes", help="With --resume: continue although the "
                                             "recipe changes what training computes (train.max_steps, train.lr, "
                                             "...); the run's old recipe.yaml is kept beside the new one.")):
    """Run the recipe's stages (train, merge, eval, export) in order.

    An output_dir that already holds a run is refused unless --resume or --overwrite is given."""
    rc = load(recipe, overrides)
    from moetune.commands.stages import run_recipe
    run_recipe(rc, resume=resume, overwrite=overwrite, allow_changes=allow_changes)


def validate(recipe: Path = typer.Argument(..., help="Recipe YAML file."), overrides: Optional[List[str]] = OVERRIDES):
    """Check a recipe without loading weights; print trainable parameters and a memory estimate."""
    rc = load(recipe, overrides)
    from moetune.commands.validate import report
    report(rc)


def explain(query: Optional[str] = typer.Argument(None, metavar="KEY|SECTION|TYPE",
                                                  help="One key (train.lr, expert.num_experts), one section (train, "
                                                  "data.mix), one expert type (hydralora), or 'aliases': other tools' "
                                                  "names (learning_rate, lora_r, ...) and moetune's keys.")):
    """Print every recipe key with its default, allowed values and documentation, grouped by section and by
    expert type; or one key, section or type."""
    typer.echo(explain_text(query))


def cluster_heads(recipe: Path = typer.Argument(..., help="Recipe YAML file (a routed type: hydralora, molora, mov)."),
                  overrides: Optional[List[str]] = OVERRIDES,
                  k_min: int = typer.Option(2, "--min", help="Smallest K tried."),
                  k_max: int = typer.Option(8, "--max", help="Largest K tried."),
                  embedder: str = typer.Option("minilm", "--embedder", help="minilm | base | tfidf | PATH to a local "
                                               "sentence-embedding model directory."),
                  out: Optional[Path] = typer.Option(None, "--out", help="New recipe (default <stem>.k<K>.yaml beside "
                                                     "RECIPE); the plot is written beside it."),
                  json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON here."),
                  init_router: bool = typer.Option(False, "--init-router", help="Start the routers from the clusters "
                                                   "and set router.init_centroids in the new recipe: with --embedder "
                                                   "minilm, tfidf or PATH, each projection's router fitted to the "
                                                   "clusters (<stem>.router.safetensors); with --embedder base, the "
                                                   "K-means centroids (<stem>.centroids.safetensors)."),
                  with_response: bool = typer.Option(False, "--with-response", help="Embed instruction + response "
                                                     "(default: the instruction only)."),
                  max_rows: Optional[int] = typer.Option(None, "--max-rows", help="Seeded subsample of the train rows."),
                  seed: int = typer.Option(0, "--seed", help="Seed of K-means, silhouette sample and subsample."),
                  force: bool = typer.Option(False, "--force", help="Replace existing output files (never RECIPE).")):
    """Choose expert.num_experts by K-means on embedded training examples; write a new recipe."""
    from moetune.commands.cluster import cluster_heads as run
    run(recipe, overrides or [], k_min=k_min, k_max=k_max, embedder=embedder, out=out, json_path=json_path,
        init_router=init_router, with_response=with_response, max_rows=max_rows, seed=seed, force=force)


def eval_cmd(run_dir: Path = typer.Argument(..., help="Run directory (the recipe's output_dir)."),
             overrides: Optional[List[str]] = OVERRIDES,
             merged: bool = typer.Option(False, "--merged", help="Score <run>/merged instead of base + adapter."),
             mask_experts: Optional[str] = typer.Option(None, "--mask-experts", help="MoLE: comma-separated expert "
                                                        "names whose gates are fixed at 0 (the others renormalised).")):
    """Evaluate a trained run: loss, exact match per domain, multiple choice; writes eval.json."""
    rc = load_run(run_dir, mask_overrides(run_dir, overrides, mask_experts))
    from moetune.commands.stages import stage_eval
    from moetune.run.session import Run
    stage_eval(Run(rc), use_merged=merged)



def export(run_dir: Path = typer.Argument(..., help="Run directory."),
           kind: Optional[str] = typer.Option(None, "--kind", help="adapter | merged | both (default: the recipe's)."),
           out: Optional[Path] = typer.Option(None, "--out", help="Export directory (default <run>/export)."),
           collapse: Optional[str] = typer.Option(None, "--collapse", help="mean | per-domain: fix a routed adapter's "
                                                  "gates at their validation average and write stock PEFT adapter(s) "
                                                  "+ collapse.json (default out: <run>/collapsed-MODE)."),
           mask_experts: Optional[str] = typer.Option(None, "--mask-experts", help="MoLE: comma-separated expert "
                                                      "names masked in the exported adapter (gates 0, rest renormalised)."),
           overrides: Optional[List[str]] = OVERRIDES):
    """Write a PEFT adapter directory and/or merged model with the recipe and a model card."""
    if collapse and kind:
        raise RecipeError("--collapse writes stock PEFT adapters; it does not combine with --kind.")
    extra = [f"export.kind={kind}"] if kind else []
    rc = load_run(run_dir, overrides if collapse else [*extra, *mask_overrides(run_dir, overrides, mask_experts)])
    from moetune.commands.stages import stage_collapse, stage_export
    from moetune.run.session import Run
    if collapse:
        stage_collapse(Run(rc), collapse, out)
        return
    stage_export(Run(rc), kind=rc.export.kind, out=out)


def runs(dirs: Optional[List[Path]] = typer.Argument(None, metavar="DIR", help="Run directories, or folders searched for them "
                                                     "(default: runs/)."),
         sort: Optional[str] = typer.Option(None, "--sort", help="Sort by a column: run, type, trainable, steps, "
                                            "seconds, tokens_per_s, train_loss, val_loss, em_before, em_after, "
                                            "pref_after, reward_margin."),
         domains: bool = typer.Option(False, "--domains", help="Add the per-domain exact match (before -> after)."),
         as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON instead of a table."),
         as_markdown: bool = typer.Option(False, "--markdown", help="Print a markdown table (for READMEs).")):
    """Compare runs: one row per run directory (type, parameters, steps, time, losses, exact match)."""
    if sort is not None and sort not in COLUMNS:
        raise RecipeError(f"--sort is {sort!r}; allowed: {', '.join(COLUMNS)}.")
    paths = list(dirs or [Path("runs")])
    missing = [str(p) for p in paths if not p.is_dir()]
    what = ("moetune runs lists run directories: a recipe.yaml beside a summary.json, what `moetune train` writes "
            "into a recipe's output_dir; each argument is one, or a folder searched for them four levels deep "
            "(so the runs of `moetune compare` under runs/compare/<recipe>/runs/ count).")
    if missing and not dirs:
        raise RecipeError(f"{what} With no argument it looks in ./runs, which does not exist here ({Path.cwd()}). "
                          "Pass the run directories or a folder holding them, e.g. `moetune runs path/to/runs`.")
    if missing:
        raise RecipeError(f"Not a directory: {', '.join(missing)}. {what}")
    rows = sort_rows([run_row(d) for d in find_runs(paths)], sort)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no run directories (recipe.yaml + summary.json) in {', '.join(map(str, paths))}")
        return
    names = sorted({d for r in rows for d in r["per_domain"]}) if domains else []
    if as_markdown:
        typer.echo(markdown(rows, names))
        return
    pref = has_preference(rows)
    Console(width=None if sys.stdout.isatty() else 240).print(table(plural(len(rows), "run"), headers(names, pref),
                                          [table_cells(r, names, pref) for r in rows]))


def compare(recipe: Path = typer.Argument(..., help="Recipe YAML file, or a study file (a recipe with a compare: "
                                          "section, e.g. recipes/studies/*.yaml)."),
            overrides: Optional[List[str]] = OVERRIDES,
            methods: Optional[List[str]] = typer.Option(None, "--methods", help="Variants, comma separated: an expert "
                                                        "type, a recipe file, merge:METHOD or expert:DOMAIN, each as "
                                                        "[NAME=]METHOD[:KEY=VALUE...] (e.g. seq=hydralora:router.level="
                                                        "sequence); on a study file also a variant's NAME. "
                                                        "The first is the reference."),
            seeds: Optional[int] = typer.Option(None, "--seeds", help="Seeds per variant: train.seed, +1, ... (default 1)."),
            steps: Optional[int] = typer.Option(None, "--steps", help="train.max_steps of every variant."),
            budget: Optional[str] = typer.Option(None, "--budget", help="equal-params (default: size every variant "
                                                 "to the reference's trainable parameters, +-5%) | recipe (as set)."),
            jobs: int = typer.Option(1, "--jobs", help="Runs at a time, each in its own process with its share of "
                                     "the CPU threads (1: one after another, in this process)."),
            out: Optional[Path] = typer.Option(None, "--out", help="Comparison directory (default runs/compare/<recipe>)."),
            resume: bool = typer.Option(False, "--resume", help="Continue the comparison in --out; finished runs are reused."),
            overwrite: bool = typer.Option(False, "--overwrite", help="Start over: the comparison in --out is moved "
                                           "aside to <out>.old-<UTC time>, not deleted."),
            bootstrap: int = typer.Option(10_000, "--bootstrap", help="Bootstrap resamples of the intervals."),
            plan: bool = typer.Option(False, "--plan", help="Check the variants and data, print the budgets and "
                                      "the runs, train nothing."),
            report: bool = typer.Option(False, "--report", help="Write comparison.md/.json/.png now from the runs "
                                        "finished so far (marked interim), train nothing; safe while it trains."),
            reference: Optional[str] = typer.Option(None, "--reference", help="With --report: pair every variant "
                                                    "with this one (a variant's name) instead of the first; writes "
                                                    "comparison-vs-NAME.md/.json/.png beside comparison.md.")):
    """Which expert type suits this data? Train every variant at every seed on the recipe's model and data, then
    compare them with the first: exact match and loss (overall, per domain), paired differences with 95%
    bootstrap intervals, routing specialisation, speed -> comparison.md, .json, .png in --out."""
    from moetune.commands.compare import compare as run, settings
    s, base = settings(recipe, methods, seeds, steps, budget, jobs, out, overrides or [], resume, overwrite, bootstrap,
                       plan, report, reference)
    run(s, base)
