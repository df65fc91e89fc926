"""benchmarks/e2e.py without training: its data set, run order, argument checks and ratios (no timings)."""
from __future__ import annotations

import json
import statistics
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import e2e  # noqa: E402
from e2e_data import MAX_WORDS, chat_rows, write_rows  # noqa: E402
from e2e_report import markers, render_table, summarise, update_results_md  # noqa: E402


def test_chat_rows_are_seeded_prompt_completion_with_long_tailed_answers(tmp_path):
    rows = chat_rows(160, seed=0)
    assert rows == chat_rows(160, seed=0) and rows != chat_rows(160, seed=1)
    assert rows[:16] == chat_rows(16, seed=0)                       # --rows N is a prefix of the full set
    assert all([m["role"] for m in r["prompt"]] == ["system", "user"] and r["completion"][0]["role"] == "assistant"
               for r in rows)
    prompt = [len(r["prompt"][1]["content"].split()) for r in rows]
    answer = [len(r["completion"][0]["content"].split()) for r in rows]
    assert max(prompt) <= 14
    assert statistics.mean(answer) > 1.3 * statistics.median(answer)    # long tail
    assert max(answer) > 4 * statistics.median(answer) and max(answer) <= MAX_WORDS + 20
    path = write_rows(tmp_path / "x.jsonl", 5)
    assert [json.loads(x) for x in path.read_text().splitlines()] == chat_rows(5)


def test_rounds_alternate_and_cover_every_run_once():
    plan = e2e.plan_runs(["moetune", "trl", "trainer"], ["fp32", "bf16"], 3)
    assert len(plan) == len(set(plan)) == 18
    firsts = [c for r, p, c in plan if p == "fp32" and [x for x in plan if x[0] == r][0][2] == c]
    assert firsts == ["moetune", "trl", "trainer"]                  # each round starts with the next contender


def test_arguments_checked(capsys):
    a = e2e.parse_args(["--moetune-set", "data.packing=dataset", "--moetune-set", "train.lr=1e-4"])
    assert a.moetune_set == ["data.packing=dataset", "train.lr=1e-4"] and a.trl_batch_size == "auto"
    for bad in (["--moetune-set", "data.packing"], ["--trl-batch-size", "0"], ["--precisions", "fp8"]):
        with pytest.raises(SystemExit) as e:
            e2e.parse_args(bad)
        assert e.value.code == 2
    assert "data.packing" in capsys.readouterr().err
    assert e2e.parse_args(["--device", "cuda"]).out.endswith("e2e_cuda.json") and a.out.endswith("e2e.json")
    a = e2e.parse_args(["--device", "cpu"])
    ok, skipped = e2e.usable_contenders(a)
    assert "trl-liger" not in ok and "cuda" in skipped["trl-liger"]


def test_recipe_has_the_shared_hyperparameters(tmp_path):
    a = e2e.parse_args([])
    r = e2e.moetune_recipe(a, "moetune-hydralora", "bf16", tmp_path / "d.jsonl", tmp_path / "c", tmp_path / "o")
    assert r["expert"] == {"type": "hydralora", "num_experts": 3, "rank": 16, "alpha": 32, "dropout": 0.0,
                           "target_modules": ["all-linear"]}
    assert r["model"]["dtype"] == "bfloat16" and r["data"]["max_length"] == 512 and r["data"]["packing"] is True
    assert (r["train"]["lr"], r["train"]["batch_size"], r["train"]["epochs"]) == (2e-4, 8, 1.0)
    assert e2e.moetune_batch(a, trl_batch=2) == 8                    # examples, as Trainer's
    budget = e2e.parse_args(["--moetune-set", "data.packing=dataset"])
    assert e2e.moetune_batch(budget, trl_batch=2) == 2               # rows of max_length, as TRL's


def _run(r, p, c, s, loss=1.0):
    return {"round": r, "precision": p, "contender": c, "train_seconds": s, "process_seconds": s + 10, "steps": 20,
            "final_loss": loss, "losses": [2.0, loss]}


