"""Data sources: a source read into Arrow, and the sources a recipe names.

A source is a local file (.jsonl, .json, .csv, .parquet, .arrow), a glob of such files, a
directory of shards, a `save_to_disk` directory, or a hub dataset id 'owner/name' resolved
from the local HF cache (moetune runs with HF_DATASETS_OFFLINE=1 unless told otherwise).

- `load_source(spec)` gives the rows as an Arrow `datasets.Dataset`: JSON lines and parquet go
  through `datasets.load_dataset` (pyarrow's fast readers, cached by `datasets`), .json and .csv
  through the one reader (`moetune.data.read`), because their exact line numbers and all-text csv
  cells matter more than speed there. Every source also gets an `identity`: what the tokenised
  cache is keyed on (paths, sizes and mtimes; the dataset fingerprint of hub and save_to_disk
  data). Arrow gives every row every column (None where a row lacks one), so a message about a
  bad row is written from the row as the reader reads it (`Source.raw`): "'response' is null"
  and "missing key 'response'" differ.
- `iter_sources(cfg, splits)` is the one loop over what a recipe's data keys name: `data.train`
  (or each `data.mix` source, read with its own format, columns and domain), `data.validation`,
  `data.test`; `check_rows` and `iter_messages` read a source's rows through its format.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from moetune.core.errors import DataError
from moetune.data import formats
from moetune.data.read import (COUNTING, SUFFIXES, arrow_file, check_suffix, first_bad_byte, not_utf8, open_disk,
                               read_file)
from moetune.recipe import DataConfig, MixSource


# ------------------------------------------------------------------ a source as Arrow

@dataclass
class Source:
    """Rows of one source as Arrow, and how to name and re-read row i for a message."""

    ds: datasets.Dataset
    identity: list
    files: list[tuple[Path, int]] = field(default_factory=list)   # (file, first row) per file, in order
    name: str = ""

    def rows(self, batch_size: int = 1000) -> Iterator[tuple[int, dict]]:
        """(index, row) of every row, read from Arrow in batches (rows have every column: None where absent)."""
        try:
            for s in range(0, len(self.ds), batch_size):
                batch = self.ds[s:s + batch_size]
                for k, vals in enumerate(zip(*batch.values())):
                    yield s + k, dict(zip(batch, vals))
        except UnicodeDecodeError:
            raise self.not_utf8() from None

    def raw(self, indices: Iterable[int]) -> dict[int, tuple[dict, str]]:
        """Row i as the reader reads it, with its location, for each of `indices` (one pass per file)."""
        want = sorted(set(int(i) for i in indices))
        out: dict[int, tuple[dict, str]] = {}
        if not self.files:
            return {i: (self.ds[i], f"{self.name} row {i + 1} ({COUNTING})") for i in want}
        for j, (path, start) in enumerate(self.files):
            end = self.files[j + 1][1] if j + 1 < len(self.files) else len(self.ds)
            mine = [i for i in want if start <= i < end]
            if not mine:
                continue
            if path.suffix.lower() in (".parquet", ".arrow"):  # Arrow is what the file holds
                out.update({i: (self.ds[i], f"{path} row {i - start + 1} ({COUNTING})") for i in mine})
                continue
            left = set(mine)
            for k, (row, loc) in enumerate(read_file(path), start):
                if k in left:
                    out[k] = (row, loc)
                    left.discard(k)
                    if not left:
                        break
        return out

    def locate(self, i: int) -> str:
        """'file line N' (jsonl, csv), 'file item N' (json) or 'file row N' (the rest) of row i."""
        return self.raw([i])[i][1]

    def not_utf8(self) -> DataError:
        """The error naming the first file of this source that is not UTF-8 (a row failed to decode)."""
        for path, _ in self.files:
            if first_bad_byte(path):
                return not_utf8(path)
        return DataError(f"Data {self.name!r} holds text that is not UTF-8. Re-encode its files to UTF-8.")


@contextmanager
def quiet():
    """No `datasets` log lines or progress bars: a failing JSON load logs pyarrow's message before
    moetune's own error would be printed."""
    level = datasets.utils.logging.get_verbosity()
    bars = datasets.utils.are_progress_bars_disabled()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.utils.logging.set_verbosity(level)
        if not bars:
            datasets.enable_progress_bars()


def _stat(p: Path) -> list:
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def is_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return (len(parts) == 2 and all(parts) and not Path(spec).exists() and not any(c in spec for c in "*?[")
            and not spec.lower().endswith(SUFFIXES))


