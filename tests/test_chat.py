"""`moetune chat` and `moetune generate` on trained tiny runs (no terminal: piped stdin)."""
from __future__ import annotations

import io
import json

import pytest
import torch

from conftest import cli, randomise_routed, tiny_overrides, write_jsonl
from moetune.commands.chat import answer, chat_loop, load_source
from moetune.eval.evaluate import exact_match
from moetune.eval.generation import Sampling
from moetune.recipe import load_recipe

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lora_run(tiny_llama, tiny_data, tmp_path_factory):
    from moetune.commands.stages import run_recipe
    out = tmp_path_factory.mktemp("chat-lora")
    run_recipe(load_recipe(None, tiny_overrides(tiny_llama, tiny_data, out, "train.max_steps=60", "train.lr=2e-2", "stages=[train]",
                                                "train.eval_before=false", "data.system_prompt=Answer briefly.")))
    return out


def _hydra_run(tiny_llama, tiny_data, out, *extra):
    """A HydraLoRA adapter with random (decisive) routers, saved as a run directory."""
    from moetune.adapters.inject import inject
    from moetune.adapters.io import save_adapter
    from moetune.models.load import load_model
    from moetune.recipe import to_yaml
    rc = load_recipe(None, tiny_overrides(tiny_llama, tiny_data, out, "expert.type=hydralora", "expert.num_experts=3",
                                          *extra))
    model = load_model(rc.model, torch.device("cpu"))
    inject(model, rc.expert, rc.router)
    randomise_routed(model)
    save_adapter(out / "adapter", model, rc.expert, rc.router, rc.model.path)
    (out / "recipe.yaml").write_text(to_yaml(rc))
    return out


@pytest.fixture(scope="module")
def hydra_run(tiny_llama, tiny_data, tmp_path_factory):
    return _hydra_run(tiny_llama, tiny_data, tmp_path_factory.mktemp("chat-hydra"))


@pytest.fixture(scope="module")
def hydra_seq_run(tiny_llama, tiny_data, tmp_path_factory):
    """The same with sequence-level routing: generation must pool the prompt's gates as the evaluation does."""
    return _hydra_run(tiny_llama, tiny_data, tmp_path_factory.mktemp("chat-hydra-seq"), "router.level=sequence")


@pytest.mark.parametrize("which", ["lora_run", "hydra_run", "hydra_seq_run"])
def test_greedy_generate_equals_evaluation_exact_match(which, tiny_data, tmp_path, monkeypatch, request):
    run = request.getfixturevalue(which)
    m = load_source(run)
    rows = [json.loads(x) for x in tiny_data["test"].read_text().splitlines()]
    # the evaluation's prompt ids are the ones generation builds from the same rows (system prompt included)
    from moetune.data.pipeline import load_examples
    rc = load_recipe(run / "recipe.yaml")
    examples = load_examples(str(tiny_data["test"]), m.tokenizer, rc.data)
    for e, r in zip(examples, rows):
        assert m.encoder.prompt_ids([{"role": "user", "content": r["instruction"]}]) == e.prompt_ids
    em = exact_match(m.model, m.tokenizer, examples, batch_size=8, max_new_tokens=4, device="cpu", show=False,
                     keep_samples=len(examples))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": r["instruction"], "id": i, "domain": r["domain"]}
                                                  for i, r in enumerate(rows)])
    # generate batches by length (like exact_match): same batches of 8, same greedy outputs
    assert cli(monkeypatch, "generate", run, "--prompts", prompts, "--out", tmp_path / "o.jsonl",
               "--max-new-tokens", "4", "--batch-size", "8") == 0
    out = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [o["id"] for o in out] == list(range(len(rows)))            # input order, fields carried through
    assert all(o["domain"] == r["domain"] for o, r in zip(out, rows))
    by_ref = sorted((s["reference"], s["output"]) for s in em["samples"])
    assert by_ref == sorted((r["response"], o["output"]) for r, o in zip(rows, out))
    assert any(o["output"] for o in out)


def test_generate_messages_rows_and_bad_row_names_file_line(lora_run, tmp_path, monkeypatch, capsys):
    good = write_jsonl(tmp_path / "g.jsonl", [
        {"messages": [{"role": "user", "content": "Add 1 and 2"}, {"role": "assistant", "content": "3"}]},
        {"prompt": "Add 1 and 2"}])
    assert cli(monkeypatch, "generate", lora_run, "--prompts", good, "--out", tmp_path / "o.jsonl",
               "--max-new-tokens", "4") == 0
    a, b = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert a["output"] == b["output"] and a["messages"][-1]["content"] == "3"   # trailing assistant turn replaced
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Add 1 and 2"}\n{"text": "no prompt"}\n')
    assert cli(monkeypatch, "generate", lora_run, "--prompts", bad, "--out", tmp_path / "x.jsonl") == 2
    err = capsys.readouterr().err
    assert f"{bad} line 2" in " ".join(err.split()) and "'prompt'" in err
    assert not (tmp_path / "x.jsonl").exists()


