#!/usr/bin/env python
"""The key-value arithmetic experiment of CALM (Bansal et al., 2024, "LLM Augmented LLMs", sec. 4.1)
on the embedded SmolLM2-135M-Instruct, end to end and seeded:

    python scripts/calm_kv_arithmetic.py data        # data/calm-kv/: keys, m_A corpus, anchor and composition splits
    python scripts/calm_kv_arithmetic.py augmenting  # m_A from scratch (width 256, 4 layers, SmolLM2 tokenizer)
                                                     #   -> runs/calm-kv/augmenting, memorisation accuracy per key split
    python scripts/calm_kv_arithmetic.py anchor      # recipes/calm-kv-anchor.yaml: LoRA on a+b-c with numbers, merged
                                                     #   -> runs/calm-kv-anchor/merged (the anchor m_B)
    python scripts/calm_kv_arithmetic.py table       # m_B alone, m_A alone, LoRA on m_B (recipes/calm-kv-lora.yaml) and
                                                     #   CALM (recipes/calm-kv-arithmetic.yaml) on the held-out keys
                                                     #   -> benchmarks/results/calm_kv_arithmetic.{json,md}
    python scripts/calm_kv_arithmetic.py all         # the four in order (about an hour on a 2-core CPU)
    python scripts/calm_kv_arithmetic.py all --smoke # tiny sizes, a few steps, under runs/calm-kv-smoke (CPU, under a minute)

The setting. A table maps random 5-letter keys to integers 0..9 (`max_value`; single digits, so
m_A's state at a key's last token predicts the whole value). The augmenting model m_A (a
small Llama of a different width, sharing the anchor's tokenizer) is trained only to recall the
table: its corpus is lines of `key` `value` `,` triples, a key sometimes preceded by + - or a
newline ("qzvtx4,+abcde7,fghij3,\nklmno5,..."), with the loss on the value digits and the
closing comma, so m_A's states at a key's last token carry that key's value whatever precedes
the key, and m_A ends each number. The anchor m_B can
do `a+b-c` on numbers (a LoRA trained on numbers, merged) and has never seen a key. Every answer
writes the numbers out, then the result: `3+5-2` -> `3+5-2=6`, `K1+K2-K3` -> `v1+v2-v3=r` (the
paper's KV-substitution then arithmetic, in one answer; exact match needs both right). Composition
data are `K1+K2-K3` prompts with those answers; the composition is trained on expressions
over 3/4 of the keys and tested on expressions over the other 1/4 ("held-out keys"), whose
values only m_A knows. LoRA on m_B gets the same composition data. With the SmolLM2 tokenizer,
letters, digits and operators are separate pre-tokens, so a key tokenizes the same in m_A's
corpus and in the prompts.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import string
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moetune.recipe import ModelConfig, load_recipe  # noqa: E402

KEY_LEN = 5
# m_A trains for at most `steps` steps; every `check_every` steps it checkpoints (resumable) and
# stops early once it recalls at least `stop_recall` of all keys.
SIZES = {"full": dict(keys=600, max_value=9, train=3000, validation=100, test=200, anchor_train=700, anchor_eval=200,
                      hidden=256, layers=4, heads=4, steps=4000, batch=32, pairs=16, lr=2e-3,
                      check_every=200, stop_recall=0.95),
         "smoke": dict(keys=24, max_value=9, train=64, validation=8, test=8, anchor_train=64, anchor_eval=8,
                       hidden=64, layers=2, heads=2, steps=30, batch=8, pairs=6, lr=3e-3,
                       check_every=10, stop_recall=1.01)}


def paths(smoke: bool) -> dict[str, Path]:
    if smoke:
        base = ROOT / "runs" / "calm-kv-smoke"
        return {"data": base / "data", "augmenting": base / "augmenting", "anchor_run": base / "anchor",
                "calm_run": base / "calm", "lora_run": base / "lora", "results": base / "results"}
    return {"data": ROOT / "data" / "calm-kv", "augmenting": ROOT / "runs" / "calm-kv" / "augmenting",
            "anchor_run": ROOT / "runs" / "calm-kv-anchor", "calm_run": ROOT / "runs" / "calm-kv-arithmetic",
            "lora_run": ROOT / "runs" / "calm-kv-lora", "results": ROOT / "benchmarks" / "results"}


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ------------------------------------------------------------------ data


def make_data(out: Path, size: dict, seed: int = 0) -> dict:
    """Keys, values, key splits and the five JSONL files; deterministic for a seed."""
    rng = random.Random(seed)
    keys: set[str] = set()
    while len(keys) < size["keys"]:
        keys.add("".join(rng.choice(string.ascii_lowercase) for _ in range(KEY_LEN)))
    order = sorted(keys)
    rng.shuffle(order)
    table = {k: rng.randint(0, size["max_value"]) for k in order}
    held, compose = order[: len(order) // 4], order[len(order) // 4:]

    def expressions(pool: list[str] | None, n: int, seen: set[str], domain: str) -> list[dict]:
        rows = []
        while len(rows) < n:
            if pool is None:                                  # numbers: what the anchor learns
                a, b, c = (rng.randint(0, size["max_value"]) for _ in range(3))
                text = f"{a}+{b}-{c}"
            else:
                k1, k2, k3 = rng.sample(pool, 3)
                text, (a, b, c) = f"{k1}+{k2}-{k3}", (table[k1], table[k2], table[k3])
            if text not in seen:                              # the answer: the numbers, then the result
                seen.add(text)
                rows.append({"instruction": text, "response": f"{a}+{b}-{c}={a + b - c}", "domain": domain})
        return rows

    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    files = {"train": expressions(compose, size["train"], seen, "kv_arithmetic"),
             "validation": expressions(compose, size["validation"], seen, "kv_arithmetic"),
             "test": expressions(held, size["test"], seen, "kv_arithmetic_heldout_keys"),
             "anchor_train": expressions(None, size["anchor_train"], seen, "arithmetic"),
             "anchor_validation": expressions(None, size["anchor_eval"], seen, "arithmetic")}
    for name, rows in files.items():
        _jsonl(out / f"{name}.jsonl", rows)
    kv = {"seed": seed, "key_length": KEY_LEN, "values": table, "compose_keys": compose, "heldout_keys": held}
    (out / "kv.json").write_text(json.dumps(kv, indent=1))
    return kv


# ------------------------------------------------------------------ the augmenting model m_A


BEFORE_KEY = ("", "+", "-", "\n")  # what may precede a key in m_A's corpus besides ',': as in the prompts


def _pair_tokens(tok, key: str, value: int, before: str = "") -> tuple[list[int], list[int]]:
    """(ids, labels) of 'before' 'key' 'value' ',': loss on the value digits and the ',' that ends them."""
    b = tok(before, add_special_tokens=False).input_ids if before else []
    k = tok(key, add_special_tokens=False).input_ids
    v = tok(f"{value},", add_special_tokens=False).input_ids
    return b + k + v, [-100] * (len(b) + len(k)) + v


def _corpus_batch(tok, table: dict, keys: list[str], size: dict, rng: random.Random):
    """A right-padded batch of lines of size['pairs'] random key-value pairs each; a key follows the previous
    pair's ',' directly or through a '+', '-' or newline (as keys follow those in the prompts)."""
    rows = []
    for _ in range(size["batch"]):
        ids, labels = [tok.bos_token_id], [-100]
        for key in rng.sample(keys, min(size["pairs"], len(keys))):
            i, lab = _pair_tokens(tok, key, table[key], rng.choice(BEFORE_KEY))
            ids, labels = ids + i, labels + lab
        rows.append((ids, labels))
    T = max(len(i) for i, _ in rows)
    ids = torch.full((len(rows), T), tok.pad_token_id)
    labels = torch.full((len(rows), T), -100)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for r, (i, lab) in enumerate(rows):
        ids[r, :len(i)], labels[r, :len(i)], mask[r, :len(i)] = torch.tensor(i), torch.tensor(lab), 1
    return ids, mask, labels


