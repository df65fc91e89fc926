"""The seeded variable-length chat set of the end-to-end benchmark (`benchmarks/e2e.py`).

Rows are TRL's conversational prompt-completion format, which all three contenders read as they
are: `{"prompt": [system, user], "completion": [assistant]}`. moetune reads it as
`data.format: prompt_completion` (loss on the completion), TRL's `SFTTrainer` the same way
(`completion_only_loss` is on for prompt-completion rows), and the Trainer + PEFT worker renders
both sides with the tokenizer's chat template and masks the prompt.

Prompts are short (a one-line request of 4-14 words). Answers are long-tailed: the word count is
drawn from a log-normal (median ~45 words, sigma 0.9) and capped at 420 words, so most answers
are a few dozen tokens and a few run past `max_length` 512 (they are cut, by every tool alike).
The answers follow a small grammar tied to the prompt's topic, so the loss has something to learn.
Deterministic: the same (n, seed) gives the same rows in every Python process.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

SYSTEM = "You are a concise technical assistant."
TOPICS = ("river bridge", "garden pump", "market stall", "paper engine", "island ferry", "forest cabin",
          "valley road", "window frame", "music box", "stone wall", "cloud tank", "letter press")
VERBS = ("check", "clean", "measure", "tighten", "replace", "inspect", "paint", "oil", "test", "record")
PARTS = ("bolt", "hinge", "valve", "panel", "cable", "gear", "seal", "frame", "spring", "lever", "filter", "belt")
ADJS = ("old", "loose", "bright", "heavy", "quiet", "narrow", "upper", "lower", "spare", "main")
ASKS = ("How do I service the {t}?", "Give me the maintenance steps for a {t}.",
        "What should I do before winter with my {t}?", "List the checks for a {t}, please.",
        "My {t} is noisy. What do I do?", "Explain how to keep a {t} working.")
MAX_WORDS = 420


def answer_words(rng: random.Random) -> int:
    """Long-tailed answer length in words: log-normal, median 45, sigma 0.9, between 3 and MAX_WORDS."""
    return max(3, min(MAX_WORDS, int(math.exp(rng.gauss(math.log(45), 0.9)))))


def answer(rng: random.Random, topic: str, n_words: int) -> str:
    """Numbered steps about `topic` ('1. Check the loose bolt of the river bridge.') until n_words."""
    steps, words = [], 0
    while words < n_words:
        s = f"{len(steps) + 1}. {rng.choice(VERBS).capitalize()} the {rng.choice(ADJS)} {rng.choice(PARTS)} of the {topic}."
        steps.append(s)
        words += len(s.split())
    return "\n".join(steps)


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """n prompt-completion chat rows, deterministic in (n, seed)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        ask = rng.choice(ASKS).format(t=topic)
        rows.append({"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ask}],
                     "completion": [{"role": "assistant", "content": answer(rng, topic, answer_words(rng))}]})
    return rows


def write_rows(path: Path, n: int, seed: int = 0) -> Path:
    """Write `chat_rows(n, seed)` as JSON lines to `path`; returns it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in chat_rows(n, seed):
            f.write(json.dumps(row) + "\n")
    return path
