"""Tokenise a source once with batched `Dataset.map`, cache it on disk, serve memory-mapped rows.

`tokenized(spec, tokenizer, cfg)` returns the tokenised rows of a source as an Arrow
dataset with the columns input_ids / labels / prompt_ids (int32 lists), reference, domain,
length, truncated (cut by max_length) and n_targets (labelled tokens after the first, the count the loss is normalised
by). It is saved under `<cache>/<fingerprint>/`, where the fingerprint hashes everything
that changes the tokens: the source's identity (paths, sizes, mtimes or dataset
fingerprint), the data settings (every `DataConfig` field but the few of `NOT_TOKEN_FIELDS`,
so a new setting is keyed unless it is listed there with its reason), the tokenizer (its full
serialisation, special tokens and chat template) and this pipeline's version. A second run
opens the cache memory-mapped without reading the source. The rows become messages through
their format (`moetune.data.formats`) and tokens through `moetune.data.rows.Encoder`.

A preference source (a format with `sequences`, moetune.data.formats) gives one row per PAIR with the
columns chosen_input_ids / chosen_labels / rejected_input_ids / rejected_labels instead of input_ids /
labels (prompt_ids and reference are the chosen side's; length is the longer side's tokens; n_targets the
smaller side's trained tokens, so a prompt that leaves either side no response token within
max_length is dropped and counted, `dropped_no_target`). A pair whose chosen and rejected tokens are
identical is dropped and counted too (`identical_pairs`).

The rows are served as an `ExampleSet` (moetune.data.examples), so the training loop holds no
Python list of every example's tokens.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import uuid
from pathlib import Path

import datasets
import numpy as np

from moetune.core.errors import DataError
from moetune.core.ui import plural
from moetune.data.formats import ROW, Format
from moetune.data.examples import ExampleSet, with_targets
from moetune.data.rows import IGNORE, Encoder, Example
from moetune.data.sources import Source, format_of, iter_sources, load_source, name_errors
from moetune.recipe import DataConfig

VERSION = 4
NOT_TOKEN_FIELDS = {
    "train": "the source's identity (resolved path, size, mtime; a dataset fingerprint) is keyed instead",
    "validation": "as train", "test": "as train",
    "hub_subset": "part of a hub source's identity", "hub_split": "as hub_subset", "hub_revision": "as hub_subset",
    "validation_split": "carves the cached rows", "max_train_examples": "takes from the cached rows",
    "seed": "orders the cached rows", "mix": "each source is cached on its own, with its own settings",
    "cache_dir": "where the cache is, not what it holds", "packing": "batches the cached rows",
    "group_by_length": "batches the cached rows", "num_proc": "the same tokens in any number of processes",
}
"""The DataConfig fields that do not shape a source's tokens, and why; every other field is in the cache
key (`token_settings`), so a new field is keyed unless it is named here."""
FEATURES = datasets.Features({
    "input_ids": datasets.Sequence(datasets.Value("int32")), "labels": datasets.Sequence(datasets.Value("int32")),
    "prompt_ids": datasets.Sequence(datasets.Value("int32")), "reference": datasets.Value("string"),
    "domain": datasets.Value("string"), "length": datasets.Value("int32"), "n_targets": datasets.Value("int32"),
    "truncated": datasets.Value("bool"), "error": datasets.Value("string")})
PAIR_FEATURES = datasets.Features({
    **{f"{side}_{k}": datasets.Sequence(datasets.Value("int32")) for side in ("chosen", "rejected")
       for k in ("input_ids", "labels")},
    **{k: v for k, v in FEATURES.items() if k not in ("input_ids", "labels")}, "identical": datasets.Value("bool")})
"""The columns of a preference source (see the module docstring)."""
datasets.utils.logging.set_verbosity_error()
PLACEHOLDER = [{"role": "completion", "content": "x"}]  # stands in for a bad row until it is dropped


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    if os.environ.get("MOETUNE_DATA_CACHE"):
        return Path(os.environ["MOETUNE_DATA_CACHE"])
    return Path(os.environ.get("MOETUNE_HOME", Path.home() / ".cache" / "moetune")) / "datasets"


def tokenizer_fingerprint(tok) -> str:
    """Hash of what decides a tokenizer's output: its serialisation, special tokens, chat template."""
    cached = getattr(tok, "_moetune_fingerprint", None)
    if cached:
        return cached
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(repr((type(tok).__name__, tok.chat_template, tok.bos_token, tok.eos_token, tok.pad_token,
                   tok.all_special_tokens, getattr(tok, "add_bos_token", None))).encode())
    fp = h.hexdigest()[:16]
    try:
        tok._moetune_fingerprint = fp
    except AttributeError:
        pass
    return fp


