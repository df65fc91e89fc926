"""Guarding a run directory: never lose a run, never write one twice at once, fail before training.

`moetune train` (stages.run_recipe) calls `open_run` before loading any model:
- a write probe: an output_dir that cannot be created or written (read-only, not a directory,
  no space left for a small file) is a RecipeError before anything trains;
- a lock: `<output_dir>/.moetune.lock`, held with `fcntl.flock` for the whole run and naming its
  holder (pid, host, start time). A second `moetune train` into the same directory refuses. The OS
  drops the lock when its process dies, however it dies, so a killed run never leaves it stuck
  (the file stays, harmlessly; only a live holder blocks);
- an existing run (checkpoints, an adapter, MoLE experts, metrics or a train summary) without
  `--resume` is refused, naming its last step; with `--overwrite` it is moved aside, intact, to
  `<output_dir>.old-<UTC time>` and the new run starts in the emptied directory. Nothing is deleted.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moetune.core.checkpoint import DONE
from moetune.core.errors import Interrupted, RecipeError, Terminated
from moetune.recipe import Recipe, load_run_recipe, to_dict

LOCK = ".moetune.lock"
PROBE_BYTES = 1 << 20   # the write probe: 1 MiB, fsynced, then removed


def _unwritable(key: str, path: Path, err: OSError) -> RecipeError:
    return RecipeError(f"Recipe key '{key}' is {str(path)!r}, which cannot be written "
                       f"({type(err).__name__}: {err.strerror or err}). Nothing was trained. Allowed: a directory "
                       f"that can be created and written, with free space (e.g. {key}=runs/NAME).")


def probe_write(path: str | Path, key: str = "output_dir") -> None:
    """Create `path` if needed and write, fsync and remove a 1 MiB file in it; RecipeError if that fails."""
    path = Path(path)
    probe = path / f".moetune-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise _unwritable(key, path, e) from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def _last_step(d: Path) -> int | None:
    """The newest step the run in `d` recorded: its newest checkpoint, else its summary, else its metrics."""
    steps = [int(p.name.split("-")[1]) for p in (d / "checkpoints").glob("step-*")
             if (p / DONE).is_file() and p.name.split("-")[1].isdigit()]
    if steps:
        return max(steps)
    try:
        return int(json.loads((d / "summary.json").read_text())["train"]["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]
        return max((int(r["step"]) for r in rows if "step" in r), default=None)
    except (OSError, ValueError, TypeError):
        return None


def existing_run(d: str | Path) -> str | None:
    """A one-line description of the run already in `d` (its last step and what it holds), or None."""
    d = Path(d)
    held = [name for name, there in (
        ("checkpoints", any((d / "checkpoints").glob("step-*"))),
        ("adapter", (d / "adapter").is_dir()),
        ("MoLE experts", (d / "experts").is_dir()),
        ("metrics", (d / "metrics.jsonl").is_file() and (d / "metrics.jsonl").stat().st_size > 0),
        ("a train summary", "train" in _summary(d)),
    ) if there]
    if not held:
        return None
    step = _last_step(d)
    return f"{'a run' if step is None else f'a run at step {step}'} ({', '.join(held)})"


def _summary(d: Path) -> dict:
    try:
        s = json.loads((d / "summary.json").read_text())
        return s if isinstance(s, dict) else {}
    except (OSError, ValueError):
        return {}


def move_aside(d: Path) -> Path:
    """Move everything in `d` but the lock file into a new sibling `<d>.old-<UTC time>`; return it."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside, n = d.parent / f"{d.name}.old-{stamp}", 1
    while aside.exists():
        aside, n = d.parent / f"{d.name}.old-{stamp}-{n}", n + 1
    aside.mkdir()
    for entry in d.iterdir():
        if entry.name != LOCK:
            os.replace(entry, aside / entry.name)
    return aside


@contextmanager
def run_lock(d: str | Path):
    """Hold `<d>/.moetune.lock` (flock, released by the OS if the process dies); RecipeError if a live
    process holds it. Yields the lock file's path."""
    path = Path(d) / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask, as open() gives
    except OSError as e:
        raise _unwritable("output_dir", Path(d), e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise RecipeError(f"output_dir {str(d)!r} is in use by another moetune run ({holder}; lock file "
                              f"{path}). Two runs must not write one directory. Allowed: wait for it to finish, "
                              "or choose another output_dir=... . A killed run releases the lock by itself.") from None
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode() + b"\n", 0)
        yield path
    finally:
        os.close(fd)   # closing the descriptor releases the flock


