"""moetune/recipe/edit.py: keys set in a recipe's YAML text, everything else kept as written."""
from __future__ import annotations

import pytest

from moetune.recipe.edit import flow, parse, set_keys

TEXT = """\
# top comment
model:
  path: m    # the model
expert:
  type: hydralora
  target_modules:
    - q_proj   # first
    - v_proj
router: {type: soft, top_k: 2}  # flow section
stages:
- train
- eval
output_dir: runs/x
"""


def test_block_list_value_becomes_a_flow_list_and_its_comments_stay():
    new = set_keys(TEXT, {"expert": {"target_modules": ["k_proj"]}})
    assert "  target_modules: [k_proj]\n    # first\n" not in new  # an inline comment of an item goes with it
    assert "  target_modules: [k_proj]\nrouter:" in new
    assert parse(new)["expert"]["target_modules"] == ["k_proj"]
    assert new.startswith("# top comment\nmodel:\n  path: m    # the model\n")


def test_top_level_block_list_flow_section_new_key_new_section():
    new = set_keys(TEXT, {"stages": ["train"], "router": {"top_k": 1}, "model": {"dtype": "float32"},
                          "train": {"lr": 0.002}})
    assert "stages: [train]\noutput_dir: runs/x\n" in new
    assert "router: {type: soft, top_k: 1}  # flow section" in new
    assert "  path: m    # the model\n  dtype: float32\nexpert:" in new
    assert new.endswith("train:\n  lr: 0.002\n")
    assert parse(new)["train"]["lr"] == 0.002


def test_comment_keeps_its_column():
    new = set_keys(TEXT, {"model": {"path": "a/longer/path"}})
    assert "  path: a/longer/path # the model" in new
    assert "  path: m2   # the model" in set_keys(TEXT, {"model": {"path": "m2"}})


@pytest.mark.parametrize("value", ["yes", "1e-3", "a: b", "# x", "", "null", "x'y", 1e-5, 2.0, None, True, 3,
                                   [1, "two"], {"a": [1]}])
def test_flow_values_parse_back(value):
    assert parse(f"k: {flow(value)}")["k"] == value


def test_beyond_the_editor_is_none():
    assert set_keys(TEXT, {"data": {"mix": [{"path": "x"}]}}) is not None  # depth 2: a list value is fine
    assert set_keys("a: &x {b: 1}\nc: *x\n", {"a": {"b": 2}}) is None         # an alias would change too
    assert set_keys(TEXT, {"expert": {"settings": {"deep": 1}}}) is not None
    assert set_keys("x: [1,\n  2]\n", {"x": [3]}) is None                     # a flow list over two lines
