"""scripts/tensor_diff.py: the largest differences between two safetensors files, on files written here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from scripts_loader import load_script

td = load_script("tensor_diff")


def test_largest_absolute_and_relative_difference(tmp_path, capsys):
    a = {"w.x": torch.tensor([[1.0, -2.0], [3.0, 4.0]]), "w.y": torch.tensor([0.001, 0.002]),
         "w.z": torch.zeros(3)}
    b = {"w.x": torch.tensor([[1.0, -2.0], [3.0, 4.5]]), "w.y": torch.tensor([0.001, 0.003]),
         "w.z": torch.zeros(3)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    assert td.main([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                    "--json", str(tmp_path / "d.json")]) == 0
    d = json.loads((tmp_path / "d.json").read_text())
    assert d["tensors"] == 3 and d["equal"] == 1
    assert d["max_abs"] == pytest.approx(0.5) and d["max_abs_key"] == "w.x"
    assert d["max_rel"] == pytest.approx(0.001 / 0.003) and d["max_rel_key"] == "w.y"   # 0.33 > 0.5 / 4.5
    assert "3 tensors, 1 bit for bit equal; max |a - b| 0.5 (w.x)" in capsys.readouterr().out


def test_different_names_or_shapes_cannot_be_compared(tmp_path, capsys):
    save_file({"w": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    save_file({"v": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    save_file({"w": torch.ones(3)}, str(tmp_path / "c.safetensors"))
    assert td.main([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]) == 1
    assert "different tensors (2 in only one, e.g. v)" in capsys.readouterr().err
    assert td.main([str(tmp_path / "a.safetensors"), str(tmp_path / "c.safetensors")]) == 1
    assert "tensor w: shape (2,) against (3,)" in capsys.readouterr().err
