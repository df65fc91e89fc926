"""Type behaviour lives on the type (issue #22, deliverable 2).

1. The modules above the experts layer (commands, exports, run, train, eval, adapters, the CLI) name
   no expert type: no string literal that is an `expert.type` key, no `getattr`/`hasattr` on the recipe's
   expert settings, no import of one type's module. Read from the source with `ast`.
2. The hooks agree with the flags that announce them (a collapsible type collapses, a stock-PEFT type
   exports PEFT tensors, a maskable type masks, ...).
3. A new type registered at run time (its settings class and its layer, nothing else) trains,
   evaluates, exports with a model card, shows in `moetune runs`, and is refused by merge and collapse
   with its own words.
"""
from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import moetune
from conftest import cli, tiny_overrides
from moetune.experts import REGISTRY, ExpertLayer
from moetune.recipe import RecipeError, load_recipe
from moetune.recipe.experts import EXPERT_CONFIGS, ExpertConfig

ROOT = Path(moetune.__file__).parent
EXPERTS_LAYER = moetune.LAYERS["experts"]
# The one allowed literal: `merge-lora --method mole`, a merge method named after its paper (it reads the
# gates of a run whose type says `mixes_trained_loras`; the method is not a type check).
ALLOWED = {("export/multimerge.py", "mole")}
# One type's modules: the module of each registered layer class, and its helpers (named after it: calm_bridge).
TYPE_MODULES = {c.__module__ for c in REGISTRY.values()} | {
    f"moetune.experts.{p.stem}" for p in (ROOT / "experts").glob("*.py") if p.stem.split("_")[0] in REGISTRY}


