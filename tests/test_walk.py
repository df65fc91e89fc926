"""Issue 28's walk, as a test: a newcomer's first hour with their own small data, outside the repository.

The user's directory holds a model, 40 Alpaca rows (JSON) and 20 ShareGPT rows (JSONL) and a recipe, all
named relative to it. Beside it, `clone/` stands for the repository's root with a finished-looking run
`clone/runs/default`; some commands run from there. The walk goes through the README's commands:
validate (and a typo), train, eval, eval on another split, generate, chat, merge-lora on a bare adapter, an
export and a collapsed export, export --collapse on a HydraLoRA run, runs, --resume on a finished run (and a
changed recipe), and a Ctrl-C. No command may print a traceback, every error names its fix, and no file of
the sentinel run changes. One subprocess (the Ctrl-C); everything else runs in-process.
"""
from __future__ import annotations

import io
import json
import signal

import pytest
import torch

import moetune  # noqa: F401  (before transformers: moetune runs offline, HF_HUB_OFFLINE=1)
from conftest import cli
from test_first_hour import checksums, train_then_signal, write_sentinel, write_user_dir

torch.set_num_threads(1)


def test_a_newcomers_first_hour(tiny_llama, tmp_path, monkeypatch, capsys):
    user = write_user_dir(tmp_path / "mine", tiny_llama)
    clone = tmp_path / "clone"
    clone.mkdir()
    sentinel = write_sentinel(clone)
    said: list[str] = []

    def run(where, *args, code=0):
        """`moetune ARGS` in directory `where`; its exit code must be `code`; returns stdout + stderr."""
        monkeypatch.chdir(where)
        got = cli(monkeypatch, *args)
        out = capsys.readouterr()
        text = out.out + out.err
        said.append(text)
        assert (got or 0) == code, f"moetune {' '.join(map(str, args))} -> {got}:\n{text[-3000:]}"
        return " ".join(text.split())

    # validate, and a typo that names the key to use
    assert "recipe OK" in run(user, "validate", "my.yaml")
    assert "Did you mean 'train.lr'?" in run(user, "validate", "my.yaml", "train.lrr=1e-3", code=2)
    # train with tiny steps (stages train, eval, export), then eval and eval on the ShareGPT test file
    run(user, "train", "my.yaml")
    mine = user / "runs" / "mine"
    assert "validation split: before vs after" in run(clone, "eval", mine)
    out = run(clone, "eval", mine, "eval.split=test")
    assert "scoring the model before training on them too" in out
    s = json.loads((mine / "summary.json").read_text())
    assert s["before"]["held_out"] == s["after"]["held_out"] and s["after"]["n"] == 20
    # generate and chat, from the clone's root
    (clone / "prompts.jsonl").write_text(json.dumps({"prompt": "Shout red", "id": 1}) + "\n")
    run(clone, "generate", mine, "--prompts", "prompts.jsonl", "--out", "answers.jsonl", "--max-new-tokens", "3")
    assert json.loads((clone / "answers.jsonl").read_text())["id"] == 1
    monkeypatch.setattr("sys.stdin", io.StringIO("Shout red\n/help\n/exit\n"))
    assert "bot> " in run(clone, "chat", mine, "--max-new-tokens", "3")
    # merge-lora on the bare adapter and on the export, from the clone's root
    run(clone, "merge-lora", mine / "adapter", "--out", "merged-adapter")
    run(clone, "merge-lora", mine / "export", "--out", "merged-export")
    monkeypatch.setattr("sys.stdin", io.StringIO("Shout red\n"))
    assert "(lora, merged)" in run(clone, "chat", "merged-adapter", "--max-new-tokens", "3")
    # a HydraLoRA run, its collapsed export (the export card follows) and merge-lora on the collapsed adapter
    run(user, "train", "my.yaml", "expert.type=hydralora", "expert.num_experts=2", "output_dir=runs/hydra")
    hydra = user / "runs" / "hydra"
    run(clone, "export", hydra, "--collapse", "mean")
    assert "collapsed-mean" in (hydra / "export" / "README.md").read_text()
    run(clone, "merge-lora", hydra / "collapsed-mean", "--out", "merged-collapsed")
    # runs: both runs listed; from a directory without runs/, what it looks for
    out = run(user, "runs")
    assert "runs/mine" in out and "runs/hydra" in out and "hydralora" in out
    assert "moetune runs path/to/runs" in run(tmp_path, "runs", code=2)
    # --resume on the finished run: nothing to train, the summary intact; a changed recipe is named, refused
    before = json.loads((mine / "summary.json").read_text())["train"]
    assert "nothing to train" in run(user, "train", "my.yaml", "--resume")
    after = json.loads((mine / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))["train"]
    assert after["final_train_loss"] == before["final_train_loss"] and after["seconds"] >= before["seconds"]
    out = run(user, "train", "my.yaml", "--resume", "train.max_steps=8", code=2)
    assert "train.max_steps: 6 -> 8" in out and "--allow-changes" in out
    # Ctrl-C during a long run: a checkpoint, the command that continues; then continue two steps
    code, err = train_then_signal(user, signal.SIGINT, "output_dir=runs/long", "train.max_steps=2000", "stages=[train]",
                                  run="runs/long")
    said.append(err)
    assert code == 130 and "Continue with: moetune train my.yaml output_dir=runs/long" in err, err[-2000:]
    step = int(err.split("training stopped after step ")[1].split()[0])
    out = run(user, "train", "my.yaml", "output_dir=runs/long", "train.max_steps=2000", "stages=[train]", "--resume",
              "train.stop_after=2")
    assert f"at step {step} of 2000" in out
    # nothing printed a traceback, and the clone's run is untouched
    assert not [t for t in said if "Traceback" in t]
    assert checksums(clone / "runs" / "default") == sentinel
    assert sorted(p.name for p in (clone / "runs").iterdir()) == ["default"]
