"""`moetune compare RECIPE --methods A,B,...`: which expert type suits this data, at this budget, with honest statistics.

Every variant (moetune/commands/compare_plan.py) trains at every seed on the recipe's model and data and is
scored on the same held-out rows; the first variant is the reference. In order, before any training:
  1. each variant's recipe is built and loaded (an unknown method or a bad override is an error naming it);
     derived variants (merge:, expert:) find the variant whose per-domain LoRAs they use; every variant must
     be scored on the same held-out rows (eval.split, its data, eval.max_examples), or pairing is impossible;
  2. `--out` is checked: a directory that holds a comparison is refused without --resume or --overwrite,
     as `moetune train` refuses a run directory (--overwrite moves it aside; nothing is deleted);
  3. the data is read and tokenised once (errors name the file and row; workers then find it cached); a
     variant that trains one LoRA per domain needs a domain column with two or more values;
  4. budgets (moetune/commands/budget.py): every variant's trainable parameters, counted on the meta device;
     with `--budget equal-params` each is sized to the reference's count within +-5%. The table is printed.
Then the runs (moetune/commands/compare_jobs.py; a variant trained with the same per-domain LoRAs as an
earlier one of the same seed mixes that one's instead of training its own), then the statistics and
comparison.{md,json,png} (moetune/commands/compare_report.py, compare_output.py).

`<out>/plan.json` records every run's recipe; `--resume` reuses finished runs and refuses a run directory
whose recipe would now differ (naming the keys). `--report` writes the report of the runs finished so far,
trains nothing (moetune/commands/compare_interim.py); with `--reference NAME` it pairs every variant with NAME
instead of the first, into comparison-vs-NAME.* (the runs stay planned and sized against the first).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
from pathlib import Path

from moetune.commands.budget import Counter, size
from moetune.commands.compare_interim import interim_statistics
from moetune.commands.compare_jobs import Job, run_all, state
from moetune.commands.compare_plan import (DERIVED, Variant, check, held_out, load_study, merge, parse_methods,
                                           protocol, resolve_sources, variant_recipe, with_study_names)
from moetune.commands.compare_output import report, wide_console
from moetune.commands.domain_experts import domain_recipe
from moetune.core.checkpoint import write_json
from moetune.export.multimerge import GATED
from moetune.core.errors import RecipeError
from moetune.core.ui import console, plural, table
from moetune.data.pipeline import load_splits
from moetune.models.load import load_tokenizer
from moetune.recipe import Recipe, parse_overrides, recipe_from_dict, to_yaml
from moetune.run.rundir import move_aside, probe_write, run_lock

BUDGETS = ("equal-params", "recipe")


@dataclasses.dataclass
class Settings:
    """The comparison's settings: the command line's, else the study file's `compare:`, else the defaults."""

    recipe: Path
    methods: list
    seeds: list[int]
    steps: int | None
    budget: str
    out: Path
    jobs: int = 1
    overrides: list[str] = dataclasses.field(default_factory=list)
    resume: bool = False
    overwrite: bool = False
    resamples: int = 10_000
    plan_only: bool = False
    report_only: bool = False
    reference: str | None = None  # --report --reference NAME: pair every variant with NAME instead of the first


def settings(recipe: Path, methods: list[str] | None = None, seeds: int | None = None, steps: int | None = None,
             budget: str | None = None, jobs: int = 1, out: Path | None = None, overrides: list[str] = (),
             resume: bool = False, overwrite: bool = False, resamples: int = 10_000,
             plan_only: bool = False, report_only: bool = False,
             reference: str | None = None) -> tuple[Settings, dict]:
    """The settings and the base recipe dict (the recipe or study file with the common overrides)."""
    data, study = load_study(recipe)
    n = seeds if seeds is not None else int(study.get("seeds", 1))
    budget = budget or study.get("budget", "equal-params")
    if budget not in BUDGETS:
        raise RecipeError(f"--budget is {budget!r}. Allowed: {', '.join(BUDGETS)}.")
    if n < 1 or jobs < 1 or resamples < 100:
        raise RecipeError(f"--seeds and --jobs must be >= 1 and --bootstrap >= 100; got {n}, {jobs}, {resamples}.")
    if resume and overwrite:
        raise RecipeError("--resume and --overwrite contradict each other. Allowed: one of them.")
    if report_only and (overwrite or plan_only):
        raise RecipeError(f"--report reads the comparison in --out; it contradicts {'--overwrite' if overwrite else '--plan'}. "
                          "Allowed: --report alone (with the comparison's own settings).")
    if reference and not report_only:
        raise RecipeError(f"--reference {reference!r} re-pairs the finished runs of a comparison, so it goes with "
                          "--report; the runs are planned and sized against the first of --methods. Allowed: "
                          "--report --reference NAME.")
    steps = steps if steps is not None else study.get("steps")
    if steps is not None and int(steps) < 1:
        raise RecipeError(f"--steps must be >= 1; got {steps}.")
    base = merge(data, parse_overrides(overrides))
    first = int(((base.get("train") or {}).get("seed")) or 0)
    out = out or Path(study.get("out") or Path("runs") / "compare" / Path(recipe).stem)
    chosen = with_study_names(methods, study.get("methods") or []) if methods else study.get("methods") or []
    s = Settings(Path(recipe), list(chosen), list(range(first, first + n)),
                 int(steps) if steps else None, budget, Path(out), jobs, list(overrides), resume, overwrite, resamples,
                 plan_only, report_only, reference)
    if report_only and not (s.out / "plan.json").is_file():
        raise RecipeError(f"--report: {str(s.out)!r} holds no comparison (no plan.json). Allowed: the --out of a "
                          "comparison that was started (the study's `out:` or runs/compare/<recipe> by default).")
    return s, base


