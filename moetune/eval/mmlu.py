"""MMLU: zero-shot multiple-choice scoring by log-likelihood (the data and its format:
`moetune/data/mmlu.py`; the prompts and their token ids: `moetune/eval/mc_prompts.py`).

Scoring
-------
``score_multiple_choice`` has two formulations (``mode``):

``"letters"`` (default; "MCF", as in the original MMLU paper)
    The prompt built by ``format_mc_prompt`` lists the lettered options; the model runs once
    per question and we pick the answer letter whose next-token log-probability is highest.

``"cloze"`` ("CF", the formulation of the SmolLM/SmolLM2 model cards)
    The prompt built by ``format_cloze_prompt`` shows the question *without* the options; each
    answer text is scored as a continuation (``" <choice>"``) by the sum of its tokens'
    log-probabilities, divided by the answer's length in characters, and the highest wins.
    This is lighteval's ``loglikelihood_acc_norm_nospace`` metric
    (``LoglikelihoodAcc(logprob_normalization=LogProbCharNorm(ignore_first_space=True))``:
    ``logprob / (len(choice) - 1)`` for a choice with a leading space), which is the metric of
    the ``mmlu_cf`` task in huggingface/smollm ``text/evaluation/tasks.py`` used for the
    SmolLM2 model cards; the prompt matches that task's ``mmlu_cloze_prompt``. The
    unnormalised winner (lighteval's ``loglikelihood_acc``) is reported as well.

    Differences from lighteval, none of which should matter in practice: questions and choices
    are stripped of surrounding whitespace; lighteval's ``tok_encode_pair`` moves trailing
    whitespace of the context into the continuation, so with a chat template (context ending in
    "assistant\n") it adds the same ``log p("\n" | prompt)`` to all four choices before the
    division, which we do not (plain prompts end in "Answer:", where both agree); and where the
    tokenizer merges across the prompt/answer boundary lighteval cuts the joint tokenization at
    ``len(prompt tokens)`` while we cut at the first token that differs (``cloze_token_ids``).
    lighteval's default is no chat template; the SmolLM2 instruct models' card figures were run
    with ``--use_chat_template`` (huggingface/smollm evaluation README).
"""
from __future__ import annotations

import inspect
from collections import defaultdict
from typing import Any, Callable, Sequence

import torch

from moetune.data.mmlu import LETTERS, SUBJECT_TO_GROUP
from moetune.eval.mc_prompts import (cloze_continuations, cloze_token_ids, format_cloze_prompt, format_mc_prompt,
                                       letter_token_ids, resolve_chat, special_prefix)
from moetune.experts.context import routing_context


def _forward_takes(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model.forward`` (or a PEFT wrapper's base model) takes the keyword ``name``."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return name in inspect.signature(target.forward).parameters
    except (TypeError, ValueError):
        return False


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    return _forward_takes(model, "logits_to_keep")


def _accuracy_table(keys: Sequence[str], correct: Sequence[bool]) -> dict[str, dict]:
    """``{key: {"accuracy", "n"}}`` over rows labelled by ``keys``."""
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for key, ok in zip(keys, correct):
        hits[key][0] += int(ok)
        hits[key][1] += 1
    return {k: {"accuracy": c / n, "n": n} for k, (c, n) in sorted(hits.items())}


def _scoring_routing(mask: torch.Tensor, pool: torch.Tensor | None = None, cache: dict | None = None):
    """The routing context of one scoring forward over padded rows, mask (B, T) of real tokens: routers count
    only real tokens, and sequence-level routers (`router.level: sequence`, MoLE's gates) pool `pool` (B, T)
    (default: every real token), the question's prompt, as training pools each example's prompt: never
    padding, never the answer being scored. `cache`: as in generation, {} stores each such router's pooled
    row for a later forward (the cached cloze path's continuations) to reuse."""
    real = mask.bool()
    return routing_context(pool_mask=real if pool is None else pool.bool(), token_mask=real, cache=cache)


def _letter_predictions(model: torch.nn.Module, tokenizer: Any, rows: Sequence[dict], batch_size: int,
                        chat: bool, progress: Callable[[int], None] | None) -> list[str]:
    """Letters mode: the letter with the highest next-token log-probability, per row (ties: the earliest)."""
    return [LETTERS[_argmax(lp)] for lp in _letter_logprobs(model, tokenizer, rows, batch_size, chat, progress)]


def _letter_logprobs(model: torch.nn.Module, tokenizer: Any, rows: Sequence[dict], batch_size: int,
                     chat: bool, progress: Callable[[int], None] | None) -> list[list[float]]:
    """Letters mode: per row, the next-token log-probabilities of its 4 answer letters after the prompt."""
    prompts = [format_mc_prompt(r, tokenizer, use_chat_template=chat) for r in rows]
    # Plain prompts get the tokenizer's usual specials (e.g. BOS); a rendered chat template
    # already contains its own.
    encoded = [tokenizer(p, add_special_tokens=not chat)["input_ids"] for p in prompts]
    letter_ids = [letter_token_ids(tokenizer, p, chat) for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    kwargs = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}

    scores: list[list[float]] = [[] for _ in rows]
    order = sorted(range(len(rows)), key=lambda i: -len(encoded[i]))  # longest first
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(idx), width), dtype=torch.long)  # (B, T)
        for b, i in enumerate(idx):  # left padding: real tokens at the right end
            input_ids[b, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[b, width - len(encoded[i]):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T), 0 on padding
        with _scoring_routing(mask.to(device)):
            out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                        position_ids=positions.to(device), use_cache=False, **kwargs)
        logprobs = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)  # (B, V)
        cand = torch.tensor([letter_ids[i] for i in idx], device=logprobs.device)  # (B, 4)
        for i, lp in zip(idx, logprobs.gather(1, cand).tolist()):  # (B, 4)
            scores[i] = lp
        if progress is not None:
            progress(min(start + batch_size, len(order)))
    return scores


