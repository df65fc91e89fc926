"""One recipe's run: what its stages share (`Run`), and the model with its trained adapter.

`Run` holds the recipe, the run directory, the device (or the accelerate `Accelerator`), the
tokenizer and the data splits (each loaded once, when first asked for) and reads/updates
summary.json. The commands (train, merge, eval, export) and the exports (collapse, multi-LoRA
merge) all work on one.

Run directory layout:
    recipe.yaml        the resolved recipe
    metrics.jsonl      training metrics, one JSON object per line
    summary.json       {'before', 'after', 'train', 'merge', 'eval', 'export'}
    checkpoints/       step-XXXXXXX/ full training state (resume)
    adapter/           the trained adapter (PEFT LoRA files + moetune.json)
    merged/            the merged model (merge stage)
    eval.json          the last evaluation (with a "routing" report for routed adapters)
    routing.png        routed adapters: mean gate weight, layer x expert, one panel per domain
    routing.md         routed adapters: the routing tables (per layer load, entropy, dead experts; per domain)
    export/            what `export` writes
"""
from __future__ import annotations

import json
from pathlib import Path

from moetune import recipe as R
from moetune.adapters.inject import mask_experts
from moetune.adapters.io import load_adapter, reference_dir
from moetune.core.checkpoint import write_json
from moetune.core.ui import console
from moetune.data.pipeline import load_splits
from moetune.models.load import load_model, load_tokenizer, pick_device


class Run:
    """What the stages of one recipe share: recipe, run directory, device, tokenizer, data."""

    def __init__(self, recipe: R.Recipe, accelerator=None, record: bool = True) -> None:
        """record=False: a run of no run directory (merge-lora on a bare adapter): summary.json is never written."""
        self.recipe = recipe
        self.record = record
        self.dir = Path(recipe.output_dir)
        self.accelerator = accelerator
        self.device = accelerator.device if accelerator is not None else pick_device(recipe.model)
        self.main = accelerator is None or accelerator.is_main_process
        self._tok = None
        self._splits: dict = {}

    def log(self, msg: str) -> None:
        if self.main:
            console.print(msg)

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = load_tokenizer(self.recipe.model, log=self.log)
        return self._tok

    def splits(self, *need: str) -> dict:
        missing = tuple(n for n in need if n not in self._splits)
        if missing:
            self._splits.update(load_splits(self.recipe.data, self.tokenizer, missing))
        return self._splits

    def held_out(self) -> list:
        split = self.recipe.eval.split
        examples = self.splits(split).get(split)
        if not examples:
            raise R.RecipeError(f"Recipe key 'eval.split' is {split!r} but data.{split} is not set.")
        return examples

    def held_out_tag(self) -> dict:
        """What the held-out scores are on: the split, its source and the number of examples scored. 'before'
        and 'after' in summary.json carry it, so that a pair on different rows is never shown as one."""
        rc = self.recipe
        source = held_out_source(rc)
        n = len(self.held_out())
        return {"split": rc.eval.split, "source": source,
                "examples": min(n, rc.eval.max_examples) if rc.eval.max_examples else n}

    @property
    def summary_path(self) -> Path:
        return self.dir / "summary.json"

    def summary(self) -> dict:
        return json.loads(self.summary_path.read_text()) if self.summary_path.is_file() else {}

    def loaded_examples(self) -> list:
        """The examples of a split loaded already (the held-out split first), without reading any data: [] if none."""
        for name in (self.recipe.eval.split, "validation", "test", "train"):
            if self._splits.get(name):
                return self._splits[name]
        return []

    def update_summary(self, **parts) -> None:
        if self.main and self.record:
            s = self.summary()
            s.update(parts)
            write_json(self.summary_path, s)


def held_out_source(rc: R.Recipe) -> str:
    """Where the held-out split (eval.split) comes from, in words: its file, or the part of the training data
    that data.validation_split holds out."""
    return getattr(rc.data, rc.eval.split) or (
        f"data.train less its validation_split {rc.data.validation_split} (seed {rc.data.seed})")


def model_with_adapter(run: Run, adapter_dir: Path | None = None, fresh: bool = False):
    """The base model with the run's adapter (or `adapter_dir`); fresh=True: the adapter training started from,
    i.e. the model the run's 'before' scores describe: as initialised (train.seed), or with train.reference
    (DPO after SFT) that run's adapter."""
    model = load_model(run.recipe.model, run.device, log=run.log)
    if fresh and run.recipe.train.reference is not None:
        load_adapter(model, reference_dir(run.recipe.train.reference))
    else:
        load_adapter(model, adapter_dir or run.dir / "adapter", fresh_seed=run.recipe.train.seed if fresh else None)
    masked = run.recipe.expert.masked_experts()
    if masked:  # --mask-experts (MoLE): gates at 0, the rest renormalised
        mask_experts(model, masked)
    return model
