"""Evaluation: loss/perplexity, greedy exact match per domain, multiple-choice accuracy, and on preference
pairs the preference accuracy (loss and exact match are then the chosen responses')."""
from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict

import torch

from moetune.adapters.inject import expert_layers
from moetune.adapters.io import reference_context
from moetune.core.ui import simple_progress
from moetune.data.mmlu import load_mc_rows
from moetune.data.examples import is_pairs
from moetune.data.rows import Example, collate
from moetune.eval.mmlu import score_multiple_choice
from moetune.experts.context import generation_routing
from moetune.train.loss import per_example_loss
from moetune.train.preference import score_pairs


def normalise_answer(text: str) -> str:
    """Exact match compares stripped text with inner whitespace collapsed."""
    return " ".join(text.strip().split())


@torch.no_grad()
def loss_by_domain(model, examples: list[Example], pad_id: int, batch_size: int, device) -> dict:
    """{'loss', 'perplexity', 'tokens', 'per_domain': {d: {'loss', 'tokens'}}} (token-weighted), and per example
    (in order) 'loss_sums' (summed target-token loss) and 'token_counts'."""
    sums, counts = defaultdict(float), defaultdict(int)
    each_sum, each_n = [], []
    model.eval()
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        b = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        s, n = per_example_loss(model, b)
        for e, si, ni in zip(chunk, s.tolist(), n.tolist()):
            sums[e.domain] += si
            counts[e.domain] += ni
            each_sum.append(si)
            each_n.append(int(ni))
    total, n = sum(sums.values()), sum(counts.values())
    loss = total / max(n, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": n,
            "per_domain": {d: {"loss": sums[d] / max(counts[d], 1), "tokens": counts[d]} for d in sorted(sums)},
            "loss_sums": each_sum, "token_counts": each_n}


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    return ids, mask                                            # (B, T), (B, T)


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS and the generation config's (one or a list)."""
    eos = [t for t in {tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)} if t is not None]
    return sorted({x for t in eos for x in (t if isinstance(t, list) else [t])})


def generate_ids(model, ids: torch.Tensor, mask: torch.Tensor, device, **kwargs) -> torch.Tensor:
    """model.generate on left-padded prompts ids, mask (B, T) -> (B, T + new), inside the routing context
    that sequence-level routers (router.level) need: they pool the prompt once and keep its gates for the
    new tokens. The one place moetune generates (exact match, `generate`, `chat`)."""
    with generation_routing(mask.to(device)):
        return model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)