def _from_rows(path: Path) -> datasets.Dataset:
    """A file read by `read_file` as Arrow; columns are the union of every row's keys, in first-seen order."""
    rows, locs = [], []
    for row, loc in read_file(path):
        if not isinstance(row, dict):
            raise DataError(f"{loc}: a row must be an object, got {type(row).__name__}.")
        rows.append(row)
        locs.append(loc)
    if not rows:
        return datasets.Dataset.from_dict({})
    keys = list(dict.fromkeys(k for r in rows for k in r))
    try:
        return datasets.Dataset.from_dict({k: [r.get(k) for r in rows] for k in keys})
    except Exception as e:  # noqa: BLE001 - pyarrow's many type errors
        raise DataError(_layout_error(path, rows, locs, e)) from None


def _kind(v) -> str:
    return ("null" if v is None else "text" if isinstance(v, str) else "true/false" if isinstance(v, bool)
            else "a number" if isinstance(v, (int, float)) else "a list" if isinstance(v, list)
            else "an object" if isinstance(v, dict) else type(v).__name__)


def _layout_error(path: Path, rows: list[dict], locs: list[str], e: Exception) -> str:
    """Name the first row whose value in some column is of another kind than the column's first value."""
    first: dict = {}
    for row, loc in zip(rows, locs):
        for k, v in row.items():
            if v is None:
                continue
            seen = first.setdefault(k, (_kind(v), loc))
            if _kind(v) != seen[0] and not {seen[0], _kind(v)} <= {"a number"}:
                return (f"{loc}: '{k}' is {_kind(v)}, but {seen[0]} in {seen[1]}. A column must hold one kind of "
                        "value in every row (e.g. quote numbers that are answers: \"3\").")
    return (f"{path}: its rows do not share one column layout ({str(e)[:200]}). Give every row the same keys with "
            "the same kinds of values.")


def _read_into_arrow(path: Path) -> datasets.Dataset:
    suffix = path.suffix.lower()
    if suffix in (".json", ".csv"):
        return _from_rows(path)
    if suffix == ".arrow":
        return arrow_file(path)
    if path.stat().st_size == 0:
        return datasets.Dataset.from_dict({})
    try:
        with quiet():
            return datasets.load_dataset("json" if suffix == ".jsonl" else "parquet", data_files=str(path),
                                         split="train")
    except Exception:  # noqa: BLE001 - the reader names the bad line or byte
        if suffix == ".jsonl":
            return _from_rows(path)
        raise DataError(f"{path}: not a readable parquet file.") from None


def _files_of(spec: str) -> list[Path]:
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"Data glob {spec!r} matches no file.")
        return files
    p = Path(spec)
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES
                   and not f.name.startswith((".", "cache-")) and f.name != "dataset_info.json")
    if not files:
        raise DataError(f"Data directory {spec!r} holds no {', '.join(SUFFIXES)} file and is not a datasets "
                        "save_to_disk directory.")
    return files


def _hub(spec: str, subset: str | None, split: str, revision: str | None) -> Source:
    offline = os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false")
    try:
        with quiet():
            ds = datasets.load_dataset(spec, subset, split=split, revision=revision)
    except Exception as e:  # noqa: BLE001
        why = ("moetune runs offline by default (HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1)" if offline
               else "loading failed")
        raise DataError(f"Hub dataset {spec!r} (subset {subset!r}, split {split!r}, revision {revision!r}) "
                        f"is no local path, and could not be read from the local HF cache: {why} "
                        f"({str(e).splitlines()[0][:200]}). "
                        "Download it where there is network (datasets.load_dataset then save_to_disk, or the "
                        "parquet files), copy it here and point the data key at the directory; or set "
                        "HF_DATASETS_OFFLINE=0 and HF_HUB_OFFLINE=0 to let moetune download.") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"Hub dataset {spec!r}: give a split (one of {', '.join(ds)}).")
    return Source(ds, ["hub", spec, subset, split, revision, ds._fingerprint], name=spec)


def _disk(p: Path) -> Source:
    ds = open_disk(p)
    state = json.loads((p / "state.json").read_text()) if (p / "state.json").exists() else {}
    return Source(ds, ["disk", str(p.resolve()), state.get("_fingerprint"), [_stat(f) for f in sorted(p.iterdir())]],
                  name=str(p))


def load_source(spec: str, subset: str | None = None, split: str = "train", revision: str | None = None) -> Source:
    """The rows of `spec` as an Arrow dataset (see the module docstring for what `spec` may be)."""
    p = Path(spec)
    if is_hub_id(spec):
        return _hub(spec, subset, split, revision)
    if not any(c in spec for c in "*?[") and not p.exists():
        raise DataError(f"Data file {spec!r} does not exist.")
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
        return _disk(p)
    files = [p] if p.is_file() else _files_of(spec)
    for f in files:
        check_suffix(f)
    parts, spans, start = [], [], 0
    for f in files:
        ds = _read_into_arrow(f)
        if len(ds):
            parts.append(ds)
            spans.append((f, start))
            start += len(ds)
    if not parts:
        return Source(datasets.Dataset.from_dict({}), [_stat(f) for f in files], [], spec)
    try:
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"Data {spec!r}: its files do not share one column layout ({str(e)[:200]}).") from None
    return Source(ds, [_stat(f) for f in files], spans, spec)


