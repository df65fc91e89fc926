"""Router initialisation from clusters (`router.init_centroids`, written by `moetune cluster-heads
--init-router`; `adapters.inject` calls `init_routers` after wrapping the model).

With `--embedder base` the file holds K-means centroids (K, d) of mean-pooled hidden states: every router
whose input has size d starts from them (`router_init_weight`). With any other embedder it holds one fitted
router weight per projection ('weight.<module name>', moetune/train/router_fit.py), copied by name.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from moetune.core.errors import RecipeError


def router_init_weight(centroids: torch.Tensor, init_std: float) -> torch.Tensor:
    """Router weight (K, d) from K-means centroids (K, d): centred over the K rows, then scaled
    so that the RMS of its entries is `init_std` (the same size as the random N(0, init_std^2)
    init). Subtracting one vector from every row shifts all logits of a token equally, which the
    softmax ignores: the gates are those of the raw centroids at a smaller scale."""
    c = centroids.float() - centroids.float().mean(0, keepdim=True)    # (K, d)
    rms = c.pow(2).mean().sqrt()
    return c * (init_std / rms) if rms > 0 else c


def load_centroids(path: str) -> torch.Tensor:
    """The (K, d) 'centroids' tensor of a file written by `cluster-heads --init-router`."""
    if not Path(path).is_file():
        raise RecipeError(f"Recipe key 'router.init_centroids' names {path!r}, which does not exist.")
    t = load_file(path).get("centroids")
    if t is None or t.dim() != 2:
        raise RecipeError(f"{path}: no (K, d) 'centroids' tensor; write it with `moetune cluster-heads --init-router`.")
    return t


def init_fitted(layers: dict, path: str, weights: dict) -> tuple[list[str], list[str]]:
    """Copy the fitted per-projection router weights ('weight.<name>', see moetune/train/router_fit.py)
    into the routers of the layers of those names; return (initialised, skipped) names."""
    done, skipped = [], []
    for name, layer in layers.items():
        w = weights.get(f"weight.{name}")
        router = getattr(layer, "router", None)
        if w is None or getattr(router, "weight", None) is None:
            skipped.append(name)
            continue
        if tuple(w.shape) != tuple(router.weight.shape):
            raise RecipeError(f"router.init_centroids {path!r} holds a ({w.shape[0]}, {w.shape[1]}) router weight for "
                              f"{name}, whose router is {tuple(router.weight.shape)} (expert.num_experts, input dim). "
                              "Allowed: a file written by `cluster-heads --init-router` for this recipe's K and model.")
        with torch.no_grad():
            router.weight.copy_(w.to(router.weight.device, router.weight.dtype))
        done.append(name)
    return done, skipped


def init_routers(layers: dict, path: str, init_std: float) -> tuple[list[str], list[str]]:
    """Set Router.weight of each routed layer whose input dim equals the centroids' dim;
    return (initialised names, skipped names). Others keep their random init, as do gates that
    do not read the layer input (MoLE gates over expert outputs). A file of fitted weights
    (`cluster-heads --init-router` with another embedder than base) sets each router by name."""
    if Path(path).is_file():
        fitted = {k: v for k, v in load_file(path).items() if k.startswith("weight.")}
        if fitted:
            return init_fitted(layers, path, fitted)
    c = load_centroids(path)
    w = router_init_weight(c, init_std)                                # (K, d)
    done, skipped = [], []
    for name, layer in layers.items():
        router = getattr(layer, "router", None)
        w_in = getattr(router, "weight", None)
        reads_input = w_in is not None and w_in.shape[1] == getattr(layer, "d_in", None)
        if not reads_input:
            continue
        if router.weight.shape[0] != c.shape[0]:
            raise RecipeError(f"router.init_centroids {path!r} holds {c.shape[0]} centroids but expert.num_experts is "
                              f"{router.weight.shape[0]}. Allowed: a centroid file with one row per expert.")
        if layer.d_in != c.shape[1]:
            skipped.append(name)
            continue
        with torch.no_grad():
            router.weight.copy_(w.to(router.weight.device, router.weight.dtype))
        done.append(name)
    return done, skipped