@torch.no_grad()
def recall_accuracy(model, tok, table: dict, keys: list[str], device, chunk: int = 64) -> float:
    """Fraction of keys whose value m_A completes greedily after '<bos>key', up to the ','.

    Computed teacher-forced in batches: greedy decoding emits exactly `value` `,` iff the argmax
    after every prefix of '<bos>key value,' is the next token of it, so the two are the same test."""
    hits = 0
    for i in range(0, len(keys), chunk):
        rows = [_pair_tokens(tok, key, table[key]) for key in keys[i:i + chunk]]   # 'key' 'value' ',', labels
        T = 1 + max(len(seq) for seq, _ in rows)
        ids = torch.full((len(rows), T), tok.pad_token_id)
        target = torch.zeros((len(rows), T), dtype=torch.bool)
        for r, (seq, labels) in enumerate(rows):
            ids[r, :1 + len(seq)] = torch.tensor([tok.bos_token_id] + seq)
            target[r, 1:1 + len(seq)] = torch.tensor(labels) != -100      # the value tokens and the comma
        ids, target = ids.to(device), target.to(device)
        hidden = model.model(input_ids=ids, attention_mask=(ids != tok.pad_token_id) | target).last_hidden_state
        keep = target[:, 1:]                                                   # (b, T-1): predicts a target token
        pred = model.lm_head(hidden[:, :-1][keep]).argmax(-1)                  # (n,)
        ok = torch.ones_like(keep)
        ok[keep] = pred == ids[:, 1:][keep]
        hits += int(ok.all(-1).sum())
    return hits / max(len(keys), 1)


