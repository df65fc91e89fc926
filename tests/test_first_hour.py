"""Issue 28, "a newcomer's first hour": a user's own data in their own directory, outside the repository,
through the README's commands. One test (or a few) per bug; each failed before its fix.

The user's directory holds relative paths only: `tiny-llama` (the model), `alpaca.json` (40 Alpaca rows)
and `chats.jsonl` (20 ShareGPT rows). Commands then run from the user's directory or from somewhere else,
beside a sentinel run `runs/default` whose files must never change.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import moetune  # noqa: F401  (before transformers: moetune runs offline, HF_HUB_OFFLINE=1)
from conftest import cli, make_rows, repo_env
from moetune.adapters.io import load_adapter
from transformers import AutoModelForCausalLM  # noqa: E402

torch.set_num_threads(1)

RECIPE = """\
# my own data
model:
  path: tiny-llama
  device: cpu
expert:
  rank: 4
data:
  train: alpaca.json
  validation: null
  validation_split: 0.1
  test: chats.jsonl
train:
  max_steps: {steps}
  batch_size: 4
  lr: 5.0e-3
  log_every: 1
eval:
  split: validation
  max_new_tokens: 4
  batch_size: 8
output_dir: runs/mine
stages: [train, eval, export]
"""


def write_user_dir(d: Path, tiny_llama: Path, steps: int = 6) -> Path:
    """The newcomer's directory: a model link, Alpaca JSON, ShareGPT JSONL and a recipe, all relative."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "tiny-llama").symlink_to(tiny_llama)
    rows = make_rows(40, 1)
    (d / "alpaca.json").write_text(json.dumps([{"instruction": r["instruction"], "input": "", "output": r["response"]}
                                               for r in rows], indent=1))
    (d / "chats.jsonl").write_text("".join(json.dumps({"conversations": [
        {"from": "human", "value": r["instruction"]}, {"from": "gpt", "value": r["response"]}]}) + "\n"
        for r in make_rows(20, 5)))
    (d / "my.yaml").write_text(RECIPE.format(steps=steps))
    return d


def write_sentinel(root: Path) -> dict[str, str]:
    """A finished-looking run `root/runs/default` (what a clone of the repository may hold); its checksums."""
    d = root / "runs" / "default"
    (d / "adapter").mkdir(parents=True)
    (d / "recipe.yaml").write_text("output_dir: runs/default\n")
    (d / "summary.json").write_text(json.dumps({"merge": {"dir": "runs/default/merged"}, "train": {"steps": 3}}))
    (d / "adapter" / "moetune.json").write_text("{}")
    return checksums(d)


def checksums(d: Path) -> dict[str, str]:
    """sha256 of every file under `d` but the run lock (which names the last command that held it)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".moetune.lock"}


@pytest.fixture(scope="module")
def user(tiny_llama, tmp_path_factory):
    """The user's directory with one trained run, `runs/mine` (trained from inside the directory)."""
    d = write_user_dir(tmp_path_factory.mktemp("newcomer") / "work", tiny_llama)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(d)
        assert cli(mp, "train", "my.yaml") in (0, None)
    return d


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Another working directory, holding a sentinel run runs/default; yields (cwd, sentinel checksums)."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    sums = write_sentinel(cwd)
    monkeypatch.chdir(cwd)
    return cwd, sums


def _logits(model, vocab: int) -> torch.Tensor:
    x = torch.randint(5, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x).logits


# ------------------------------------------------------------------ bug 1: merge-lora on a bare adapter


def test_merge_lora_on_a_bare_adapter_writes_into_no_run(user, elsewhere, monkeypatch, capsys):
    cwd, sums = elsewhere
    run = user / "runs" / "mine"
    run_files = checksums(run)
    ref = AutoModelForCausalLM.from_pretrained(user / "tiny-llama")
    load_adapter(ref, run / "adapter")
    want = _logits(ref.eval(), ref.config.vocab_size)
    # the run's adapter/, its export (kind adapter: the adapter files and a recipe.yaml) and a copy elsewhere
    shutil.copytree(run / "adapter", cwd / "copied-adapter")
    for i, source in enumerate([run / "adapter", run / "export", cwd / "copied-adapter"]):
        capsys.readouterr()
        assert cli(monkeypatch, "merge-lora", source, "--out", f"m{i}") in (0, None), capsys.readouterr().err
        merged = AutoModelForCausalLM.from_pretrained(cwd / f"m{i}").eval()
        torch.testing.assert_close(_logits(merged, merged.config.vocab_size), want, atol=1e-4, rtol=1e-4)
    assert checksums(cwd / "runs" / "default") == sums          # the sentinel run: untouched
    assert checksums(run) == run_files                          # the source run: untouched (no summary entry)
    assert not (run / "export" / "summary.json").exists()
    assert sorted(p.name for p in cwd.iterdir()) == ["copied-adapter", "m0", "m1", "m2", "runs"]


