"""Reading instruction and chat data, applying templates, masking prompts out of the loss.

This module is the per-row logic; `moetune.data.sources` reads whole sources into Arrow and
`moetune.data.pipeline` tokenises them once (batched `Dataset.map`, cached on disk). Formats:
- instruction: `{"instruction", "response"[, "input", "domain"]}` (Alpaca's `output` too)
- chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`
- sharegpt: `{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}`
- text: `{"text": str}`, a plain completion trained on every token
All become a message list. With a chat template (the tokenizer's own) the text is the
rendered conversation; without one the documented plain template is

    ### Instruction:\n{user text}\n\n### Response:\n{assistant text}<eos>

(system text, when present, goes first followed by a blank line). Loss is computed
only on assistant tokens: every other label is -100.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from moetune.core.errors import DataError, RecipeError
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
    if fmt == "sharegpt":
        return _sharegpt(row, loc, cfg)
    if fmt == "text":
        text = row.get(cfg.text_field)
        if not isinstance(text, str) or not text:
            raise DataError(f"{loc}: missing or empty text column '{cfg.text_field}' (row keys: "
                            f"{', '.join(map(str, row))}). Set data.text_field to the right column.")
        return [{"role": "completion", "content": text}]
    if cfg.response_field not in row and cfg.response_field == "response" and "output" in row:
        row = {**row, "response": row["output"]}  # Alpaca's instruction/input/output
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


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _sharegpt(row: dict, loc: str, cfg: DataConfig) -> list[dict]:
    turns = row.get(cfg.conversations_field)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{loc}: missing or empty '{cfg.conversations_field}' list (row keys: {', '.join(row)}).")
    msgs = []
    for j, t in enumerate(turns):
        if (not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES or not isinstance(t.get("value"), str)):
            raise DataError(f"{loc}: turn {j} must be {{'from': system|human|gpt, 'value': str}}, got {t!r:.120}.")
        msgs.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{loc}: the last turn must be the assistant's ('gpt'; it is '{turns[-1]['from']}').")
    return msgs


def detect_format(rows: list[tuple[dict, str]], cfg: DataConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    if not rows:
        raise DataError("No rows to read.")
    row, loc = rows[0]
    return format_of_keys(list(row) if isinstance(row, dict) else [], cfg, loc)


def format_of_keys(keys: list, cfg: DataConfig, loc: str) -> str:
    """The format a row with these columns is in (data.format 'auto')."""
    for fmt, key in (("chat", cfg.messages_field), ("sharegpt", cfg.conversations_field),
                     ("instruction", cfg.instruction_field), ("text", cfg.text_field)):
        if key in keys:
            return fmt
    raise DataError(f"{loc}: cannot tell the format: no '{cfg.messages_field}', '{cfg.conversations_field}', "
                    f"'{cfg.instruction_field}' nor '{cfg.text_field}' key (row keys: {', '.join(map(str, keys))}). "
                    "Set data.format and the field names.")


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
        """The rendered conversation cut into (text, is_trained) pieces: assistant turns are trained
        (only the last one with data.mask_history); a 'completion' (text format) is trained whole."""
        if msgs[0]["role"] == "completion":
            eos = self.tok.eos_token or ""
            text = msgs[0]["content"]
            return [(text if text.endswith(eos) else text + eos, True)]
        msgs = self._with_system(msgs)
        pieces: list[tuple[str, bool]] = []
        done = ""
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = self._render(msgs[:i], gen=True)
            full = self._render(msgs[: i + 1], gen=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise RecipeError("The chat template does not render conversations as growing prefixes; "
                                  "set data.template=plain.")
            pieces += [(prompt[len(done):], False), (full[len(prompt):], i == last or not self.cfg.mask_history)]
            done = full
        return pieces

    def _ids_many(self, texts: list[str], add: bool) -> list[list[int]]:
        """Token ids of many texts in one (batched, Rust-side) tokenizer call; '' -> []."""
        full = [t for t in texts if t]
        got = iter(self.tok(full, add_special_tokens=add)["input_ids"] if full else [])
        return [next(got) if t else [] for t in texts]

    def prompt_ids(self, msgs: list[dict]) -> list[int]:
        """Token ids of `msgs` (ending with a user turn) followed by the assistant header, tokenised piece
        by piece exactly as `encode_batch` tokenises a conversation's prompt (not cut to max_length)."""
        pieces = [t for t, _ in self.segments(msgs + [{"role": "assistant", "content": ""}])[:-1]]
        first = self._ids_many(pieces[:1], add=not self.chat)
        return [i for ids in first + self._ids_many(pieces[1:], add=False) for i in ids]

    def encode(self, msgs: list[dict], domain: str = "all") -> Example:
        return self.encode_batch([msgs], [domain])[0]

    def encode_batch(self, convs: list[list[dict]], domains: list[str],
                     full_lengths: list[int] | None = None) -> list[Example]:
        """Examples of many conversations, tokenised with two batched tokenizer calls
        (`full_lengths`, when given, receives each token count before max_length cuts it)."""
        pieces = [self.segments(m) for m in convs]
        # The plain template has no special tokens of its own: let the tokenizer add BOS once.
        firsts = iter(self._ids_many([p[0][0] for p in pieces], add=not self.chat))
        rests = iter(self._ids_many([t for p in pieces for t, _ in p[1:]], add=False))
        eos, n = self.tok.eos_token_id, self.cfg.max_length
        out = []
        for msgs, ps, domain in zip(convs, pieces, domains):
            ids: list[int] = []
            labels: list[int] = []
            prompt_ids: list[int] = []
            for j, (_, trained) in enumerate(ps):
                t = next(firsts) if j == 0 else next(rests)
                if j == len(ps) - 1:
                    prompt_ids = list(ids)
                ids += t
                labels += t if trained else [IGNORE] * len(t)
            if not self.chat and eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
                labels.append(eos)
            if full_lengths is not None:
                full_lengths.append(len(ids))
            out.append(Example(ids[:n], labels[:n], prompt_ids[:n], msgs[-1]["content"], domain))
        return out


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