class _NoScheduler:  # save_checkpoint wants a scheduler; m_A's lr is computed from the step
    def state_dict(self) -> dict:
        return {}


def train_augmenting(data: Path, out: Path, size: dict, seed: int = 0, device: str = "auto") -> dict:
    """Train m_A from scratch to recall the key table; save model + tokenizer to `out`.

    Checkpoints (model, optimizer, RNG, batch sampler, log) go to `<out>-state/checkpoints` every
    size['check_every'] steps, atomically; a rerun resumes from the newest one. Stops early once
    m_A recalls size['stop_recall'] of all keys."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from moetune.core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
    from moetune.models.load import load_config, load_tokenizer
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    tok = load_tokenizer(ModelConfig())                     # the default base's tokenizer
    kv = json.loads((data / "kv.json").read_text())
    table, keys = kv["values"], list(kv["values"])
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=load_config(ModelConfig()).vocab_size, hidden_size=size["hidden"],
                      intermediate_size=3 * size["hidden"], num_hidden_layers=size["layers"],
                      num_attention_heads=size["heads"], num_key_value_heads=size["heads"],
                      max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=size["lr"], weight_decay=0.0)
    rng = random.Random(seed)
    steps, log, start, t0 = size["steps"], [], 0, time.time()
    state_dir = out.parent / f"{out.name}-state"
    ck = latest_checkpoint(state_dir)
    if ck is not None:
        st = load_checkpoint(ck)
        missing, unexpected = model.load_state_dict({k: v.to(dev) for k, v in st["adapter"].items()}, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:                    # lm_head is tied to the embeddings
            raise SystemExit(f"{ck} does not match this m_A: missing {missing}, unexpected {unexpected}")
        opt.load_state_dict(st["optimizer"])
        set_rng_state(*st["rng"])
        v, state, g = st["position"]["sampler"]
        rng.setstate((v, tuple(state), g))
        start, log = st["step"], st["position"]["log"]
        t0 -= log[-1]["seconds"] if log else 0.0
        print(f"m_A: resuming from {ck} (step {start})", flush=True)
        if log and log[-1]["recall_all_keys"] >= size["stop_recall"]:
            start = steps                                                       # it had already stopped early
    for step in range(start, steps):
        model.train()
        lr = size["lr"] * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        ids, mask, labels = (t.to(dev) for t in _corpus_batch(tok, table, keys, size, rng))
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state   # (b, T, d)
        keep = labels[:, 1:] != -100                                                # (b, T-1)
        logits = model.lm_head(hidden[:, :-1][keep])                                # (N, V): value digits only
        loss = F.cross_entropy(logits.float(), labels[:, 1:][keep])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % size["check_every"] == 0 or step + 1 == steps:
            model.eval()
            recall = recall_accuracy(model, tok, table, keys, dev)
            log.append({"step": step + 1, "loss": round(loss.item(), 4), "recall_all_keys": round(recall, 4),
                        "seconds": round(time.time() - t0, 1)})
            print(f"m_A step {step + 1}/{steps} loss {loss.item():.4f} recall {recall:.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
            v, state, g = rng.getstate()
            save_checkpoint(state_dir, step + 1, dict(model.named_parameters()), opt, _NoScheduler(),
                            {"sampler": [v, list(state), g], "log": log})
            if recall >= size["stop_recall"]:
                break
    model.eval()
    acc = {"compose_keys": recall_accuracy(model, tok, table, kv["compose_keys"], dev),
           "heldout_keys": recall_accuracy(model, tok, table, kv["heldout_keys"], dev)}
    print(f"m_A recalls the value of {acc}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"recall_accuracy": acc, "log": log, "steps_run": log[-1]["step"] if log else 0,
            "config": {k: size[k] for k in ("hidden", "layers", "heads", "steps", "batch", "pairs", "lr",
                                            "check_every", "stop_recall")},
            "parameters": sum(p.numel() for p in model.parameters()), "seed": seed}
    (out / "calm_kv_augmenting.json").write_text(json.dumps(info, indent=1))
    return info


# ------------------------------------------------------------------ anchor, comparisons, table


def _data_overrides(data: Path, test: str = "test") -> list[str]:
    return [f"data.train={data / 'train.jsonl'}", f"data.validation={data / 'validation.jsonl'}",
            f"data.test={data / f'{test}.jsonl'}"]


def _smoke_train(smoke: bool) -> list[str]:
    return (["train.max_steps=2", "train.batch_size=4", "train.eval_every=0", "train.save_every=0",
             "eval.max_examples=4", "eval.batch_size=4", "data.max_length=64"] if smoke else [])


def train_anchor(p: dict, smoke: bool) -> Path:
    from moetune.commands.stages import run_recipe
    data = p["data"]
    over = [f"data.train={data / 'anchor_train.jsonl'}", f"data.validation={data / 'anchor_validation.jsonl'}",
            f"data.test={data / 'anchor_validation.jsonl'}", f"output_dir={p['anchor_run']}", *_smoke_train(smoke)]
    run_recipe(load_recipe(ROOT / "recipes" / "calm-kv-anchor.yaml", over))
    return p["anchor_run"] / "merged"


def score_alone(model_dir: Path, recipe, data_file: Path, device) -> dict:
    """Loss and exact match of one model without any adapter, with the recipe's template and eval settings."""
    from moetune.data.pipeline import load_examples
    from moetune.eval.evaluate import evaluate
    from moetune.models.load import load_model, load_tokenizer
    cfg = ModelConfig(path=str(model_dir))
    tok = load_tokenizer(cfg)
    model = load_model(cfg, device)
    return evaluate(model, tok, load_examples(str(data_file), tok, recipe.data), recipe, device, show=False)


