"""`moetune cluster-heads`: K-means scan on the default data, the new recipe, router init from centroids."""
from __future__ import annotations

import difflib
import json
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT, cli
import torch
from safetensors.torch import load_file

from moetune.commands.cluster import choose, cluster_heads, elbow, embed, example_texts, scan
from moetune.experts.routing import router_init_weight
from moetune.recipe import RecipeError, load_recipe

torch.set_num_threads(1)
DEFAULT = {s: ROOT / "data" / "default" / f"{s}.jsonl" for s in ("train", "validation", "test")}


def write_recipe(path: Path, model: str, data: dict, etype: str = "hydralora", num_experts: int = 3) -> Path:
    expert = f"{{type: {etype}, rank: 4{f', num_experts: {num_experts}' if etype != 'lora' else ''}}}"
    path.write_text(f"# my recipe\nmodel: {{path: {model}, device: cpu}}\nexpert: {expert}\n"
                    "router: {balance_loss: switch, balance_weight: 0.01}\n"
                    f"data: {{train: {data['train']}, validation: {data['validation']}, test: {data['test']}}}\n"
                    "train: {max_steps: 7}\n")
    return path


@pytest.fixture(scope="module")
def tfidf_run(tmp_path_factory):
    """One CLI run with tfidf on all 1,500 default training rows, K in [2, 8]."""
    d = tmp_path_factory.mktemp("tfidf")
    src = write_recipe(d / "hyd.yaml", "smollm2-135m-instruct", DEFAULT)
    before = src.read_bytes()
    mp = pytest.MonkeyPatch()
    try:
        assert cli(mp, "cluster-heads", src, "--embedder", "tfidf", "--json", d / "report.json") == 0
    finally:
        mp.undo()
    return {"dir": d, "src": src, "before": before, "report": json.loads((d / "report.json").read_text())}


def test_tfidf_on_default_data_recovers_the_domains(tfidf_run):
    r = tfidf_run["report"]
    per_k = {x["k"]: x for x in r["per_k"]}
    assert sorted(per_k) == list(range(2, 9))
    # Measured (seed 0): silhouette peaks at K=6 (0.1237; K=7: 0.1229), ARI 0.939; K=5 gives ARI 0.851.
    # K=6 is the five domains with 'strings' split into its two sub-tasks (upper-casing, first letters).
    # K=6 and K=7 are close in silhouette, so the test allows either and bounds the ARI of the choice.
    assert r["chosen_k"] in (6, 7) and r["chosen_k"] == choose(r["per_k"])
    assert r["ari"] == per_k[r["chosen_k"]]["ari"] > 0.85
    assert per_k[6]["ari"] > 0.9 and per_k[5]["ari"] > 0.8 and per_k[2]["ari"] < 0.5
    assert per_k[6]["sizes"][:4] == [300, 300, 300, 300] and sum(per_k[6]["sizes"]) == 1500
    assert r["elbow_k"] in range(4, 8)


def test_k6_clusters_are_pure_domains():
    """At K=6 every cluster holds one domain; the only split domain is 'strings', by sub-task."""
    rc = load_recipe(None, [f"data.train={DEFAULT['train']}"])
    texts, domains = example_texts(rc.data)
    res = scan(embed(texts, "tfidf"), 6, 6, domains)[0]
    pairs = Counter(zip(domains, res["labels"].tolist()))
    assert len(pairs) == 6 and len({lab for _, lab in pairs}) == 6
    split = {dom for dom, _ in pairs if sum(d == dom for d, _ in pairs) > 1}
    assert split == {"strings"}


def test_new_recipe_loads_with_k_and_input_is_unchanged(tfidf_run):
    r, src = tfidf_run["report"], tfidf_run["src"]
    new = Path(r["new_recipe"])
    assert new == src.with_name(f"hyd.k{r['chosen_k']}.yaml")
    assert src.read_bytes() == tfidf_run["before"]
    rc = load_recipe(new)
    assert rc.expert.type == "hydralora" and rc.expert.num_experts == r["chosen_k"]
    assert rc.expert.rank == 4 and rc.router.balance_loss == "switch" and rc.train.max_steps == 7
    assert rc.router.init_centroids is None
    assert new.read_text().startswith("# Written by `moetune cluster-heads`")


