"""moetune: fine-tune mixtures of parameter-efficient experts on Hugging Face causal LMs.

Layers (see LAYERS): the sub-packages are stacked; a module imports only its own package or
packages of a lower layer, never one above or beside it, and the import graph has no cycle
(tests/test_layers.py checks both from the source, and that the README's layout map agrees). An
import inside a function is for a heavy dependency (torch in the CLI, transformers, matplotlib,
sklearn, bitsandbytes), never to dodge a cycle.
"""
import os

# Nothing moetune reads by default lives on the hub: fail at once on a miss instead of
# waiting on the network. Set HF_HUB_OFFLINE=0 to let a hub id download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"

LAYERS: dict[str, int] = {
    "__main__": 10,           # `python -m moetune`
    "cli": 9,                 # parse arguments, call one command
    "commands": 8,            # what each command does: stages, validate, cluster-heads, chat, runs, ...
    "serve": 8,               # `moetune serve`: loading runs on a shared base, continuous batching, the HTTP API
    "export": 7,              # merge, multi-LoRA merge, collapse, the stock-loading snippet
    "eval": 6,                # scoring (its loss is train.loss), generation, the routing report
    "train": 5,               # the loop, its loss, logs, activation checkpointing, FSDP, router fitting
    "run": 5,                 # a recipe's run: Run, the model with its adapter, the run-directory guard
    "adapters": 4,            # wrap a model's projections with expert layers; save/load adapters
    "experts": 3,             # one module per paper, the registry, routing (gates, routers, losses)
    "models": 2,              # base models, tokenizers, target projections, decoder blocks
    "data": 2,                # rows, formats, sources, the tokenising pipeline, packing, the default data
    "recipe": 1,              # the typed recipe schema (torch-free)
    "core": 0,                # errors, schema helpers, console, atomic files and checkpoints, flags
}
"""Layer of each sub-package (and top-level module) of `moetune`: a module may import its own package
or a package of a LOWER layer; packages on one layer are independent of each other."""
