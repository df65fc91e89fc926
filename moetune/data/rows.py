"""Examples: message lists rendered through a template into token ids with trained-only labels.

`moetune.data.formats` turns a row into a message list; `Encoder` renders it. With a chat template
(the tokenizer's own) the text is the rendered conversation; without one the documented plain
template is

    ### Instruction:\n{user text}\n\n### Response:\n{assistant text}<eos>

(system text, when present, goes first followed by a blank line). Loss is computed only on
assistant tokens (every other label is -100); raw 'prompt' / 'completion' messages (the text and
plain prompt_completion formats) are tokenised as they are, the completion trained.
`moetune.data.pipeline` runs this batched over a whole source and caches the result.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moetune.core.errors import DataError, RecipeError
from moetune.data.formats import RAW_ROLES
from moetune.recipe import DataConfig

PLAIN_USER = "### Instruction:\n{text}\n\n### Response:\n"
IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]          # IGNORE on prompt tokens
    prompt_ids: list[int]      # the prompt up to the last assistant turn, for generation
    reference: str             # the last assistant turn, for exact match
    domain: str


@dataclass
class Pair(Example):
    """A preference pair (TRL's prompt/chosen/rejected). The `Example` fields are the CHOSEN sequence (prompt +
    chosen; `reference` is the chosen answer), so whatever reads one sequence per row (the SFT loss, exact
    match, the routing report) reads the chosen one; `rejected_ids` / `rejected_labels` are prompt + rejected."""

    rejected_ids: list[int] = field(default_factory=list)
    rejected_labels: list[int] = field(default_factory=list)


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

    def _render(self, msgs: list[dict], gen: bool, tools: list | None = None) -> str:
        if self.chat:
            msgs = [{k: v for k, v in m.items() if k != "train"} if "train" in m else m for m in msgs]
            try:
                return self.tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=gen)
            except Exception as e:  # noqa: BLE001 - jinja's errors and the template's own raise_exception
                raise DataError(f"the chat template cannot render this conversation ({type(e).__name__}: "
                                f"{str(e)[:200]}).") from None
        text = ""
        for m in msgs:
            if m["role"] == "system":
                text += m["content"] + "\n\n"
            elif m["role"] == "user":
                text += PLAIN_USER.format(text=m["content"])
            else:
                text += m["content"] + (self.tok.eos_token or "") + "\n\n"
        return text[:-2] if (msgs[-1]["role"] == "assistant" and not gen) else text

    def _raw(self, msgs: list[dict]) -> list[tuple[str, bool]]:
        """Raw 'prompt' / 'completion' text as it is, the completion trained and ending with EOS."""
        if any(m["role"] not in RAW_ROLES for m in msgs):
            raise DataError("raw 'prompt'/'completion' text cannot be mixed with chat messages.")
        eos = self.tok.eos_token or ""
        out = [(m["content"], m["role"] == "completion") for m in msgs]
        text, trained = out[-1]
        out[-1] = (text if text.endswith(eos) else text + eos, trained)
        return out

    def _check_tools(self, msgs: list[dict], tools: list | None) -> None:
        if self.chat or not (tools or any(m["role"] == "tool" or m.get("tool_calls") for m in msgs)):
            return
        raise DataError("tool definitions, calls and results need a chat template that renders them, and the plain "
                        "template has none (data.template is 'plain', or the tokenizer has no chat template). "
                        "Use a model whose chat template renders 'tool_calls' and the 'tool' role, or drop those "
                        "turns.")

    @staticmethod
    def _rendered(m: dict, piece: str) -> None:
        """Raise unless the template rendered `m`'s tool calls (their names) or tool result into `piece`."""
        for call in m.get("tool_calls") or ():
            name = (call.get("function") or call)["name"]
            if name not in piece:
                raise DataError(f"the chat template of this tokenizer does not render tool calls (the call to "
                                f"{name!r} is not in the rendered text). Use a model whose chat template renders "
                                "'tool_calls' and the 'tool' role, or drop those turns.")
        if m["role"] == "tool" and m["content"].strip() and m["content"].strip() not in piece:
            raise DataError("the chat template of this tokenizer does not render 'tool' messages (a tool result "
                            "is not in the rendered text). Use a model whose chat template renders 'tool_calls' "
                            "and the 'tool' role, or drop those turns.")

    def segments(self, msgs: list[dict]) -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, is_trained) pieces: assistant turns are trained
        (only the last one with data.mask_history; never one marked "train": False); raw prompt /
        completion text is kept as it is, the completion trained."""
        if msgs[0]["role"] in RAW_ROLES:
            return self._raw(msgs)
        tools = getattr(msgs, "tools", None)  # formats.Messages: the row's tool definitions
        self._check_tools(msgs, tools)
        msgs = self._with_system(msgs)
        pieces: list[tuple[str, bool]] = []
        done = ""
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = self._render(msgs[:i], gen=True, tools=tools)
            full = self._render(msgs[: i + 1], gen=False, tools=tools)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise RecipeError("The chat template does not render conversations as growing prefixes; "
                                  "set data.template=plain.")
            trained = m.get("train", True) and (i == last or not self.cfg.mask_history)
            pieces += [(prompt[len(done):], False), (full[len(prompt):], trained)]
            if self.chat:
                for t in reversed(msgs[:i]):  # the tool results since the previous assistant turn
                    if t["role"] == "assistant":
                        break
                    self._rendered(t, prompt[len(done):])
                self._rendered(m, full[len(prompt):])
            done = full
        for t in tools or ():  # definitions come before the first answer (a call names its tool too)
            name = (t.get("function") or t).get("name")
            if isinstance(name, str) and name not in pieces[0][0]:
                raise DataError(f"the chat template of this tokenizer does not render tool definitions (the "
                                f"'{self.cfg.tools_field}' column; {name!r} is not in the rendered prompt). Use a "
                                "model whose chat template renders `tools`, or put the definitions in the system "
                                "message.")
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

    def encode_batch(self, convs: list[list[dict]], domains: list[str], full_lengths: list[int] | None = None,
                     pieces: list[list[tuple[str, bool]]] | None = None) -> list[Example]:
        """Examples of many conversations, tokenised with two batched tokenizer calls
        (`full_lengths`, when given, receives each token count before max_length cuts it;
        `pieces`, when given, are the conversations' `segments`)."""
        pieces = [self.segments(m) for m in convs] if pieces is None else pieces
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
            out.append(Example(ids[:n], labels[:n], prompt_ids[:n], msgs[-1].get("content") or "", domain))
        return out


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) input_ids / attention_mask / labels."""
    return _padded([(e.input_ids, e.labels) for e in batch], pad_id)


def collate_pairs(batch: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs as ONE right-padded batch of 2B rows (2B, T): the B chosen sequences, then the B rejected ones
    (TRL's concatenated forward)."""
    return _padded([(p.input_ids, p.labels) for p in batch] + [(p.rejected_ids, p.rejected_labels) for p in batch],
                   pad_id)


def _padded(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    T = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (x, y) in enumerate(seqs):
        n = len(x)
        ids[i, :n] = torch.tensor(x)
        labels[i, :n] = torch.tensor(y)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