def token_settings(cfg: DataConfig) -> dict:
    """The data settings that shape tokens: every DataConfig field but those of NOT_TOKEN_FIELDS."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in NOT_TOKEN_FIELDS}


def cache_key(identity: list, tokenizer_fp: str, cfg: DataConfig, domain: str | None) -> str:
    """The cache entry of a source: its identity, the token-shaping settings, the domain label, the
    tokenizer and this pipeline's version."""
    key = {"v": VERSION, "source": identity, "data": token_settings(cfg), "domain": domain, "tokenizer": tokenizer_fp}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _n_targets(e: Example) -> int:
    """Labelled tokens after the first (what the loss sees)."""
    return len(e.labels) - 1 - e.labels[1:].count(IGNORE) if e.labels else 0


def _encode_fn(tok, cfg: DataConfig, fmt: Format, domain: str | None):
    """The batched map function: rows -> FEATURES columns (PAIR_FEATURES for a format with `sequences`)."""
    enc = Encoder(tok, cfg)
    names = fmt.sequences or ("",)

    def fn(batch: dict) -> dict:
        rows = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
        msgs = {n: [] for n in names}
        pieces = {n: [] for n in names}
        domains, errors = [], []
        for row in rows:
            try:
                m = fmt.to_messages(row, ROW, cfg)
                m = m if fmt.sequences else {"": m}
                p, err = {n: enc.segments(m[n]) for n in names}, ""
            except DataError as e:
                m, err = {n: PLACEHOLDER for n in names}, str(e) if ROW in str(e) else f"{ROW}: {e}"
                p = {n: enc.segments(PLACEHOLDER) for n in names}
            for n in names:
                msgs[n].append(m[n])
                pieces[n].append(p[n])
            errors.append(err)
            domains.append(domain or str(row.get(cfg.domain_field) or "all"))
        full = {n: [] for n in names}
        enc_rows = {n: enc.encode_batch(msgs[n], domains, full[n], pieces[n]) for n in names}
        out = {k: [] for k in (PAIR_FEATURES if fmt.sequences else FEATURES)}
        for i, err in enumerate(errors):
            side = {n: enc_rows[n][i] for n in names}
            for n, e in side.items():
                out[f"{n}_input_ids" if n else "input_ids"].append(e.input_ids)
                out[f"{n}_labels" if n else "labels"].append(e.labels)
            first = side[names[0]]
            out["prompt_ids"].append(first.prompt_ids)
            out["reference"].append(first.reference)
            out["domain"].append(first.domain)
            out["length"].append(max(len(e.input_ids) for e in side.values()))
            out["n_targets"].append(min(_n_targets(e) for e in side.values()))
            out["truncated"].append(any(full[n][i] > cfg.max_length for n in names))
            out["error"].append(err)
            if fmt.sequences:  # the same tokens on both sides, each with a response token (else: no response)
                out["identical"].append(len({tuple(e.input_ids) for e in side.values()}) == 1 and out["n_targets"][-1] > 0)
        return out
    return fn


def _tokenize(src: Source, tok, cfg: DataConfig, domain: str | None, work: Path) -> tuple[datasets.Dataset, dict]:
    ds = src.ds
    fmt, cfg = format_of(src, cfg)
    n = len(ds)
    num_proc = cfg.num_proc or (min(os.cpu_count() or 1, 8) if n >= 20_000 else 1)
    try:
        out = ds.map(_encode_fn(tok, cfg, fmt, domain), batched=True, batch_size=1000, remove_columns=ds.column_names,
                     features=PAIR_FEATURES if fmt.sequences else FEATURES, num_proc=num_proc if num_proc > 1 else None, desc="tokenising",
                     cache_file_name=str(work / "tokens.arrow"))  # not beside the source: deleted once saved
    except UnicodeDecodeError:
        raise src.not_utf8() from None
    errors = out.data.column("error").to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(errors != "")
    info = {"rows": n, "bad_rows": int(len(bad)), "bad_examples": [], "format": fmt.name}
    if len(bad):
        named = name_errors(src, fmt, cfg, {int(i): str(errors[i]) for i in bad[:5]}, ROW)
        if not cfg.skip_bad_rows:
            raise DataError(named[0] + (f" ({plural(len(bad), 'bad row')} in all; data.skip_bad_rows: true skips and "
                                        "counts them.)" if len(bad) > 1 else ""))
        info["bad_examples"] = named
    if fmt.sequences:  # a pair with identical chosen and rejected tokens teaches nothing: skipped and counted
        same = out.data.column("identical").to_numpy(zero_copy_only=False) & (errors == "")
        info["identical_pairs"] = int(same.sum())
        errors = np.where(same, "identical", errors)
        out = out.remove_columns("identical")
    if (errors != "").any():
        out = out.select(np.flatnonzero(errors == ""))
    return out.remove_columns("error"), info