def _cloze_sequences(tokenizer: Any, rows: Sequence[dict], chat: bool) -> list[list[tuple[list[int], int]]]:
    """Per row, its 4 scored sequences: (token ids, n continuation tokens) from ``cloze_token_ids``.

    Plain prompts get the tokenizer's leading specials (e.g. BOS); a rendered chat template
    already contains its own."""
    seqs = []
    for row in rows:
        prompt = format_cloze_prompt(row, tokenizer, use_chat_template=chat)
        plain = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        prefix = [] if chat else special_prefix(tokenizer, prompt, plain)
        seqs.append([cloze_token_ids(tokenizer, prompt, c, prefix) for c in cloze_continuations(row)])
    return seqs


def _cloze_loglikelihoods(model: torch.nn.Module, tokenizer: Any, rows: Sequence[dict],
                          batch_size: int, chat: bool,
                          progress: Callable[[int], None] | None) -> list[list[float]]:
    """Cloze mode: per row, the summed log-probability of each of its 4 continuations.

    ``batch_size`` questions (4 x ``batch_size`` sequences) go through the model together,
    left-padded so every continuation ends at the last position; only the last ``K`` positions'
    logits are needed (``K`` = longest continuation in the batch + 1; ``logits_to_keep=K`` when
    the model supports it).
    """
    seqs = _cloze_sequences(tokenizer, rows, chat)
    split = [_shared_prompt_split(s) for s in seqs]  # the prompt sequence-level routers pool
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    keep_logits = _accepts_logits_to_keep(model)

    scores: list[list[float]] = [[] for _ in rows]
    order = sorted(range(len(rows)), key=lambda i: -max(len(ids) for ids, _ in seqs[i]))  # longest first
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        items = [seqs[i][k] for i in idx for k in range(4)]  # 4B sequences, question-major
        width = max(len(ids) for ids, _ in items)
        keep = max(n for _, n in items) + 1  # K: positions whose logits predict continuation tokens
        input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)  # (4B, T)
        mask = torch.zeros((len(items), width), dtype=torch.long)  # (4B, T)
        pool = torch.zeros((len(items), width), dtype=torch.bool)  # (4B, T): each question's shared prompt
        for b, (ids, _) in enumerate(items):  # left padding: real tokens at the right end
            input_ids[b, width - len(ids):] = torch.tensor(ids)
            mask[b, width - len(ids):] = 1
            pool[b, width - len(ids):width - len(ids) + split[idx[b // 4]]] = True
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (4B, T), 0 on padding
        kwargs = {"logits_to_keep": keep} if keep_logits else {}
        with _scoring_routing(mask.to(device), pool.to(device)):
            out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                        position_ids=positions.to(device), use_cache=False, **kwargs)
        logits = out.logits[:, -keep:-1, :]  # (4B, K-1, V): position T-K+j predicts token T-K+j+1
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # >= float32
        targets = input_ids[:, width - keep + 1:].to(logits.device)  # (4B, K-1): tokens T-K+1 .. T-1
        token_lp = (logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                    - logits.logsumexp(dim=-1))  # (4B, K-1): log p(target | prefix)
        n_cont = torch.tensor([n for _, n in items], device=logits.device)  # (4B,)
        offset = torch.arange(keep - 1, device=logits.device)  # (K-1,)
        is_cont = offset.unsqueeze(0) >= (keep - 1 - n_cont).unsqueeze(1)  # (4B, K-1): last n tokens
        summed = torch.where(is_cont, token_lp, torch.zeros_like(token_lp)).sum(-1)  # (4B,)
        for b, i in enumerate(idx):
            scores[i] = summed[4 * b:4 * b + 4].tolist()
        if progress is not None:
            progress(min(start + batch_size, len(order)))
    return scores


def _shared_prompt_split(seq4: Sequence[tuple[list[int], int]]) -> int:
    """Length of the token prefix the 4 sequences of one question share and may share a KV cache
    for: their common prefix, cut before the first scored token of any of them (>= 1)."""
    first = [ids for ids, _ in seq4]
    common = 0
    while all(len(ids) > common for ids in first) and len({ids[common] for ids in first}) == 1:
        common += 1
    return min(common, *(len(ids) - n for ids, n in seq4))


def _cloze_loglikelihoods_cached(model: torch.nn.Module, tokenizer: Any, rows: Sequence[dict],
                                 batch_size: int, chat: bool,
                                 progress: Callable[[int], None] | None) -> list[list[float]]:
    """Cloze mode with the prompt run once per question: the same sums as ``_cloze_loglikelihoods``.

    Per batch, the ``B`` prompts (the prefix the 4 sequences share, see ``_shared_prompt_split``)
    run left-padded with ``use_cache=True``; the KV cache is repeated 4x and the ``4B``
    continuations run right-padded after it, at positions continuing each prompt. The first
    continuation token is predicted by the prompt's last logits, the others by the continuation
    pass. With long questions and short answers this costs about a quarter of the plain path.
    """
    seqs = _cloze_sequences(tokenizer, rows, chat)
    split = [_shared_prompt_split(s) for s in seqs]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    kwargs = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    cache_key = "cache" if _forward_takes(model, "cache") else "past_key_values"  # renamed in transformers 5.x

    scores: list[list[float]] = [[] for _ in rows]
    order = sorted(range(len(rows)), key=lambda i: -max(len(ids) for ids, _ in seqs[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        prompts = [seqs[i][0][0][:split[i]] for i in idx]
        width = max(map(len, prompts))
        p_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)      # (B, Tp)
        p_mask = torch.zeros((len(idx), width), dtype=torch.long)            # (B, Tp)
        for b, ids in enumerate(prompts):  # left padding
            p_ids[b, width - len(ids):] = torch.tensor(ids)
            p_mask[b, width - len(ids):] = 1
        p_pos = (p_mask.cumsum(-1) - 1).clamp(min=0)                         # (B, Tp)
        gates: dict = {}                                                     # sequence-level routers' (B, N) rows
        with _scoring_routing(p_mask.to(device), cache=gates):
            out = model(input_ids=p_ids.to(device), attention_mask=p_mask.to(device),
                        position_ids=p_pos.to(device), use_cache=True, **kwargs)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values  # renamed in 5.x
        cache.batch_repeat_interleave(4)                                     # B -> 4B rows, question-major
        gates = {k: v.repeat_interleave(4, dim=0) for k, v in gates.items()}  # (4B, N), the same order
        last = out.logits[:, -1, :].repeat_interleave(4, dim=0)              # (4B, V)

        conts = [(seqs[i][k][0][split[i]:], seqs[i][k][1]) for i in idx for k in range(4)]
        tc = max(len(c) for c, _ in conts)
        c_ids = torch.full((len(conts), tc), pad_id, dtype=torch.long)       # (4B, Tc)
        c_mask = torch.zeros((len(conts), tc), dtype=torch.long)             # (4B, Tc)
        scored = torch.zeros((len(conts), tc), dtype=torch.bool)             # (4B, Tc)
        for b, (c, n) in enumerate(conts):  # right padding
            c_ids[b, :len(c)] = torch.tensor(c)
            c_mask[b, :len(c)] = 1
            scored[b, len(c) - n:len(c)] = True
        p_len = p_mask.sum(-1).repeat_interleave(4)                          # (4B,)
        c_pos = p_len.unsqueeze(1) + torch.arange(tc).unsqueeze(0)           # (4B, Tc)
        mask = torch.cat([p_mask.repeat_interleave(4, dim=0), c_mask], 1)    # (4B, Tp+Tc)
        with _scoring_routing(c_mask.to(device), cache=gates):               # the prompt's gates, reused
            logits = model(input_ids=c_ids.to(device), attention_mask=mask.to(device),
                           position_ids=c_pos.to(device), use_cache=True, **{cache_key: cache}).logits
        logits = torch.cat([last.unsqueeze(1), logits[:, :-1]], 1)          # (4B, Tc, V): predicts c_ids
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        targets = c_ids.to(logits.device)
        token_lp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)  # (4B, Tc)
        summed = torch.where(scored.to(logits.device), token_lp, torch.zeros_like(token_lp)).sum(-1)  # (4B,)
        for b, i in enumerate(idx):
            scores[i] = summed[4 * b:4 * b + 4].tolist()
        if progress is not None:
            progress(min(start + batch_size, len(order)))
    return scores


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value (ties -> the earliest)."""
    return max(range(len(values)), key=lambda k: (values[k], -k))


def score_multiple_choice(model: torch.nn.Module, tokenizer: Any, rows: Sequence[dict],
                          batch_size: int = 8, use_chat_template: bool | None = None,
                          progress: Callable[[int], None] | None = None,
                          mode: str = "letters", share_prompt: bool | None = None) -> dict[str, Any]:
    """Zero-shot accuracy of ``model`` on multiple-choice ``rows`` (see module docstring).

    ``mode="letters"``: prompts from ``format_mc_prompt``; the prediction is the letter with the
    highest next-token log-probability. ``use_chat_template=None`` means "if the tokenizer has
    one". Only the last position's logits are used (``logits_to_keep=1`` when supported).

    ``mode="cloze"``: prompts from ``format_cloze_prompt``; every answer text is scored as a
    continuation by its summed token log-probabilities divided by its length in characters
    (lighteval's ``LogProbCharNorm(ignore_first_space=True)``). ``use_chat_template=None``
    means *no* template (lighteval's base-style cloze). ``batch_size`` counts questions: each
    batch is one forward over its 4 x ``batch_size`` (prompt + answer) sequences.

    Either way sequences are sorted by length and run in left-padded batches with an attention
    mask and explicit position ids (``cumsum(mask) - 1``), so each sees the same positions as
    it would unpadded; ties go to the earliest letter. ``progress(n_done)`` is called after
    each batch. ``share_prompt`` (cloze only; ``None``: unless the model is a CALM composition,
    whose augmenting cache cannot be repeated) runs each question's prompt once and its 4 answers
    after the KV cache (``_cloze_loglikelihoods_cached``): same scores, about 4x less compute.

    Returns ``{"accuracy", "n", "per_subject": {s: {"accuracy", "n"}}, "per_group": {...},
    "predictions": [letter per row, in input order]}``; cloze mode adds
    ``"accuracy_unnormalized"``: the accuracy without the per-character normalisation
    (lighteval's ``loglikelihood_acc``).
    """
    if not rows:
        raise ValueError("no rows to score")
    if mode not in ("letters", "cloze"):
        raise ValueError(f"mode must be 'letters' or 'cloze', got {mode!r}")
    extra: dict[str, Any] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if mode == "letters":
                chat = resolve_chat(tokenizer, use_chat_template)
                predictions = _letter_predictions(model, tokenizer, rows, batch_size, chat, progress)
            else:
                chat = resolve_chat(tokenizer, bool(use_chat_template))
                if share_prompt is None:
                    share_prompt = not hasattr(model, "calm_runner")
                scorer = _cloze_loglikelihoods_cached if share_prompt else _cloze_loglikelihoods
                loglik = scorer(model, tokenizer, rows, batch_size, chat, progress)
                lengths = [[max(1, len(c.strip())) for c in r["choices"]] for r in rows]  # chars
                predictions = [LETTERS[_argmax([s / n for s, n in zip(ll, ln)])]
                               for ll, ln in zip(loglik, lengths)]
                raw_hits = sum(LETTERS[_argmax(ll)] == r["answer"] for ll, r in zip(loglik, rows))
                extra = {"accuracy_unnormalized": raw_hits / len(rows)}
    finally:
        model.train(was_training)

    correct = [p == r["answer"] for p, r in zip(predictions, rows)]
    subjects = [r.get("subject") or "unknown" for r in rows]
    groups = [r.get("group") or SUBJECT_TO_GROUP.get(s, "unknown") for r, s in zip(rows, subjects)]
    return {"accuracy": sum(correct) / len(rows), "n": len(rows),
            "per_subject": _accuracy_table(subjects, correct),
            "per_group": _accuracy_table(groups, correct), "predictions": predictions, **extra}
