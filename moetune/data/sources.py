"""Reading a data source into an Arrow `datasets.Dataset`, with row locations for errors.

A source is a local file (.jsonl, .json, .csv, .parquet, .arrow), a glob of such files, a
directory of shards, a `save_to_disk` directory, or a hub dataset id 'owner/name' resolved
from the local HF cache (moetune runs with HF_DATASETS_OFFLINE=1 unless told otherwise).
JSON lines and parquet go through `datasets.load_dataset` (Arrow, cached by `datasets`);
.json and .csv through the row readers of `moetune.data.rows`, because their exact line numbers
and all-text csv cells matter more than speed there. Every source also gets an `identity`:
what the tokenised cache is keyed on (paths, sizes and mtimes; the dataset fingerprint of
hub and save_to_disk data).
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from moetune.data.rows import DataError, read_rows

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")


@dataclass
class Source:
    """Rows of one source as Arrow, and how to name row i in a message."""

    ds: datasets.Dataset
    identity: list
    files: list[tuple[Path, int]] = field(default_factory=list)   # (file, first row) per file, in order
    name: str = ""

    def locate(self, i: int) -> str:
        """'file line N' (jsonl, csv), 'file item N' (json) or 'file row N' (the rest) of row i."""
        if not self.files:
            return f"{self.name} row {i}"
        path, start = next((p, s) for p, s in reversed(self.files) if s <= i)
        k = i - start
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".csv"):
            return next(loc for j, (_, loc) in enumerate(_iter_locs(path)) if j == k)
        return f"{path} {'item' if suffix == '.json' else 'row'} {k}"


    def locations(self):
        """The location of every row, in order, in one pass over each file."""
        if not self.files:
            yield from (f"{self.name} row {i}" for i in range(len(self.ds)))
            return
        for path, start in self.files:
            if path.suffix.lower() in (".jsonl", ".csv"):
                yield from (loc for _, loc in _iter_locs(path))
            else:
                end = next((s for _, s in self.files if s > start), len(self.ds))
                kind = "item" if path.suffix.lower() == ".json" else "row"
                yield from (f"{path} {kind} {k}" for k in range(end - start))

    def rows(self):
        """(row dict, location) pairs, read in Arrow batches."""
        locs = self.locations()
        for batch in self.ds.iter(batch_size=1000):
            for vals in zip(*batch.values()):
                yield dict(zip(batch, vals)), next(locs)


def source_rows(spec: str, cfg, split: str = "train") -> list[tuple[dict, str]]:
    """All (row, location) pairs of a data key's source (`cfg` a DataConfig: hub settings)."""
    datasets.disable_progress_bars()
    try:
        src = load_source(spec, cfg.hub_subset, cfg.hub_split if split == "train" else split, cfg.hub_revision)
        return list(src.rows())
    finally:
        datasets.enable_progress_bars()


def _iter_locs(path: Path):
    """Row locations of a jsonl/csv file as `read_rows` names them (blank lines skipped)."""
    if path.suffix.lower() == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    yield None, f"{path} line {i}"
    else:
        yield from read_rows(path)


def _stat(p: Path) -> list:
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def is_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return (len(parts) == 2 and all(parts) and not Path(spec).exists() and not any(c in spec for c in "*?[")
            and not spec.lower().endswith(SUFFIXES))


def _from_rows(path: Path) -> datasets.Dataset:
    rows = [r for r, _ in read_rows(path)]
    if not rows:
        return datasets.Dataset.from_dict({})
    try:
        return datasets.Dataset.from_list(rows)
    except Exception as e:  # noqa: BLE001 - pyarrow's many type errors
        raise DataError(f"{path}: its rows do not share one column layout ({str(e)[:200]}). Give every row "
                        "the same keys with the same kinds of values.") from None


def _read_file(path: Path) -> datasets.Dataset:
    suffix = path.suffix.lower()
    if suffix in (".json", ".csv"):
        return _from_rows(path)
    if suffix == ".arrow":
        try:
            return datasets.Dataset.from_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: not an Arrow file written by `datasets` ({str(e)[:200]}).") from None
    builder = "json" if suffix == ".jsonl" else "parquet"
    if path.stat().st_size == 0:
        return datasets.Dataset.from_dict({})
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception:  # noqa: BLE001 - fall back to the row reader, which names the bad line
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


def _check_suffix(p: Path) -> None:
    if p.suffix.lower() not in SUFFIXES:
        raise DataError(f"Data file {str(p)!r}: unsupported type {p.suffix.lower()!r}. Allowed: "
                        f"{', '.join(SUFFIXES)}, a glob or directory of them, a datasets directory or a hub id.")


def _hub(spec: str, subset: str | None, split: str, revision: str | None) -> Source:
    offline = os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false")
    try:
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


def load_source(spec: str, subset: str | None = None, split: str = "train", revision: str | None = None) -> Source:
    """The rows of `spec` as an Arrow dataset (see the module docstring for what `spec` may be)."""
    p = Path(spec)
    if is_hub_id(spec):
        return _hub(spec, subset, split, revision)
    if not any(c in spec for c in "*?[") and not p.exists():
        raise DataError(f"Data file {spec!r} does not exist.")
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{p}: not a datasets save_to_disk directory ({e}).") from None
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"{p}: holds several splits ({', '.join(ds)}); point to one split's directory.")
        state = json.loads((p / "state.json").read_text()) if (p / "state.json").exists() else {}
        return Source(ds, ["disk", str(p.resolve()), state.get("_fingerprint"), [_stat(f) for f in sorted(p.iterdir())]],
                      name=str(p))
    files = [p] if p.is_file() else _files_of(spec)
    for f in files:
        _check_suffix(f)
    parts, spans, start = [], [], 0
    for f in files:
        ds = _read_file(f)
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
