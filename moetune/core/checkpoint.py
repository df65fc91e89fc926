"""Atomic, pickle-free checkpoints: adapter, optimizer, scheduler, RNG and data position.

Every tensor goes to safetensors, everything else to JSON. A checkpoint directory is
written under a temporary name and renamed into place, so a run killed at any moment
leaves earlier checkpoints intact; `latest` finds the newest complete one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from moetune.core.files import atomic_file, ordinary_modes

DONE = "COMPLETE"
MANIFEST = "MANIFEST.json"   # {file: {bytes, sha256}}, written after the files, before DONE


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then the directories, to disk (so a rename never exposes unwritten data)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_dir(final: str | Path):
    """Yield a temp dir beside `final`; on success give it and its files the modes ordinary writes get
    (`ordinary_modes`: the umask, not mkdtemp's 0700), flush it to disk and swap it into place (old copy
    removed after). A failure anywhere (disk full, read-only) removes the temp dir and leaves `final`
    as it was: an existing copy is put back, a new one never appears half-written."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    old = None
    try:
        yield tmp
        ordinary_modes(tmp)
        _fsync_tree(tmp)
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists():
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def finite(obj):
    """`obj` with every NaN or infinite float replaced by None (JSON has no NaN: a file holding one is not JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically (core.files.atomic_file); NaN and infinities are written as null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(finite(obj), f, indent=2, default=str, allow_nan=False)
        f.write("\n")


def _optimizer_to_files(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": opt_state["param_groups"], "state": {}}
    for idx, st in opt_state["state"].items():
        meta["state"][str(idx)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
                meta["state"][str(idx)][k] = "tensor"
            else:
                meta["state"][str(idx)][k] = v
    return tensors, meta


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for idx, st in meta["state"].items():
        state[int(idx)] = {k: (tensors[f"{idx}.{k}"] if v == "tensor" else v) for k, v in st.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    v, s, g = meta["python"]
    random.setstate((v, tuple(s), g))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))


def save_checkpoint(run_dir: str | Path, step: int, adapter: dict[str, torch.Tensor], optimizer, scheduler,
                    position: dict, keep: int = 2) -> Path:
    """Write checkpoints/step-XXXXXXX atomically, then prune to the `keep` newest."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    with atomic_dir(final) as tmp:
        save_file(adapter, str(tmp / "adapter.safetensors"))
        opt_t, opt_meta = _optimizer_to_files(optimizer.state_dict())
        save_file(opt_t, str(tmp / "optimizer.safetensors"))
        rng_t, rng_meta = rng_state()
        save_file(rng_t, str(tmp / "rng.safetensors"))
        meta = {"step": step, "position": position, "optimizer": opt_meta, "rng": rng_meta,
                "scheduler": scheduler.state_dict()}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1, default=str))
        write_json(tmp / MANIFEST, {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                                    for p in sorted(tmp.iterdir()) if p.is_file()})
        (tmp / DONE).write_text("ok\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(path: str | Path) -> str | None:
    """None if the checkpoint at `path` is whole, else why not: a file missing, of the wrong size or
    content (against MANIFEST.json, when the checkpoint has one), or that does not parse."""
    path = Path(path)
    if not (path / DONE).is_file():
        return f"no {DONE} marker"
    try:
        manifest = json.loads((path / MANIFEST).read_text()) if (path / MANIFEST).is_file() else {}
        for name, want in manifest.items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != want["bytes"]:
                return f"{name} has {f.stat().st_size} bytes, {want['bytes']} written"
            if _sha256(f) != want["sha256"]:
                return f"{name} does not match its sha256"
        load_checkpoint(path)
    except Exception as e:  # truncated safetensors, bad JSON, unreadable file: all mean "do not use"
        return f"{type(e).__name__}: {e}"
    return None


def newest_verified_checkpoint(run_dir: str | Path, warn=print) -> tuple[Path | None, dict | None, list[str]]:
    """(path, loaded state, problems) of the newest checkpoint that verifies, newest first; `warn` is told
    about each damaged one skipped. (None, None, problems) when none verifies. Nothing is applied to a
    model here: the state is fully loaded first, so a damaged file never leaves a half-loaded run."""
    problems = []
    for p in sorted((Path(run_dir) / "checkpoints").glob("step-*"), reverse=True):
        if not p.is_dir() or not (p / DONE).is_file():
            continue
        why = verify_checkpoint(p)
        if why is None:
            return p, load_checkpoint(p), problems
        problems.append(f"{p.name}: {why}")
        warn(f"--resume: checkpoint {p} is damaged ({why}); trying an older one.")
    return None, None, problems


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Newest complete checkpoint directory, or None."""
    done = sorted(p for p in (Path(run_dir) / "checkpoints").glob("step-*") if (p / DONE).is_file())
    return done[-1] if done else None


def load_checkpoint(path: str | Path) -> dict:
    """{'step', 'position', 'adapter', 'optimizer' (state_dict), 'scheduler', 'rng': (tensors, meta)}."""
    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    return {
        "step": meta["step"], "position": meta["position"], "scheduler": meta["scheduler"],
        "adapter": load_file(str(path / "adapter.safetensors")),
        "optimizer": _optimizer_from_files(load_file(str(path / "optimizer.safetensors")), meta["optimizer"]),
        "rng": (load_file(str(path / "rng.safetensors")), meta["rng"]),
    }
