"""`moetune compare`: the runs. One job per variant and seed, run in this process or in parallel workers.

A job trains and scores one run (`stages.run_recipe`, stages [train, eval]) into `<out>/runs/<variant>-s<seed>`,
or builds the adapter of a derived variant from another run's per-domain LoRAs (merge:, expert:) and scores
it. What a job finds in its directory decides what it does, so an interrupted comparison continues:

  done     eval.json holds per-example results and summary.json the scores  -> reused as it is
  trained  the adapter and a finished training summary, no scores           -> scored (stages [eval])
  partial  a checkpoint that verifies                                      -> training resumes from it
  other    a run without a usable checkpoint                                -> moved aside (<dir>.old-<time>,
                                                                             never deleted), trained afresh
  empty    nothing                                                         -> trained

With `--jobs N` (N > 1) each job runs in its own process (`python -m moetune.commands.compare_jobs JOB.json`,
its output in `<out>/logs/<job>.log`), at most N at a time, a job only after the jobs it reads from; each
gets OMP_NUM_THREADS = (OMP_NUM_THREADS or the CPU count) // N, and with several GPUs the processes take
them in turn (CUDA_VISIBLE_DEVICES). Several processes on one GPU share it. The first Ctrl-C (SIGINT) or
SIGTERM starts no new run and stops the running ones at a checkpoint (`_stop_workers`); --resume continues.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moetune.commands.stages import run_recipe
from moetune.core.checkpoint import newest_verified_checkpoint, write_json
from moetune.core.errors import Interrupted, RecipeError, Terminated
from moetune.core.files import read_json_object
from moetune.core.ui import console, plural, simple_progress
from moetune.export.multimerge import GATED, merge_command
from moetune.recipe import recipe_from_dict
from moetune.recipe.paths import anchor_paths
from moetune.run.rundir import existing_run
from moetune.train.signals import NAMES, StopRequest, raise_terminated, signal_name


@dataclass
class Job:
    """One run of a comparison."""

    id: str                        # '<variant>-s<seed>'
    variant: str
    seed: int
    kind: str                      # 'type' | 'recipe' (train) | 'merge' | 'expert' (derived)
    run_dir: str
    recipe: dict                   # the run's recipe (derived kinds: the source run's)
    source_dir: str | None = None  # the run whose per-domain LoRAs it uses (derived; shared experts)
    options: dict = field(default_factory=dict)   # derived kinds: method / domain and merge options
    after: list[str] = field(default_factory=list)


def state(job: Job) -> str:
    """'done', 'trained', 'partial', 'other' or 'empty' (the module docstring)."""
    d = Path(job.run_dir)
    ev, s = read_json_object(d / "eval.json"), read_json_object(d / "summary.json")
    if "per_example" in ev and "after" in s:
        return "done"
    if (d / "adapter").is_dir() and (job.kind not in ("type", "recipe") or not (s.get("train") or {}).get("stopped", True)):
        return "trained"
    if any((d / "checkpoints").glob("step-*")):
        return "partial"
    return "other" if existing_run(d) else "empty"



def experts_of(run_dir: str) -> tuple[list[str], list[str]]:
    """(adapter directories, domains) of the per-domain LoRAs a run trained (its experts/experts.json)."""
    info = read_json_object(Path(run_dir) / "experts" / "experts.json")
    if not info:
        raise RecipeError(f"{run_dir} has no trained per-domain LoRAs (experts/experts.json); its run did not finish.")
    return [info[d]["adapter"] for d in sorted(info)], sorted(info)


def job_recipe(job: Job, data: dict | None = None):
    """The Recipe of a job's recipe dict (default `job.recipe`), its relative input paths made absolute against
    the working directory, as `moetune train` records them: the run's recipe.yaml then names the same files
    from anywhere, and a resumed run's recipe equals the one it was trained with."""
    data = anchor_paths(copy.deepcopy(job.recipe if data is None else data), [Path.cwd()])
    return recipe_from_dict(data, source=f"run {job.id}")


def _train_recipe(job: Job):
    data = job.recipe
    if job.source_dir:  # the same per-domain LoRAs as another variant: mix those, train none
        dirs, names = experts_of(job.source_dir)
        data = {**data, "expert": recipe_from_dict(data).expert.over_trained_experts(dirs, names)}
    return job_recipe(job, data)


