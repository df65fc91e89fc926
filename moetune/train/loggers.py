"""Training metrics to metrics.jsonl and to the trackers of `train.report_to` (tensorboard, wandb,
mlflow), plus the per-block routing numbers of routed adapters and `curves.png` at the end.

`TrainLoggers.log(row)` is called by the training loop wherever a metrics.jsonl row is written.
For a training row of a routed adapter it first adds `row["routing"]`, computed from the gates of
the step's last micro-batch (real tokens only, padding masked):

    entropy               mean over routed modules of the mean per-token gate entropy (nats)
    entropy_by_block[k]   the same over the modules of transformer block k
    load_by_block[k]      (N,) mean gate weight per expert over the modules of block k

Tracker tags: train/loss, train/lr, train/grad_norm, train/tokens_per_s, train/epoch,
validation/loss, validation/specialisation (train/routing_log.py), aux/<name>, routing/entropy, routing/entropy/block_<k>, routing/load/block_<k>/expert_<i>;
with train.objective dpo or orpo also train/<name> and validation/<name> for each of PREFERENCE_METRICS
(TRL's names: rewards/chosen, rewards/margins, logps/chosen, ...; train/preference.py).
"""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import torch

from moetune.adapters.inject import routed_layers
from moetune.core.errors import RecipeError
from moetune.core.ui import Metrics
from moetune.experts.routing import entropy, load
from moetune.models.layers import layer_index
from moetune.recipe import Recipe
from moetune.train.curves import save_curves

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                      "logps/rejected", "nll_loss", "log_odds_ratio", "preference_accuracy")
"""Preference-tuning metrics a metrics.jsonl row may hold (train/preference.py), passed to the trackers as is."""


def check_trackers(names: list[str]) -> None:
    """RecipeError naming the missing package of any tracker in `names` (before training starts)."""
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise RecipeError(f"Recipe key 'train.report_to' includes {name!r}, but the {PACKAGES[name]} package is "
                              f"not installed. Install it (pip install {PACKAGES[name]}) or remove {name!r} from "
                              "train.report_to (allowed: tensorboard, wandb, mlflow, or [] for metrics.jsonl only).")


def flatten(row: dict) -> dict[str, float]:
    """Tracker tags of one metrics.jsonl row (see the module docstring); non-numbers are left out."""
    out: dict[str, float] = {}
    val = row.get("split") == "validation"
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "epoch"):
        if isinstance(row.get(key), (int, float)):
            out[f"train/{key}"] = float(row[key])
    if val and isinstance(row.get("val_loss"), (int, float)):
        out["validation/loss"] = float(row["val_loss"])
    if val and isinstance((row.get("val_routing") or {}).get("specialisation"), (int, float)):
        out["validation/specialisation"] = float(row["val_routing"]["specialisation"])
    for key in PREFERENCE_METRICS:
        if isinstance(row.get(key), (int, float)):
            out[f"{'validation' if val else 'train'}/{key}"] = float(row[key])
    for k, v in (row.get("aux") or {}).items():
        out[f"aux/{k}"] = float(v)
    r = row.get("routing")
    if r:
        out["routing/entropy"] = float(r["entropy"])
        for b, h in r["entropy_by_block"].items():
            out[f"routing/entropy/block_{b}"] = float(h)
        for b, ld in r["load_by_block"].items():
            for i, x in enumerate(ld):
                out[f"routing/load/block_{b}/expert_{i}"] = float(x)
    return out


def routing_row(model, mask: torch.Tensor | None) -> dict | None:
    """`row["routing"]` from the routers' last forward (see the module docstring); None if not routed."""
    layers = routed_layers(model)
    blocks: dict[str, list[tuple[float, torch.Tensor]]] = {}
    for name, m in layers.items():
        last = getattr(m.router, "_last", None)
        if last is None:
            continue
        w = last[2].detach().float()                                     # (..., N) gates of the last forward
        msk = getattr(m.router, "_mask", None)                           # its real tokens (the routing context's)
        if msk is None:
            msk = mask if mask is not None and mask.numel() * w.shape[-1] == w.numel() else None
        k = layer_index(name)
        blocks.setdefault(str(k) if k is not None else name, []).append(
            (float(entropy(w, msk)), load(w, msk).cpu()))                  # (N,)
    if not blocks:
        return None
    ent = {b: sum(h for h, _ in v) / len(v) for b, v in blocks.items()}
    ld = {b: (torch.stack([x for _, x in v]).mean(0)) for b, v in blocks.items()}   # (N,) each
    n_mod = sum(len(v) for v in blocks.values())
    return {"entropy": round(sum(h for v in blocks.values() for h, _ in v) / n_mod, 5),
            "entropy_by_block": {b: round(h, 5) for b, h in ent.items()},
            "load_by_block": {b: [round(float(x), 5) for x in t] for b, t in ld.items()}}


class _TensorBoard:
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter
        self.w = SummaryWriter(log_dir=str(log_dir))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for k, v in scalars.items():
            self.w.add_scalar(k, v, step)

    def close(self) -> None:
        self.w.close()


class _WandB:
    def __init__(self, recipe: Recipe, run_dir: Path) -> None:
        import wandb
        self.wandb = wandb
        self.run = wandb.init(name=run_dir.name, dir=str(run_dir), config=dataclasses.asdict(recipe), reinit=True)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, recipe: Recipe, run_dir: Path) -> None:
        import mlflow
        self.mlflow = mlflow
        mlflow.start_run(run_name=run_dir.name)
        t = recipe.train
        mlflow.log_params({"expert.type": recipe.expert.type, "model.path": recipe.model.path, "train.lr": t.lr,
                           "train.batch_size": t.batch_size, "train.max_steps": t.max_steps})

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class TrainLoggers:
    """metrics.jsonl plus the recipe's trackers; only the main process writes anything."""

    def __init__(self, recipe: Recipe, run_dir: Path, model, enabled: bool = True) -> None:
        self.run_dir, self.model, self.enabled = Path(run_dir), model, enabled
        self.metrics = Metrics(self.run_dir / "metrics.jsonl", enabled=enabled)
        self.routed = bool(routed_layers(model))
        self.trackers: list = []
        names = list(recipe.train.report_to)
        check_trackers(names)
        if not enabled:
            return
        for name in dict.fromkeys(names):
            if name == "tensorboard":
                self.trackers.append(_TensorBoard(Path(recipe.train.logging_dir or self.run_dir / "tensorboard")))
            elif name == "wandb":
                self.trackers.append(_WandB(recipe, self.run_dir))
            else:
                self.trackers.append(_MLflow(recipe, self.run_dir))

    def log(self, row: dict, mask: torch.Tensor | None = None) -> None:
        """Write `row` to metrics.jsonl and the trackers; `mask` (B, T): the last micro-batch's attention mask."""
        if not self.enabled:
            return
        if self.routed and "loss" in row and "routing" not in row:
            r = routing_row(self.model, mask)
            if r is not None:
                row = {**row, "routing": r}
        self.metrics.log(row)
        if "event" in row or not isinstance(row.get("step"), int):
            return
        scalars = flatten(row)
        for t in self.trackers:
            t.log(scalars, row["step"])

    def close(self) -> Path | None:
        """Close the trackers and draw curves.png from metrics.jsonl; its path (None when nothing to plot)."""
        for t in self.trackers:
            t.close()
        self.trackers = []
        if not self.enabled or not self.metrics.path.is_file():
            return None
        return save_curves(self.metrics.path, self.run_dir / "curves.png")