def test_json_report_and_png(tfidf_run):
    r = tfidf_run["report"]
    assert {"embedder", "rows", "chosen_k", "ari", "per_k", "plot", "new_recipe", "text", "elbow_k"} <= set(r)
    assert r["embedder"] == "tfidf" and r["rows"] == 1500 and r["text"] == "instruction"
    for x in r["per_k"]:
        assert set(x) == {"k", "inertia", "silhouette", "ari", "sizes"} and len(x["sizes"]) == x["k"]
        assert -1 <= x["silhouette"] <= 1 and -1 <= x["ari"] <= 1 and x["inertia"] > 0
    inertias = [x["inertia"] for x in r["per_k"]]
    assert inertias == sorted(inertias, reverse=True)
    png = Path(r["plot"])
    assert png.parent == tfidf_run["dir"] and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_refuses_to_overwrite(tmp_path, monkeypatch):
    src = write_recipe(tmp_path / "hyd.yaml", "smollm2-135m-instruct", DEFAULT)
    before = src.read_bytes()
    fast = ["--embedder", "tfidf", "--max-rows", "150", "--max", "3"]
    with pytest.raises(RecipeError, match="never overwrites"):
        cluster_heads(src, [], embedder="tfidf", out=src, force=True)
    other = tmp_path / "other.yaml"
    other.write_text("keep me\n")
    assert cli(monkeypatch, "cluster-heads", src, *fast, "--out", other) == 2
    assert other.read_text() == "keep me\n"
    assert cli(monkeypatch, "cluster-heads", src, *fast) == 0
    written = sorted(tmp_path.glob("hyd.k*.yaml"))
    assert len(written) == 1
    text = written[0].read_text()
    assert cli(monkeypatch, "cluster-heads", src, *fast) == 2      # the default name exists now
    assert written[0].read_text() == text
    assert cli(monkeypatch, "cluster-heads", src, *fast, "--out", other, "--force") == 0
    assert load_recipe(other).expert.num_experts in (2, 3)
    assert src.read_bytes() == before


def test_lora_type_and_bad_options_are_recipe_errors(tmp_path, monkeypatch):
    lora = write_recipe(tmp_path / "lora.yaml", "smollm2-135m-instruct", DEFAULT, etype="lora")
    with pytest.raises(RecipeError, match="hydralora, molora or mov"):
        cluster_heads(lora, [], embedder="tfidf")
    assert cli(monkeypatch, "cluster-heads", lora, "--embedder", "tfidf") == 2
    # An override turns it into a routed type.
    rep = cluster_heads(lora, ["expert.type=mov"], embedder="tfidf", k_max=3, max_rows=100,
                        out=tmp_path / "mov.yaml")
    assert load_recipe(tmp_path / "mov.yaml").expert.num_experts == rep["chosen_k"]
    hyd = write_recipe(tmp_path / "hyd.yaml", "smollm2-135m-instruct", DEFAULT)
    with pytest.raises(RecipeError, match="neither minilm, base, tfidf"):
        cluster_heads(hyd, [], embedder=str(tmp_path / "no-such-model"), max_rows=50)
    with pytest.raises(RecipeError, match="2 <= min <= max"):
        cluster_heads(hyd, [], embedder="tfidf", k_min=1)
    assert not list(tmp_path.glob("hyd.k*"))


def test_router_init_weight_is_centred_scaled_and_keeps_the_argmax():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(4, 16, generator=g) + 3.0                          # (K, d), a large common part
    w = router_init_weight(c, 0.02)
    torch.testing.assert_close(w.sum(0), torch.zeros(16), atol=1e-6, rtol=0)
    assert abs(float(w.pow(2).mean().sqrt()) - 0.02) < 1e-6
    x = torch.randn(100, 16, generator=g)
    assert torch.equal((x @ w.t()).argmax(-1), (x @ c.t()).argmax(-1))  # a common shift + positive scale


def test_choose_and_elbow():
    rows = [{"k": k, "silhouette": s, "inertia": i} for k, s, i in
            [(2, 0.1, 100.0), (3, 0.3, 40.0), (4, 0.3, 35.0), (5, 0.2, 32.0)]]
    assert choose(rows) == 3 and elbow(rows) == 3


