"""The commands on a trained model: merge-lora, chat, generate, serve."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import List, Optional

import typer

from moetune.cli.options import BASE, MASK, OVERRIDES, SEED, SOURCE, TEMPERATURE, TOP_P, is_run, load, load_run, masks, sampling
from moetune.core.adapter_files import find_adapter_dir, read_meta
from moetune.core.errors import RecipeError
from moetune.core.ui import plural
from moetune.recipe import anchor_path, load_run_recipe


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
    if is_run(source):  # the run's own adapter: the merge is recorded in its summary.json
        rc, adapter, record = load_run(source, overrides), None, True
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
    rc = load(None, [f"model.path={base}", "data.test=null", "eval.split=validation", "stages=[merge]", *quant,
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


def chat(source: Optional[Path] = SOURCE, overrides: Optional[List[str]] = OVERRIDES,
         temperature: float = TEMPERATURE, top_p: float = TOP_P,
         max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Longest reply in tokens."),
         seed: Optional[int] = SEED, base: bool = BASE, mask_experts: Optional[str] = MASK,
         show_routing: bool = typer.Option(False, "--show-routing", help="Routed adapters: after each answer, the "
                                           "top expert per transformer block for every generated token.")):
    """Chat with a trained model in the terminal (streamed replies, multi-turn; /reset, /exit). Reads piped
    stdin too: one user turn per line."""
    from moetune.commands.chat import chat_loop, load_source
    decoding = sampling(temperature, top_p, max_new_tokens, seed)
    chat_loop(load_source(source, base, masks(mask_experts), overrides), decoding, show_routing=show_routing)


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
    decoding = sampling(temperature, top_p, max_new_tokens, seed)
    if batch_size < 1:
        raise RecipeError(f"--batch-size must be >= 1; got {batch_size}.")
    generate_file(load_source(source, base, masks(mask_experts), overrides), prompts, out, decoding, batch_size)


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