def compare(s: Settings, base: dict) -> dict:
    """Plan, check, size, run and report a comparison (the module docstring); returns comparison.json."""
    recipe = recipe_from_dict(base, source=str(s.recipe))
    variants = parse_methods(s.methods)
    if variants[0].kind in DERIVED:
        raise RecipeError(f"The first method is the reference and must train; {variants[0].spec!r} is derived.")
    datas = {v.name: variant_recipe(v, base, recipe, s.overrides, s.steps) for v in variants if v.kind not in DERIVED}
    recipes = {name: check(name, protocol(d, s.seeds[0], "runs/check")) for name, d in datas.items()}
    _check_pairing(variants, recipes)
    resolve_sources(variants, recipes)
    existing = None if s.plan_only or s.report_only else _guard(s)
    domains = _preflight(variants, recipes)
    sizes = _budgets(s, variants, datas, recipes, domains)
    _print_sizes(s, variants, sizes)
    for name, values in sizes.items():
        if values.get("values"):
            datas[name] = merge(datas[name], {"expert": values["values"]})
    jobs = _jobs(s, variants, datas)
    if s.plan_only:
        console.print(f"--plan: {plural(len(jobs), 'run')} planned ({plural(len(variants), 'variant')} x "
                      f"{plural(len(s.seeds), 'seed')}); nothing run.")
        return {"sizes": sizes, "jobs": [dataclasses.asdict(j) for j in jobs]}
    if s.report_only:  # read the finished runs; no lock: the comparison may be training now
        _check_plan(s, jobs, "--report")
        paired = _repaired(variants, s.reference)
        stats, interim = interim_statistics(s, paired, jobs, sizes)
        return report(s, paired, jobs, sizes, {}, stats, interim, planned_reference=variants[0].name)
    _open(s, existing, jobs)
    with run_lock(s.out):
        started = run_all(jobs, s.jobs, s.out)
        return report(s, variants, jobs, sizes, started)


def _repaired(variants: list[Variant], name: str | None) -> list[Variant]:
    """The variants with `name` (--reference) first, the others in their order; unchanged without it."""
    if not name or name == variants[0].name:
        return variants
    found = [v for v in variants if v.name == name]
    if not found:
        close = difflib.get_close_matches(name, [v.name for v in variants], n=1)
        raise RecipeError(f"--reference {name!r} is not a variant of this comparison.{f' Did you mean {close[0]!r}?' if close else ''} "
                          f"Allowed: {', '.join(v.name for v in variants)}.")
    return [found[0], *[v for v in variants if v.name != name]]


def _check_pairing(variants: list[Variant], recipes: dict[str, Recipe]) -> None:
    ref = variants[0].name
    want = held_out(recipes[ref])
    for name, rc in recipes.items():
        if held_out(rc) != want:
            raise RecipeError(f"Variant {name!r} is scored on {held_out(rc)} (eval.split, its data, eval.max_examples) "
                              f"but {ref!r} on {want}. A paired comparison needs the same held-out rows: set them "
                              "alike in every variant.")


def _guard(s: Settings) -> str | None:
    """The comparison already in --out ('N of M runs finished'), refused without --resume / --overwrite."""
    if not (s.out / "plan.json").is_file() and not (s.out / "runs").is_dir():
        return None
    old = _plan_file(s.out)
    jobs = old.get("runs") or {}
    finished = sum(state(Job(**j["job"])) == "done" for j in jobs.values())
    found = f"a comparison ({finished} of {plural(len(jobs), 'run')} finished)"
    if not (s.resume or s.overwrite):
        raise RecipeError(f"--out {str(s.out)!r} already holds {found}. Nothing was changed. Allowed: --resume to "
                          "continue it (finished runs are reused); --overwrite to start over (the old comparison is "
                          f"moved aside to {s.out.name}.old-<UTC time>, not deleted); or another --out.")
    return found


