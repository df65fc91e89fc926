"""data/multidomain and its generator (scripts/gen_multidomain.py); the compare_routing table."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_data_is_the_generators_output_and_held_out_is_unseen():
    gen = _script("gen_multidomain")
    splits = gen.generate(200, 15, 25, 0)
    for split, rows in splits.items():
        committed = [json.loads(x) for x in (ROOT / "data/multidomain" / f"{split}.jsonl").read_text().splitlines()]
        assert committed == rows
    train = {r["instruction"] for r in splits["train"]}
    held = splits["validation"] + splits["test"]
    assert not [r for r in held if r["instruction"] in train]
    assert {r["domain"] for r in splits["test"]} == set(gen.DOMAINS) and len(gen.DOMAINS) == 8
    assert gen.row("zib", _Fixed()) == {"instruction": "Translate to Zib: cat cat cat", "response": "vel vel vel"}
    assert gen.row("quon", _Fixed())["response"] == "dask dask dask"      # same input, another answer
    assert gen.row("initials", _Fixed())["response"] == "CCC"


class _Fixed:
    """A stand-in random.Random: every choice is the first, every integer 3."""

    def choice(self, xs):
        return xs[0]

    def randint(self, a, b):
        return 3


def test_compare_routing_table_rows():
    cr = _script("compare_routing")
    res = {"exact_match": 0.6, "loss": 1.0, "params": 10, "specialisation": 0.25, "median_tokens_per_s": 100.0,
           "per_domain": {"a": {"exact_match": 1.0}, "b": {"exact_match": 0.0}}}
    lora = {**res, "specialisation": None}
    text = cr.table({"multidomain": {"lora": {"0": {**lora, "exact_match": 0.5}, "1": {**lora, "exact_match": 0.4}},
                                     "hydralora+sup": {"0": res, "1": res}}})
    lines = text.splitlines()
    assert lines[0] == "**multidomain**"
    assert lines[4] == "| lora | 10 | 0,1 | 0.450 ± 0.071 | – | 1.000 ± 0.000 | – | 100.0 ± 0.0 | 1.000 ± 0.000 | 0.000 ± 0.000 |"
    # EM minus LoRA's of the same seed: 0.1 and 0.2
    assert lines[5].startswith("| hydralora+sup | 10 | 0,1 | 0.600 ± 0.000 | 0.150 ± 0.071 | 1.000 ± 0.000 | 0.2500 ± 0.0000 |")


def test_compare_routing_mole_budget_reuse_and_merge(tmp_path, monkeypatch, capsys):
    cr = _script("compare_routing")
    assert cr.domains("multidomain") == sorted(_script("gen_multidomain").DOMAINS)
    # 8 domains: rank 16 // 8 = 2 per domain LoRA, 60 steps / 8 domains -> 8 steps each
    assert cr.mole_overrides("multidomain", "mole", 0, 60, tmp_path) == [
        "expert.rank=2", "expert.alpha=4", "expert.expert_max_steps=8"]
    try:
        cr.mole_overrides("multidomain", "mole+seqsup", 0, 60, tmp_path)
        raise AssertionError("a MoLE variant without its `mole` run must stop")
    except SystemExit as e:
        assert "run --methods mole first" in str(e)
    info = tmp_path / "multidomain" / "mole-s0" / "experts"
    info.mkdir(parents=True)
    (info / "experts.json").write_text(json.dumps({"b": {"adapter": "/x/b/adapter"}, "a": {"adapter": "/x/a/adapter"}}))
    assert cr.mole_overrides("multidomain", "mole+seqsup", 0, 60, tmp_path)[:3] == [
        "expert.experts_from=list", "expert.experts=[/x/a/adapter,/x/b/adapter]", "expert.names=[a,b]"]
    # --merge: results of runs made in parallel land in one file, per data set, method and seed
    row = {"exact_match": 0.5, "loss": 1.0, "params": 10, "specialisation": None, "per_domain": {}}
    parts = []
    for i, (method, seed) in enumerate([("lora", "0"), ("lora", "1")]):
        parts.append(tmp_path / f"part{i}.json")
        parts[-1].write_text(json.dumps({"results": {"default": {method: {seed: row}}}, "runs": [f"run {i}"]}))
    out = tmp_path / "all.json"
    monkeypatch.setattr("sys.argv", ["compare_routing.py", "--out", str(out), "--merge", *map(str, parts)])
    cr.main()
    doc = json.loads(out.read_text())
    assert sorted(doc["results"]["default"]["lora"]) == ["0", "1"] and doc["runs"] == ["run 0", "run 1"]
    assert "| lora | 10 | 0,1 | 0.500 ± 0.000 |" in capsys.readouterr().out