def test_merge_lora_from_a_repository_root_leaves_its_runs_default_alone(user, tiny_data, elsewhere, monkeypatch):
    """The reported case: run from a clone's root (runs/default and data/default there), the bare adapter's merge
    rewrote runs/default/summary.json's `merge` entry."""
    cwd, sums = elsewhere
    (cwd / "data" / "default").mkdir(parents=True)
    for split, path in tiny_data.items():
        shutil.copy(path, cwd / "data" / "default" / f"{split}.jsonl")
    source = user / "runs" / "mine" / "adapter"
    assert cli(monkeypatch, "merge-lora", source, "--out", "m", "--base", user / "tiny-llama") in (0, None)
    assert (cwd / "m" / "model.safetensors").is_file()
    assert checksums(cwd / "runs" / "default") == sums


def test_merge_lora_on_a_run_records_the_merge_in_that_run_only(user, elsewhere, tmp_path, monkeypatch):
    cwd, sums = elsewhere
    run = tmp_path / "copy-of-mine"
    shutil.copytree(user / "runs" / "mine", run)
    assert cli(monkeypatch, "merge-lora", run, "--out", "merged-copy") in (0, None)
    merge = json.loads((run / "summary.json").read_text())["merge"]
    assert merge["dir"] == "merged-copy" and merge["max_logit_diff"] < 1e-4
    assert checksums(cwd / "runs" / "default") == sums


# ------------------------------------------------------------------ bug 4: commands that read no data, from anywhere


def test_a_run_records_absolute_paths_and_evaluates_from_anywhere(user, elsewhere, tmp_path, monkeypatch):
    cwd, sums = elsewhere
    import yaml
    saved = yaml.safe_load((user / "runs" / "mine" / "recipe.yaml").read_text())
    assert saved["data"]["train"] == str(user / "alpaca.json") and saved["data"]["test"] == str(user / "chats.jsonl")
    assert saved["model"]["path"] == str(user / "tiny-llama")
    meta = json.loads((user / "runs" / "mine" / "adapter" / "moetune.json").read_text())
    assert meta["base_model"] == str(user / "tiny-llama")
    run = tmp_path / "mine"
    shutil.copytree(user / "runs" / "mine", run)
    assert cli(monkeypatch, "eval", run) in (0, None)             # reads the data by its recorded absolute path
    assert json.loads((run / "eval.json").read_text())["scores"]["n"] == 4
    assert checksums(cwd / "runs" / "default") == sums


def _legacy_copy(user: Path, dest: Path) -> Path:
    """A copy of the run whose recipe.yaml names its data and model relative to the user's directory, as runs
    written before paths were recorded absolute did; the data files are gone (moved, deleted)."""
    shutil.copytree(user / "runs" / "mine", dest)
    text = (dest / "recipe.yaml").read_text().replace(str(user) + "/", "")
    assert "alpaca.json" in text and str(user) not in text
    (dest / "recipe.yaml").write_text(text.replace("alpaca.json", "gone.json").replace("chats.jsonl", "gone.jsonl"))
    return dest


