"""File modes and small reads: what moetune writes gets the mode an ordinary write gives, whatever wrote it.

tempfile's mkstemp and mkdtemp (the atomic writes of core/checkpoint.py, plots, generate's output) create
0600 files and 0700 directories, and safetensors' writer 0600 files: others could not read a run's
summary.json, adapter or merged model. Those paths are given 0666 / 0777 less the umask, as open() and
mkdir() do. Torch-free.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable


def umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc/self/status), else set and
    restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_mode(path: str | Path) -> None:
    """Give `path` the mode an ordinary open() or mkdir() would: 0666 (a file) or 0777 (a directory) less the
    umask. tempfile's mkstemp / mkdtemp (and safetensors' writer) create 0600 / 0700, readable by no one else."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask())


def ordinary_modes(root: str | Path) -> None:
    """`ordinary_mode` for `root` and everything under it."""
    ordinary_mode(root)
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            ordinary_mode(os.path.join(dirpath, name))


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG at `path` whole or not at all: drawn into a temp file beside it, given
    the ordinary mode, renamed into place. A crash or a full disk never leaves a half-written picture."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        ordinary_mode(tmp)                      # mkstemp creates 0600; a plot is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """`rows` as JSON lines at `path` (UTF-8, '\\n' line ends, non-ASCII kept as is), whole or not at all: written
    to a temp file beside it, given the ordinary mode and renamed into place, so a crash never leaves half a
    data file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        ordinary_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json_object(path: str | Path) -> dict:
    """The JSON object in `path` (a run's summary.json, eval.json, ...), or {} when it is missing, unreadable,
    not JSON or not an object: readers of run directories show what is there and skip the rest."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