def tokenized(spec: str, tok, cfg: DataConfig, split: str = "train", domain: str | None = None
              ) -> tuple[datasets.Dataset, dict]:
    """Tokenised rows of `spec` (from the cache when the fingerprint matches) and the build info;
    `domain` labels every row (None: the domain column)."""
    hub_split = cfg.hub_split if split == "train" else split
    datasets.disable_progress_bars()  # shown only for big sources, below
    try:
        src = load_source(spec, cfg.hub_subset, hub_split, cfg.hub_revision)
        if len(src.ds) == 0:
            raise DataError(f"Data file {spec!r} has no rows.")
        path = cache_root(cfg) / cache_key(src.identity, tokenizer_fingerprint(tok), cfg, domain)
        if (path / "moetune.json").exists():
            try:
                return datasets.load_from_disk(str(path / "data")), json.loads((path / "moetune.json").read_text())
            except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt
                shutil.rmtree(path, ignore_errors=True)
        if len(src.ds) >= 50_000:
            datasets.enable_progress_bars()
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        (tmp / "map").mkdir(parents=True)
        try:
            ds, info = _tokenize(src, tok, cfg, domain, tmp / "map")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a half-built entry of our own
            raise
        info["source"] = spec
        ds.save_to_disk(str(tmp / "data"))
        del ds
        shutil.rmtree(tmp / "map", ignore_errors=True)
    finally:
        datasets.enable_progress_bars()
    (tmp / "moetune.json").write_text(json.dumps(info, indent=1))
    try:
        tmp.rename(path)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(path / "data")), info


def load_examples(path: str, tokenizer, cfg: DataConfig, split: str = "train") -> ExampleSet:
    """A held-out source; preference pairs that cannot be scored (no response token) are dropped and counted."""
    ds, info = tokenized(path, tokenizer, cfg, split)
    es = ExampleSet(ds, info=info)
    return with_targets(es) if es.pairs else es


def sample_positions(n: int, max_rows: int | None, seed: int) -> list[int]:
    """All of range(n), or a seeded sorted sample of `max_rows` of them (cluster-heads' --max-rows)."""
    if max_rows and n > max_rows:
        return sorted(random.Random(seed).sample(range(n), max_rows))
    return list(range(n))


def source_rows(cfg: DataConfig, tokenizer, max_rows: int | None, seed: int) -> list[Example]:
    """The tokenised training rows at `sample_positions` over every row of every training source in order
    (data.mix's sources before their weights and caps, else data.train): the rows, one for one, whose prompts
    `commands/cluster.example_texts` reads with the same max_rows and seed. A source with rows that training
    skips (data.skip_bad_rows) raises a DataError: its positions would not line up with the texts."""
    parts = []
    for part in iter_sources(cfg, ("train",)):
        ds, info = tokenized(part.spec, tokenizer, part.cfg, part.split, part.domain)
        skipped = int(info.get("rows", len(ds))) - len(ds)
        if skipped:
            raise DataError(f"Data {part.spec!r}: training skips {plural(skipped, 'row')} of {info.get('rows')} "
                            f"({int(info.get('bad_rows', 0))} bad with data.skip_bad_rows, "
                            f"{plural(int(info.get('identical_pairs', 0)), 'identical preference pair')}), so "
                            "clustered prompts cannot be matched to the tokenised rows for a router init. Allowed: clean data "
                            "(`moetune data inspect` names the bad rows), or no clustered router init.")
        parts.append(ExampleSet(ds, info=info))
    rows, start = [], 0
    positions = sample_positions(sum(len(es) for es in parts), max_rows, seed)
    for es in parts:
        mine = [i - start for i in positions if start <= i < start + len(es)]
        rows += es.take(mine) if mine else []
        start += len(es)
    return rows


