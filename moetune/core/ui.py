"""Console output: rich progress bars, summary tables, and metrics.jsonl."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)


class _NoFusedKernelNotice(logging.Filter):
    """bitsandbytes logs, at import on AVX512-BF16 CPUs, that the optional `kernels` package for its fused bf16
    CPU kernel is missing. moetune never uses that kernel (moetune/models/quant.py), and transformers imports
    bitsandbytes (through peft) for every run, QLoRA or not: the line would only mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward" not in record.getMessage()


def quiet_library_notices() -> None:
    """Silence the library log lines above (idempotent; installs a logging filter, imports nothing)."""
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _NoFusedKernelNotice) for f in log.filters):
        log.addFilter(_NoFusedKernelNotice())


class Metrics:
    """Append-only JSONL log (one object per line, flushed at once)."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **row}) + "\n")


class TrainProgress:
    """Progress bar with loss, learning rate, tokens/s and ETA."""

    def __init__(self, total: int, start: int, con: Console | None = None, enabled: bool = True,
                 description: str = "train") -> None:
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=con or console, disable=not enabled)
        self.task = self.progress.add_task(description, total=total, completed=start, loss="-", lr="-", tps="-")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *a):
        return self.progress.__exit__(*a)

    def update(self, done: int, loss: float, lr: float, tps: float) -> None:
        self.progress.update(self.task, completed=done, loss=f"{loss:.4f}", lr=f"{lr:.2e}", tps=f"{tps:,.0f}")


def simple_progress(description: str, total: int, enabled: bool = True) -> Progress:
    """A plain progress bar for evaluation loops (use .advance(task))."""
    p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                 TextColumn("ETA"), TimeRemainingColumn(), console=console, disable=not enabled, transient=True)
    p.add_task(description, total=total)
    return p


def plural(n: int, word: str, many: str | None = None) -> str:
    """A count and its noun, singular for one: '1 example', '0 examples', '1,500 rows' ('2 entries' with
    `many`). Every count moetune prints goes through it (tests/test_papercuts.py reads the source)."""
    return f"{n:,} {word if n == 1 else many or word + 's'}"


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def table(title: str, columns: list[str], rows: list[list]) -> Table:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="right" if c != columns[0] else "left")
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    return t
