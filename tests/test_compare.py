"""`moetune compare` without training: the paired bootstrap against a hand computation, the conclusion's
wording, equal-parameter budgets (sizing on the meta device, MoLE's count), variant parsing, study files, and
bad input refused before any training."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, cli, make_rows, tiny_overrides, write_jsonl
from moetune.commands import budget as B
from moetune.commands.compare import settings
from moetune.commands.compare import compare as run_compare
from moetune.commands.compare_plan import parse_methods, split_top
from moetune.eval import paired as P
from moetune.experts import REGISTRY
from moetune.recipe import RecipeError, load_recipe
from moetune.recipe.experts import EXPERT_CONFIGS
from scripts_loader import load_script

torch.set_num_threads(1)


# ------------------------------------------------------------------ statistics


def _hand_bootstrap(stat, n_seeds: int, n: int, resamples: int, seed) -> tuple[float, float]:
    """The documented procedure written out with loops: seeds first, then examples, from one generator."""
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, n_seeds, size=(resamples, n_seeds))
    examples = rng.integers(0, n, size=(resamples, n))
    values = [stat([int(s) for s in seeds[b]], [int(i) for i in examples[b]]) for b in range(resamples)]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def test_paired_interval_equals_a_hand_computed_bootstrap():
    rng = np.random.default_rng(3)
    x, ref = rng.integers(0, 2, (3, 11)), rng.integers(0, 2, (3, 11))  # (seeds, examples) correct / not

    def mean_diff(ss, ii):
        vals = [x[s][i] - ref[s][i] for s in ss for i in ii]
        return sum(vals) / len(vals)
    got = P.mean_difference(x, ref, *P.draws(3, 11, resamples=300, seed=7))
    lo, hi = _hand_bootstrap(mean_diff, 3, 11, 300, 7)
    assert got["difference"] == pytest.approx((x - ref).mean(), abs=1e-15)
    assert (got["low"], got["high"]) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))
    assert got["low"] < got["difference"] < got["high"]

    num, den = rng.uniform(0, 5, (2, 9)), rng.integers(1, 6, (2, 9)).astype(float)   # loss sums, token counts
    rnum, rden = rng.uniform(0, 5, (2, 9)), den.copy()

    def ratio_diff(ss, ii):
        def r(a, b):
            return sum(a[s][i] for s in ss for i in ii) / sum(b[s][i] for s in ss for i in ii)
        return r(num, den) - r(rnum, rden)
    got = P.ratio_difference(num, den, rnum, rden, *P.draws(2, 9, resamples=200, seed=[0, 2]))
    lo, hi = _hand_bootstrap(ratio_diff, 2, 9, 200, [0, 2])
    assert got["difference"] == pytest.approx(num.sum() / den.sum() - rnum.sum() / rden.sum(), abs=1e-12)
    assert (got["low"], got["high"]) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))


def test_conclusion_wording_for_known_and_null_differences():
    known = {"difference": 0.025, "low": 0.012, "high": 0.037, "seeds": 3}
    assert P.conclusion("HydraLoRA", "LoRA", known) == "HydraLoRA beats LoRA by 0.025 EM [0.012, 0.037]"
    worse = {"difference": -0.048, "low": -0.07, "high": -0.02, "seeds": 3}
    assert P.conclusion("MoLoRA", "LoRA", worse) == "LoRA beats MoLoRA by 0.048 EM [0.020, 0.070]"
    null = {"difference": 0.01, "low": -0.005, "high": 0.025, "seeds": 3}
    assert P.conclusion("MoV", "LoRA", null) == ("no difference detectable at this budget between MoV and LoRA: "
                                                 "+0.010 EM [-0.005, +0.025]")
    edge = {"difference": 0.02, "low": 0.0, "high": 0.04, "seeds": 3}   # touching 0 is not a win
    assert P.conclusion("A", "B", edge).startswith("no difference detectable")
    loss = {"difference": -0.05, "low": -0.08, "high": -0.02, "seeds": 1}
    assert P.conclusion("A", "B", loss, "test loss", higher_is_better=False) == (
        "A has a lower test loss than B by 0.050 [0.020, 0.080] (1 seed: the interval covers the test examples, "
        "not the variation between seeds)")

    # from data: a method right on 40% more examples at every seed, and one that differs by chance only
    rng = np.random.default_rng(0)
    ref = (rng.uniform(size=(3, 200)) < 0.3).astype(int)
    better = np.maximum(ref, (rng.uniform(size=(3, 200)) < 0.4).astype(int))
    noise = ref.copy()
    flip = rng.choice(200, 6, replace=False)
    noise[:, flip[:3]] = 1 - noise[:, flip[:3]]
    noise[:, flip[3:]] = 1 - noise[:, flip[3:]]
    draws = P.draws(3, 200, resamples=2000, seed=0)
    d = P.mean_difference(better, ref, *draws)
    assert P.conclusion("X", "LoRA", d).startswith(f"X beats LoRA by {d['difference']:.3f} EM [")
    assert d["low"] > 0.15
    assert P.conclusion("Y", "LoRA", P.mean_difference(noise, ref, *draws)).startswith("no difference detectable")


def test_per_seed_table_pairs_each_seed_with_the_reference_at_that_seed():
    from moetune.commands.compare_output import markdown, tables
    em = lambda *xs: {"mean": sum(x for x in xs if x is not None) / len([x for x in xs if x is not None]),
                      "sd": None, "n": 3, "per_seed": {str(s): x for s, x in enumerate(xs) if x is not None}}
    variants = {"lora": {"trainable": 100, "metrics": {"exact_match": em(0.9, 0.8, 0.925)}, "per_domain": {"a": {}}},
                "moe": {"trainable": 100, "metrics": {"exact_match": em(0.95, 0.85, 0.9)}, "per_domain": {"a": {}}},
                "late": {"trainable": 100, "metrics": {"exact_match": em(0.7, None, None)}, "per_domain": {"a": {}}}}
    diff = {"difference": 0.0, "low": -0.1, "high": 0.1}
    doc = {"reference": "lora", "seeds": [0, 1, 2], "domains": ["a"], "variants": variants,
           "metrics": [{"key": "exact_match", "label": "EM", "fmt": ".3f", "higher_is_better": True}],
           "paired": {"moe": {"exact_match": diff, "per_domain": {}}, "late": {"exact_match": diff, "per_domain": {}}}}
    head, rows = tables(doc)["per_seed"]
    assert head == ["variant", "EM seed 0", "EM seed 1", "EM seed 2"]
    assert rows == [["lora", "0.900", "0.800", "0.925"],
                    ["moe", "0.950 (+0.050)", "0.850 (+0.050)", "0.900 (-0.025)"],
                    ["late", "0.700 (-0.200)", "-", "-"]]
    doc.update(command="moetune compare r.yaml", recipe="r.yaml", bootstrap={"resamples": 10, "seed": 0}, jobs=1,
               date="d", machine="m", budget="recipe", held_out={"n": 4, "split": "test"}, conclusions=[])
    for v in variants.values():
        v.update(method="lora", size=None, budget="-")
    assert "## Exact match per seed (in brackets: minus lora's at the same seed)" in markdown(doc)
    assert "per_seed" not in tables({**doc, "seeds": [0]})   # one seed: the results table says it all


# ------------------------------------------------------------------ budgets


@pytest.fixture(scope="module")
def meta_model(tmp_path_factory) -> Path:
    """A config-only Llama (hidden 256, 4 layers): counted on the meta device, never loaded."""
    from transformers import LlamaConfig
    d = tmp_path_factory.mktemp("meta-llama")
    LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=4).save_pretrained(d)
    return d


def _recipe(model: Path, *extra: str):
    return load_recipe(None, [f"model.path={model}", "data.test=null", "stages=[train]", *extra])


def test_counts_on_the_meta_device_follow_the_formulas(meta_model):
    c = B.Counter(log=lambda *a: None)
    h, kv, f, layers = 256, 128, 512, 4                    # q, o: h->h; k, v: h->kv; gate, up: h->f; down: f->h
    ins, outs = [h, h, h, h, h, h, f], [h, kv, kv, h, f, f, h]
    assert c.count(_recipe(meta_model, "expert.rank=16"), []) == layers * 16 * (sum(ins) + sum(outs))
    hydra = _recipe(meta_model, "expert.type=hydralora", "expert.rank=6", "expert.num_experts=4")
    assert c.count(hydra, []) == layers * sum(6 * i + 4 * 6 * o + 4 * i for i, o in zip(ins, outs))
    # MoLE per domain: D LoRAs, plus one gate per sub-layer (attention, MLP) reading N*d_out of its first
    # projection in forward order (q_proj: h; gate_proj: f), W_g (N, N*d_out) and b (N,)
    mole = _recipe(meta_model, "expert.type=mole", "expert.experts_from=per_domain", "expert.rank=3")
    d = 5
    gates = layers * sum(d * d * o + d for o in (h, f))
    assert c.count(mole, list("abcde")) == d * layers * 3 * (sum(ins) + sum(outs)) + gates
    block = _recipe(meta_model, "expert.type=mole", "expert.experts_from=per_domain", "expert.rank=3",
                    "expert.granularity=block")
    assert c.count(block, list("abcde")) == d * layers * 3 * (sum(ins) + sum(outs)) + layers * (d * d * h + d)


def test_types_that_train_per_domain_experts_count_what_they_train_over_them():
    for etype, cfg in EXPERT_CONFIGS.items():
        own = REGISTRY[etype].parameters_over_experts.__qualname__.split(".")[0] != "ExpertLayer"
        trains_first = cfg(type=etype, **cfg.from_data).per_domain_expert() is not None
        assert own is trains_first, etype
        assert set(cfg(type=etype).budget_values()) == set(cfg.budget_keys) <= {f for f in cfg.__dataclass_fields__}


@pytest.mark.parametrize("etype, own", [("hydralora", {"rank": 8, "num_experts": 3}),
                                        ("molora", {"rank": 8, "num_experts": 4}), ("mov", {"num_experts": 4}),
                                        ("lora", {"rank": 8})])
def test_sizing_meets_the_budget_within_five_percent(meta_model, etype, own):
    c = B.Counter(log=lambda *a: None)
    target = c.count(_recipe(meta_model, "expert.rank=16"), [])

    def build(values):
        return _recipe(meta_model, f"expert.type={etype}", *[f"expert.{k}={v}" for k, v in values.items()])
    found = B.size(build, list(own), own, target, lambda r: c.count(r, []), alpha=16.0)
    assert abs(found["trainable"] / target - 1) <= B.TOLERANCE
    assert c.count(build(found["values"]), []) == found["trainable"]
    if "rank" in found["values"]:   # alpha follows rank: the scale alpha / r is kept
        assert found["values"]["alpha"] / found["values"]["rank"] == pytest.approx(16.0 / own["rank"])
    with pytest.raises(RecipeError, match="closest is"):   # a budget no value can meet
        B.size(build, list(own), own, 10, lambda r: c.count(r, []), alpha=None)


# ------------------------------------------------------------------ variants, studies, refusals


def test_variant_specs_parse():
    vs = parse_methods(["lora,seq=hydralora:router.level=sequence:expert.target_modules=[q_proj,v_proj]",
                        "molora:router.type=top_k", "t=merge:ties:density=0.3", "expert:cipher"])
    assert [v.name for v in vs] == ["lora", "seq", "molora+type=top_k", "t", "expert-cipher"]
    assert vs[1].overrides == ["router.level=sequence", "expert.target_modules=[q_proj,v_proj]"]
    assert (vs[3].kind, vs[3].method, vs[3].options) == ("merge", "ties", {"density": "0.3"})
    assert split_top("a:[b:c],{d:e}:f", ":") == ["a", "[b:c],{d:e}", "f"]
    with pytest.raises(RecipeError, match="twice"):
        parse_methods(["lora,lora"])
    with pytest.raises(RecipeError, match="not KEY=VALUE"):
        parse_methods(["hydralora:router.level"])


@pytest.fixture()
def base(tiny_llama, tiny_data, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("expert: {type: lora, rank: 16, alpha: 32}\n")
    over = [o for o in tiny_overrides(tiny_llama, tiny_data, tmp_path / "unused")
            if not o.startswith(("expert.rank=", "output_dir="))]
    return recipe, over


def _run(recipe, overrides, out, *methods, **kw):
    s, data = settings(recipe, list(methods), kw.pop("seeds", 1), None, kw.pop("budget", None), 1, out,
                       overrides, plan_only=kw.pop("plan_only", False), **kw)
    return run_compare(s, data)


@pytest.mark.parametrize("methods, message", [
    (["lora,hydralor"], "unknown method 'hydralor'. Did you mean 'hydralora'?"),
    (["lora,mole,t=merge:tie"], "unknown merge method 'tie'"),
    (["lora,t=merge:ties"], "no variant of this comparison trains them"),
    (["merge:ties,mole"], "must train"),
    (["lora,hydralora:router.levle=sequence"], "Variant 'hydralora+levle=sequence': Unknown recipe key 'router.levle'"),
    (["lora,hydralora:train.seed=3"], "sets train.seed"),
    (["lora,mole:router.type=top_k"], "MoLE gates are soft"),
    (["lora,hydralora:eval.max_examples=3"], "same held-out rows"),
])
def test_bad_variants_are_refused_before_anything_runs(base, tmp_path, methods, message):
    recipe, over = base
    with pytest.raises(RecipeError) as e:
        _run(recipe, over, tmp_path / "out", *methods)
    assert message in str(e.value)
    assert not (tmp_path / "out").exists()


def test_per_domain_method_without_a_domain_column_is_refused(base, tmp_path, monkeypatch, capsys):
    recipe, over = base
    plain = write_jsonl(tmp_path / "plain.jsonl", [{k: v for k, v in r.items() if k != "domain"} for r in make_rows(32, 5)])
    over = [o for o in over if not o.startswith("data.train=")] + [f"data.train={plain}"]
    assert cli(monkeypatch, "compare", recipe, *over, "--methods", "lora,mole", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "Variant 'mole' (mole) trains one LoRA per value of the training data's domain field" in err
    assert "has no domain column" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_plan_prints_budgets_and_runs_nothing(base, tmp_path, monkeypatch, capsys):
    recipe, over = base
    assert cli(monkeypatch, "compare", recipe, *over, "--methods", "lora,hydralora,mole,merge:cat", "--seeds", "2",
               "--plan", "--out", tmp_path / "out") in (0, None)
    out = capsys.readouterr().out
    assert "budgets (equal-params" in out and "reference" in out and "sized" in out and "merge of mole's LoRAs" in out
    assert not (tmp_path / "out").exists()
    doc = _run(recipe, over, tmp_path / "out", "lora,hydralora,mole,merge:cat", seeds=2, plan_only=True)
    jobs = {j["id"]: j for j in doc["jobs"]}
    assert sorted(jobs) == sorted(f"{v}-s{s}" for v in ("lora", "hydralora", "mole", "merge-cat") for s in (0, 1))
    assert jobs["merge-cat-s1"]["after"] == ["mole-s1"] and jobs["lora-s1"]["recipe"]["train"]["seed"] == 1
    assert abs(doc["sizes"]["hydralora"]["trainable"] / doc["sizes"]["lora"]["trainable"] - 1) <= 0.05


def test_report_needs_a_started_comparison_with_a_finished_reference(base, tmp_path, monkeypatch, capsys):
    recipe, over = base
    args = ["compare", recipe, *over, "--methods", "lora,hydralora", "--out", tmp_path / "out", "--report"]
    assert cli(monkeypatch, *args) == 2
    assert "holds no comparison (no plan.json)" in capsys.readouterr().err and not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "plan.json").write_text('{"runs": {}}')
    assert cli(monkeypatch, *args) == 2
    err = capsys.readouterr().err
    assert "the reference 'lora' has no finished run at seed 0 yet (0 of 2 runs finished)" in err
    assert "Traceback" not in err and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["plan.json"]
    assert cli(monkeypatch, *args, "--overwrite") == 2
    assert "--report reads the comparison in --out; it contradicts --overwrite" in capsys.readouterr().err
    assert cli(monkeypatch, *args[:-1], "--reference", "hydralora") == 2
    assert "--reference 'hydralora' re-pairs the finished runs of a comparison, so it goes with --report" in capsys.readouterr().err


def test_committed_studies_plan(tiny_llama, tmp_path):
    """Each recipes/studies/*.yaml loads, names its variants and plans its runs (on a tiny model, as set)."""
    studies = sorted((ROOT / "recipes" / "studies").glob("*.yaml"))
    assert len(studies) >= 4
    for study in studies:
        s, data = settings(study, budget="recipe", out=tmp_path / study.stem, plan_only=True,
                           overrides=[f"model.path={tiny_llama}", "model.device=cpu", "eval.multiple_choice=[]"])
        # a clustered router init names the file its make target writes first (Makefile), fitted to the real
        # model: planned here without it
        s.methods = [{**m, "overrides": [o for o in m.get("overrides", []) if not o.startswith("router.init_centroids=")]}
                     if isinstance(m, dict) else m for m in s.methods]
        doc = run_compare(s, data)
        assert len(doc["jobs"]) == len(parse_methods(s.methods)) * len(s.seeds) >= 4, study.name
        assert json.loads(json.dumps(doc["jobs"]))  # plain data: what plan.json records


def test_methods_name_a_study_files_variants(base, tmp_path):
    """On a study file, --methods NAME is that study variant (the same recipe, so the same run: a subset or
    another order of a study's variants trains into its --out); other values are parsed as ever."""
    recipe, over = base
    study = tmp_path / "study.yaml"
    study.write_text(f"compare:\n  recipe: {recipe}\n  budget: recipe\n  methods:\n    - {{name: lora, method: lora}}\n"
                     "    - {name: seq, method: hydralora, overrides: [router.level=sequence, expert.rank=4]}\n")
    full = {j["id"]: j for j in _run(study, over, tmp_path / "a", plan_only=True)["jobs"]}
    some = _run(study, over, tmp_path / "a", "seq,lora", plan_only=True)["jobs"]   # --plan writes nothing
    assert [j["id"] for j in some] == ["seq-s0", "lora-s0"]
    for j in some:
        assert j["recipe"] == full[j["id"]]["recipe"]
    assert full["seq-s0"]["recipe"]["router"]["level"] == "sequence" and full["seq-s0"]["recipe"]["expert"]["rank"] == 4
    mixed = _run(study, over, tmp_path / "c", "seq,hydralora", plan_only=True)["jobs"]   # a type stays a type
    assert [j["id"] for j in mixed] == ["seq-s0", "hydralora-s0"]
    assert (mixed[1]["recipe"].get("router") or {}).get("level") != "sequence"


def test_resuming_a_subset_keeps_the_plan_of_the_other_runs(base, tmp_path):
    """--resume with fewer variants (a subset of a study) adds to plan.json, it does not forget the runs it
    does not plan: the whole comparison's --resume and --report still check those against their settings."""
    from moetune.commands import compare as C
    from moetune.commands.compare_jobs import Job
    recipe, over = base
    out = tmp_path / "out"
    jobs = [Job(**j) for j in _run(recipe, over, out, "lora", plan_only=True)["jobs"]]
    out.mkdir()
    other = {"sha": "0" * 64, "job": {"id": "other-s0"}}
    (out / "plan.json").write_text(json.dumps({"runs": {"other-s0": other, "lora-s0": {"sha": "stale", "job": {}}}}))
    s, _ = settings(recipe, ["lora"], 1, None, None, 1, out, over, resume=True)
    C._open(s, "0 of 2 runs finished", jobs)
    runs = json.loads((out / "plan.json").read_text())["runs"]
    assert runs["other-s0"] == other and runs["lora-s0"]["sha"] == C._sha(jobs[0])


def test_a_failed_run_stops_only_the_runs_that_need_it(tmp_path, monkeypatch):
    from moetune.commands import compare_jobs as J
    jobs = [J.Job(n, n.split("-")[0], 0, "type", str(tmp_path / n), {}, after=after)
            for n, after in (("a-s0", []), ("b-s0", []), ("c-s0", ["b-s0"]), ("d-s0", []))]
    ran = []

    def fake(job):
        ran.append(job.id)
        if job.id == "b-s0":
            raise RecipeError("b broke")
        return "empty"
    monkeypatch.setattr(J, "run_job", fake)
    with pytest.raises(RecipeError) as e:
        J.run_all(jobs, 1, tmp_path, log=lambda *a: None)
    assert ran == ["a-s0", "b-s0", "d-s0"]
    assert "2 of 4 runs did not finish: b-s0: b broke; c-s0: skipped: it needs b-s0" in str(e.value)
    assert J.threads_per_job(1) >= J.threads_per_job(64) == 1


def test_derived_variants_run_after_their_source_whatever_the_order(base, tmp_path):
    recipe, over = base
    doc = _run(recipe, over, tmp_path / "out", "lora,ties=merge:ties,solo=expert:add,mole,mole_b=mole:expert.granularity=block",
               seeds=1, plan_only=True, budget="recipe")
    order = [j["id"] for j in doc["jobs"]]
    assert order == ["lora-s0", "mole-s0", "mole_b-s0", "ties-s0", "solo-s0"]
    jobs = {j["id"]: j for j in doc["jobs"]}
    assert jobs["mole_b-s0"]["source_dir"].endswith("mole-s0") and jobs["mole_b-s0"]["after"] == ["mole-s0"]
    assert jobs["ties-s0"]["options"] == {"method": "ties"} and jobs["solo-s0"]["options"] == {"domain": "add"}


def test_study_tables_fill_the_marked_blocks():
    st = load_script("study_tables")
    md = ("# Comparison of 2 variants\n\nCommand: `x`\n\n## Results\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
          "## Budgets\n\n| v |\n\n## Conclusions\n\n- A beats B.\n")
    text = "intro\n<!-- study:m:results -->\nold\n<!-- /study:m:results -->\n<!-- study:m -->\nold\n<!-- /study:m -->\n"
    b = st.blocks(md)
    out, n = st.fill(text, "m", ":results", b[":results"])
    out, k = st.fill(out, "m", "", b[""])
    assert n == k == 1 and "old" not in out
    short = out.split("<!-- study:m:results -->\n")[1].split("\n<!-- /study:m:results -->")[0]
    assert short.startswith("Command: `x`") and "| 1 | 2 |" in short and "- A beats B." in short and "Budgets" not in short
    assert "\n#### Budgets\n" in out.split("<!-- study:m -->\n")[1]
    assert not any(line.startswith(("# ", "## ", "### ")) for line in out.splitlines())  # no new sections


def test_a_multiple_choice_file_recorded_relative_and_absolute_is_one_column(tmp_path, monkeypatch):
    """Runs of one comparison that recorded `eval.multiple_choice` relative (older runs) and absolute share the
    file's column, each run's accuracy in it."""
    from moetune.commands.compare_jobs import Job
    from moetune.commands.compare_report import RunResult, mc_metrics
    monkeypatch.chdir(tmp_path)
    job = Job(id="a-s0", variant="a", seed=0, kind="type", run_dir="r", recipe={})
    old = RunResult(job, {"multiple_choice": {"mc/law.jsonl": {"accuracy": 0.25}}}, {})
    new = RunResult(job, {"multiple_choice": {str(tmp_path / "mc" / "law.jsonl"): {"accuracy": 0.5}}}, {})
    cols = mc_metrics([old, new])
    assert [c.label for c in cols] == ["MC law"]
    assert [cols[0].read(r) for r in (old, new)] == [0.25, 0.5]
