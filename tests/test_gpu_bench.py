"""benchmarks/gpu.py --smoke (tiny shapes on CPU) runs end to end, so the GPU benchmark never rots."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, repo_env

METHODS = ["moetune_lora", "hydralora", "molora_soft", "molora_top2", "mov", "mole", "trainer_peft_lora"]
QLORA = ["qlora_moetune_lora", "qlora_hydralora"]


@pytest.mark.slow
def test_gpu_benchmark_smoke(tmp_path):
    env = repo_env(OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "benchmarks/gpu.py", "--smoke", "--shapes", "qwen2-0.5b-shape",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_smoke.json").read_text())
    (shape,) = report["shapes"]
    assert shape["shape"] == "qwen2-0.5b-shape" and shape["dtype"] == "bfloat16" and shape["flops_per_step"] > 0
    assert shape["qlora_skipped"] is None                         # QLoRA runs on CPU too (bitsandbytes' CPU backend)
    rows = shape["rows"]
    assert set(rows) == {m + c for m in METHODS + QLORA for c in ("", "+ckpt")}
    for k, r in rows.items():
        assert r["tokens_per_s"] > 0 and r["trainer_peft_speedup"] > 0 and r["vs_moetune_lora"] > 0, k
    assert rows["moetune_lora"]["vs_moetune_lora"] == 1.0 and rows["trainer_peft_lora"]["trainer_peft_speedup"] == 1.0
    for m in METHODS[:-1] + QLORA:  # activation checkpointing lowers the counted peak memory of a step
        assert rows[m + "+ckpt"]["peak_mib"] < rows[m]["peak_mib"], m
    assert "| moetune_lora |" in (tmp_path / "gpu_smoke.md").read_text()