def refuse_or_clear(d: Path, resume: bool, overwrite: bool) -> Path | None:
    """No run in `d`, or --resume: nothing to do. A run and --overwrite: move it aside (returned).
    A run and neither flag: RecipeError naming it and both ways forward."""
    if resume and overwrite:
        raise RecipeError("--resume and --overwrite contradict each other: --resume continues the run in output_dir, "
                          "--overwrite starts a new one (moving the old one aside). Allowed: one of them.")
    found = existing_run(d)
    if found is None or resume:
        return None
    if overwrite:
        return move_aside(d)
    raise RecipeError(f"output_dir {str(d)!r} already holds {found}. Nothing was changed. Allowed: "
                      f"`moetune train RECIPE --resume` to continue it from its newest checkpoint; "
                      f"`--overwrite` to start over (the old run is moved aside to {d.name}.old-<UTC time>, "
                      "not deleted); or another output_dir=... .")


RESUME_NEUTRAL = ("output_dir", "stages", "eval.", "merge.", "export.", "model.device", "model.attn_implementation",
                  "model.trust_remote_code", "data.test", "data.cache_dir", "data.num_proc", "train.eval_before",
                  "train.eval_every", "train.save_every", "train.keep_checkpoints", "train.log_every",
                  "train.stop_after", "train.report_to", "train.logging_dir", "train.gradient_checkpointing",
                  "train.distributed")
"""Recipe keys (a trailing '.': a whole section) that a resumed run may change without training differently
from a fresh run: where and how often it writes and logs, what is scored and exported, the device, and
the settings that compute the same update another way (activation checkpointing, DDP / FSDP; both tested
equal). Every other key changes what training computes."""


