"""The one reader of data files: (row, location) pairs, streamed, exactly as written.

`read_file(path)` reads a .jsonl, .json, .csv, .parquet or .arrow file (or a `datasets`
save_to_disk directory): no column is added to a row that lacks it and a null stays a null,
which is what a message about a bad row must describe. Text is decoded as UTF-8 (a leading
byte-order mark, as Windows editors write, is skipped); a file that is not UTF-8 gets one
message naming its line and byte and how to re-encode it. `moetune.data.sources` builds Arrow
from these readers (or from pyarrow's own, faster, for JSON lines and parquet) and re-reads a bad
row here to describe it.

Locations count from 1: 'line N' is the line of a .jsonl or .csv file, 'item N' the Nth element of
a .json list, 'row N' the Nth row of a parquet, Arrow or save_to_disk source (and of hub data).
"""
from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import datasets

from moetune.core.errors import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")
COUNTING = "counting from 1"


def read_file(path: str | Path) -> Iterator[tuple[dict, str]]:
    """(row, location) of every row of one file (or save_to_disk directory), streamed in order (see the
    module docstring)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"Data file {str(p)!r} does not exist.")
    if p.is_dir():  # a save_to_disk directory
        yield from ((row, f"{p} row {i} ({COUNTING})") for i, row in enumerate(open_disk(p), 1))
        return
    check_suffix(p)
    try:
        yield from READERS[p.suffix.lower()](p)
    except UnicodeDecodeError:
        raise not_utf8(p) from None


def _jsonl(p: Path):
    with p.open(encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors write one) is skipped
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p} line {i}: not valid JSON ({e.msg}).") from None
            if not isinstance(row, dict):
                raise DataError(f"{p} line {i}: each line must be a JSON object, got {type(row).__name__}.")
            yield row, f"{p} line {i}"


def _json(p: Path):
    try:
        data = json.loads(p.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(f"{p} line {e.lineno}: not valid JSON ({e.msg}).") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{p}: expected a JSON list of rows (or {{'data': [...]}}).")
    for i, row in enumerate(data, 1):
        yield row, f"{p} item {i} ({COUNTING})"


def _csv(p: Path):
    # csv.reader's line_num, not a row count: quoted fields may span lines (multi-line answers).
    with p.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        start = reader.line_num + 1
        for rec in reader:
            if rec:  # blank lines are skipped, as csv.DictReader does
                row: dict = dict(zip(header, rec))  # a short row lacks its last columns' keys
                if len(rec) > len(header):
                    row[None] = rec[len(header):]
                yield row, f"{p} line {start}"
            start = reader.line_num + 1


def _parquet(p: Path):
    import pyarrow.parquet as pq
    n = 0
    try:
        batches = pq.ParquetFile(p).iter_batches(batch_size=1000)
        for batch in batches:
            for row in batch.to_pylist():
                n += 1
                yield row, f"{p} row {n} ({COUNTING})"
    except OSError as e:  # pyarrow's ArrowInvalid is an OSError subclass too
        raise DataError(f"{p}: not a readable parquet file ({str(e)[:200]}).") from None


def _arrow(p: Path):
    ds = arrow_file(p)
    for n, row in enumerate(ds, 1):
        yield row, f"{p} row {n} ({COUNTING})"


READERS = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet, ".arrow": _arrow}


def first_bad_byte(path: Path) -> tuple[int, int, int] | None:
    """(line, byte offset, byte) of the first byte of `path` that is not UTF-8, or None."""
    offset = 0
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):  # b'\n' never occurs inside a UTF-8 sequence: lines decode alone
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return n, offset + e.start, raw[e.start]
            offset += len(raw)
    return None


def not_utf8(path: Path) -> DataError:
    """The error for a file that is not UTF-8 text, naming its first undecodable byte."""
    bad = first_bad_byte(path)
    where = f" line {bad[0]} (byte {bad[1]}: 0x{bad[2]:02x})" if bad else ""
    return DataError(
        f"{path}{where}: not UTF-8 text. moetune reads data files as UTF-8; this one was saved in another "
        "encoding (Windows-1252 and Latin-1 are common). Re-encode it to UTF-8, e.g. "
        f"`iconv -f cp1252 -t utf-8 {path} > {path.with_name(path.stem + '-utf8' + path.suffix)}` (with the "
        "encoding it was written in), and point the data key at the new file.")


def check_suffix(p: Path) -> None:
    if p.suffix.lower() not in SUFFIXES:
        raise DataError(f"Data file {str(p)!r}: unsupported type {p.suffix.lower()!r}. Allowed: "
                        f"{', '.join(SUFFIXES)}, a glob or directory of them, a datasets directory or a hub id.")


def arrow_file(path: Path) -> datasets.Dataset:
    """An Arrow file written by `datasets`, memory-mapped."""
    try:
        return datasets.Dataset.from_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: not an Arrow file written by `datasets` ({str(e)[:200]}).") from None


def open_disk(p: Path) -> datasets.Dataset:
    """One split saved by `datasets.Dataset.save_to_disk`, memory-mapped."""
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{p}: not a datasets save_to_disk directory ({e}).") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{p}: holds several splits ({', '.join(ds)}); point to one split's directory.")
    return ds