def test_commands_that_read_no_data_do_not_check_it(user, elsewhere, tmp_path, monkeypatch, capsys):
    cwd, sums = elsewhere
    run = _legacy_copy(user, user / "runs" / "legacy")   # its model 'tiny-llama' is found from the run's parents
    try:
        prompts = cwd / "p.jsonl"
        prompts.write_text(json.dumps({"prompt": "Shout red"}) + "\n")
        assert cli(monkeypatch, "generate", run, "--prompts", prompts, "--out", "o.jsonl",
                   "--max-new-tokens", "3") in (0, None), capsys.readouterr().err
        assert len((cwd / "o.jsonl").read_text().splitlines()) == 1
        for args in ([run], [run, "--base"], ["--base", f"model.path={user / 'tiny-llama'}"]):
            monkeypatch.setattr("sys.stdin", io.StringIO("Shout red\n"))
            capsys.readouterr()
            assert cli(monkeypatch, "chat", *args, "--max-new-tokens", "3") in (0, None), capsys.readouterr().err
            assert "bot> " in capsys.readouterr().out
        assert cli(monkeypatch, "merge-lora", run, "--out", "merged") in (0, None), capsys.readouterr().err
        monkeypatch.setattr("sys.stdin", io.StringIO("Shout red\n"))
        assert cli(monkeypatch, "chat", cwd / "merged", "--max-new-tokens", "3") in (0, None)
        assert "bot> " in capsys.readouterr().out
        # eval reads the data, so it is the one that names the missing file
        assert cli(monkeypatch, "eval", run) == 2
        assert "gone.json" in capsys.readouterr().err
    finally:
        shutil.rmtree(run)
    assert checksums(cwd / "runs" / "default") == sums


# ------------------------------------------------------------------ bug 2: --resume on a finished run, seconds, changes


def _strict_json(path: Path) -> dict:
    """JSON as the standard says: NaN and Infinity are not JSON."""
    def refuse(name):
        raise ValueError(f"{path} holds {name}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture
def fresh_user(tiny_llama, tmp_path, monkeypatch):
    """A user's directory of its own (no run yet), as the working directory."""
    d = write_user_dir(tmp_path / "work", tiny_llama)
    monkeypatch.chdir(d)
    return d


def test_resume_on_a_finished_run_keeps_its_summary(fresh_user, monkeypatch, capsys):
    assert cli(monkeypatch, "train", "my.yaml", "stages=[train]") in (0, None)
    run = fresh_user / "runs" / "mine"
    first = _strict_json(run / "summary.json")["train"]
    capsys.readouterr()
    assert cli(monkeypatch, "train", "my.yaml", "stages=[train]", "--resume") in (0, None)
    out = " ".join(capsys.readouterr().err.split())        # moetune's log goes to stderr
    assert "step 6 of 6" in out and "nothing to train" in out
    again = _strict_json(run / "summary.json")["train"]
    assert again["final_train_loss"] == first["final_train_loss"] and again["steps"] == 6
    assert again["seconds"] >= first["seconds"]
    assert again["val_loss"] == pytest.approx(first["val_loss"], abs=1e-6)


def test_a_resumed_run_reports_the_seconds_of_both_stretches(fresh_user, monkeypatch):
    import time
    from moetune.train import step as step_mod
    real = step_mod.TrainStep.__call__

    def slow(self, *a, **k):                      # the first stretch takes at least 3 x 0.4 s
        time.sleep(0.4)
        return real(self, *a, **k)

    monkeypatch.setattr(step_mod.TrainStep, "__call__", slow)
    assert cli(monkeypatch, "train", "my.yaml", "stages=[train]", "train.stop_after=3") in (0, None)
    monkeypatch.setattr(step_mod.TrainStep, "__call__", real)
    assert cli(monkeypatch, "train", "my.yaml", "stages=[train]", "--resume") in (0, None)
    t = _strict_json(fresh_user / "runs" / "mine" / "summary.json")["train"]
    assert t["steps"] == 6 and t["resumed_from"] == 3
    assert t["seconds"] >= 1.2                    # both stretches, not the last one only


def test_a_changed_recipe_on_resume_is_named_and_refused(fresh_user, monkeypatch, capsys):
    run = fresh_user / "runs" / "mine"
    assert cli(monkeypatch, "train", "my.yaml", "stages=[train]", "train.stop_after=3") in (0, None)
    saved = (run / "recipe.yaml").read_text()
    files = checksums(run)
    capsys.readouterr()
    assert cli(monkeypatch, "train", "my.yaml", "stages=[train]", "--resume", "train.max_steps=8") == 2
    msg = " ".join(capsys.readouterr().err.split())
    assert "train.max_steps: 6 -> 8" in msg and "--allow-changes" in msg and "Traceback" not in msg
    assert checksums(run) == files                                  # refused before anything was written
    # a change that training does not see is named and accepted; the old recipe is kept beside the new one
    assert cli(monkeypatch, "train", "my.yaml", "stages=[train]", "--resume", "train.save_every=2") in (0, None)
    assert "train.save_every: 0 -> 2" in " ".join(capsys.readouterr().err.split())
    kept = [p for p in run.glob("recipe.before-*.yaml")]
    assert len(kept) == 1 and kept[0].read_text() == saved
    assert "save_every: 2" in (run / "recipe.yaml").read_text()
    # --allow-changes continues with the new values
    assert cli(monkeypatch, "train", "my.yaml", "--resume", "train.max_steps=8", "--allow-changes",
               "stages=[train]") in (0, None)
    assert _strict_json(run / "summary.json")["train"]["steps"] == 8
    assert "max_steps: 8" in (run / "recipe.yaml").read_text()


# ------------------------------------------------------------------ bug 3: eval on another split scores "before" there too


def test_eval_on_another_file_scores_before_and_after_on_the_same_rows(user, tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer
    from moetune.data.pipeline import load_examples
    from moetune.eval.evaluate import loss_by_domain
    from moetune.recipe import DataConfig
    run = tmp_path / "mine"
    shutil.copytree(user / "runs" / "mine", run)
    monkeypatch.chdir(user)
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"instruction": r["instruction"], "output": r["response"]} for r in make_rows(12, 9)]))
    assert json.loads((run / "summary.json").read_text())["before"]["n"] == 4      # validation, 10% of 40 rows
    capsys.readouterr()
    assert cli(monkeypatch, "eval", run, f"data.test={other}", "eval.split=test") in (0, None)
    assert "scoring the model before training on them too" in " ".join(capsys.readouterr().err.split())
    s = json.loads((run / "summary.json").read_text())
    assert s["before"]["n"] == s["after"]["n"] == 12
    assert s["before"]["held_out"] == s["after"]["held_out"] == {"split": "test", "source": str(other), "examples": 12}
    base = AutoModelForCausalLM.from_pretrained(user / "tiny-llama").eval()
    examples = load_examples(str(other), AutoTokenizer.from_pretrained(user / "tiny-llama"), DataConfig())
    want = loss_by_domain(base, examples, base.config.pad_token_id, 8, "cpu")["loss"]
    assert s["before"]["loss"] == pytest.approx(want, rel=1e-5)    # "before" = the untrained model on these rows
    # the same split again: the pair matches already, nothing is rescored
    assert cli(monkeypatch, "eval", run, f"data.test={other}", "eval.split=test") in (0, None)
    assert "before training on them too" not in capsys.readouterr().err
    assert json.loads((run / "summary.json").read_text())["before"] == s["before"]