def test_ratios_pair_runs_of_the_same_round(tmp_path):
    runs = [_run(0, "fp32", "moetune", 10), _run(0, "fp32", "trl", 20), _run(1, "fp32", "moetune", 20),
            _run(1, "fp32", "trl", 30), _run(0, "bf16", "moetune", 5), _run(0, "bf16", "trl", 20),
            _run(1, "bf16", "moetune", 10), _run(1, "bf16", "trl", 15)]
    s = summarise(runs)
    assert s["per_run_kind"]["fp32/trl"]["vs_moetune"] == {"median": 1.75, "min": 1.5, "max": 2.0, "rounds": 2}
    assert s["bf16_speedup"]["moetune"]["median"] == 2.0
    assert s["best_precision"] == {"moetune": "bf16", "trl": "bf16"}
    assert s["best_vs_best_moetune"]["trl"]["median"] == 2.75         # (20/5 + 15/10) / 2
    res = {"summary": s, "data": {"rows": 4, "tokens": 400, "mean": 100.0, "median": 90, "p90": 180, "max": 200,
                                  "cut_at_max_length": 0}, "shared": True, "date": "d", "machine": "m", "device": "cpu",
           "threads": 2, "load_avg_start": [1.0], "load_avg_end": [2.0], "wall_seconds": 60, "versions": {},
           "command": "e2e.py", "trl_batch_size": 2, "settings": {"batch_size": 8, "moetune_set": []}, "skipped": {}}
    table = render_table(res)
    assert "| fp32 | trl | 20 | 25.0 | 35.0 | 1.75x [1.50, 2.00] |" in table
    md = tmp_path / "RESULTS.md"
    md.write_text("# R\n\nbefore\n")
    update_results_md(md, table)
    update_results_md(md, "gpu\n", "cuda")
    update_results_md(md, "second\n")                               # replaced, not appended again
    text = md.read_text()
    (start, end), (gpu_start, gpu_end) = markers("cpu"), markers("cuda")
    assert text.count(start) == 1 and "second\n" + end in text and text.startswith("# R\n\nbefore\n")
    assert gpu_start + "\ngpu\n" + gpu_end in text and table not in text


def test_bad_moetune_override_stops_before_any_run(tmp_path, capsys):
    data = write_rows(tmp_path / "d.jsonl", 4)
    good = e2e.parse_args(["--moetune-set", "data.packing=false", "--moetune-set", "train.lr=1e-4"])
    e2e.check_moetune_recipes(good, ["moetune", "moetune-hydralora", "trl"], data, tmp_path, 8)
    bad = e2e.parse_args(["--moetune-set", "data.packign=true"])
    with pytest.raises(SystemExit) as e:
        e2e.check_moetune_recipes(bad, ["moetune"], data, tmp_path, 8)
    assert e.value.code == 2 and "Did you mean 'data.packing'" in capsys.readouterr().err


def test_cuda_without_a_gpu_and_no_moetune_are_usage_errors(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    for argv, words in ((["--contenders", "trl"], "must include moetune"), (["--device", "cuda"], "CUDA is not available")):
        if argv[0] == "--device" and torch.cuda.is_available():
            continue
        with pytest.raises(SystemExit) as e:
            e2e.main([*argv, "--out", str(tmp_path / "x.json")])
        assert e.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_a_failing_optional_contender_is_dropped_not_the_run(tmp_path, monkeypatch, capsys):
    """main's flow without training: runs faked, trl-liger's worker fails; the table and JSON still come out."""
    import moetune.models.load as load
    monkeypatch.setattr(load, "resolve_path", lambda path, log=print: str(tmp_path))
    monkeypatch.setattr(e2e, "usable_contenders", lambda a: (["moetune", "trl", "trl-liger"], {}))
    monkeypatch.setattr(e2e, "data_stats", lambda *a: {"rows": 4, "tokens": 400, "mean": 100.0, "median": 90,
                                                       "p90": 180, "max": 200, "min": 50, "cut_at_max_length": 0})
    seconds = iter(range(10, 100))
    monkeypatch.setattr(e2e, "run_moetune", lambda *a, **k: {"train_seconds": 10.0, "process_seconds": 20.0,
                                                             "steps": 1, "losses": [1.0], "final_loss": 1.0})

    def worker(a, contender, precision, *rest):
        if contender == "trl-liger":
            raise e2e.OptionalFailed("trl-liger fp32: worker exited 1:\nImportError: liger needs something")
        return {"train_seconds": float(next(seconds)), "process_seconds": 30.0, "steps": 1, "losses": [1.5],
                "final_loss": 1.5}
    monkeypatch.setattr(e2e, "run_worker", worker)
    out = tmp_path / "e2e.json"
    e2e.main(["--rows", "4", "--rounds", "2", "--precisions", "fp32", "--no-warmup", "--out", str(out)])
    res = json.loads(out.read_text())
    assert {r["contender"] for r in res["runs"]} == {"moetune", "trl"} and len(res["runs"]) == 4
    assert "liger needs something" in res["skipped"]["trl-liger"]
    trl = res["summary"]["per_run_kind"]["fp32/trl"]["vs_moetune"]
    assert trl["rounds"] == 2 and trl["min"] >= 1.0                  # 10-11 s against moetune's 10 s
    assert "trl-liger (its run failed" in out.with_suffix(".md").read_text()
