"""`router.init: clusters`: the routers start from clusters of the training prompts, found when training starts.

The two steps of `moetune cluster-heads --init-router` (moetune/commands/cluster.py, moetune/train/router_fit.py),
run inside `train` so that a recipe can name the init without naming a file made for one data set:

1. embed the prompt of each training row (data.train, or every source of data.mix; a preference pair's chosen
   sequence) with `router.init_embedder`, a seeded sample of `router.init_max_rows` rows, and split them by
   K-means into K = expert.num_experts clusters;
2. on the loaded base model, before the adapter is injected, fit every routed projection's router by ridge least
   squares so that each row's prompt-mean input x_j maps to its cluster: W = Y^T X (X^T X + lam I)^-1 with
   Y the centred one-hot cluster ids (router_fit.fit_weight).

The fitted weights go to <output_dir>/router_init.safetensors ('weight.<module name>' (K, d_in)), with
router_init.json beside it (K, embedder, rows, seed, cluster sizes, the adjusted Rand index against the data's
domain column when it has one, and each projection's fit accuracy). The run keeps both: a resumed run reuses them
(settings checked against the .json) instead of clustering again, and they record where the routers started.
The main process computes; the other processes wait for it and read the file. The seed is expert.init_seed, else
train.seed (the adapter's own init seed), so seeds of a study differ in their clusters too.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

from moetune.adapters.inject import target_layer_names
from moetune.commands.cluster import embed, example_texts, scan
from moetune.core.checkpoint import write_json
from moetune.core.errors import RecipeError
from moetune.core.files import atomic_file
from moetune.core.ui import plural
from moetune.data.pipeline import source_rows
from moetune.recipe import Recipe
from moetune.train.router_fit import fit_router_file

FILE = "router_init.safetensors"


def settings(rc: Recipe) -> dict:
    """What the clusters depend on: a reused file must have been made with these."""
    seed = rc.expert.init_seed if rc.expert.init_seed is not None else rc.train.seed
    return {"k": int(rc.expert.num_experts), "embedder": rc.router.init_embedder,
            "max_rows": rc.router.init_max_rows, "seed": int(seed),
            "train": [m.path for m in rc.data.mix] if rc.data.mix else str(rc.data.train)}


def reusable(path: Path, want: dict) -> bool:
    """The run already holds a router init made with `want` (a resumed or restarted run)."""
    meta = path.with_suffix(".json")
    if not (path.is_file() and meta.is_file()):
        return False
    try:
        return json.loads(meta.read_text()).get("settings") == want
    except ValueError:
        return False


def fit_clusters(rc: Recipe, model, tokenizer, path: Path, log: Callable[[str], None]) -> dict:
    """Steps 1-2 of the module docstring on `model` (the base, no adapter yet); write `path` and its .json."""
    want = settings(rc)
    t0 = time.time()
    rows = source_rows(rc.data, tokenizer, want["max_rows"], want["seed"])  # tokenised, before any embedding
    texts, domains = example_texts(rc.data, False, want["max_rows"], want["seed"])
    if len(texts) <= want["k"]:
        raise RecipeError(f"Recipe key 'router.init' is 'clusters', but the training data gives "
                          f"{plural(len(texts), 'row')} for {plural(want['k'], 'cluster')} (expert.num_experts). "
                          "Allowed: more rows than experts, or router.init: random.")
    log(f"router.init: clusters: embedding {plural(len(texts), 'training prompt')} ({want['embedder']}), "
        f"K-means into {plural(want['k'], 'cluster')}, fitting the routers on the base model ...")
    if len(rows) != len(texts):  # both read every source's rows in order: a mismatch is a bug, never a guess
        raise RuntimeError(f"router.init: {plural(len(texts), 'prompt')} but {plural(len(rows), 'tokenised row')}")
    found = scan(embed(texts, want["embedder"], rc.model), want["k"], want["k"], domains, want["seed"])[0]
    names = target_layer_names(model, rc.expert)
    with atomic_file(path, ".safetensors") as tmp:
        acc = fit_router_file(model, rows, found["labels"], names, tokenizer.pad_token_id, tmp)
    report = {"settings": want, "rows": len(texts), "sizes": found["sizes"], "silhouette": found["silhouette"],
              "ari_vs_domain": found["ari"], "seconds": round(time.time() - t0, 1),
              "fit": "ridge least squares of centred one-hot cluster ids on each projection's prompt-mean input",
              "train_accuracy": acc, "use": "router.init_centroids: each router's weight is copied by module name"}
    write_json(path.with_suffix(".json"), report)
    ari = f", adjusted Rand index vs domain {found['ari']:.2f}" if found["ari"] is not None else ""
    log(f"Routers start from {plural(want['k'], 'cluster')} of {plural(len(texts), 'prompt')} (sizes "
        f"{' '.join(map(str, found['sizes']))}{ari}; mean fit accuracy {sum(acc.values()) / max(len(acc), 1):.2f}, "
        f"{report['seconds']:.0f} s): {path}")
    return report


def clustered_init(rc: Recipe, model, tokenizer, run_dir: Path, main: bool, wait: Callable[[], None],
                   log: Callable[[str], None]) -> Recipe:
    """`rc` itself, or with router.init: clusters `rc` whose router.init_centroids names the run's fitted file
    (made now by the main process unless the run holds one with the same settings)."""
    if rc.router.init != "clusters":
        return rc
    path = Path(run_dir) / FILE
    if main and not reusable(path, settings(rc)):
        fit_clusters(rc, model, tokenizer, path, log)  # router_fit.pooled_inputs runs without gradients
    elif main:
        log(f"router.init: clusters: reusing {path} (made with the same settings)")
    wait()
    return dataclasses.replace(rc, router=dataclasses.replace(rc.router, init_centroids=str(path)))