# ------------------------------------------------------------------ bug 5: validate refuses what train refuses; no debris


def test_validate_refuses_a_test_split_without_test_data(fresh_user, monkeypatch, capsys):
    for command in ("validate", "train"):
        capsys.readouterr()
        assert cli(monkeypatch, command, "my.yaml", "eval.split=test", "data.test=null") == 2
        msg = " ".join(capsys.readouterr().err.split())
        assert "Recipe key 'eval.split' is 'test'" in msg and "data.test" in msg and "eval.split=validation" in msg
    assert not (fresh_user / "runs").exists()                    # train refused before making anything
    # stages that score nothing on the test split need no test data
    assert cli(monkeypatch, "validate", "my.yaml", "eval.split=test", "data.test=null", "stages=[train]",
               "train.eval_before=false") in (0, None)


def test_a_run_that_fails_before_training_leaves_no_run_directory(fresh_user, monkeypatch, capsys):
    rows = json.loads((fresh_user / "alpaca.json").read_text())
    del rows[7]["output"]
    (fresh_user / "bad.json").write_text(json.dumps(rows))
    assert cli(monkeypatch, "train", "my.yaml", "data.train=bad.json") == 2
    assert "bad.json" in capsys.readouterr().err
    assert not (fresh_user / "runs").exists()                    # neither runs/mine nor the runs/ it created
    # a directory that was there before stays, with what it held
    (fresh_user / "runs" / "mine").mkdir(parents=True)
    (fresh_user / "runs" / "mine" / "notes.txt").write_text("mine")
    assert cli(monkeypatch, "train", "my.yaml", "data.train=bad.json") == 2
    assert sorted(p.name for p in (fresh_user / "runs" / "mine").iterdir()) == ["notes.txt"]


# ------------------------------------------------------------------ bug 7: output files respect the umask


@pytest.fixture
def umask_007():
    old = os.umask(0o007)
    yield
    os.umask(old)