def mix_counts(sizes: list[int], weights: list[float] | None) -> list[int]:
    """Rows taken from each source: as is, or the total shared out by weight (largest remainders)."""
    if not weights:
        return list(sizes)
    total, w = sum(sizes), np.asarray(weights, dtype=float)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def load_mix(cfg: DataConfig, tokenizer) -> ExampleSet:
    """The `data.mix` sources, each tokenised (and cached) on its own, as one ExampleSet."""
    parts, infos = [], []
    for part in iter_sources(cfg, ("train",)):
        ds, info = tokenized(part.spec, tokenizer, part.cfg, part.split, part.domain)
        parts.append(ds)
        infos.append(info)
    sizes = [min(len(d), s.max_rows or len(d)) for d, s in zip(parts, cfg.mix)]
    counts = mix_counts(sizes, [s.weight for s in cfg.mix] if cfg.mix[0].weight is not None else None)
    rows, offset = [], 0
    for i, (d, size, n) in enumerate(zip(parts, sizes, counts)):
        pool = shuffled(len(d), cfg.seed + 7919 * (i + 1))[:size]          # the seeded max_rows sample
        reps = np.concatenate([pool] * (n // size) + [pool[: n % size]]) if size else pool[:0]
        rows.append(np.sort(reps) + offset)
        offset += len(d)
    table = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    info = {"rows": sum(i["rows"] for i in infos), "bad_rows": sum(i["bad_rows"] for i in infos),
            "bad_examples": sum((i["bad_examples"] for i in infos), [])[:5], "format": "mix",
            "sources": [{"path": s.path, "rows": i["rows"], "taken": n, "format": i["format"]}
                        for s, i, n in zip(cfg.mix, infos, counts)]}
    return ExampleSet(table, np.concatenate(rows), info)


def shuffled(n: int, seed: int) -> np.ndarray:
    """The seeded permutation of range(n) (the same one `random.Random(seed).shuffle` gives a list)."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return np.asarray(idx, dtype=np.int64)


def load_splits(cfg: DataConfig, tokenizer, need: tuple[str, ...] = ("train", "validation", "test")
                ) -> dict[str, ExampleSet]:
    """train / validation / test examples (validation carved off train when not given)."""
    splits: dict[str, ExampleSet] = {}
    train = None
    if "train" in need or ("validation" in need and not cfg.validation):
        full = load_mix(cfg, tokenizer) if cfg.mix else load_examples(cfg.train, tokenizer, cfg, "train")
        train = full.view(shuffled(len(full), cfg.seed))
    if "validation" in need or "train" in need:
        if cfg.validation:
            splits["validation"] = load_examples(cfg.validation, tokenizer, cfg, "validation")
        else:
            k = int(len(train) * cfg.validation_split)  # 0 disables validation
            splits["validation"], train = train[:k], train[k:]
    if "train" in need:
        if cfg.max_train_examples:
            train = train[: cfg.max_train_examples]
        train = with_targets(train)
        if not len(train):
            raise DataError(f"No training example keeps a response token within data.max_length={cfg.max_length} "
                            f"({train.info.get('dropped_no_target', 0)} dropped). Raise data.max_length.")
        splits["train"] = train
    if "test" in need and cfg.test:
        splits["test"] = load_examples(cfg.test, tokenizer, cfg, "test")
    return splits



def data_summary(splits: dict) -> dict:
    """Per split: examples used, source rows, bad rows skipped (the first few named), and for preference
    pairs those skipped as identical or without a response token, for summary.json."""
    out = {}
    for name, es in splits.items():
        info = getattr(es, "info", None) or {}
        out[name] = {"examples": len(es), "source_rows": info.get("rows"), "bad_rows_skipped": info.get("bad_rows", 0),
                     **({"bad_examples": info["bad_examples"]} if info.get("bad_examples") else {}),
                     **({"identical_pairs_skipped": info["identical_pairs"]} if info.get("identical_pairs") else {}),
                     **({"no_response_skipped": info["dropped_no_target"]} if info.get("dropped_no_target") else {})}
    return out


def skip_lines(summary: dict) -> list[str]:
    """One log line per split of `data_summary(...)` that skipped rows: how many, and why."""
    lines = []
    for name, d in summary.items():
        if d["bad_rows_skipped"]:
            lines.append(f"data.{name}: {plural(d['bad_rows_skipped'], 'bad row')} skipped, e.g. {d['bad_examples'][0]}")
        if d.get("identical_pairs_skipped"):
            lines.append(f"data.{name}: {plural(d['identical_pairs_skipped'], 'pair')} with identical chosen and "
                         "rejected tokens skipped")
        if d.get("no_response_skipped"):
            lines.append(f"data.{name}: {plural(d['no_response_skipped'], 'row')} with no response token within "
                         "data.max_length skipped")
    return lines