def _plan_file(out: Path) -> dict:
    try:
        return json.loads((out / "plan.json").read_text())
    except (OSError, ValueError):
        return {}


def _preflight(variants: list[Variant], recipes: dict[str, Recipe]) -> dict[str, list[str]]:
    """Read and tokenise every variant's data once; the training domains per variant; per-domain checks."""
    tokenizers, seen, domains = {}, {}, {}
    for name, rc in recipes.items():
        missing = [f for f in rc.eval.multiple_choice if not Path(f).is_file()]
        if missing:
            raise RecipeError(f"Variant {name!r}: recipe key 'eval.multiple_choice' names {missing[0]!r}, which does "
                              f"not exist (working directory: {Path.cwd()}). Allowed: multiple-choice JSONL files "
                              "(`moetune data mmlu` writes MMLU ones), or an empty list.")
        key = (rc.model.path, json.dumps(dataclasses.asdict(rc.data), sort_keys=True, default=str))
        if key not in seen:
            if rc.model.path not in tokenizers:
                tokenizers[rc.model.path] = load_tokenizer(rc.model, log=console.print)
            splits = load_splits(rc.data, tokenizers[rc.model.path])
            seen[key] = sorted({str(d) for d in splits["train"].column("domain")})
        domains[name] = seen[key]
        if rc.expert.per_domain_expert() is not None and len(domains[name]) < 2:
            raise RecipeError(f"Variant {name!r} ({rc.expert.type}) trains one LoRA per value of the training data's "
                              f"domain field ('{rc.data.domain_field}'), but data.train ({rc.data.train or 'data.mix'}) "
                              + ("has no domain column" if domains[name] == ["all"] else
                                 f"has one domain only ({domains[name][0]!r})")
                              + ". Allowed: data whose rows carry two or more domains, or drop the variant.")
    return domains


def _pinned(v: Variant) -> set[str]:
    return {o.split("=", 1)[0].split(".", 1)[1] for o in v.overrides if o.startswith("expert.")}


def _budgets(s: Settings, variants: list[Variant], datas: dict, recipes: dict, domains: dict) -> dict[str, dict]:
    """name -> {'trainable', 'how', 'values' (sized keys), 'keys' (the type's budget keys and values)}."""
    counter = Counter(log=console.print)
    out: dict[str, dict] = {}
    ref = variants[0].name

    def count(rc: Recipe, name: str) -> int:
        return counter.count(rc, domains[name])

    for i, v in enumerate(variants):
        if v.kind in DERIVED:
            out[v.name] = {"trainable": None, "how": f"{v.kind} of {v.source}'s LoRAs"}
            continue
        rc = recipes[v.name]
        shown = rc.expert.budget_values()
        keys = list(shown)
        free = [k for k in keys if k not in _pinned(v)]
        if i == 0 or s.budget == "recipe" or not free:
            how = "reference" if i == 0 else ("as set" if s.budget == "recipe" else "pinned" if keys else "no size key")
            try:
                n = count(rc, v.name)
            except RecipeError as e:
                if s.budget == "equal-params":
                    raise RecipeError(f"Variant {v.name!r}: its trainable parameters cannot be counted: {e}") from None
                n = None
            out[v.name] = {"trainable": n, "how": how, "keys": shown}
            continue
        target = out[ref]["trainable"]
        alpha = None if "alpha" in _pinned(v) else rc.expert.alpha

        def build(values: dict, v=v) -> Recipe:
            return check(v.name, protocol(merge(datas[v.name], {"expert": values}), s.seeds[0], "runs/check"))
        try:
            found = size(build, free, shown, target, lambda r, v=v: count(r, v.name), alpha)
        except RecipeError as e:
            raise RecipeError(f"--budget equal-params: variant {v.name!r} ({rc.expert.type}) cannot be sized to "
                              f"{ref!r}'s {plural(target, 'trainable parameter')} by {', '.join(free)}: {e} Allowed: set its "
                              f"size yourself ({v.name}:expert.{free[0]}=N pins it; the table then shows the "
                              "difference), or --budget recipe.") from None
        sized = {k: found["values"].get(k, shown[k]) for k in keys}
        out[v.name] = {"trainable": found["trainable"], "how": "sized", "keys": sized, "values": found["values"],
                       "from": shown}
    return out