def test_init_router_on_tiny_llama(tiny_llama, tiny_data, tmp_path, monkeypatch):
    from moetune.adapters.inject import inject
    from moetune.adapters.io import load_adapter, save_adapter
    from moetune.models.load import load_model
    src = write_recipe(tmp_path / "tiny.yaml", str(tiny_llama), tiny_data, num_experts=2)
    assert cli(monkeypatch, "cluster-heads", src, "--embedder", "base", "--max", "4", "--init-router",
               "--out", tmp_path / "new.yaml") == 0
    rc = load_recipe(tmp_path / "new.yaml")
    k = rc.expert.num_experts
    cpath = Path(rc.router.init_centroids)
    assert cpath == tmp_path / "new.centroids.safetensors"
    meta = json.loads(cpath.with_suffix(".json").read_text())
    assert meta["k"] == k and meta["dim"] == 32 and meta["embedder"] == "base"
    c = load_file(cpath)["centroids"]                                  # (K, hidden 32)
    assert c.shape == (k, 32)
    model = load_model(rc.model)
    layers = inject(model, rc.expert, rc.router)
    expected = router_init_weight(c, rc.router.init_std)
    hit = [n for n, layer in layers.items() if layer.d_in == 32]
    miss = [n for n, layer in layers.items() if layer.d_in != 32]
    assert len(hit) == 12 and len(miss) == 2 and all(n.endswith("down_proj") for n in miss)
    for n in hit:
        torch.testing.assert_close(layers[n].router.weight.data, expected)
    for n in miss:                                                     # (K, 64): left at the random init
        w = layers[n].router.weight.data
        assert w.shape == (k, 64) and w.std() < 0.05 and w.abs().sum() > 0
    # A saved adapter loads without the centroid file: its own router weights are used.
    for layer in layers.values():
        layer.router.weight.data.add_(1.0)
    save_adapter(tmp_path / "adapter", model, rc.expert, rc.router, str(tiny_llama))
    cpath.unlink()
    fresh = load_model(rc.model)
    load_adapter(fresh, tmp_path / "adapter")
    got = {n: m.router.weight for n, m in fresh.named_modules() if hasattr(m, "router")}
    torch.testing.assert_close(got[hit[0]].data, expected + 1.0)
    with pytest.raises(RecipeError, match="router.init_centroids"):
        load_recipe(tmp_path / "new.yaml")


def test_centroid_count_must_match_num_experts(tiny_llama, tiny_data, tmp_path):
    from moetune.adapters.inject import inject
    from moetune.models.load import load_model
    src = write_recipe(tmp_path / "tiny.yaml", str(tiny_llama), tiny_data, num_experts=2)
    rep = cluster_heads(src, [], embedder="base", k_max=3, init_router=True, out=tmp_path / "new.yaml")
    rc = load_recipe(tmp_path / "new.yaml", [f"expert.num_experts={rep['chosen_k'] + 1}"])
    with pytest.raises(RecipeError, match="centroids but expert.num_experts"):
        inject(load_model(rc.model), rc.expert, rc.router)


def test_minilm_on_a_subsample(tmp_path):
    """The default embedder on 300 default rows: measured ARI 1.0 at K=5 (see README for the full set)."""
    src = write_recipe(tmp_path / "hyd.yaml", "smollm2-135m-instruct", DEFAULT)
    t0 = time.time()
    rep = cluster_heads(src, [], embedder="minilm", k_min=4, k_max=6, max_rows=300, out=tmp_path / "m.yaml")
    per_k = {x["k"]: x for x in rep["per_k"]}
    assert rep["dim"] == 384 and rep["rows"] == 300
    assert per_k[5]["ari"] > 0.9 and rep["ari"] > 0.85 and rep["chosen_k"] in (5, 6)
    assert time.time() - t0 < 120


# ------------------------------------------------------------------ a newcomer's papercuts (issue 28)

FAST = ["--embedder", "tfidf", "--max-rows", "150", "--max", "3"]


def _no_embedding(monkeypatch):
    """Make embedding fail loudly: a refusal must come before any work."""
    import moetune.commands.cluster as cluster

    def embed(*a, **k):
        raise AssertionError("embedded before refusing")
    monkeypatch.setattr(cluster, "embed", embed)


def test_a_rerun_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    src = write_recipe(tmp_path / "hyd.yaml", "smollm2-135m-instruct", DEFAULT)
    assert cli(monkeypatch, "cluster-heads", src, *FAST, "--json", tmp_path / "r.json") == 0
    written = sorted(tmp_path.glob("hyd.k*.yaml"))
    assert len(written) == 1
    capsys.readouterr()
    _no_embedding(monkeypatch)
    assert cli(monkeypatch, "cluster-heads", src, *FAST) == 2           # the default name of some K exists
    err = capsys.readouterr().err
    assert written[0].name in err and "--force" in err and "Traceback" not in err
    other = tmp_path / "other.yaml"
    other.with_suffix(".png").write_bytes(b"keep me")                   # the plot beside --out exists
    assert cli(monkeypatch, "cluster-heads", src, *FAST, "--out", other) == 2
    assert "other.png" in capsys.readouterr().err and not other.exists()
    assert cli(monkeypatch, "cluster-heads", src, *FAST, "--out", tmp_path / "new.yaml",
               "--json", tmp_path / "r.json") == 2                       # --json names an existing file
    assert "r.json" in capsys.readouterr().err
    assert other.with_suffix(".png").read_bytes() == b"keep me"