@torch.no_grad()
def exact_match(model, tokenizer, examples: list[Example], batch_size: int, max_new_tokens: int, device,
                show: bool = True, keep_samples: int = 5) -> dict:
    """Greedy, batched generation; exact match of the answer per domain."""
    model.eval()
    hits, totals = defaultdict(int), defaultdict(int)
    samples = []
    correct = [False] * len(examples)
    eos = eos_ids(model, tokenizer)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))  # similar lengths per batch
    with simple_progress("exact match", len(examples), enabled=show) as bar:
        for s in range(0, len(order), batch_size):
            chunk = [examples[i] for i in order[s:s + batch_size]]
            ids, mask = left_pad([e.prompt_ids for e in chunk], tokenizer.pad_token_id)
            out = generate_ids(model, ids, mask, device, do_sample=False, max_new_tokens=max_new_tokens,
                               eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
            new = out[:, ids.shape[1]:]                         # (B, <= max_new_tokens)
            for i, e, row in zip(order[s:s + batch_size], chunk, new.tolist()):
                text = tokenizer.decode(row, skip_special_tokens=True)
                ok = normalise_answer(text) == normalise_answer(e.reference)
                correct[i] = ok
                hits[e.domain] += ok
                totals[e.domain] += 1
                if len(samples) < keep_samples:
                    samples.append({"domain": e.domain, "reference": e.reference, "output": text.strip(), "ok": ok})
            bar.advance(bar.task_ids[0], len(chunk))
    n = sum(totals.values())
    return {"exact_match": sum(hits.values()) / max(n, 1), "n": n, "samples": samples, "correct": correct,
            "per_domain": {d: {"exact_match": hits[d] / totals[d], "n": totals[d]} for d in sorted(totals)}}


def examples_fingerprint(examples: list[Example]) -> str:
    """sha256 of the held-out examples' domains and reference answers, in order: equal for two evaluations of
    the same rows whatever the tokenizer, so their per-example results pair up (`moetune compare`)."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.domain, e.reference]).encode() + b"\n")
    return h.hexdigest()


def per_example_record(examples: list[Example], loss: dict, correct: list[bool] | None,
                       preferred: list[bool] | None = None) -> dict:
    """The compact per-example results eval.json keeps: 'domains' (sorted names) and 'domain' (an index into
    them per example), 'loss_sum' (summed loss over the target tokens, 6 significant digits) and 'tokens' per
    example, 'correct' a string of '1'/'0' (greedy exact match; absent without generation), on preference
    pairs 'preferred' a string of '1'/'0' (the chosen response the more likely), 'fingerprint'."""
    names = sorted({e.domain for e in examples})
    index = {d: i for i, d in enumerate(names)}
    out = {"n": len(examples), "fingerprint": examples_fingerprint(examples), "domains": names,
           "domain": [index[e.domain] for e in examples], "loss_sum": [float(f"{x:.6g}") for x in loss["loss_sums"]],
           "tokens": loss["token_counts"]}
    if correct is not None:
        out["correct"] = "".join("1" if ok else "0" for ok in correct)
    if preferred is not None:
        out["preferred"] = "".join("1" if ok else "0" for ok in preferred)
    return out


def evaluate(model, tokenizer, examples: list[Example], recipe, device, generation: bool | None = None,
             show: bool = True, per_example: bool = False) -> dict:
    """Loss and (optionally) exact match on held-out examples, merged per domain; with `per_example`, also
    `per_example_record` under 'per_example'."""
    cfg = recipe.eval
    if cfg.max_examples:
        examples = examples[: cfg.max_examples]
    res = loss_by_domain(model, examples, tokenizer.pad_token_id, cfg.batch_size, device)
    out = {"loss": res["loss"], "perplexity": res["perplexity"], "n": len(examples), "per_domain": {}}
    for d, v in res["per_domain"].items():
        out["per_domain"][d] = {"loss": v["loss"]}
    em = None
    if cfg.generation if generation is None else generation:
        em = exact_match(model, tokenizer, examples, cfg.batch_size, cfg.max_new_tokens, device, show=show)
        out["exact_match"] = em["exact_match"]
        out["samples"] = em["samples"]
        for d, v in em["per_domain"].items():
            out["per_domain"].setdefault(d, {})["exact_match"] = v["exact_match"]
            out["per_domain"][d]["n"] = v["n"]
    preferred = None
    if is_pairs(examples):
        pref = preference_scores(model, tokenizer, examples, recipe, device)
        for d, acc in pref.pop("preference_per_domain").items():
            out["per_domain"].setdefault(d, {})["preference_accuracy"] = acc
        preferred = pref.pop("preferred")
        out.update(pref)
    if per_example:
        out["per_example"] = per_example_record(examples, res, em["correct"] if em else None, preferred)
    return out


def preference_scores(model, tokenizer, pairs, recipe, device) -> dict:
    """{'preference_accuracy', 'preference': score_pairs' numbers} of `pairs`; the per-domain accuracy joins
    `per_domain` in `evaluate`. TRL's rewards/* need a reference: the base with this adapter switched off, or
    `train.reference`'s adapter; a model without an adapter (merged) gets the reference-free numbers only."""
    ref = reference_context(model, recipe.train.reference) if expert_layers(model) else None
    s = score_pairs(model, pairs, tokenizer.pad_token_id, recipe.eval.batch_size, device, recipe.train.beta, ref)
    per, preferred = s.pop("per_domain"), s.pop("preferred")
    return {"preference_accuracy": s["preference_accuracy"], "preference": s, "preferred": preferred,
            "preference_per_domain": {d: v["preference_accuracy"] for d, v in per.items()}}


def check_multiple_choice(paths: list[str]) -> None:
    """Read and validate every `eval.multiple_choice` file now (DataError naming the file, line and key), so that
    a run with an eval stage fails before training, not hours later at its evaluation."""
    for path in paths:
        load_mc_rows(path)


def multiple_choice(model, tokenizer, paths: list[str], recipe, show: bool = True) -> dict:
    """Accuracy on multiple-choice JSONL files (MMLU format), per file, subject and group."""
    out = {}
    for path in paths:
        rows = load_mc_rows(path)
        with simple_progress(f"multiple choice {path}", len(rows), enabled=show) as bar:
            out[path] = score_multiple_choice(model, tokenizer, rows, batch_size=recipe.eval.batch_size,
                                              use_chat_template=recipe.eval.mc_chat_template,
                                              mode=recipe.eval.mc_format,
                                              progress=lambda k: bar.update(bar.task_ids[0], completed=k))
    return out


def preference_line(before: dict, after: dict) -> str | None:
    """The console line of a run scored on preference pairs: preference accuracy before -> after, TRL's reward
    accuracy and margin after; None for other runs."""
    if "preference_accuracy" not in after and "preference_accuracy" not in before:
        return None

    def f(d: dict, k: str) -> str:
        v = d.get(k, (d.get("preference") or {}).get(k))
        return "-" if v is None else f"{v:.3f}"
    p = after.get("preference") or {}
    rewards = (f"; rewards/accuracies {f(p, 'rewards/accuracies')}, rewards/margins {f(p, 'rewards/margins')}"
               if "rewards/margins" in p else "")
    return (f"preference accuracy (chosen more likely than rejected): {f(before, 'preference_accuracy')} -> "
            f"{f(after, 'preference_accuracy')}{rewards}")