def test_outputs_respect_the_umask(fresh_user, umask_007, monkeypatch):
    def modes(paths):
        got = {str(p.relative_to(fresh_user)): oct(p.stat().st_mode & 0o777) for p in paths}
        return got, {k: oct(0o770 if (fresh_user / k).is_dir() else 0o660) for k in got}   # what open()/mkdir() give

    assert cli(monkeypatch, "train", "my.yaml", "stages=[train,merge,eval,export]", "train.save_every=3") in (0, None)
    run = fresh_user / "runs" / "mine"
    prompts = fresh_user / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Shout red"}) + "\n")
    assert cli(monkeypatch, "generate", run, "--prompts", prompts, "--out", "answers.jsonl",
               "--max-new-tokens", "2") in (0, None)
    paths = [*run.rglob("*"), fresh_user / "answers.jsonl"]
    for sub in ("merged", "export", "adapter", "checkpoints/step-0000003", "summary.json", "eval.json",
                "curves.png", "merged/model.safetensors", "adapter/adapter_model.safetensors"):
        assert run / sub in paths
    got, want = modes(paths)
    assert got == want
    assert cli(monkeypatch, "merge-lora", run / "adapter", "--out", "merged-elsewhere") in (0, None)
    got, want = modes([fresh_user / "merged-elsewhere", *(fresh_user / "merged-elsewhere").rglob("*")])
    assert got == want


def test_cluster_heads_files_respect_the_umask(tiny_llama, tiny_data, tmp_path, umask_007):
    from moetune.commands.cluster import cluster_heads
    src = tmp_path / "hyd.yaml"
    src.write_text(f"model: {{path: {tiny_llama}, device: cpu}}\nexpert: {{type: hydralora, rank: 4, num_experts: 2}}\n"
                   f"data: {{train: {tiny_data['train']}, validation: {tiny_data['validation']}, "
                   f"test: {tiny_data['test']}}}\n")
    cluster_heads(src, [], embedder="base", k_max=3, init_router=True, out=tmp_path / "new.yaml")
    made = sorted(p for p in tmp_path.iterdir() if p.name != "hyd.yaml")
    assert any(p.name.endswith(".centroids.safetensors") for p in made)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in made} == {p.name: "0o660" for p in made}


# ------------------------------------------------------------------ bug 8: the export card after export --collapse


def test_export_card_follows_a_collapsed_export(fresh_user, monkeypatch):
    assert cli(monkeypatch, "train", "my.yaml", "expert.type=hydralora", "expert.num_experts=2") in (0, None)
    card = fresh_user / "runs" / "mine" / "export" / "README.md"
    text = card.read_text()
    assert "No collapsed export yet" in text
    assert "held-out `None`" not in text and "validation_split 0.1" in text      # data.validation is null
    assert cli(monkeypatch, "export", "runs/mine", "--collapse", "mean") in (0, None)
    text = card.read_text()
    assert "No collapsed export yet" not in text and "collapsed-mean" in text and "| mean | 1 |" in text


# ------------------------------------------------------------------ papercuts: time and disk


def test_stages_decide_the_before_scores_and_the_default_merges_nothing(fresh_user, monkeypatch):
    from moetune.recipe import Recipe
    assert Recipe().stages == ["train", "eval", "export"]          # a merged model (538 MB for SmolLM2) is asked for
    assert cli(monkeypatch, "validate", "my.yaml", "eval.split=test", "data.test=null", "stages=[train]") in (0, None)
    assert cli(monkeypatch, "train", "my.yaml", "stages=[train]") in (0, None)
    s = json.loads((fresh_user / "runs" / "mine" / "summary.json").read_text())
    assert "before" not in s and s["train"]["steps"] == 6          # stages=[train] scores nothing
    assert cli(monkeypatch, "train", "my.yaml", "stages=[train]", "train.eval_before=true", "--overwrite") in (0, None)
    assert json.loads((fresh_user / "runs" / "mine" / "summary.json").read_text())["before"]["n"] == 4