def test_chat_answers_a_piped_conversation_with_history_and_reset(lora_run):
    m = load_source(lora_run)
    greedy = Sampling(max_new_tokens=4)
    script = "Add 1 and 2\nShout red\n/reset\nAdd 1 and 2\n/exit\nShout blue\n"
    out = io.StringIO()
    assert chat_loop(m, greedy, io.StringIO(script), out) == 3
    text = out.getvalue()
    assert text.count("bot> ") == 3 and "(conversation cleared)" in text and "Shout blue" not in text
    replies = [line.split("bot> ", 1)[1] for line in text.splitlines() if line.startswith("bot> ")]
    # after /reset the same first question gets the same reply; the streamed text is the decoded reply
    assert replies[0] == replies[2]
    fresh = load_source(lora_run)
    first = answer(fresh, "Add 1 and 2", greedy, io.StringIO())
    assert replies[0] == first
    # the second turn saw the first exchange: its prompt holds both user turns
    fresh.history.append({"role": "user", "content": "Shout red"})
    assert fresh.tokenizer.decode(fresh.encoder.prompt_ids(fresh.history)).count("Add 1 and 2") == 1
    assert fresh.tokenizer.decode(fresh.encoder.prompt_ids(fresh.history)).count("Answer briefly.") == 1


def test_chat_cli_from_piped_stdin_and_base_differs(lora_run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Shout red\n"))
    assert cli(monkeypatch, "chat", lora_run, "--max-new-tokens", "4") in (0, None)
    tuned = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("Shout red\n"))
    assert cli(monkeypatch, "chat", lora_run, "--base", "--max-new-tokens", "4") in (0, None)
    base = capsys.readouterr().out
    assert "you> Shout red" in tuned and "bot> " in tuned and "lora" in tuned.splitlines()[0]
    assert "without the adapter" in base.splitlines()[0]
    tuned_m, base_m = load_source(lora_run), load_source(lora_run, base=True)
    ids = torch.tensor([tuned_m.encoder.prompt_ids([{"role": "user", "content": "Shout red"}])])
    with torch.no_grad():
        assert not torch.allclose(tuned_m.model(ids).logits, base_m.model(ids).logits)


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(lora_run):
    m = load_source(lora_run)
    ids = [m.encoder.prompt_ids([{"role": "user", "content": "Shout red"}])]
    from moetune.eval.generation import generate_batch
    hot = Sampling(temperature=5.0, top_p=1.0, max_new_tokens=6, seed=3)
    a, b = (generate_batch(m.model, m.tokenizer, ids, hot, "cpu") for _ in range(2))
    assert a == b
    nucleus = Sampling(temperature=5.0, top_p=1e-6, max_new_tokens=6, seed=4)
    assert generate_batch(m.model, m.tokenizer, ids, nucleus, "cpu") == \
        generate_batch(m.model, m.tokenizer, ids, Sampling(max_new_tokens=6), "cpu")


def test_show_routing_on_a_routed_adapter(hydra_run):
    from moetune.eval.generation import RoutingRecorder
    from moetune.eval.report import collect_gates
    m = load_source(hydra_run)
    assert m.routed and m.expert_type == "hydralora"
    out = io.StringIO()
    chat_loop(m, Sampling(max_new_tokens=3), io.StringIO("Shout red\n"), out, show_routing=True)
    lines = out.getvalue().splitlines()
    head = next(i for i, s in enumerate(lines) if s.startswith("routing: top expert"))
    rows = lines[head + 1:head + 4]
    assert len(rows) == 3 and all(len(r.split()[-1]) == 2 for r in rows)   # 3 tokens x 2 blocks
    assert lines[head + 4].startswith("  mean gate per expert: 0=")
    # the recorded gates of the first step are the gates of the prompt's last position
    ids = m.encoder.prompt_ids([{"role": "user", "content": "Shout red"}])
    rec = RoutingRecorder(m.model)
    from moetune.eval.generation import generate_batch
    generate_batch(m.model, m.tokenizer, [ids], Sampling(max_new_tokens=2), "cpu")
    g = rec.gates()
    rec.remove()
    from moetune.data.rows import Example
    sums = collect_gates(m.model, [Example(ids, ids, ids, "", "x")], m.tokenizer.pad_token_id, 1, "cpu")
    assert g.shape[:2] == (2, len(sums.names))
    full = (sums.gate[0] / sums.tokens[0]).float()                                    # (L, N) mean over the prompt
    assert not torch.allclose(g[0], full)                                      # a single position, not the mean
    with torch.no_grad():
        rec = RoutingRecorder(m.model)
        m.model(torch.tensor([ids]))
        last = rec.gates()[0]
        rec.remove()
    torch.testing.assert_close(g[0], last)


