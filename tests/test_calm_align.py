"""CALM with different tokenizers (expert.tokenizer_check align): a tiny random Llama anchor (width 32, 4 layers,
the shared tiny BPE tokenizer) composed with a tiny random GPT-2 m_A (width 24, 3 layers) whose own byte-level BPE
tokenizer has another vocabulary, other merges and adds a BOS. The tree layout on a hand example; each anchor
position sees exactly m_A's tokenization of its text; fresh = anchor exactly; no look-ahead; cached greedy
generation = no-cache reference; clear errors; training sends gradients."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from calm_prefill import cache_keyword, check_prefill_splits
from conftest import WORDS, build_tokenizer, make_rows, tiny_overrides
from moetune.adapters.inject import inject, trainable_parameters
from moetune.commands.stages import run_recipe
from moetune.experts.calm import CALMConfig
from moetune.experts.calm_align import build_layout, prefix_texts, visible
from moetune.models.load import load_model
from moetune.recipe import ModelConfig, RecipeError, load_recipe

torch.set_num_threads(1)

D_AUG = 24


def _aug_tokenizer():
    """Byte-level BPE with another vocabulary (320 tokens, other corpus and specials) that prepends <s>.

    Trained on word pairs ('redgreen', 'seveneight', ...), which it keeps whole where the anchor splits them, so
    the text of an anchor prefix ending inside such a word is segmented differently from the whole text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ([" ".join(a + b for a, b in zip(WORDS, WORDS[1:]))] * 4 + [" ".join(reversed(WORDS))] * 3
              + [f"{r['response']} {r['instruction']}" for r in make_rows(50, 5)])
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _save(path, model, tok):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Anchor (Llama, shared tiny tokenizer), m_A (GPT-2, its own tokenizer), m_A with a slow tokenizer."""
    from transformers import ByT5Tokenizer
    d = tmp_path_factory.mktemp("calm_align")
    tok = build_tokenizer(chat=True)
    torch.manual_seed(0)
    anchor = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.2,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    anchor.generation_config.eos_token_id = tok.eos_token_id
    anchor.generation_config.pad_token_id = tok.pad_token_id
    tok_a, slow = _aug_tokenizer(), ByT5Tokenizer()

    def gpt2(t):                                               # 512 embedding rows: more than either tokenizer
        torch.manual_seed(1)
        return AutoModelForCausalLM.from_config(GPT2Config(vocab_size=512, n_embd=D_AUG, n_layer=3, n_head=2,
                                                           n_positions=256, initializer_range=0.2,
                                                           bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id))
    return {"anchor": _save(d / "anchor", anchor, tok), "aug": _save(d / "aug", gpt2(tok_a), tok_a),
            "aug_slow": _save(d / "aug_slow", gpt2(slow), slow), "tok": tok, "tok_a": tok_a}


def _anchor(pair):
    return load_model(ModelConfig(path=str(pair["anchor"]), device="cpu"))


def _composed(pair, **kw):
    model = _anchor(pair)
    inject(model, CALMConfig(type="calm", augmenting_model=str(pair["aug"]), tokenizer_check="align",
                             **{"num_compositions": 2, **kw}), seed=0)
    return model


def _double(model):
    """The composed model and m_A in float64, so that equalities hold up to rounding (1e-10)."""
    model.double()
    model.calm_runner.model.double()
    return model


def _randomise(model, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.add_(scale * torch.randn(p.shape, generator=g))


TEXTS = ["<|im_start|>user\nShout redgreen<|im_end|>\n", "Add 3 and 4 is seveneight", "Shout moonone and greenblue"]


def _batch(tok):
    """Three rows, left-padded, the first with chat special tokens."""
    rows = [tok(t)["input_ids"] for t in TEXTS]
    n = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _logits(model, ids, mask, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False, **kw).logits


# ------------------------------------------------------------------ the alignment


def test_layout_on_a_hand_example():
    # m_A ids of the texts of anchor prefixes 0..4 (prefix 2 adds no text, e.g. a special token); the whole
    # text re-segments what prefix 1 ended with: P_1 = [1, 5] but X = P_4 = [1, 7, 8]
    layout = build_layout([[1], [1, 5], [1, 5], [1, 7], [1, 7, 8]])
    assert layout.ids == [1, 7, 8, 5]                          # trunk X = [1, 7, 8], then the tail [5] of P_1, once
    assert layout.pos == [0, 1, 2, 1]                          # the tail token sits at position 1 of P_1
    see = visible(torch.tensor(layout.ctx), 4).int().tolist()
    assert see == [[1, 0, 0, 0],                               # X[0]
                   [1, 1, 0, 0],                               # X[1]
                   [1, 1, 1, 0],                               # X[2]
                   [1, 0, 0, 1]]                               # tail 5: X[:1] and itself
    allowed = visible(torch.tensor(layout.query), 4).int().tolist()
    assert allowed == [[1, 0, 0, 0],                           # P_0 = [1]
                       [1, 0, 0, 1],                           # P_1 = [1, 5]
                       [1, 0, 0, 1],                           # P_2 = P_1
                       [1, 1, 0, 0],                           # P_3 = [1, 7]
                       [1, 1, 1, 0]]                           # P_4 = X
    empty = build_layout([[], [4], [4, 6]])                    # no BOS and no text yet: nothing to attend to
    assert empty.query == [(0, 0, 0), (1, 0, 0), (2, 0, 0)]
    assert visible(torch.tensor(empty.query), 2).int().tolist() == [[0, 0], [1, 0], [1, 1]]


def test_prefix_texts_skip_special_tokens_and_unfinished_characters(pair):
    tok = pair["tok"]
    ids = tok("Shout red<|im_end|> héllo")["input_ids"]
    texts = prefix_texts(tok, ids, list(range(len(ids))))
    assert texts[-1] == "Shout red héllo"
    assert all(texts[-1].startswith(t) for t in texts)
    assert "h\ufffd" not in "".join(texts) and texts.count("Shout red h") == 2   # 'é' is two byte tokens


def test_each_anchor_position_sees_exactly_its_prefix_tokenization(pair):
    model = _composed(pair)
    tok, tok_a = pair["tok"], pair["tok_a"]
    ids, mask = _batch(tok)
    _logits(model, ids, mask)
    runner = model.calm_runner
    aug_ids, pos, see, allowed = runner.aligner.inputs(ids, mask.bool(), ids.shape[1])
    assert torch.equal(allowed, runner.allowed) and runner.states[0].shape == (3, aug_ids.shape[1], D_AUG)
    tails = 0
    for r in range(3):
        real = mask[r].bool().nonzero().flatten().tolist()
        assert not allowed[r, :real[0]].any()                  # padding queries read nothing

        def text(cols, r=r):
            return tok.decode(ids[r, cols], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        trunk = len(tok_a(text(real))["input_ids"])            # m_A's tokens of the whole row
        for j, c in enumerate(real):
            expect = tok_a(text(real[:j + 1]))["input_ids"]   # m_A's own tokenization, with its <s>
            keys = allowed[r, c].nonzero().flatten()
            assert aug_ids[r, keys].tolist() == expect and pos[r, keys].tolist() == list(range(len(expect)))
            assert torch.equal(see[r, keys[-1]], allowed[r, c])   # the query reads P_t's last token's context
            tails += int(keys[-1] >= trunk)                    # P_t is not a prefix of the whole row's ids
    assert tails >= 3                                          # segmentations that later text changes are exercised


# ------------------------------------------------------------------ the composed model


def test_fresh_align_composition_is_the_anchor_exactly(pair):
    anchor = _anchor(pair)
    model = _composed(pair)
    ids, mask = _batch(pair["tok"])
    assert torch.equal(_logits(model, ids, mask), _logits(anchor, ids, mask))
    assert model.calm_runner.calls == 1 and model.calm_runner.cache is None
    _randomise(model)
    out = _logits(model, ids, mask)
    assert torch.isfinite(out).all()
    assert (out - _logits(anchor, ids, mask)).abs().max() > 0.1       # the composition acts


def test_no_look_ahead(pair):
    """Logits at positions <= t depend only on anchor tokens <= t: truncating or changing what follows changes
    nothing, although m_A segments the whole text differently from its prefixes ('seven' vs 'seveneight')."""
    model = _double(_composed(pair))
    _randomise(model)
    tok = pair["tok"]
    ids = torch.tensor([tok("Shout seveneight and moonone")["input_ids"]])
    full = _logits(model, ids, torch.ones_like(ids))
    g = torch.Generator().manual_seed(5)
    for t in range(ids.shape[1] - 1):
        cut = ids[:, :t + 1]
        torch.testing.assert_close(_logits(model, cut, torch.ones_like(cut))[0], full[0, :t + 1],
                                   atol=1e-10, rtol=1e-10)
        other = torch.cat([cut, torch.randint(5, len(tok), (1, 4), generator=g)], 1)
        torch.testing.assert_close(_logits(model, other, torch.ones_like(other))[0, :t + 1], full[0, :t + 1],
                                   atol=1e-10, rtol=1e-10)
    anchor = _anchor(pair).double()
    assert (full[0] - _logits(anchor, ids, torch.ones_like(ids))[0]).abs().amax(-1).min() > 1e-3   # it acts at every t


def _greedy_reference(model, ids, mask, steps: int, eos: int) -> torch.Tensor:
    """Greedy decoding by full forwards over the whole sequence (no cache), EOS suppressed (min_new_tokens)."""
    out, m = ids, mask
    for _ in range(steps):
        pos = (m.cumsum(-1) - 1).clamp(min=0)
        logits = _logits(model, out, m, position_ids=pos)[:, -1]
        logits[:, eos] = float("-inf")
        nxt = logits.argmax(-1, keepdim=True)
        out, m = torch.cat([out, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    return out[:, ids.shape[1]:]


def test_cached_greedy_generation_matches_no_cache(pair):
    anchor = _anchor(pair)
    model = _composed(pair)
    _randomise(model)
    ids, mask = _batch(pair["tok"])
    runner = model.calm_runner
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8, min_new_tokens=8,
              pad_token_id=anchor.generation_config.pad_token_id)
    calls = runner.calls
    cached = model.generate(**kw, use_cache=True)[:, ids.shape[1]:]
    assert runner.calls - calls == 8 and runner.cache is None  # m_A re-run on the whole text at every step
    assert runner.ids.shape == (3, ids.shape[1] + 7)
    reference = _greedy_reference(model, ids, mask, 8, anchor.generation_config.eos_token_id)
    assert torch.equal(cached, reference)
    assert torch.equal(cached, model.generate(**kw, use_cache=False)[:, ids.shape[1]:])
    assert not torch.equal(cached, anchor.generate(**kw)[:, ids.shape[1]:])
    # one cached step gives the no-cache logits of the last position (float64: equal up to rounding)
    from transformers import DynamicCache
    _double(model)
    past = DynamicCache(config=model.config)
    nxt = cached[:, :1]
    both, m2 = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    pos = (m2.cumsum(-1) - 1).clamp(min=0)                     # the anchor's positions, as generate passes them
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=pos[:, :-1], **{cache_keyword(model): past}, use_cache=True)
        step = model(input_ids=nxt, attention_mask=m2, position_ids=pos[:, -1:], **{cache_keyword(model): past},
                     use_cache=True).logits[:, -1]
    full = _logits(model, both, m2, position_ids=pos)[:, -1]
    torch.testing.assert_close(step, full, atol=1e-10, rtol=1e-10)
    with torch.no_grad():                                      # another input in between: refused, not recomputed
        _logits(model, ids, mask)
        with pytest.raises(RuntimeError, match="must advance together"):
            model(input_ids=nxt, attention_mask=torch.cat([m2, torch.ones_like(nxt)], 1), **{cache_keyword(model): past},
                  use_cache=True)


def test_any_prefill_split_gives_the_no_cache_logits(pair):
    """Align mode: the prompt in 1, 2 or 3 prefill calls with a DynamicCache, then single tokens (and a
    cropped cache): the no-cache logits at every real position."""
    model = _double(_composed(pair))
    _randomise(model)
    ids, mask = _batch(pair["tok"])
    check_prefill_splits(model, ids, mask, new=3)
    assert model.calm_runner.ids.shape == (3, ids.shape[1] + 3)


# ------------------------------------------------------------------ errors and training


def test_tokenizer_errors(pair):
    with pytest.raises(RecipeError, match=r"'expert.augmenting_model'.*does not match the anchor's.*"
                                          r"vocabularies differ.*expert.tokenizer_check=align \(different tokenizers"):
        inject(_anchor(pair), CALMConfig(type="calm", augmenting_model=str(pair["aug"]), num_compositions=2))
    with pytest.raises(RecipeError, match=r"'expert.augmenting_model'.*ByT5Tokenizer.*slow Python tokenizer.*"
                                          r"needs a fast"):
        inject(_anchor(pair), CALMConfig(type="calm", augmenting_model=str(pair["aug_slow"]), num_compositions=2,
                                         tokenizer_check="align"))
    base = ["expert.type=calm", f"model.path={pair['anchor']}", "stages=[eval]",
            f"expert.augmenting_model={pair['aug']}"]
    assert load_recipe(None, [*base, "expert.tokenizer_check=align"]).expert.tokenizer_check == "align"
    with pytest.raises(RecipeError, match="expert.tokenizer_check.*align"):
        load_recipe(None, [*base, "expert.tokenizer_check=text"])


def test_training_sends_finite_gradients(pair):
    model = _composed(pair)
    params = trainable_parameters(model)
    opt = torch.optim.Adam(params, lr=1e-2)
    ids, mask = _batch(pair["tok"])
    model.train()
    losses = []
    for _ in range(3):
        opt.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits[mask[:, 1:].bool()], ids[:, 1:][mask[:, 1:].bool()])
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in model.calm_runner.model.parameters())
    assert losses[-1] < losses[0]


def test_recipe_trains_and_evaluates_in_align_mode(pair, tiny_data, tmp_path):
    r = load_recipe(None, tiny_overrides(pair["anchor"], tiny_data, tmp_path / "run", "expert.type=calm",
                                         f"expert.augmenting_model={pair['aug']}", "expert.num_compositions=2",
                                         "expert.tokenizer_check=align", "stages=[train,eval]", "train.max_steps=4",
                                         "train.lr=1e-2"))
    s = run_recipe(r)
    assert s["train"]["steps"] == 4
    assert s["after"]["loss"] < s["before"]["loss"], (s["before"]["loss"], s["after"]["loss"])
    assert 0.0 <= s["after"]["exact_match"] <= 1.0