def test_a_recipe_typo_is_reported_before_torch_is_imported(user):
    """Every command that loads a recipe checks it first: a typo costs no torch import (seconds)."""
    import subprocess
    import sys
    run = user / "runs" / "mine"
    commands = [["validate", "my.yaml"], ["train", "my.yaml"], ["data", "inspect", "my.yaml"], ["eval", str(run)],
                ["export", str(run)], ["merge-lora", str(run), "--out", "m"]]
    code = ("import json, sys\nfrom moetune.cli import main\nout = []\n"
            f"for argv in {commands!r}:\n"
            "    sys.argv = ['moetune', *argv, 'train.learning_rate=1']\n"
            "    try:\n        main()\n        code = 0\n    except SystemExit as e:\n        code = e.code\n"
            "    out.append([argv[0], code, sorted(m for m in ('torch', 'transformers') if m in sys.modules)])\n"
            "print(json.dumps(out))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=user, env=repo_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[-1]) == [[c[0], 2, []] for c in commands]
    assert res.stderr.count("Unknown recipe key 'train.learning_rate'") == len(commands)


# ------------------------------------------------------------------ interrupts


def train_then_signal(user_dir: Path, signum: int, *args: str, run: str = "runs/mine"):
    """`moetune train my.yaml ARGS` in a subprocess, sent `signum` once the second step is logged in `run`;
    (returncode, stderr)."""
    import signal
    import subprocess
    import sys
    import time
    env = repo_env(OMP_NUM_THREADS="1")
    metrics = user_dir / run / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "moetune", "train", "my.yaml", *args], cwd=user_dir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file() and metrics.read_text().count('"loss"') >= 2:
                proc.send_signal(signum)
                break
            time.sleep(0.02)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, " ".join(err.split())


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(fresh_user, monkeypatch, capsys):
    from moetune.core.checkpoint import verify_checkpoint
    code, err = train_then_signal(fresh_user, __import__("signal").SIGTERM, "train.max_steps=2000", "stages=[train]")
    assert code == 143, err[-2000:]
    assert "Traceback" not in err
    ckpts = sorted((fresh_user / "runs" / "mine" / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and verify_checkpoint(ckpts[-1]) is None
    step = int(ckpts[-1].name.split("-")[1])
    assert 2 <= step < 2000
    assert f"stopped by SIGTERM: training stopped after step {step} of 2000; its checkpoint is " \
           f"runs/mine/checkpoints/step-{step:07d}." in err
    assert "Continue with: moetune train my.yaml train.max_steps=2000 'stages=[train]' --resume" in err
    capsys.readouterr()
    assert cli(monkeypatch, "train", "my.yaml", "train.max_steps=2000", "stages=[train]", "--resume",
               "train.stop_after=2") in (0, None)
    assert f"resumed from runs/mine/checkpoints/step-{step:07d} at step {step} of 2000" in \
           " ".join(capsys.readouterr().err.split())
    assert json.loads((fresh_user / "runs" / "mine" / "summary.json").read_text())["train"]["steps"] == step + 2


def test_ctrl_c_before_training_leaves_nothing_and_says_so(fresh_user, monkeypatch, capsys):
    import moetune.commands.stages as stages

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "load_model", interrupted)
    assert cli(monkeypatch, "train", "my.yaml") == 130
    err = " ".join(capsys.readouterr().err.split())
    assert "stopped by Ctrl-C (SIGINT): nothing had been trained; the run directory made for it was removed." in err
    assert not (fresh_user / "runs").exists()


# ------------------------------------------------------------------ moetune runs; chat


def test_runs_without_a_runs_folder_explains_what_it_looks_for(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli(monkeypatch, "runs") == 2
    msg = " ".join(capsys.readouterr().err.split())
    assert "recipe.yaml beside a summary.json" in msg and "looks in ./runs, which does not exist" in msg
    assert "moetune runs path/to/runs" in msg


def test_chat_help_and_a_merged_model_with_its_system_prompt(fresh_user, monkeypatch, capsys):
    from moetune.commands.chat import load_source
    assert cli(monkeypatch, "train", "my.yaml", "stages=[train]", "data.system_prompt=Answer briefly.") in (0, None)
    assert cli(monkeypatch, "merge-lora", "runs/mine/adapter", "--out", "merged") in (0, None)
    m = load_source(fresh_user / "merged")
    assert m.encoder.cfg.system_prompt == "Answer briefly." and m.expert_type == "lora, merged"
    monkeypatch.setattr("sys.stdin", io.StringIO("/help\n/exit\n"))
    capsys.readouterr()
    assert cli(monkeypatch, "chat", "merged") in (0, None)
    out = capsys.readouterr().out
    assert "(lora, merged)" in out.splitlines()[0] and "(base)" not in out
    assert "unknown command" not in out and "/reset" in out.split("you> /help", 1)[1]
