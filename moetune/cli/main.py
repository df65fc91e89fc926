"""The `moetune` application: its commands in the order `--help` lists them, and the entry point that turns
recipe, data and write errors and stop signals into one paragraph and an exit code."""
from __future__ import annotations

import errno
import os
import shlex
import signal
import sys
import threading

import typer
from rich.markup import escape

from moetune.cli import data_cmds, model_cmds, train_cmds
from moetune.commands.usage import Typer, version_text
from moetune.core.errors import Interrupted, RecipeError, Terminated
from moetune.core.ui import console, quiet_library_notices
from moetune.train.signals import raise_terminated, signal_name

app = Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune mixtures of parameter-efficient experts on Hugging Face causal LMs, "
                       "driven by YAML recipes. Start with: moetune train recipes/default.yaml")
data_app = Typer(no_args_is_help=True, help="Build the default data and MMLU files; inspect a recipe's data.")
app.add_typer(data_app, name="data")

COMMANDS = (("train", train_cmds.train), ("validate", train_cmds.validate), ("explain", train_cmds.explain),
            ("cluster-heads", train_cmds.cluster_heads), ("eval", train_cmds.eval_cmd),
            ("merge-lora", model_cmds.merge_lora), ("export", train_cmds.export), ("chat", model_cmds.chat),
            ("generate", model_cmds.generate), ("serve", model_cmds.serve), ("runs", train_cmds.runs),
            ("compare", train_cmds.compare))
"""(name, function) of every command, in the order `moetune --help` lists them; `moetune data ...` below."""
for _name, _fn in COMMANDS:
    app.command(_name)(_fn)
for _name, _fn in (("make", data_cmds.data_make), ("inspect", data_cmds.data_inspect), ("mmlu", data_cmds.data_mmlu)):
    data_app.command(_name)(_fn)

# Write failures (disk full, quota, read-only, permission) mid-run: one paragraph, exit 2, no traceback.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _version(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="Print moetune's version and those of the libraries it runs on.")):
    """Fine-tune mixtures of parameter-efficient experts on Hugging Face causal LMs, driven by YAML recipes."""


def main() -> None:
    """Entry point: recipe/data/model errors print one paragraph and exit 2, no traceback."""
    # moetune draws its own progress bars; transformers' and the hub's are off and only errors are logged.
    # Set through the environment, which transformers reads when a command first imports it, so that
    # --help needs no transformers; when it is loaded already (main called in-process), set it directly.
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    quiet_library_notices()  # bitsandbytes' CPU-kernel notice, logged whenever transformers imports peft
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    previous = signal.signal(signal.SIGTERM, raise_terminated) if threading.current_thread() is threading.main_thread() else None
    try:
        app()
    except Interrupted as e:
        if e.message:  # the main process of a run says what was kept; the others exit quietly
            hint = f" Continue with: {_resume_command()}" if e.resumable else ""
            console.print(f"[yellow]stopped by {signal_name(e.signum)}[/]: {escape(e.message + hint)}", highlight=False,
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


def _resume_command() -> str:
    """The command line that continues the stopped run: this one with --resume (and without --overwrite)."""
    args = [a for a in sys.argv[1:] if a not in ("--overwrite", "--resume")]
    command = shlex.join(["moetune", *args, "--resume"])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun / accelerate launch set it in every process
        command += " (through the same launcher: torchrun ... -m moetune or accelerate launch ... -m moetune)"
    return command
