"""File modes, whole-or-nothing file writes and small reads.

What moetune writes gets the mode an ordinary write gives, whatever wrote it: tempfile's mkstemp and mkdtemp
(the atomic writes here and in core/checkpoint.py) create 0600 files and 0700 directories, and safetensors'
writer 0600 files, so others could not read a run's summary.json, adapter or merged model. Those paths are
given 0666 / 0777 less the umask, as open() and mkdir() do. A single file (a plot, a data file, JSON, a
model card) is written through `atomic_file`: a temp file beside it, renamed into place. Torch-free.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator


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


@contextmanager
def atomic_file(path: str | Path, suffix: str = ".tmp") -> Iterator[str]:
    """A temp file's name beside `path` to write into; when the block ends without an error it gets the
    ordinary mode and is renamed onto `path`, on any error (Ctrl-C included) it is removed. So `path` is
    whole, old or new, whatever happens (the writes of plots, data files, JSON, model cards)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        ordinary_mode(tmp)                      # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG at `path` through `atomic_file`: never a half-written picture."""
    with atomic_file(path, ".png") as tmp:
        fig.savefig(tmp, dpi=dpi)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace a text file through `atomic_file`."""
    with atomic_file(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """`rows` as JSON lines at `path` (UTF-8, '\\n' line ends, non-ASCII kept as is) through `atomic_file`: a
    crash never leaves half a data file."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)


def read_json_object(path: str | Path) -> dict:
    """The JSON object in `path` (a run's summary.json, eval.json, ...), or {} when it is missing, unreadable,
    not JSON or not an object: readers of run directories show what is there and skip the rest."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