def _derived_adapter(job: Job) -> None:
    """Write the derived variant's adapter into <run>/adapter: a merge of the source's LoRAs, or one of them."""
    out = Path(job.run_dir) / "adapter"
    if (out / "adapter_config.json").is_file():
        return
    opts = job.options
    if job.kind == "merge" and opts["method"] == GATED:  # the MoLE run's experts at its mean gates
        merge_command([], GATED, out, gates_from=Path(job.source_dir), split="validation")
        return
    dirs, names = experts_of(job.source_dir)
    if job.kind == "expert":
        if opts["domain"] not in names:
            raise RecipeError(f"Variant {job.variant!r}: {job.source_dir} has no per-domain LoRA {opts['domain']!r}. "
                              f"Allowed: {', '.join(names)}.")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(".adapter-tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(dirs[names.index(opts["domain"])], tmp)
        os.replace(tmp, out)
        return
    weights = opts.get("weights")
    merge_command([Path(d) for d in dirs], opts["method"], out, weights=weights.replace(";", ",") if weights else None,
                  density=float(opts.get("density", 0.5)), seed=job.seed,
                  rank=int(opts["rank"]) if opts.get("rank") else None)


def run_job(job: Job) -> str:
    """Bring one run to 'done' (see the module docstring); returns the state it started from."""
    start = state(job)
    if start == "done":
        return start
    if job.kind in ("merge", "expert"):
        _derived_adapter(job)
        rc = job_recipe(job)
        lora = rc.expert.per_domain_expert()[0]  # scored as the kind of adapter it is: a plain LoRA
        rc = dataclasses.replace(rc, expert=lora, stages=["eval"], output_dir=job.run_dir)
        run_recipe(rc)
        return start
    rc = _train_recipe(job)
    if start == "trained":
        run_recipe(dataclasses.replace(rc, stages=["eval"]))
    elif start == "partial" and newest_verified_checkpoint(job.run_dir, warn=console.print)[0] is not None:
        run_recipe(rc, resume=True)
    else:
        run_recipe(rc, overwrite=start != "empty")
    return start


# ------------------------------------------------------------------ many jobs


def threads_per_job(jobs: int) -> int:
    """OMP_NUM_THREADS (else the CPUs this process may use) shared by `jobs` processes, at least 1 each."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    total = int(os.environ.get("OMP_NUM_THREADS") or 0) or cpus
    return max(1, total // jobs)


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_all(jobs: list[Job], n_parallel: int, out: Path, log=console.print) -> dict[str, str]:
    """Run every job, at most `n_parallel` at a time (1: here, in order); returns job id -> state it started
    from. A failed run (a RecipeError here, a non-zero exit of a worker) stops no other job but those that need
    it; at the end a RecipeError lists the failures."""
    if n_parallel > 1:
        return _parallel(jobs, n_parallel, out, log)
    started, failed = {}, {}
    for job in jobs:  # in order: every job after the jobs it reads from (compare._jobs)
        if any(a in failed for a in job.after):
            failed[job.id] = f"skipped: it needs {', '.join(a for a in job.after if a in failed)}"
            continue
        if state(job) != "done":
            log(f"[bold]{job.id}[/]: {_verb(state(job), job)}")
        try:
            started[job.id] = run_job(job)
        except RecipeError as e:
            failed[job.id] = str(e)
            log(f"[red]failed[/] {job.id}: {e}")
    _raise_failures(failed, len(jobs))
    return started


def _raise_failures(failed: dict[str, str], total: int) -> None:
    if failed:
        raise RecipeError(f"{len(failed)} of {plural(total, 'run')} did not finish: "
                          + "; ".join(f"{k}: {v}" for k, v in failed.items())
                          + ". Fix the cause and rerun with --resume: finished runs are reused.")


def _verb(s: str, job: Job) -> str:
    if job.kind in ("merge", "expert"):
        return "scoring" if s == "trained" else f"{job.kind} of {Path(job.source_dir).name}'s LoRAs"
    return {"trained": "scoring the trained run", "partial": "resuming from its checkpoint",
            "other": "starting over (the unfinished run is moved aside)", "empty": "training"}.get(s, s)


def _parallel(jobs: list[Job], n: int, out: Path, log) -> dict[str, str]:
    threads, gpus = threads_per_job(n), _gpus()
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    started = {j.id: state(j) for j in jobs}
    running: dict[str, tuple[subprocess.Popen, Job, object, float]] = {}
    done, failed = {j.id for j in jobs if started[j.id] == "done"}, {}
    pending = [j for j in jobs if j.id not in done]
    log(f"{len(pending)} of {plural(len(jobs), 'run')} to do, {n} at a time, {plural(threads, 'thread')} each"
        + (f", on {gpus} GPUs in turn" if gpus > 1 else ""))
    slot, stopping = 0, None
    try:
        with StopRequest() as stop, simple_progress("compare", len(jobs)) as bar:
            bar.update(bar.task_ids[0], completed=len(done))
            while pending or running:
                if stop.signum is not None and stopping is None:   # the first signal: stop the runs at a checkpoint
                    stopping = stop.signum
                    _stop_workers(running, stopping, log)
                for job in [] if stopping else list(pending):
                    if len(running) >= n:
                        break
                    if any(a in failed for a in job.after):
                        failed[job.id] = f"skipped: it needs {', '.join(a for a in job.after if a in failed)}"
                        pending.remove(job)
                        continue
                    if all(a in done for a in job.after):
                        pending.remove(job)
                        running[job.id] = _start(job, out, threads, slot % gpus if gpus > 1 else None)
                        slot += 1
                        log(f"started {job.id} ({_verb(started[job.id], job)})")
                for jid, (proc, job, fh, t0) in list(running.items()):
                    if proc.poll() is None:
                        continue
                    fh.close()
                    del running[jid]
                    if proc.returncode == 0:
                        done.add(jid)
                        log(f"finished {jid} in {time.time() - t0:.0f} s")
                    elif stopped := _stopped_by(proc.returncode):
                        failed[jid] = f"stopped by {signal_name(stopped)} (--resume continues it)"
                        log(f"[yellow]stopped[/] {jid}: {_tail(out, jid)}")
                    else:
                        failed[jid] = f"exit {proc.returncode}, log {out / 'logs' / (jid + '.log')}: {_tail(out, jid)}"
                        log(f"[red]failed[/] {jid}: {failed[jid]}")
                    bar.update(bar.task_ids[0], completed=len(done) + len(failed))
                if stopping and not running:
                    break
                time.sleep(0.5)
    finally:  # a second signal, or an error here: stop the workers now (checkpoints are atomic)
        for proc, _job, fh, _t0 in running.values():
            proc.terminate()
            proc.wait()
            fh.close()
    if stopping:
        raise Interrupted(stopping, f"{len(done)} of {plural(len(jobs), 'run')} finished; the runs in progress "
                                    "stopped at a checkpoint (their logs in " f"{out / 'logs'}).", resumable=True)
    _raise_failures(failed, len(jobs))
    return started


def _stopped_by(returncode: int) -> int | None:
    """The signal that stopped a worker (exit 128 + signum after a checkpoint, or killed by it), else None."""
    for signum in NAMES:
        if returncode in (128 + signum, -signum):
            return signum
    return None


def _stop_workers(running: dict, signum: int, log) -> None:
    """Pass the first SIGINT/SIGTERM on to every worker once (each stops at a step boundary with a checkpoint,
    `moetune.train.signals`); the workers run in sessions of their own, so a terminal's Ctrl-C or a container's
    SIGTERM reaches them only this way, once. No new run starts; a second signal stops the workers at once."""
    log(f"[yellow]{signal_name(signum)}[/]: no new run starts; the {plural(len(running), 'run')} in progress stop at a "
        "checkpoint (the same signal again stops them at once, keeping the checkpoints written before).")
    for proc, _job, _fh, _t0 in running.values():
        if proc.poll() is None:
            proc.send_signal(signum)


def _start(job: Job, out: Path, threads: int, gpu: int | None):
    path = out / "jobs" / f"{job.id}.json"
    write_json(path, dataclasses.asdict(job))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    fh = open(out / "logs" / f"{job.id}.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", "moetune.commands.compare_jobs", str(path)], stdout=fh,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, job, fh, time.time()


def _tail(out: Path, jid: str) -> str:
    lines = [x for x in (out / "logs" / f"{jid}.log").read_text(errors="replace").splitlines() if x.strip()]
    return lines[-1][:300] if lines else "(no output)"


def main(argv: list[str]) -> int:
    """Worker: run the job in the JSON file argv[0]; a RecipeError is one line on stderr and exit 2; stopped by
    SIGINT or SIGTERM (a run stops at a checkpoint, other stages at once), 128 + the signal's number."""
    job = Job(**json.loads(Path(argv[0]).read_text()))
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        run_job(job)
    except RecipeError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    except (Interrupted, Terminated) as e:
        console.print(f"stopped by {signal_name(e.signum)}: {getattr(e, 'message', '') or 'files written so far are intact.'}",
                      highlight=False, soft_wrap=True)
        return 128 + e.signum
    except KeyboardInterrupt:
        console.print("stopped by Ctrl-C (SIGINT): files written so far are intact.", highlight=False)
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