def _above_experts() -> list[Path]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        key = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if moetune.LAYERS.get(key, -1) > EXPERTS_LAYER:
            out.append(path)
    return out


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _expert_modules(node: ast.AST) -> list[str]:
    """The moetune.experts.* modules an import statement imports."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("moetune.experts")]
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moetune.experts"):
        if node.module != "moetune.experts":
            return [node.module]
        return [f"moetune.experts.{a.name}" for a in node.names if (ROOT / "experts" / f"{a.name}.py").is_file()]
    return []


def type_leaks(path: Path, rel: str | None = None) -> list[str]:
    """Where `path` names an expert type: a string literal equal to a type key, getattr/hasattr on an
    expression mentioning `expert`, or an import of one type's module."""
    tree = ast.parse(path.read_text())
    rel = rel or path.relative_to(ROOT).as_posix()
    docs = _docstrings(tree)
    bad = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in EXPERT_CONFIGS
                and id(node) not in docs and (rel, node.value) not in ALLOWED):
            bad.append(f"{rel}:{node.lineno} names expert type {node.value!r}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                and node.args and "expert" in ast.unparse(node.args[0])):
            bad.append(f"{rel}:{node.lineno} reads a type-specific key: {ast.unparse(node)}")
        for m in _expert_modules(node):
            if m in TYPE_MODULES:
                bad.append(f"{rel}:{node.lineno} imports one type's module {m}")
    return bad


def test_type_modules_are_the_registered_layers_and_their_helpers():
    assert {"moetune.experts.lora", "moetune.experts.mole", "moetune.experts.calm_bridge"} <= TYPE_MODULES
    assert not {"moetune.experts.base", "moetune.experts.routing"} & TYPE_MODULES


def test_leak_finder_finds_each_kind_of_leak(tmp_path):
    src = tmp_path / "probe.py"
    src.write_text('"""Docstring naming "lora" is fine."""\nfrom moetune.experts.mole import set_mask\n'
                   'from moetune.experts import REGISTRY, molora\nimport moetune.experts.base\n'
                   'def f(rc):\n    """mole"""\n    if rc.expert.type == "molora":\n        pass\n'
                   '    return getattr(rc.expert, "masked", None)\n')
    found = type_leaks(src, "commands/probe.py")
    assert len(found) == 4, found
    assert any("'molora'" in f for f in found) and any("getattr" in f for f in found)
    assert any("moetune.experts.mole " in f + " " for f in found) and any("experts.molora" in f for f in found)


def test_no_module_above_the_experts_layer_names_an_expert_type():
    paths = _above_experts()
    names = {p.relative_to(ROOT).as_posix() for p in paths}
    assert {"cli/train_cmds.py", "cli/model_cmds.py", "commands/stages.py", "adapters/io.py", "export/stock.py", "commands/runs.py",
            "export/collapse.py", "export/multimerge.py", "run/session.py", "commands/validate.py"} <= names
    leaks = [leak for p in paths for leak in type_leaks(p)]
    assert not leaks, "\n".join(leaks)


def _overrides(cls, name: str) -> bool:
    return getattr(cls, name).__qualname__.split(".")[0] != "ExpertLayer"


@pytest.mark.parametrize("etype", list(REGISTRY))
def test_hooks_agree_with_the_flags_of_the_settings_class(etype):
    layer, cfg = REGISTRY[etype], EXPERT_CONFIGS[etype]
    assert layer.mergeable is cfg.mergeable
    assert _overrides(layer, "collapse") is cfg.collapsible
    assert _overrides(layer, "peft_export") is (cfg.stock_peft or etype == "mov")  # mov: its collapsed IA3 form
    assert _overrides(layer, "set_mask") is (cfg.mask_key is not None)
    assert _overrides(layer, "lora_mixture") is cfg.mixes_trained_loras
    assert _overrides(layer, "lora_plus_parameters") is (cfg.lora_plus and not cfg.mixes_trained_loras)  # MoLE: its LoRAs
    if cfg.mask_key is not None:
        assert cfg.mask_key in {f.name for f in dataclasses.fields(cfg)}
    if cfg.collapsible:
        assert cfg.routed
    instance = cfg(type=etype)
    assert etype in instance.describe() and etype in instance.card_line()
    assert "'DIR'" in instance.how_to_load("DIR")
    if not cfg.mergeable:
        assert etype in str(instance.merge_refusal())


# ------------------------------------------------------------------ a new type: its config and its module only


@dataclasses.dataclass
class ShiftConfig(ExpertConfig):
    """A test-only type: a trained shift of each wrapped projection's output (its `rank` is unused)."""


class ShiftLayer(ExpertLayer):
    """y = W0 x + b + beta, beta (d_out,) trained from zero."""

    config_cls = ShiftConfig

    def __init__(self, base: nn.Module, cfg: ShiftConfig, router=None, name: str = "") -> None:
        super().__init__(base, cfg, router, name)
        self.beta = nn.Parameter(torch.zeros(self.d_out))                 # (d_out,)

    def delta(self, x: torch.Tensor) -> torch.Tensor:                    # (..., d_in) -> (..., d_out)
        return self.beta.expand(*x.shape[:-1], self.d_out)


@pytest.fixture
def shift_type(monkeypatch):
    monkeypatch.setitem(EXPERT_CONFIGS, "shift", ShiftConfig)
    monkeypatch.setitem(REGISTRY, "shift", ShiftLayer)


def test_a_new_type_is_its_config_and_its_module(shift_type, tiny_llama, tiny_data, tmp_path, monkeypatch, capsys):
    from moetune.commands.stages import run_recipe
    out = tmp_path / "run"
    rc = load_recipe(None, tiny_overrides(tiny_llama, tiny_data, out, "expert.type=shift", "expert.target_modules=[o_proj]",
                                          "train.max_steps=3", "eval.generation=false"))
    assert rc.stages == ["train", "eval", "export"]                     # not mergeable: the default drops merge
    summary = run_recipe(rc)
    assert summary["after"]["loss"] < summary["before"]["loss"]
    meta = json.loads((out / "adapter" / "moetune.json").read_text())
    assert meta["expert"]["type"] == "shift" and len(meta["modules"]) == 2
    card = (out / "export" / "README.md").read_text()
    assert "- Expert: shift, rank 4" in card and "a shift adapter (safetensors + moetune.json)" in card
    assert "Load without moetune" not in card and "Collapsed export" not in card
    assert cli(monkeypatch, "runs", out, "--json") in (0, None)
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["type"] == "shift" and rows[0]["collapsed"] is None
    assert cli(monkeypatch, "merge-lora", out, "--out", tmp_path / "m") == 2
    assert "Expert type 'shift' does not fold into the base weights" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="--collapse is for hydralora, molora, mov"):
        from moetune.export.collapse import export_collapsed
        from moetune.run.session import Run
        export_collapsed(Run(load_recipe(out / "recipe.yaml", [f"output_dir={out}"])), "mean")
    assert cli(monkeypatch, "eval", out, "--mask-experts", "a") == 2
    assert "--mask-experts applies to MoLE runs" in capsys.readouterr().err