def _flat(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out
    return {prefix.rstrip("."): obj}


def recipe_changes(old: Recipe, new: Recipe) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of every key whose value differs (a key one recipe lacks: None)."""
    a, b = _flat(to_dict(old)), _flat(to_dict(new))
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def changes_training(key: str) -> bool:
    """Whether changing recipe key `key` on --resume makes the run differ from a fresh one (`RESUME_NEUTRAL`)."""
    return not any(key == n or (n.endswith(".") and key.startswith(n)) for n in RESUME_NEUTRAL)


STARTED = ("recipe.yaml", "summary.json", "metrics.jsonl", LOCK)
"""What a run writes into output_dir before its first checkpoint (see `forget_failed_start`)."""


def before_start(d: str | Path) -> tuple[set[str] | None, Path | None]:
    """What `forget_failed_start` needs to know of `d` before a run starts: the names it holds (None: it does not
    exist) and the topmost of it and its parents that does not exist yet (None: it exists)."""
    d = Path(os.path.abspath(d))
    if d.is_dir():
        return {p.name for p in d.iterdir()}, None
    top = d
    while not top.parent.exists():
        top = top.parent
    return None, top


def forget_failed_start(d: str | Path, held: set[str] | None, created: Path | None) -> bool:
    """After a run failed or was stopped: when it wrote no training output (`existing_run` is None), remove the
    files it wrote at its start (`STARTED`, those not there before) and the directories it created, if that
    leaves them empty. A directory that held something before keeps it. True when the directory went."""
    d = Path(os.path.abspath(d))
    if not d.is_dir() or existing_run(d) is not None:
        return False
    for name in STARTED:
        if held is None or name not in held:
            (d / name).unlink(missing_ok=True)
    if created is None or any(d.iterdir()):
        return False
    while True:
        d.rmdir()
        if d == created or any(d.parent.iterdir()):
            break
        d = d.parent
    return True


def stop_signal(e: BaseException) -> int | None:
    """The signal behind an exception that stopped a run: Ctrl-C (KeyboardInterrupt), SIGTERM (Terminated), or
    the one Interrupted names; None for any other exception."""
    if isinstance(e, KeyboardInterrupt):
        return signal.SIGINT
    if isinstance(e, (Terminated, Interrupted)):
        return e.signum
    return None


def interrupted(d: str | Path, e: BaseException, signum: int, removed: bool) -> Interrupted:
    """The Interrupted a stopped run ends with: what it kept in run directory `d` and whether --resume can go on."""
    d = Path(d)
    if removed:
        return Interrupted(signum, "nothing had been trained; the run directory made for it was removed.")
    steps = sorted(p for p in (d / "checkpoints").glob("step-*") if (p / DONE).is_file())
    text = e.message if isinstance(e, Interrupted) and e.message else ""
    if not text and steps:
        text = f"the newest checkpoint is {steps[-1]} (step {int(steps[-1].name.split('-')[1])})."
    if "train" in _summary(d) and not _summary(d)["train"].get("stopped"):
        text += f" Training had finished (the adapter is in {d / 'adapter'}); not every later stage ran."
    if not text:
        text = f"nothing was kept in {d} that --resume could continue from."
    return Interrupted(signum, text.strip(), step=getattr(e, "step", None), resumable=bool(steps))


def check_resume_recipe(d: str | Path, recipe: Recipe, allow_changes: bool, log=print) -> list[tuple]:
    """On --resume: compare `recipe` with the run's recipe.yaml. No difference: nothing to do. Differences that
    change what training computes (`recipe.changes_training`) are a RecipeError naming them, unless
    `allow_changes`; the others are named and accepted. Returns the differences; when there are any, the main
    process keeps the old recipe.yaml as recipe.before-<UTC time>.yaml (`keep_old_recipe`)."""
    d = Path(d)
    if not (d / "recipe.yaml").is_file():
        return []
    try:
        old = load_run_recipe(d)
    except RecipeError as e:
        raise RecipeError(f"--resume: the recipe.yaml of the run in {d} no longer loads ({e}). Allowed: fix it, or "
                          "start a new run (another output_dir=..., or --overwrite).") from None
    old.output_dir = recipe.output_dir
    changes = recipe_changes(old, recipe)
    if not changes:
        return []
    text = "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in changes)
    training = [k for k, _, _ in changes if changes_training(k)]
    if training and not allow_changes:
        raise RecipeError(
            f"--resume: the recipe differs from the one the run in {str(d)!r} was trained with (its recipe.yaml): "
            f"{text}. {', '.join(training)} change{'s' if len(training) == 1 else ''} what training computes, so "
            "the resumed run would match a fresh run of neither recipe. Nothing was changed. Allowed: resume with "
            f"the run's own recipe (`moetune train {d / 'recipe.yaml'} --resume`, adding only keys training does "
            "not see, such as eval.*, export.*, train.save_every); add --allow-changes to continue with the new "
            "values anyway (the old recipe is kept as recipe.before-<UTC time>.yaml); or start a new run "
            "(another output_dir=..., or --overwrite).")
    log(f"--resume: recipe changes against {d / 'recipe.yaml'}: {text}"
        + (" (--allow-changes: training continues with the new values)" if training else ""))
    return changes


def _show(value) -> str:
    return "null" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def keep_old_recipe(d: str | Path) -> Path:
    """Copy `<d>/recipe.yaml` to a new `<d>/recipe.before-<UTC time>.yaml` (before a resumed run rewrites it)."""
    d = Path(d)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    kept, n = d / f"recipe.before-{stamp}.yaml", 1
    while kept.exists():
        kept, n = d / f"recipe.before-{stamp}-{n}.yaml", n + 1
    kept.write_text((d / "recipe.yaml").read_text())
    return kept


@contextmanager
def open_run(d: str | Path, resume: bool = False, overwrite: bool = False, extra_dirs: tuple = (),
             log=print):
    """Probe, lock, then refuse or move aside (see the module docstring); held for the body of the `with`.
    extra_dirs: (recipe key, directory) pairs also probed, e.g. ('export.dir', path)."""
    d = Path(d)
    probe_write(d)
    for key, path in extra_dirs:
        probe_write(path, key)
    with run_lock(d):
        aside = refuse_or_clear(d, resume, overwrite)
        if aside is not None:
            log(f"--overwrite: the previous run in {d} was moved to {aside}")
        yield aside
