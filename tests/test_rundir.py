"""A run directory never loses work: an existing run is refused without --resume, --overwrite moves it
aside, one live run per directory (a killed one does not block), a damaged newest checkpoint falls back
to an older one, unwritable outputs fail before training (or leave nothing half-written), empty recipes."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moetune.adapters.io as adapters_mod
from conftest import cli, repo_env, tiny_overrides
from moetune.commands.stages import run_recipe
from moetune.core import checkpoint as ckpt
from moetune.recipe import RecipeError, load_recipe, to_yaml
from moetune.run.rundir import LOCK, existing_run, run_lock

torch.set_num_threads(1)
FAST = ("stages=[train]", "train.eval_before=false")


def _recipe(tiny_llama, tiny_data, out, *extra):
    return load_recipe(None, tiny_overrides(tiny_llama, tiny_data, out, *FAST, *extra))


def _recipe_file(tiny_llama, tiny_data, out, tmp_path, *extra) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(to_yaml(_recipe(tiny_llama, tiny_data, out, *extra)))
    return path


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != LOCK}


def test_rerun_without_resume_is_refused_and_changes_nothing(tiny_llama, tiny_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    run_recipe(_recipe(tiny_llama, tiny_data, out, "train.max_steps=3", "train.save_every=3"))
    before = _files(out)
    assert "checkpoints/step-0000003/adapter.safetensors" in before
    assert existing_run(out) == "a run at step 3 (checkpoints, adapter, metrics, a train summary)"
    recipe = _recipe_file(tiny_llama, tiny_data, out, tmp_path, "train.max_steps=5")
    capsys.readouterr()
    assert cli(monkeypatch, "train", recipe) == 2
    msg = " ".join(capsys.readouterr().err.split())
    assert f"output_dir '{out}' already holds a run at step 3" in msg
    assert "--resume" in msg and "--overwrite" in msg and "Traceback" not in msg
    assert _files(out) == before                                  # nothing deleted, nothing rewritten
    assert cli(monkeypatch, "train", recipe, "--resume", "--overwrite") == 2
    assert "contradict" in capsys.readouterr().err


def test_overwrite_moves_the_old_run_aside(tiny_llama, tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_recipe(_recipe(tiny_llama, tiny_data, out, "train.max_steps=3", "train.save_every=3"))
    before = _files(out)
    recipe = _recipe_file(tiny_llama, tiny_data, out, tmp_path, "train.max_steps=2", "train.save_every=2")
    assert cli(monkeypatch, "train", recipe, "--overwrite") in (0, None)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and _files(aside[0]) == before         # the old run, byte for byte
    assert json.loads((out / "summary.json").read_text())["train"]["steps"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]
    assert (out / LOCK).is_file() and not (aside[0] / LOCK).exists()


def test_a_second_run_into_a_locked_directory_refuses(tiny_llama, tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with run_lock(out):
        with pytest.raises(RecipeError, match=f"in use by another moetune run .*\"pid\": {os.getpid()}"):
            run_recipe(_recipe(tiny_llama, tiny_data, out))
    assert existing_run(out) is None                              # refused before anything was written


def test_lock_of_a_killed_process_does_not_block(tiny_llama, tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    code = (f"import sys, time; from moetune.run.rundir import run_lock\n"
            f"with run_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(120)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=repo_env())
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(RecipeError, match=f"\"pid\": {child.pid}"):
            run_recipe(_recipe(tiny_llama, tiny_data, out))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert json.loads((out / LOCK).read_text())["pid"] == child.pid   # the stale file is still there ...
    s = run_recipe(_recipe(tiny_llama, tiny_data, out, "train.max_steps=2"))   # ... and does not block
    assert s["train"]["steps"] == 2


def test_damaged_newest_checkpoint_falls_back_to_an_older_one(tiny_llama, tiny_data, tmp_path):
    common = ("train.max_steps=6", "train.save_every=2", "expert.dropout=0.1")
    run_recipe(_recipe(tiny_llama, tiny_data, tmp_path / "full", *common))
    out = tmp_path / "split"
    run_recipe(_recipe(tiny_llama, tiny_data, out, *common, "train.stop_after=4"))
    newest = out / "checkpoints" / "step-0000004"
    assert ckpt.verify_checkpoint(newest) is None
    data = (newest / "adapter.safetensors").read_bytes()
    (newest / "adapter.safetensors").write_bytes(data[: len(data) // 2])             # truncated
    assert "adapter.safetensors has" in ckpt.verify_checkpoint(newest)
    s = run_recipe(_recipe(tiny_llama, tiny_data, out, *common), resume=True)
    assert s["train"]["steps"] == 6
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    event = next(r for r in rows if r.get("event") == "resume")
    assert event["step"] == 2 and event["skipped_damaged"][0].startswith("step-0000004: adapter.safetensors has")
    full, resumed = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (tmp_path / "full", out))
    for k in full:                                               # resumed from step 2: the uninterrupted result
        torch.testing.assert_close(resumed[k], full[k], atol=1e-6, rtol=1e-5)


def test_no_checkpoint_verifies_is_a_clear_error(tiny_llama, tiny_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    run_recipe(_recipe(tiny_llama, tiny_data, out, "train.max_steps=4", "train.save_every=2", "train.stop_after=2"))
    state = out / "checkpoints" / "step-0000002" / "optimizer.safetensors"
    raw = bytearray(state.read_bytes())
    raw[-1] ^= 0xFF                                               # same size, one flipped bit: sha256 catches it
    state.write_bytes(bytes(raw))
    recipe = _recipe_file(tiny_llama, tiny_data, out, tmp_path, "train.max_steps=4", "train.save_every=2")
    capsys.readouterr()
    assert cli(monkeypatch, "train", recipe, "--resume") == 2
    msg = " ".join(capsys.readouterr().err.split())
    assert "verifies (step-0000002: optimizer.safetensors does not match its sha256)" in msg
    assert "Traceback" not in msg


def test_unwritable_output_fails_before_training(tiny_llama, tiny_data, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    recipe = _recipe_file(tiny_llama, tiny_data, blocker / "run", tmp_path)
    assert cli(monkeypatch, "train", recipe) == 2
    msg = " ".join(capsys.readouterr().err.split())
    assert f"Recipe key 'output_dir' is '{blocker / 'run'}', which cannot be written" in msg and "Nothing was trained" in msg
    recipe = _recipe_file(tiny_llama, tiny_data, tmp_path / "run", tmp_path, "stages=[train,export]",
                          f"export.dir={blocker / 'export'}")
    assert cli(monkeypatch, "train", recipe) == 2
    assert "Recipe key 'export.dir'" in " ".join(capsys.readouterr().err.split())
    assert existing_run(tmp_path / "run") is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_fails_before_training(tiny_llama, tiny_data, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(RecipeError, match="cannot be written"):
            run_recipe(_recipe(tiny_llama, tiny_data, ro / "run"))
    finally:
        ro.chmod(0o755)


def test_disk_full_while_saving_the_adapter_leaves_no_adapter_dir(tiny_llama, tiny_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def full(tensors, path, *a, **k):
        Path(path).write_bytes(b"\0" * 10)                        # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(adapters_mod, "save_file", full)
    recipe = _recipe_file(tiny_llama, tiny_data, out, tmp_path, "train.max_steps=2", "train.save_every=2")
    assert cli(monkeypatch, "train", recipe) == 2
    msg = " ".join(capsys.readouterr().err.split())
    assert "No space left on device" in msg and "never left half-written" in msg and "Traceback" not in msg
    assert not (out / "adapter").exists() and not list(out.glob(".adapter*"))   # no partial dir, no temp dir
    assert ckpt.verify_checkpoint(out / "checkpoints" / "step-0000002") is None   # the training is kept


def test_atomic_dir_failure_keeps_the_previous_copy(tmp_path):
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "weights").write_text("old")
    with pytest.raises(OSError):
        with ckpt.atomic_dir(final) as tmp:
            (tmp / "weights").write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (final / "weights").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.mark.parametrize("text", ["", "\n\n", "# a recipe to fill in\n  # indented comment\n"])
def test_empty_or_comment_only_recipe_is_an_error(text, tmp_path, monkeypatch, capsys):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match="is empty \\(or holds only comments\\)"):
        load_recipe(path)
    assert cli(monkeypatch, "validate", path) == 2
    assert f"Recipe file '{path}' is empty" in " ".join(capsys.readouterr().err.split())
    path.write_text("# every default, on purpose\n{}\n")
    assert load_recipe(path).output_dir == "runs/default"
