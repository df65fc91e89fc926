"""Reading instruction and chat data, applying templates, masking prompts out of the loss.

Sources: .jsonl, .json (a list of rows, or {"data": [...]}) .csv, .parquet, and
directories written by `datasets.Dataset.save_to_disk`. Formats:
- instruction: `{"instruction", "response"[, "input", "domain"]}`
- chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`
Both become a message list. With a chat template (the tokenizer's own) the text is the
rendered conversation; without one the documented plain template is

    ### Instruction:\n{user text}\n\n### Response:\n{assistant text}<eos>

(system text, when present, goes first followed by a blank line). Loss is computed
only on assistant tokens: every other label is -100.
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from moetune.errors import DataError, RecipeError
from moetune.recipe import DataConfig

# datasets and pyarrow (heavy imports, needed only for those input formats) are imported inside the readers.
PLAIN_USER = "### Instruction:\n{text}\n\n### Response:\n"
IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]          # IGNORE on prompt tokens
    prompt_ids: list[int]      # the prompt up to the last assistant turn, for generation
    reference: str             # the last assistant turn, for exact match
    domain: str


# ------------------------------------------------------------------ reading rows

def read_rows(path: str | Path) -> list[tuple[dict, str]]:
    """Rows of a data source with a location string ('file line N') for each."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"Data file {str(p)!r} does not exist.")
    if p.is_dir():
        import datasets
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:
            raise DataError(f"{p}: not a datasets save_to_disk directory ({e}).") from None
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"{p}: holds several splits ({', '.join(ds)}); point to one split's directory.")
        return [(dict(r), f"{p} row {i}") for i, r in enumerate(ds)]
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with p.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p} line {i}: not valid JSON ({e.msg}).") from None
                if not isinstance(row, dict):
                    raise DataError(f"{p} line {i}: each line must be a JSON object, got {type(row).__name__}.")
                rows.append((row, f"{p} line {i}"))
        return rows
    if suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{p} line {e.lineno}: not valid JSON ({e.msg}).") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{p}: expected a JSON list of rows (or {{'data': [...]}}).")
        return [(r, f"{p} item {i}") for i, r in enumerate(data)]
    if suffix == ".csv":
        # csv.reader's line_num, not a row count: quoted fields may span lines (multi-line answers).
        with p.open(encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            rows, start = [], reader.line_num + 1
            for rec in reader:
                if rec:  # blank lines are skipped, as csv.DictReader does
                    row: dict = dict(zip(header, rec))
                    row.update({k: None for k in header[len(rec):]})
                    if len(rec) > len(header):
                        row[None] = rec[len(header):]
                    rows.append((row, f"{p} line {start}"))
                start = reader.line_num + 1
            return rows
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        return [(r, f"{p} row {i}") for i, r in enumerate(pq.read_table(p).to_pylist())]
    raise DataError(f"Data file {str(p)!r}: unsupported type {suffix!r}. Allowed: .jsonl, .json, .csv, "
                    ".parquet or a datasets directory.")


def to_messages(row: dict, loc: str, cfg: DataConfig, fmt: str) -> list[dict]:
    """A row as a message list ending with the assistant turn to learn/score."""
    if not isinstance(row, dict):
        raise DataError(f"{loc}: a row must be an object, got {type(row).__name__}.")
    if fmt == "chat":
        msgs = row.get(cfg.messages_field)
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{loc}: missing or empty '{cfg.messages_field}' list (row keys: {', '.join(row)}).")
        for j, m in enumerate(msgs):
            if (not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant")
                    or not isinstance(m.get("content"), str)):
                raise DataError(f"{loc}: message {j} must be {{'role': system|user|assistant, 'content': str}}, "
                                f"got {m!r:.120}.")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{loc}: the last message must be the assistant's (it is '{msgs[-1]['role']}').")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    for key in (cfg.instruction_field, cfg.response_field):
        if key not in row or row[key] is None:
            raise DataError(f"{loc}: missing key '{key}' (row keys: {', '.join(map(str, row))}). "
                            f"Set data.instruction_field / data.response_field to the right columns.")
        if not isinstance(row[key], (str, int, float)):
            raise DataError(f"{loc}: '{key}' must be text, got {type(row[key]).__name__}.")
    text = str(row[cfg.instruction_field])
    extra = row.get(cfg.input_field)
    if extra:
        text = f"{text}\n\n{extra}"
    return [{"role": "user", "content": text}, {"role": "assistant", "content": str(row[cfg.response_field])}]


def detect_format(rows: list[tuple[dict, str]], cfg: DataConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    if not rows:
        raise DataError("No rows to read.")
    row, loc = rows[0]
    if isinstance(row, dict) and cfg.messages_field in row:
        return "chat"
    if isinstance(row, dict) and cfg.instruction_field in row:
        return "instruction"
    raise DataError(f"{loc}: cannot tell the format: no '{cfg.messages_field}' nor '{cfg.instruction_field}' "
                    f"key (row keys: {', '.join(map(str, row))}). Set data.format and the field names.")


# ------------------------------------------------------------------ templates

class Encoder:
    """Turns message lists into token ids with assistant-only labels."""

    def __init__(self, tokenizer, cfg: DataConfig) -> None:
        self.tok = tokenizer
        self.cfg = cfg
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if cfg.template == "chat" and not has_chat:
            raise RecipeError("Recipe key 'data.template' is 'chat', but this tokenizer has no chat template. "
                              "Allowed: 'plain' or 'auto'.")
        self.chat = cfg.template == "chat" or (cfg.template == "auto" and has_chat)

    def _with_system(self, msgs: list[dict]) -> list[dict]:
        if self.cfg.system_prompt is not None and msgs[0]["role"] != "system":
            return [{"role": "system", "content": self.cfg.system_prompt}] + msgs
        return msgs

    def _render(self, msgs: list[dict], gen: bool) -> str:
        if self.chat:
            return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        text = ""
        for m in msgs:
            if m["role"] == "system":
                text += m["content"] + "\n\n"
            elif m["role"] == "user":
                text += PLAIN_USER.format(text=m["content"])
            else:
                text += m["content"] + (self.tok.eos_token or "") + "\n\n"
        return text[:-2] if (msgs[-1]["role"] == "assistant" and not gen) else text

    def segments(self, msgs: list[dict]) -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, is_assistant) pieces."""
        msgs = self._with_system(msgs)
        pieces: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = self._render(msgs[:i], gen=True)
            full = self._render(msgs[: i + 1], gen=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise RecipeError("The chat template does not render conversations as growing prefixes; "
                                  "set data.template=plain.")
            pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        return pieces

    def _ids(self, text: str, first: bool) -> list[int]:
        # The plain template has no special tokens of its own: let the tokenizer add BOS once.
        add = first and not self.chat
        return self.tok(text, add_special_tokens=add)["input_ids"] if text else []

    def encode(self, msgs: list[dict], domain: str = "all") -> Example:
        ids: list[int] = []
        labels: list[int] = []
        prompt_ids: list[int] = []
        pieces = self.segments(msgs)
        for j, (text, is_assistant) in enumerate(pieces):
            t = self._ids(text, first=(j == 0))
            if j == len(pieces) - 1:
                prompt_ids = list(ids)
            ids += t
            labels += t if is_assistant else [IGNORE] * len(t)
        if not self.chat and self.tok.eos_token_id is not None and (not ids or ids[-1] != self.tok.eos_token_id):
            ids.append(self.tok.eos_token_id)
            labels.append(self.tok.eos_token_id)
        n = self.cfg.max_length
        return Example(ids[:n], labels[:n], prompt_ids[:n], msgs[-1]["content"], domain)


# ------------------------------------------------------------------ splits

def load_examples(path: str, tokenizer, cfg: DataConfig) -> list[Example]:
    rows = read_rows(path)
    if not rows:
        raise DataError(f"Data file {path!r} has no rows.")
    fmt = detect_format(rows, cfg)
    enc = Encoder(tokenizer, cfg)
    out = []
    for row, loc in rows:
        msgs = to_messages(row, loc, cfg, fmt)
        out.append(enc.encode(msgs, str(row.get(cfg.domain_field) or "all")))
    return out


def load_splits(cfg: DataConfig, tokenizer, need: tuple[str, ...] = ("train", "validation", "test")
                ) -> dict[str, list[Example]]:
    """train / validation / test examples (validation carved off train when not given)."""
    splits: dict[str, list[Example]] = {}
    train = load_examples(cfg.train, tokenizer, cfg) if ("train" in need or not cfg.validation) else []
    if train:
        random.Random(cfg.seed).shuffle(train)
    if "validation" in need or "train" in need:
        if cfg.validation:
            splits["validation"] = load_examples(cfg.validation, tokenizer, cfg)
        else:
            k = int(len(train) * cfg.validation_split)  # 0 disables validation
            splits["validation"], train = train[:k], train[k:]
    if cfg.max_train_examples:
        train = train[: cfg.max_train_examples]
    if "train" in need:
        dropped = sum(1 for e in train if all(lab == IGNORE for lab in e.labels))
        train = [e for e in train if any(lab != IGNORE for lab in e.labels)]
        if not train:
            raise DataError(f"No training example keeps a response token within data.max_length={cfg.max_length} "
                            f"({dropped} dropped). Raise data.max_length.")
        splits["train"] = train
    if "test" in need and cfg.test:
        splits["test"] = load_examples(cfg.test, tokenizer, cfg)
    return splits


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) input_ids / attention_mask / labels."""
    T = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
