"""Router init fitted to clusters from any embedder (moetune/train/router_fit.py, `cluster-heads --init-router`)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from test_cluster import write_recipe
from transformers import AutoTokenizer

from moetune.adapters.inject import inject
from moetune.commands.cluster import cluster_heads
from moetune.data.pipeline import load_examples
from moetune.data.rows import IGNORE, collate
from moetune.experts.routing import prompt_mask, routing_context
from moetune.models.load import load_model
from moetune.recipe import load_recipe
from moetune.train.router_fit import fit_weight

torch.set_num_threads(1)


def test_fit_weight_separates_separable_rows():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 20, generator=g) * 3
    labels = torch.arange(60) % 3
    x = centres[labels] + torch.randn(60, 20, generator=g) * 0.5         # (n, d)
    w = fit_weight(x, labels, 3)                                         # (K, d)
    assert w.shape == (3, 20)
    assert torch.equal((x @ w.t()).argmax(-1), labels)
    # least squares of the centred one-hot: the logits of a row are near 2/3 for its cluster, -1/3 else
    assert abs(float((x @ w.t()).gather(1, labels[:, None]).mean()) - 2 / 3) < 0.1


def test_init_router_with_the_default_minilm_embedder(tiny_llama, tiny_data, tmp_path):
    """minilm clusters of the tiny rows -> fitted router weights in every projection; the injected
    routers then send the clustered rows to their own cluster's expert well above chance (1/2)."""
    src = write_recipe(tmp_path / "tiny.yaml", str(tiny_llama), tiny_data, num_experts=2)
    rep = cluster_heads(src, [], embedder="minilm", k_min=2, k_max=2, init_router=True, out=tmp_path / "new.yaml")
    rc = load_recipe(tmp_path / "new.yaml")
    path = Path(rc.router.init_centroids)
    assert path == tmp_path / "new.router.safetensors" and rep["centroids"] == str(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["embedder"] == "minilm" and meta["k"] == 2 and len(meta["train_accuracy"]) == 14
    model = load_model(rc.model)
    layers = inject(model, rc.expert, rc.router)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ex = load_examples(str(tiny_data["train"]), tok, rc.data)
    # the clusters themselves: recompute them as cluster_heads did (same K-means on the same rows)
    from moetune.commands.cluster import embed, example_texts, scan
    texts, _ = example_texts(rc.data)
    labels = torch.as_tensor(scan(embed(texts, "minilm", rc.model), 2, 2)[0]["labels"]).long()   # (n,)
    grabbed = {}
    hooks = [m.router.register_forward_hook(lambda mod, i, o, n=n: grabbed.__setitem__(n, o.detach()))
             for n, m in layers.items()]
    b = collate(ex, tok.pad_token_id)
    pool = prompt_mask(b["labels"] != IGNORE, b["attention_mask"])       # (B, T)
    with torch.no_grad(), routing_context(pool_mask=pool):
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in hooks:
        h.remove()
    acc = []
    for w in grabbed.values():                                           # (B, T, N)
        mean = (w * pool.unsqueeze(-1)).sum(1) / pool.sum(1, keepdim=True)   # (B, N) mean prompt gate
        acc.append(float((mean.argmax(-1) == labels).float().mean()))
    assert len(acc) == 14 and min(acc) > 0.75 and sum(acc) / len(acc) > 0.9
    fresh = load_model(rc.model)
    plain = inject(fresh, load_recipe(tmp_path / "new.yaml", ["router.init_centroids=null"]).expert)
    assert not torch.equal(next(iter(plain.values())).router.weight, next(iter(layers.values())).router.weight)


def test_projections_that_read_one_input_share_it(tiny_llama, tiny_data):
    """pooled_inputs keeps one tensor for q/k/v and one for gate/up per block, each equal to the projection's
    own prompt-mean input computed by hand, on every row (rows beyond the first batch included)."""
    from moetune.adapters.inject import target_layer_names
    from moetune.train.router_fit import pooled_inputs
    src = write_recipe(Path(tiny_data["train"]).parent / "pool.yaml", str(tiny_llama), tiny_data, num_experts=2)
    rc = load_recipe(src)
    model = load_model(rc.model)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ex = load_examples(str(tiny_data["train"]), tok, rc.data)[:11]
    names = target_layer_names(model, rc.expert)
    got = pooled_inputs(model, ex, names, tok.pad_token_id, batch_size=4)   # 3 batches, the last one short
    b = collate(ex, tok.pad_token_id)
    pool = prompt_mask(b["labels"] != IGNORE, b["attention_mask"]).unsqueeze(-1).float()   # (n, T, 1)
    want = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, a, n=n: want.__setitem__(n, (a[0] * pool).sum(1) / pool.sum(1))) for n in names]
    with torch.no_grad():
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    for h in hooks:
        h.remove()
    for n in names:
        assert got[n].shape == want[n].shape == (11, model.get_submodule(n).in_features)
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-5)   # padded batches of 4 vs one of 11
    groups = {}
    for n in names:
        groups.setdefault(id(got[n]), []).append(n.rsplit(".", 1)[-1])
    assert sorted(map(sorted, groups.values())) == sorted(
        [["k_proj", "q_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]] * 2)
