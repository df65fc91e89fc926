"""scripts/migrate_layout.py: old flat-layout imports and paths become the sub-package ones, once.

The old paths below are fixtures (migrate_layout: leave this file).
"""
from __future__ import annotations

import importlib
import importlib.util

from scripts_loader import load_script

from conftest import ROOT
migrate = load_script("migrate_layout")

OLD = '''"""Uses moetune.sources and moetune/models.py."""
import moetune.adapters as A
from moetune import recipe as R, routing as RT
from moetune.data import IGNORE, collate
from moetune.stages import (Run, model_with_adapter,  # noqa: F401
                            run_recipe)
from moetune.experts.calm_bridge import decoder_layers, load_augmenting


def f():
    from moetune.report import layer_index, mean_gates
    return moetune.train.Plan
'''
NEW = '''"""Uses moetune.data.sources and moetune/models/load.py."""
import moetune.adapters.io as A
from moetune import recipe as R
from moetune.experts import routing as RT
from moetune.data.rows import IGNORE, collate
from moetune.run.session import Run, model_with_adapter  # noqa: F401
from moetune.commands.stages import run_recipe
from moetune.models.layers import decoder_layers
from moetune.experts.calm_bridge import load_augmenting


def f():
    from moetune.models.layers import layer_index
    from moetune.eval.report import mean_gates
    return moetune.train.loop.Plan
'''


def test_old_imports_and_paths_become_the_new_ones_once():
    assert migrate.rewrite_python(OLD) == NEW
    assert migrate.rewrite_python(NEW) == NEW  # idempotent: a second run changes nothing
    wrapped = "from moetune.data.datagen import (  # noqa: E402\n    BLORP, DOMAINS,\n)\n"
    assert migrate.rewrite_python(wrapped) == wrapped  # a new-layout import keeps its own formatting
    assert migrate.rewrite_text("see `moetune/train.py` and `moetune.pipeline.load_splits`") == \
        "see `moetune/train/loop.py` and `moetune.data.pipeline.load_splits`"


def test_files_are_rewritten_in_place_but_the_marked_ones(tmp_path, capsys):
    old, marked = tmp_path / "a.py", tmp_path / "b.py"
    old.write_text(OLD)
    marked.write_text("# migrate_layout: leave this file\n" + OLD)
    assert migrate.main([str(tmp_path)]) == 0
    assert old.read_text() == NEW and marked.read_text() == "# migrate_layout: leave this file\n" + OLD
    assert capsys.readouterr().out.split() == [str(old)]


def test_every_target_exists_and_every_old_module_is_gone():
    for old, new in migrate.MOVED.items():
        assert not (ROOT / "moetune" / f"{old}.py").exists(), old
        assert importlib.util.find_spec(f"moetune.{new}") is not None, new
    for (module, name), home in migrate.NAMES.items():
        assert hasattr(importlib.import_module(f"moetune.{home}"), name), (home, name)
        assert name not in vars(importlib.import_module(f"moetune.{module}")) or \
            getattr(importlib.import_module(f"moetune.{module}"), name).__module__ == f"moetune.{home}", (module, name)