def _print_sizes(s: Settings, variants: list[Variant], sizes: dict) -> None:
    ref = sizes[variants[0].name]["trainable"]
    rows = []
    for v in variants:
        b = sizes[v.name]
        keys = ", ".join(f"{k} {val}" + (f" (was {b['from'][k]})" if b.get("from", {}).get(k, val) != val else "")
                         for k, val in (b.get("keys") or {}).items())
        n = b["trainable"]
        rows.append([v.name, v.spec, keys or "-", f"{n:,}" if n is not None else "-",
                     f"{100 * (n / ref - 1):+.1f}%" if n is not None and ref else "-", b["how"]])
    wide_console().print(table(f"budgets ({s.budget}; trainable parameters counted on the meta device)",
                               ["variant", "method", "size", "trainable", "vs reference", "how"], rows))


def _shares_experts(rc: Recipe, earlier: list[tuple[str, Recipe]]) -> str | None:
    """The earlier variant (same seed) whose per-domain LoRAs are exactly this one's, if any."""
    if rc.expert.per_domain_expert() is None:
        return None

    def key(r: Recipe) -> str:
        return to_yaml(dataclasses.replace(domain_recipe(r, "_"), output_dir=""))
    mine = key(rc)
    return next((name for name, other in earlier if other.expert.per_domain_expert() is not None
                 and key(other) == mine), None)


def _jobs(s: Settings, variants: list[Variant], datas: dict) -> list[Job]:
    jobs: list[Job] = []
    order = [v for v in variants if v.kind not in DERIVED] + [v for v in variants if v.kind in DERIVED]
    for seed in s.seeds:  # per seed, the training variants first: a run comes after the runs it reads from
        trained: list[tuple[str, Recipe]] = []
        owner: dict[str, str] = {}  # variant -> the variant whose run trained its per-domain LoRAs (this seed)
        for v in order:
            jid, run_dir = f"{v.name}-s{seed}", str(s.out / "runs" / f"{v.name}-s{seed}")
            if v.kind in DERIVED:
                src = v.source if v.kind == "merge" and v.method == GATED else owner[v.source]
                opts = {"method": v.method, **v.options} if v.kind == "merge" else {"domain": v.method, **v.options}
                jobs.append(Job(jid, v.name, seed, v.kind, run_dir, copy.deepcopy(datas[v.source]),
                                str(s.out / "runs" / f"{src}-s{seed}"), opts, sorted({f"{src}-s{seed}",
                                                                                      f"{v.source}-s{seed}"})))
                continue
            data = protocol(datas[v.name], seed, run_dir)
            rc = recipe_from_dict(data, source=f"run {jid}")
            shared = _shares_experts(rc, trained)
            owner[v.name] = owner[shared] if shared else v.name
            jobs.append(Job(jid, v.name, seed, v.kind, run_dir, data,
                            str(s.out / "runs" / f"{owner[v.name]}-s{seed}") if shared else None,
                            after=[f"{owner[v.name]}-s{seed}"] if shared else []))
            trained.append((v.name, rc))
    return jobs


def _sha(job: Job) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(job), sort_keys=True, default=str).encode()).hexdigest()


def _open(s: Settings, existing: str | None, jobs: list[Job]) -> None:
    """Create --out (write probe), move an old comparison aside (--overwrite) or check it (--resume), write plan.json."""
    probe_write(s.out, "--out")
    kept = {}
    if existing and s.overwrite:
        console.print(f"--overwrite: the previous comparison in {s.out} was moved to {move_aside(s.out)}")
    elif existing:
        kept = _check_plan(s, jobs, "--resume")  # with the runs planned by other commands on --out (a study's subset)
    runs = {j.id: {"sha": _sha(j), "job": dataclasses.asdict(j)} for j in jobs}
    write_json(s.out / "plan.json", {"recipe": str(s.recipe), "methods": [str(m) for m in s.methods],
                                     "seeds": s.seeds, "steps": s.steps, "budget": s.budget,
                                     "runs": {**kept, **runs}})


def _check_plan(s: Settings, jobs: list[Job], flag: str) -> dict:
    """Refuse when a run of --out that has started was planned with other settings than `jobs`; returns plan.json's
    runs."""
    old = _plan_file(s.out).get("runs") or {}
    for job in jobs:
        prev = old.get(job.id)
        if prev and prev["sha"] != _sha(job) and state(job) != "empty":
            raise RecipeError(f"{flag}: run {job.id} in {s.out} was planned with other settings "
                              f"({_diff(prev['job'], dataclasses.asdict(job))}). Nothing was changed. Allowed: the "
                              "comparison's own command and settings, --overwrite, or another --out.")
    return old


def _flat(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def _diff(a: dict, b: dict) -> str:
    fa, fb = _flat(a), _flat(b)
    keys = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
    return "; ".join(f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in keys[:5]) + (" ..." if len(keys) > 5 else "")


__all__ = ["BUDGETS", "Settings", "compare", "settings"]
