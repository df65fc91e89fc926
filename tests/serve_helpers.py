"""Helpers of tests/test_serve*.py: tiny runs of every expert type, a real `moetune serve` subprocess on a free port."""
from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import build_tokenizer, tiny_overrides

CONTEXT = 384

TYPES = {
    "lora": ["train.lr=5e-3"],
    "hydra-seq": ["expert.type=hydralora", "expert.num_experts=3", "router.level=sequence", "train.lr=5e-3"],
    "molora": ["expert.type=molora", "expert.num_experts=2", "router.type=top_k", "router.top_k=1"],
    "mov": ["expert.type=mov", "expert.num_experts=2"],
    "mole": ["expert.type=mole", "expert.experts_from=per_domain", "expert.expert_max_steps=3",
             "expert.granularity=block"],
    "calm": ["expert.type=calm", "expert.num_compositions=2", "train.lr=1e-3"],
}

RANDOMISED = ("hydra-seq", "molora", "mov")


def long_context_copy(model_dir: Path, out: Path) -> Path:
    """The tiny model with a longer context (its rotary embedding does not depend on it)."""
    shutil.copytree(model_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["max_position_embeddings"] = CONTEXT
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def train_runs(base: Path, data: dict, root: Path, names=tuple(TYPES)) -> dict[str, Path]:
    """A trained run directory (3 steps) per entry `names` of TYPES, all on `base`."""
    from test_calm import _save_llama
    from moetune.commands.stages import run_recipe
    from moetune.recipe import load_recipe
    aug = _save_llama(root / "augmenting", build_tokenizer(chat=True), 24, 3, 2, 1, 1)
    runs = {}
    for name in names:
        extra = list(TYPES[name]) + ([f"expert.augmenting_model={aug}"] if name == "calm" else [])
        runs[name] = root / name
        run_recipe(load_recipe(None, tiny_overrides(base, data, runs[name], "stages=[train]", "train.max_steps=3",
                                                    "train.eval_before=false", "train.lr=3e-2", *extra)))
    for name in set(RANDOMISED) & set(names):
        decisive(runs[name])
    return runs


def decisive(run: Path) -> None:
    """Large experts and decisive routers in a routed run's adapter, so that a row getting another row's gates
    (or pooling the wrong tokens) would change its tokens."""
    import torch
    from conftest import randomise_routed
    from moetune.adapters.io import load_adapter, save_adapter
    from moetune.models.load import load_model
    from moetune.recipe import load_recipe
    rc = load_recipe(run / "recipe.yaml", [f"output_dir={run}"])
    model = load_model(rc.model, torch.device("cpu"))
    load_adapter(model, run / "adapter")
    randomise_routed(model)
    save_adapter(run / "adapter", model, rc.expert, rc.router, rc.model.path)


class Server:
    """`python -m moetune serve ARGS --port 0` in a subprocess; `url` once it listens; its output kept in `lines`."""

    def __init__(self, args: list, env: dict | None = None, timeout: float = 180) -> None:
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "moetune", "serve", *map(str, args), "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env)
        self.lines: list[str] = []
        got: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(got,), daemon=True).start()
        deadline = time.time() + timeout
        self.url = None
        while time.time() < deadline and self.url is None:
            try:
                line = got.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if "listening on http://" in line:
                self.url = line.split("listening on ", 1)[1].split()[0]
        if self.url is None:
            self.stop()
            raise RuntimeError("moetune serve did not start:\n" + "".join(self.lines[-40:]))

    def _read(self, got: queue.Queue) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            got.put(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def http(url: str, method: str = "GET", body=None, headers: dict | None = None, raw: bytes | None = None,
         timeout: float = 60) -> tuple[int, object]:
    """(status, parsed JSON or text) of one request; never raises on an HTTP error status."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def metric(url: str, name: str, **labels) -> float:
    """A sample of GET /metrics (a counter or gauge; 0 when absent)."""
    _, text = http(url + "/metrics")
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == (f"{name}{{{want}}}" if want else name):
            return float(value)
    return 0.0