def _run_or_resume(recipe) -> dict:
    """run_recipe, resuming from the newest checkpoint that an interrupted earlier run left in its output_dir."""
    from moetune.commands.stages import run_recipe
    from moetune.core.checkpoint import latest_checkpoint
    return run_recipe(recipe, resume=latest_checkpoint(recipe.output_dir) is not None)


def table(p: dict, smoke: bool) -> dict:
    from moetune.models.load import pick_device
    data, anchor = p["data"], p["anchor_run"] / "merged"
    common = [f"model.path={anchor}", *_data_overrides(data), *_smoke_train(smoke),
              *([] if smoke else ["train.save_every=100"])]  # checkpoints: an interrupted `table` resumes
    calm = load_recipe(ROOT / "recipes" / "calm-kv-arithmetic.yaml",
                       [*common, f"expert.augmenting_model={p['augmenting']}", f"output_dir={p['calm_run']}",
                        *(["expert.num_compositions=2"] if smoke else [])])          # the smoke m_A has 2 layers
    lora = load_recipe(ROOT / "recipes" / "calm-kv-lora.yaml", [*common, f"output_dir={p['lora_run']}"])
    device = pick_device(calm.model)
    rows = {"anchor m_B alone": score_alone(anchor, calm, data / "test.jsonl", device),
            "augmenting m_A alone": score_alone(p["augmenting"], calm, data / "test.jsonl", device)}
    numbers = score_alone(anchor, calm, data / "anchor_validation.jsonl", device)
    t0 = time.time()
    rows["LoRA on m_B (same data)"] = _run_or_resume(lora)["after"]
    t1 = time.time()
    rows["CALM m_B + m_A"] = _run_or_resume(calm)["after"]
    seconds = {"lora": round(t1 - t0, 1), "calm": round(time.time() - t1, 1)}
    aug_info = json.loads((p["augmenting"] / "calm_kv_augmenting.json").read_text())
    res = {"test": "K1+K2-K3 over held-out keys (values known only to m_A)", "n": rows["CALM m_B + m_A"]["n"],
           "rows": {k: {"exact_match": v.get("exact_match"), "loss": v["loss"]} for k, v in rows.items()},
           "anchor_on_numbers_exact_match": numbers.get("exact_match"), "augmenting_recall": aug_info["recall_accuracy"],
           "train_seconds": seconds, "train_seconds_note": "this invocation only (a resumed run counts what was left)",
           "device": str(device), "smoke": smoke,
           "commands": "python scripts/calm_kv_arithmetic.py all"}
    lines = ["| model | exact match | loss |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['exact_match']:.3f} | {v['loss']:.3f} |" for k, v in res["rows"].items()]
    lines += ["", f"n = {res['n']} held-out test expressions; anchor on a+b-c with numbers: "
                  f"{res['anchor_on_numbers_exact_match']:.3f} exact match; m_A recalls key values: "
                  f"{aug_info['recall_accuracy']}; device {device}."]
    p["results"].mkdir(parents=True, exist_ok=True)
    (p["results"] / "calm_kv_arithmetic.json").write_text(json.dumps(res, indent=1))
    (p["results"] / "calm_kv_arithmetic.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=("data", "augmenting", "anchor", "table", "all"))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and steps under runs/calm-kv-smoke")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="m_A training device (recipes use model.device)")
    a = ap.parse_args(argv)
    size, p = SIZES["smoke" if a.smoke else "full"], paths(a.smoke)
    if a.step in ("data", "all"):
        kv = make_data(p["data"], size, a.seed)
        print(f"{len(kv['values'])} keys ({len(kv['heldout_keys'])} held out) -> {p['data']}")
    if a.step in ("augmenting", "all"):
        train_augmenting(p["data"], p["augmenting"], size, a.seed, a.device)
    if a.step in ("anchor", "all"):
        print(f"anchor -> {train_anchor(p, a.smoke)}")
    if a.step in ("table", "all"):
        table(p, a.smoke)


if __name__ == "__main__":
    main()