BLOCK = """\
# My own recipe: HydraLoRA on my data.
model:
  path: smollm2-135m-instruct   # the built-in model
expert:
  type: hydralora
  rank: 4
  num_experts: 5                # a guess; cluster-heads picks it
  target_modules: [q_proj, v_proj]  # attention only
router: {balance_loss: switch, balance_weight: 0.01}
data:
  train: TRAIN
  validation: VALIDATION
  test: TEST

  # how long
train:
  max_steps: 7
stages: [train, eval, export]
"""


def test_the_new_recipe_keeps_comments_and_layout(tmp_path, monkeypatch):
    src = tmp_path / "mine.yaml"
    text = BLOCK.replace("TRAIN", str(DEFAULT["train"])).replace("VALIDATION", str(DEFAULT["validation"]))
    src.write_text(text.replace("TEST", str(DEFAULT["test"])))
    rep = cluster_heads(src, ["train.max_steps=9", "data.max_length=64"], embedder="tfidf", k_max=3, max_rows=150,
                        out=tmp_path / "new.yaml")
    k = rep["chosen_k"]
    new = (tmp_path / "new.yaml").read_text()
    old_lines = src.read_text().splitlines()
    header, body = new.split(old_lines[0] + "\n", 1)                    # what cluster-heads adds, then the recipe
    new_lines = [old_lines[0], *body.splitlines()]
    # every line the same but the two changed values; the new key (data.max_length) is one line more
    assert len(new_lines) == len(old_lines) + 1
    assert f"  num_experts: {k}                # a guess; cluster-heads picks it" in new_lines
    assert "  max_steps: 9" in new_lines and "  max_length: 64" in new_lines
    for line in old_lines:
        if "num_experts" not in line and "max_steps" not in line:
            assert line in new_lines, line                                   # comments, flow lists, blank lines
    diff = [d for d in difflib.ndiff(old_lines, new_lines) if d[:2] in ("- ", "+ ")]
    assert sorted(diff) == sorted(["-   num_experts: 5                # a guess; cluster-heads picks it",
                                   f"+   num_experts: {k}                # a guess; cluster-heads picks it",
                                   "-   max_steps: 7", "+   max_steps: 9", "+   max_length: 64"])
    assert "expert.num_experts" in header and "train.max_steps" in header and "data.max_length" in header
    assert all(line.startswith("#") for line in header.splitlines())
    rc = load_recipe(tmp_path / "new.yaml")
    assert rc.expert.num_experts == k and rc.train.max_steps == 9 and rc.data.max_length == 64
    assert list(rc.expert.target_modules) == ["q_proj", "v_proj"] and rc.router.balance_loss == "switch"


def test_the_new_recipe_keeps_a_flow_style_section(tmp_path):
    src = write_recipe(tmp_path / "hyd.yaml", "smollm2-135m-instruct", DEFAULT)
    rep = cluster_heads(src, [], embedder="tfidf", k_max=3, max_rows=150, out=tmp_path / "new.yaml")
    new = (tmp_path / "new.yaml").read_text()
    assert "# my recipe" in new
    assert f"expert: {{type: hydralora, rank: 4, num_experts: {rep['chosen_k']}}}" in new
    assert "router: {balance_loss: switch, balance_weight: 0.01}" in new
    assert load_recipe(tmp_path / "new.yaml").expert.num_experts == rep["chosen_k"]


def test_init_router_help_names_every_embedder(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "300")
    assert cli(monkeypatch, "cluster-heads", "--help") == 0
    out = " ".join(capsys.readouterr().out.split())
    line = out.split("--init-router", 1)[1].split("--with-response", 1)[0]
    assert "needs --embedder base" not in line
    assert "minilm" in line and "base" in line and "router.init_centroids" in line


@pytest.mark.parametrize("embedder", ["tfidf", "base"])
def test_init_router_into_a_new_folder(tiny_llama, tiny_data, tmp_path, embedder):
    """--out in a folder that does not exist yet: the router (or centroid) file goes there too (the
    routing-balance studies write runs/studies/clusters/<data>.k4.*; it failed with an I/O error)."""
    src = write_recipe(tmp_path / "tiny.yaml", str(tiny_llama), tiny_data)
    out = tmp_path / "new" / "dir" / "c.yaml"
    rep = cluster_heads(src, [], embedder=embedder, k_min=2, k_max=2, init_router=True, out=out)
    assert Path(rep["centroids"]).is_file() and Path(rep["centroids"]).parent == out.parent
    assert load_recipe(out).router.init_centroids == rep["centroids"]
