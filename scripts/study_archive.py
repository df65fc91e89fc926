#!/usr/bin/env python
"""Keep a comparison's finished runs in the repository, so a study that outlasts one machine goes on on the next.

A `moetune compare` run directory is large (adapter, checkpoints), but what its report, its curves and the
expert-diversity table read from a finished run is small: eval.json (per-example results and the routing
report), summary.json, metrics.jsonl (losses, per-layer MI, gate histograms) and recipe.yaml. `save` copies
those of every finished run ('done': eval.json with per-example results and summary.json with the final
scores, as `compare` decides) from OUT/runs/<run> to ARCHIVE/runs/<run>, with plan.json and, for a routed
run, diversity.json (scripts/expert_diversity.py's row, which needs the adapter). `restore` puts them back
under OUT/runs/<run> where OUT has no such run, so `moetune compare ... --resume` reuses them as finished
runs and trains only the rest. Neither ever overwrites: a run already in the destination is left as it is
(`save` refreshes an archived run only when its eval.json differs, which a finished run's never does).
`verify` checks that reruns reproduce a committed report: every finished run (a run directory or a kept
archive) whose id the report lists must give the report's per-seed exact match and test loss to the last
digit; it exits non-zero when one differs.

    python scripts/study_archive.py save runs/studies/routing-balance-multidomain benchmarks/results/studies/routing-balance-multidomain
    python scripts/study_archive.py restore benchmarks/results/studies/routing-balance-multidomain runs/studies/routing-balance-multidomain
    python scripts/study_archive.py verify benchmarks/results/studies/routing-balance-multidomain/comparison.json runs/studies/routing-balance-multidomain/runs
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout
sys.path.insert(0, str(ROOT / "scripts"))

import expert_diversity  # noqa: E402
from moetune.commands.compare_jobs import Job, state  # noqa: E402

KEPT = ("eval.json", "summary.json", "metrics.jsonl", "recipe.yaml")
DIVERSITY = "diversity.json"
CHECKED = ("exact_match", "loss")   # summary.json's "after" scores that a rerun must reproduce


def finished(run: Path) -> bool:
    """The run has per-example scores and final scores: compare's own 'done' state."""
    return state(Job(id=run.name, variant="", seed=0, kind="type", run_dir=str(run), recipe={})) == "done"


def _copy_atomic(src: Path, dst: Path) -> None:
    """dst gets src's bytes through a temporary name: never a half-written file."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)


def _packed(pack: Path, member: str) -> bytes | None:
    """The bytes of file `member` (e.g. eval.json) inside an archived run, or None."""
    try:
        with tarfile.open(pack, "r:xz") as tar:
            f = tar.extractfile(f"{pack.name[: -len('.tar.xz')]}/{member}")
            return f.read() if f else None
    except (OSError, KeyError, tarfile.TarError):
        return None


def save(out: Path, archive: Path) -> list[str]:
    """Pack every finished run of comparison `out` into `archive`; the names of the runs written."""
    written = []
    for run in sorted((out / "runs").glob("*")):
        if not run.is_dir() or ".old-" in run.name or not finished(run):
            continue
        pack = archive / "runs" / f"{run.name}.tar.xz"
        if _packed(pack, "eval.json") == (run / "eval.json").read_bytes():
            continue
        pack.parent.mkdir(parents=True, exist_ok=True)
        tmp = pack.with_name(pack.name + ".tmp")
        with tarfile.open(tmp, "w:xz", preset=9) as tar:
            for name in KEPT:
                if (run / name).is_file():
                    tar.add(run / name, arcname=f"{run.name}/{name}")
            row = None
            if (run / "adapter" / "adapter_model.safetensors").is_file():
                try:
                    row = expert_diversity.run_diversity(run)
                except SystemExit:          # not routed: no experts to compare
                    pass
            if row is not None:
                data = json.dumps(row, indent=1).encode()
                info = tarfile.TarInfo(f"{run.name}/{DIVERSITY}")
                info.size, info.mtime = len(data), int((run / "eval.json").stat().st_mtime)
                tar.addfile(info, io.BytesIO(data))
        tmp.replace(pack)
        written.append(run.name)
    plan, kept = out / "plan.json", archive / "plan.json"
    if plan.is_file() and (not kept.is_file() or kept.read_bytes() != plan.read_bytes()):
        archive.mkdir(parents=True, exist_ok=True)
        _copy_atomic(plan, kept)        # the newest plan: compare only ever adds runs to it
    return written


def restore(archive: Path, out: Path) -> list[str]:
    """Unpack the archived runs under `out` where `out` has no run of that name; the names restored."""
    restored = []
    for pack in sorted((archive / "runs").glob("*.tar.xz")):
        name = pack.name[: -len(".tar.xz")]
        dst = out / "runs" / name
        if dst.exists():
            continue
        tmp = dst.with_name(name + ".restoring")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with tarfile.open(pack, "r:xz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(name + "/")]
            for m in members:
                m.name = m.name[len(name) + 1:]
            tar.extractall(tmp, members=members, filter="data")
        if not finished(tmp):
            shutil.rmtree(tmp)
            continue
        tmp.rename(dst)                 # a run appears whole or not at all
        restored.append(name)
    if (archive / "plan.json").is_file() and not (out / "plan.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        _copy_atomic(archive / "plan.json", out / "plan.json")
    return restored


def _final_scores(runs: Path) -> dict[str, dict]:
    """Run id -> summary.json's "after" scores, for every finished run under `runs` (directories or .tar.xz)."""
    scores = {}
    for path in sorted(runs.glob("*")):
        if path.is_dir() and ".old-" not in path.name and (path / "summary.json").is_file():
            name, text = path.name, (path / "summary.json").read_bytes()
        elif path.name.endswith(".tar.xz"):
            name, text = path.name[: -len(".tar.xz")], _packed(path, "summary.json")
            if text is None:            # save always packs it: a damaged archive, not a run to skip
                raise SystemExit(f"{path}: no readable summary.json in this archive")
        else:
            continue
        after = json.loads(text).get("after")
        if after:
            scores[name] = after
    return scores


