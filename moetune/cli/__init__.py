"""moetune's command line: parse, load the recipe, call one stage function. Nothing else.

`main` (the `moetune` entry point) and `app` live in `moetune.cli.main`, which registers the commands of
`train_cmds` (a run: train, validate, explain, cluster-heads, eval, export, runs, compare), `model_cmds`
(a trained model: merge-lora, chat, generate, serve) and `data_cmds` (`moetune data ...`); `options` holds
what they share. The modules a command runs (stages, validate, cluster, multimerge, collapse, mmlu) import
torch, transformers or datasets, so each command imports its module inside its function: `moetune --help`
and a command's `--help` then answer without importing torch (tests/test_layers.py checks). That is the
only reason for imports inside functions in this package (tests/test_layers.py checks that too); the recipe,
errors, UI, data generator, run table and adapter-file reader are torch-free and imported at the top.
"""
from moetune.cli.main import app, main

__all__ = ["app", "main"]