def test_bad_sources_are_clear_errors(tmp_path, monkeypatch, capsys):
    assert cli(monkeypatch, "chat", tmp_path) == 2
    assert "neither an adapter" in capsys.readouterr().err
    assert cli(monkeypatch, "generate", tmp_path / "nope", "--prompts", "x", "--out", "y") == 2
    assert "is not a directory" in capsys.readouterr().err
    assert cli(monkeypatch, "chat", tmp_path, "--temperature", "-1") == 2


TYPES = {
    "lora": [],
    "hydralora": ["expert.type=hydralora", "expert.num_experts=2"],
    "molora": ["expert.type=molora", "expert.num_experts=2", "router.type=top_k", "router.top_k=1"],
    "mov": ["expert.type=mov", "expert.num_experts=2"],
    "mole": ["expert.type=mole", "expert.experts_from=per_domain", "expert.expert_max_steps=3", "expert.granularity=block"],
    "calm": ["expert.type=calm", "expert.num_compositions=2", "train.lr=1e-3"],
}


@pytest.mark.parametrize("etype", list(TYPES))
def test_every_expert_type_generates_like_the_evaluation(etype, tiny_llama, tiny_data, tmp_path, monkeypatch):
    """Greedy `moetune generate` on a trained run of each type equals the eval stage's model (run.session.model_with_adapter)
    under evaluate.exact_match; MoLE with --mask-experts equals the eval of the masked recipe."""
    from moetune.commands.stages import run_recipe
    from moetune.run.session import Run, model_with_adapter
    from test_calm import _save_llama
    from conftest import build_tokenizer
    extra = list(TYPES[etype])
    if etype == "calm":
        extra.append(f"expert.augmenting_model={_save_llama(tmp_path / 'aug', build_tokenizer(chat=True), 24, 3, 2, 1, 1)}")
    run_dir = tmp_path / "run"
    run_recipe(load_recipe(None, tiny_overrides(tiny_llama, tiny_data, run_dir, "stages=[train]", "train.max_steps=3",
                                                "train.eval_before=false", "train.lr=3e-2", *extra)))
    mask = ["add"] if etype == "mole" else []
    rc = load_recipe(run_dir / "recipe.yaml", [f"output_dir={run_dir}"] + ([f"expert.masked={mask}"] if mask else []))
    run = Run(rc)
    model = model_with_adapter(run)
    examples = run.held_out()
    em = exact_match(model, run.tokenizer, examples, batch_size=8, max_new_tokens=5, device="cpu", show=False,
                     keep_samples=len(examples))
    rows = [json.loads(x) for x in tiny_data["test"].read_text().splitlines()]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": r["instruction"], "ref": r["response"]} for r in rows])
    args = ["--mask-experts", ",".join(mask)] if mask else []
    assert cli(monkeypatch, "generate", run_dir, "--prompts", prompts, "--out", tmp_path / "o.jsonl",
               "--max-new-tokens", "5", "--batch-size", "8", *args) == 0
    out = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert sorted((s["reference"], s["output"]) for s in em["samples"]) == sorted((o["ref"], o["output"]) for o in out)
    assert sum(bool(o["output"]) for o in out) >= len(out) // 2                 # real text, not empty answers
    m = load_source(run_dir, mask_experts=mask)
    assert m.expert_type == etype and m.routed == (etype in ("hydralora", "molora", "mov", "mole"))


def test_ctrl_c_stops_one_answer_not_the_chat(lora_run, monkeypatch):
    import moetune.commands.chat as chat
    m = load_source(lora_run)
    real, calls = chat.generate_batch, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(chat, "generate_batch", flaky)
    out = io.StringIO()
    assert chat_loop(m, Sampling(max_new_tokens=3), io.StringIO("Shout red\nAdd 1 and 2\n"), out) == 1
    assert "(answer interrupted" in out.getvalue()
    assert [h["content"] for h in m.history if h["role"] == "user"] == ["Add 1 and 2"]