def verify(report: Path, runs: Path) -> tuple[list[str], list[str], list[str]]:
    """(reproduced, differing, not in the report): the finished runs under `runs` checked against the per-seed
    exact match and test loss of `report` (a compare comparison.json). Equal means equal floats, not close ones."""
    per_run = {}                        # run id -> {metric: the report's value for that seed}
    for variant in json.loads(report.read_text())["variants"].values():
        for run_dir, seed in zip(variant["runs"], variant["seeds"]):
            per_run[Path(run_dir).name] = {m: variant["metrics"][m]["per_seed"].get(str(seed)) for m in CHECKED}
    same, differ, new = [], [], []
    for name, after in _final_scores(runs).items():
        if name not in per_run:
            new.append(name)
            continue
        mine = {m: after.get(m) for m in CHECKED}
        if mine == per_run[name]:
            same.append(name)
        else:
            differ.append(name)
            print(f"{name}: report {per_run[name]}, rerun {mine}")
    return same, differ, new


def main(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save", help="pack OUT's finished runs into ARCHIVE")
    s.add_argument("out", type=Path)
    s.add_argument("archive", type=Path)
    r = sub.add_parser("restore", help="put ARCHIVE's runs back under OUT (never over a run OUT has)")
    r.add_argument("archive", type=Path)
    r.add_argument("out", type=Path)
    v = sub.add_parser("verify", help="check finished runs against a report's per-seed scores (exit 1 if one differs)")
    v.add_argument("report", type=Path, help="the committed comparison.json")
    v.add_argument("runs", type=Path, help="a directory of run directories or of kept .tar.xz archives")
    a = ap.parse_args(argv)
    if a.cmd == "verify":
        same, differ, new = verify(a.report, a.runs)
        print(f"{len(same)} run(s) reproduce the report's exact match and test loss to the last digit, "
              f"{len(differ)} differ, {len(new)} not in the report" + (": " + ", ".join(new) if new else ""))
        if differ:
            raise SystemExit(1)
        return same
    names = save(a.out, a.archive) if a.cmd == "save" else restore(a.archive, a.out)
    verb = "saved" if a.cmd == "save" else "restored"
    print(f"{verb} {len(names)} run(s)" + (": " + ", ".join(names) if names else ""))
    return names


if __name__ == "__main__":
    main()
