"""router.init: clusters (moetune/commands/router_clusters.py): `train` clusters the training prompts and fits the
routers itself, with the same weights as `cluster-heads --init-router`; the run keeps them and a resumed run reuses
them; recipes that cannot use it are refused before any work."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, cli, tiny_overrides, train_default
from safetensors.torch import load_file
from test_cluster import write_recipe

from moetune.adapters.inject import expert_layers
from moetune.commands import router_clusters
from moetune.commands.cluster import cluster_heads
from moetune.commands.stages import run_recipe
from moetune.core.errors import DataError, RecipeError
from moetune.recipe import load_recipe

torch.set_num_threads(1)

COMMON = ("expert.type=hydralora", "expert.num_experts=2", "stages=[train]", "train.eval_before=false",
          "train.max_steps=4", "train.save_every=2", "train.seed=3", "router.init=clusters",
          "router.init_embedder=tfidf")


def test_train_fits_the_routers_cluster_heads_would(tiny_llama, tiny_data, tmp_path, monkeypatch):
    """The run's router_init.safetensors equals cluster-heads --init-router's file for the same rows, K and seed;
    stopped after 2 steps and resumed, the run reuses the file (no second clustering) and ends with the adapter of
    an uninterrupted run."""
    src = write_recipe(tmp_path / "src.yaml", str(tiny_llama), tiny_data, num_experts=2)
    cluster_heads(src, [], embedder="tfidf", k_min=2, k_max=2, init_router=True, out=tmp_path / "k2.yaml", seed=3)
    want = load_file(str(tmp_path / "k2.router.safetensors"))

    whole = tmp_path / "whole"
    run_recipe(load_recipe(None, tiny_overrides(tiny_llama, tiny_data, whole, *COMMON)))
    got = load_file(str(whole / router_clusters.FILE))
    assert sorted(got) == sorted(want) and len(got) == 14
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    meta = json.loads((whole / "router_init.json").read_text())
    assert meta["settings"] == {"k": 2, "embedder": "tfidf", "max_rows": 2000, "seed": 3, "train": str(tiny_data["train"])}
    assert sum(meta["sizes"]) == 64 and len(meta["train_accuracy"]) == 14
    assert "init_centroids: null" in (whole / "recipe.yaml").read_text()      # the recipe as written, not the file

    stopped = tmp_path / "stopped"
    run_recipe(load_recipe(None, tiny_overrides(tiny_llama, tiny_data, stopped, *COMMON, "train.stop_after=2")))
    before = (stopped / router_clusters.FILE).read_bytes()

    def no_second_clustering(*a, **k):
        raise AssertionError("clustered again on resume")
    monkeypatch.setattr(router_clusters, "embed", no_second_clustering)
    run_recipe(load_recipe(None, tiny_overrides(tiny_llama, tiny_data, stopped, *COMMON)), resume=True)
    assert (stopped / router_clusters.FILE).read_bytes() == before
    a, b = load_file(str(whole / "adapter/adapter_model.safetensors")), load_file(str(stopped / "adapter/adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_the_injected_routers_hold_the_fitted_weights(tiny_llama, tiny_data, tmp_path):
    """clustered_init on a loaded base: the recipe it returns injects routers equal to the file, and a recipe with
    router.init: random does not."""
    from moetune.adapters.io import start_adapter
    from moetune.models.load import load_model, load_tokenizer
    rc = load_recipe(None, tiny_overrides(tiny_llama, tiny_data, tmp_path / "r", *COMMON))
    model, tok = load_model(rc.model), load_tokenizer(rc.model)
    (tmp_path / "r").mkdir()
    logs = []
    rc2 = router_clusters.clustered_init(rc, model, tok, tmp_path / "r", True, lambda: None, logs.append)
    assert rc2.router.init_centroids == str(tmp_path / "r" / router_clusters.FILE) and rc.router.init_centroids is None
    assert any("Routers start from 2 clusters of 64 prompts" in m for m in logs)
    start_adapter(model, rc2)
    fitted = load_file(rc2.router.init_centroids)
    layers = expert_layers(model)
    assert len(layers) == 14
    for name, layer in layers.items():
        torch.testing.assert_close(layer.router.weight.detach(), fitted[f"weight.{name}"], rtol=0, atol=0)
    plain = load_recipe(None, tiny_overrides(tiny_llama, tiny_data, tmp_path / "p", *COMMON[:-2]))
    assert router_clusters.clustered_init(plain, model, tok, tmp_path / "p", True, lambda: None, logs.append) is plain


def test_a_file_made_with_other_settings_is_not_reused(tmp_path):
    path = tmp_path / router_clusters.FILE
    path.write_bytes(b"x")
    want = {"k": 4, "embedder": "minilm", "max_rows": 2000, "seed": 0, "train": "t.jsonl"}
    (tmp_path / "router_init.json").write_text(json.dumps({"settings": want}))
    assert router_clusters.reusable(path, want)
    assert not router_clusters.reusable(path, {**want, "k": 3})
    assert not router_clusters.reusable(path, {**want, "seed": 1})
    (tmp_path / "router_init.json").write_text("{half")                        # a crash mid-write: made again
    assert not router_clusters.reusable(path, want)


@pytest.mark.parametrize("extra, message", [
    (("expert.type=lora",), "expert type 'lora' has no router that reads the layer input"),
    (("expert.type=mole",), "expert type 'mole' has no router"),
    (("router.init_centroids=k.safetensors",), "router.init_centroids names a file too"),
    (("train.reference=runs/sft",), "train.reference starts the adapter"),
])
def test_recipes_that_cannot_cluster_are_refused(tiny_llama, tiny_data, tmp_path, extra, message):
    overrides = tiny_overrides(tiny_llama, tiny_data, tmp_path / "r", "expert.type=hydralora", "router.init=clusters",
                               *extra)
    with pytest.raises(RecipeError, match="Recipe key 'router.init' is 'clusters', but") as e:
        load_recipe(None, overrides, check_files=False)
    assert message in str(e.value)


def test_the_cli_names_the_key_without_a_traceback(tiny_llama, tiny_data, tmp_path, monkeypatch, capsys):
    recipe = ROOT / "recipes" / "default.yaml"             # expert.type: lora
    code = cli(monkeypatch, "validate", recipe, "router.init=clusters", f"model.path={tiny_llama}")
    err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err.err + err.out
    assert "Recipe key 'router.init' is 'clusters', but expert type 'lora'" in " ".join((err.err + err.out).split())


def test_data_whose_bad_rows_training_skips_is_refused(tiny_llama, tiny_data, tmp_path):
    """data.skip_bad_rows drops rows from training, so the clustered prompts would not line up with the rows the
    routers are fitted on: refused before any embedding, naming the key and the count."""
    rows = tiny_data["train"].read_text().splitlines()
    bad = tmp_path / "train.jsonl"
    bad.write_text("\n".join(rows[:5] + ['{"instruction": 3}'] + rows[5:]) + "\n")
    data = {**tiny_data, "train": bad}
    rc = load_recipe(None, tiny_overrides(tiny_llama, data, tmp_path / "r", *COMMON, "data.skip_bad_rows=true"))
    with pytest.raises(DataError, match=r"train.jsonl': training skips 1 row of 65 \(1 bad with data.skip_bad_rows, 0 identical"):
        run_recipe(rc)
    assert not (tmp_path / "r").exists()                                          # nothing trained: no run left


@pytest.mark.slow
def test_two_processes_cluster_once_and_train_the_one_process_adapter(tiny_llama, tiny_data, tmp_path):
    """1 process (batch 4) vs DDP on 2 (batch 2 each) vs FSDP on 2 (batch 1, grad_accum 2), router.init: clusters:
    the main process clusters and fits, the other waits and reads the same file; the adapters are the same."""
    runs = {}
    for name, port, extra in (("one", None, ("train.batch_size=4",)),
                              ("ddp", 29571, ("train.batch_size=2", "train.distributed=ddp")),
                              ("fsdp", 29572, ("train.batch_size=1", "train.grad_accum=2", "train.distributed=fsdp"))):
        out = tmp_path / name
        printed = train_default(tiny_overrides(tiny_llama, tiny_data, out, *COMMON, "expert.dropout=0.0", *extra), port)
        assert printed.count("Routers start from 2 clusters") == 1                      # clustered once
        runs[name] = (load_file(str(out / router_clusters.FILE)), load_file(str(out / "adapter/adapter_model.safetensors")))
    init, adapter = runs["one"]
    assert any(v.abs().max() > 1e-3 for k, v in adapter.items() if "router" in k)
    for name in ("ddp", "fsdp"):
        other_init, other = runs[name]
        for k in init:
            torch.testing.assert_close(other_init[k], init[k], rtol=0, atol=0)
        assert other.keys() == adapter.keys()
        for k in adapter:
            torch.testing.assert_close(other[k], adapter[k], atol=1e-5, rtol=1e-4)


def test_data_mix_rows_line_up_with_the_clustered_prompts(tiny_llama, tiny_data, tmp_path):
    """With data.mix (two sources) and a seeded sample, the tokenised rows the routers are fitted on are the rows
    whose prompts were clustered, one for one (cluster-heads --init-router once fitted data.train's rows to the mix's
    clusters); router.init: clusters then trains on a mix."""
    from moetune.commands.cluster import example_texts
    from moetune.data.pipeline import source_rows
    from moetune.models.load import load_tokenizer
    mix = (f"data.mix=[{{path: {tiny_data['train']}, domain: a}}, {{path: {tiny_data['validation']}, domain: b}}]")
    rc = load_recipe(None, tiny_overrides(tiny_llama, tiny_data, tmp_path / "m", *COMMON, mix, "router.init_max_rows=30"))
    tok = load_tokenizer(rc.model)
    texts, domains = example_texts(rc.data, False, 30, 3)
    rows = source_rows(rc.data, tok, 30, 3)
    assert len(rows) == len(texts) == 30 and set(domains) == {"a", "b"}
    for text, row in zip(texts, rows):
        prompt = tok.decode([t for t, lab in zip(row.input_ids, row.labels) if lab < 0])
        assert text in prompt
    assert [r.domain for r in rows] == domains
    run_recipe(rc)
    meta = json.loads((tmp_path / "m" / "router_init.json").read_text())
    assert meta["rows"] == 30 and meta["settings"]["train"] == [str(tiny_data["train"]), str(tiny_data["validation"])]


def test_preference_pairs_cluster_their_prompts(tiny_llama, tmp_path):
    """DPO from a fresh adapter with router.init: clusters: the chosen sequences' prompts are clustered and fitted
    (a Pair is read as its chosen sequence), and the policy trains from the fitted routers."""
    from conftest import write_jsonl
    from test_preference_data import pair_rows
    data = {k: write_jsonl(tmp_path / f"{k}.jsonl", pair_rows(n, i)) for i, (k, n) in
            enumerate((("train", 48), ("validation", 16), ("test", 16)), 1)}
    out = tmp_path / "dpo"
    run_recipe(load_recipe(None, tiny_overrides(tiny_llama, data, out, *COMMON, "train.objective=dpo")))
    meta = json.loads((out / "router_init.json").read_text())
    assert meta["rows"] == 48 and sum(meta["sizes"]) == 48
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