# ------------------------------------------------------------------ the sources a recipe names

@dataclass
class Part:
    """One source a recipe's data keys name, with the settings it is read with."""

    key: str                       # the recipe key, for messages: 'train', 'mix[0]', 'validation', 'test'
    spec: str                      # file, glob, directory or hub id
    split: str                     # 'train', 'validation' or 'test'
    cfg: DataConfig                # a mix source's format and columns applied
    domain: str | None = None      # the label of every row (a mix source's `domain`), None: the domain column
    mix: MixSource | None = None   # the mix entry it comes from

    def load(self) -> Source:
        c = self.cfg
        return load_source(self.spec, c.hub_subset, c.hub_split if self.split == "train" else self.split,
                           c.hub_revision)


def mix_config(cfg: DataConfig, src: MixSource) -> DataConfig:
    """The data settings one `data.mix` source is read with (its format, columns and hub keys)."""
    return dataclasses.replace(cfg, train=src.path, format=src.format, hub_subset=src.hub_subset,
                               hub_split=src.hub_split, hub_revision=src.hub_revision, mix=[],
                               **{f"{k}_field": v for k, v in src.columns.items()})


def iter_sources(cfg: DataConfig, splits: tuple[str, ...] = ("train",)) -> Iterator[Part]:
    """The sources of `splits`, in order: train is `data.mix`'s sources when set, else `data.train`;
    a split whose key is None has none."""
    for split in splits:
        if split == "train" and cfg.mix:
            for i, src in enumerate(cfg.mix):
                yield Part(f"mix[{i}]", src.path, "train", mix_config(cfg, src), src.domain, src)
        elif getattr(cfg, split):
            yield Part(split, getattr(cfg, split), split, cfg)


def format_of(src: Source, cfg: DataConfig) -> tuple[formats.Format, DataConfig]:
    """The format of a source (data.format, or detected from its columns) and the settings its rows
    are read with (e.g. Alpaca's `output` column as the response)."""
    if not len(src.ds):
        raise DataError(f"Data {src.name!r} has no rows.")
    try:
        fmt = formats.detect(src.ds.column_names, cfg)
    except DataError as e:
        raise DataError(f"{src.locate(0)}: {e}") from None
    return fmt, fmt.resolve(src.ds.column_names, cfg)


def name_errors(src: Source, fmt: formats.Format, cfg: DataConfig, errors: dict[int, str],
                placeholder: str = formats.ROW) -> list[str]:
    """The messages of bad rows {index: message found on the Arrow row}, written from each row as the
    reader reads it (its own keys, nulls) where the format rejects that too; else the Arrow row's
    message, its `placeholder` replaced by the row's location."""
    raw = src.raw(errors)
    out = []
    for i, msg in errors.items():
        row, loc = raw[i]
        try:
            fmt.to_messages(row, loc, cfg)
            out.append(msg.replace(placeholder, loc))
        except DataError as e:
            out.append(str(e))
    return out


def check_rows(part: Part) -> tuple[int, int]:
    """(rows, bad rows) of a source whose rows its format reads (no tokenizer); the first bad row
    raises unless data.skip_bad_rows. Streams the rows in Arrow batches."""
    src = part.load()
    fmt, cfg = format_of(src, part.cfg)
    bad = 0
    for i, row in src.rows():
        try:
            fmt.to_messages(row, formats.ROW, cfg)
        except DataError as e:
            if not cfg.skip_bad_rows:
                raise DataError(name_errors(src, fmt, cfg, {i: str(e)}, formats.ROW)[0]) from None
            bad += 1
    return len(src.ds), bad


def iter_messages(part: Part, src: Source | None = None, indices: Iterable[int] | None = None
                  ) -> Iterator[tuple[dict, list[dict]]]:
    """(row, messages) of a source's rows (those at `indices`, else all), streamed in row order; a bad row
    raises. `src`: the part already loaded. A preference row gives its prompt + chosen."""
    src = src or part.load()
    fmt, cfg = format_of(src, part.cfg)
    want = None if indices is None else set(int(i) for i in indices)
    for i, row in src.rows():
        if want is not None and i not in want:
            continue
        try:
            yield row, fmt.first_messages(row, formats.ROW, cfg)
        except DataError as e:
            raise DataError(name_errors(src, fmt, cfg, {i: str(e)}, formats.ROW)[0]) from None
