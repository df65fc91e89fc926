"""Data formats: one registry entry per format, from a row's columns to a message list.

Each `Format` in `FORMATS` has
- `fields`: the `DataConfig` fields naming the columns it reads (`data.messages_field`, ...; a
  `data.mix` source renames them with `columns`), and `required`, those of them whose columns
  `detect` looks for;
- `detect(columns, cfg)`: whether a source with these columns is in this format (`data.format:
  auto` takes the first format of `FORMATS`, in order, that matches);
- `to_messages(row, loc, cfg)`: one row as a message list, or a `DataError` naming `loc`.

Adding a format is one entry (and its name in `moetune.recipe.FORMATS`, the recipe's choices,
with a `*_field` in `DataConfig` for a new column: `MixSource.columns` follows).

Messages are dicts with a role:
- 'system', 'user', 'assistant', 'tool' (OpenAI chat messages): rendered by the tokenizer's
  chat template (or the plain template); an assistant message may carry `tool_calls`, a tool
  message `name` / `tool_call_id`. Assistant messages are trained, but for one with
  `"train": False` (context: an assistant turn inside a conversational prompt);
- 'prompt' and 'completion': raw text, never templated; a completion is trained, a prompt not.
The last message is the one generation is scored on (its content is the exact-match reference).
A chat row's tool definitions (the `tools` column) ride on the list: `Messages.tools`.

One row gives one token sequence, but for a format with several per row: `preference` (TRL's
prompt/chosen/rejected) names them in `sequences = ("chosen", "rejected")` and its `to_messages`
returns one message list per name ({'chosen': prompt + chosen, 'rejected': prompt + rejected}); the
pipeline encodes each with the same `Encoder` into its own columns (`chosen_input_ids`, ...).
`first_messages` gives the first of them, for code that reads one conversation per row.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from moetune.core.errors import DataError
from moetune.recipe import DataConfig

ROW = "\x00ROW\x00"  # a row location not known yet (written inside a batched map, replaced afterwards)
CHAT_ROLES = ("system", "user", "assistant", "tool")
RAW_ROLES = ("prompt", "completion")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class Messages(list):
    """A message list with the row's tool definitions, for the chat template's `tools` (None: none)."""

    tools: list | None = None


@dataclass(frozen=True)
class Format:
    """One data format (see the module docstring)."""

    name: str
    fields: tuple[str, ...]
    required: tuple[str, ...]
    read: Callable[[dict, str, DataConfig], list[dict]]
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # field -> columns read when its own is absent
    sequences: tuple[str, ...] = ()  # several token sequences per row: to_messages gives {name: messages}

    def detect(self, columns: list[str], cfg: DataConfig) -> bool:
        return all(getattr(cfg, f) in columns for f in self.required)

    def resolve(self, columns: list[str], cfg: DataConfig) -> DataConfig:
        """`cfg` with each aliased field that is at its default and has no column of its own pointing at the
        first alias column the source has (Alpaca's `output` for `response`)."""
        default, changes = DataConfig(), {}
        for f, names in self.aliases.items():
            own = getattr(cfg, f)
            found = next((n for n in names if n in columns), None)
            if own == getattr(default, f) and own not in columns and found:
                changes[f] = found
        return dataclasses.replace(cfg, **changes) if changes else cfg

    def to_messages(self, row: dict, loc: str, cfg: DataConfig) -> list[dict] | dict[str, list[dict]]:
        """The row as a message list ending with the turn to learn/score ({name: list} for `sequences`)."""
        if not isinstance(row, dict):
            raise DataError(f"{loc}: a row must be an object, got {type(row).__name__}.")
        return self.read(row, loc, cfg)

    def first_messages(self, row: dict, loc: str, cfg: DataConfig) -> list[dict]:
        """One message list per row: `to_messages`, or its first sequence (a preference row's prompt + chosen)."""
        msgs = self.to_messages(row, loc, cfg)
        return msgs[self.sequences[0]] if self.sequences else msgs


# ------------------------------------------------------------------ reading values

def _keys(row: dict) -> str:
    return ", ".join(map(str, row)) or "none"


def _value(row: dict, f: str, loc: str, cfg: DataConfig):
    """The value of the column `data.<f>` names: a missing key and a null are errors, told apart."""
    key = getattr(cfg, f)
    if key not in row:
        raise DataError(f"{loc}: missing key {key!r} (row keys: {_keys(row)}). If that column has another name "
                        f"here, set data.{f} to it.")
    if row[key] is None:
        raise DataError(f"{loc}: {key!r} is null. Give it a value, or drop the row (data.skip_bad_rows: true skips "
                        "and counts such rows).")
    return row[key]


def _text(row: dict, f: str, loc: str, cfg: DataConfig) -> str:
    v = _value(row, f, loc, cfg)
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise DataError(f"{loc}: {getattr(cfg, f)!r} must be text, got {type(v).__name__}.")
    return str(v)


def _nonempty_list(row: dict, f: str, loc: str, cfg: DataConfig) -> list:
    v = _value(row, f, loc, cfg)
    if not isinstance(v, list) or not v:
        raise DataError(f"{loc}: {getattr(cfg, f)!r} must be a non-empty list, got "
                        f"{'an empty list' if v == [] else type(v).__name__}.")
    return v


def _no_nulls(v):
    """`v` without None values in its dicts (Arrow gives every struct every key a file uses anywhere)."""
    if isinstance(v, dict):
        return {k: _no_nulls(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_no_nulls(x) for x in v]
    return v


def _tool_call(call, loc: str, where: str) -> dict:
    """One OpenAI tool call ({type: function, function: {name, arguments}}, or {name, arguments}); JSON-text
    arguments become an object, as chat templates expect."""
    call = _no_nulls(call) if isinstance(call, dict) else call
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise DataError(f"{loc}: {where} must be {{'type': 'function', 'function': {{'name': str, 'arguments': "
                        f"object}}}}, got {call!r:.120}.")
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
        except json.JSONDecodeError:
            raise DataError(f"{loc}: {where} has arguments that are text but not JSON: {args!r:.80}.") from None
        fn = {**fn, "arguments": parsed}
        call = {**call, "function": fn} if "function" in call else fn
    return call


def chat_messages(items: list, loc: str, what: str = "message") -> list[dict]:
    """OpenAI chat messages checked and normalised: role and content, plus the tool keys (an assistant's
    `tool_calls`, a tool message's `name` / `tool_call_id`); keys that are null count as absent."""
    out = []
    for j, m in enumerate(items):
        d = {k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else None
        role = d.get("role") if d else None
        calls = d.get("tool_calls") if d else None
        content = d.get("content") if d else None
        if role not in CHAT_ROLES or not (isinstance(content, str) or (role == "assistant" and calls)):
            raise DataError(f"{loc}: {what} {j} must be {{'role': system|user|assistant|tool, 'content': str}} "
                            f"(an assistant's may hold 'tool_calls' instead of content), got {m!r:.120}.")
        msg = {"role": role, **({"content": content} if content is not None else {})}
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list):
                raise DataError(f"{loc}: {what} {j}: 'tool_calls' must be a list, on an assistant message.")
            msg["tool_calls"] = [_tool_call(c, loc, f"{what} {j} tool call {k}") for k, c in enumerate(calls)]
        if role == "tool":
            msg.update({k: d[k] for k in ("name", "tool_call_id") if k in d})
        out.append(msg)
    return out


def _last_assistant(msgs: list[dict], loc: str, what: str) -> list[dict]:
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{loc}: the last {what} must be the assistant's (it is '{msgs[-1]['role']}').")
    return msgs


# ------------------------------------------------------------------ the formats

def _instruction(row: dict, loc: str, cfg: DataConfig) -> list[dict]:
    text = _text(row, "instruction_field", loc, cfg)
    answer = _text(row, "response_field", loc, cfg)
    extra = row.get(cfg.input_field)
    if extra:
        text = f"{text}\n\n{extra}"
    return [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]


def _with_tools(msgs: list[dict], row: dict, loc: str, cfg: DataConfig) -> Messages:
    """`msgs` with the row's tool definitions: a list of objects (or that list as JSON text), or none."""
    out = Messages(msgs)
    tools = row.get(cfg.tools_field)
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise DataError(f"{loc}: {cfg.tools_field!r} is text but not JSON: {tools!r:.80}.") from None
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise DataError(f"{loc}: {cfg.tools_field!r} must be a list of tool definitions (JSON schema objects), got "
                        f"{tools!r:.120}.")
    out.tools = _no_nulls(tools) or None
    return out


def _chat(row: dict, loc: str, cfg: DataConfig) -> list[dict]:
    msgs = _last_assistant(chat_messages(_nonempty_list(row, "messages_field", loc, cfg), loc), loc, "message")
    return _with_tools(msgs, row, loc, cfg)


def _sharegpt(row: dict, loc: str, cfg: DataConfig) -> list[dict]:
    turns = _nonempty_list(row, "conversations_field", loc, cfg)
    msgs = []
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES or not isinstance(t.get("value"), str):
            raise DataError(f"{loc}: turn {j} must be {{'from': system|human|gpt, 'value': str}}, got {t!r:.120}.")
        msgs.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{loc}: the last turn must be the assistant's ('gpt'; it is '{turns[-1]['from']}').")
    return msgs


def _completed(row: dict, loc: str, cfg: DataConfig, p, c, c_name: str) -> list[dict]:
    """A prompt `p` and completion `c` (column `c_name`): two texts (raw, no template), or two message lists (the
    completion's assistant turns are trained, the prompt's are not)."""
    if isinstance(p, str) and isinstance(c, str):
        return [{"role": "prompt", "content": p}, {"role": "completion", "content": c}]
    if isinstance(p, list) and isinstance(c, list) and c:
        prompt = [{**m, "train": False} if m["role"] == "assistant" else m
                  for m in chat_messages(p, loc, f"{cfg.prompt_field} message")]
        return _with_tools(prompt + _last_assistant(chat_messages(c, loc, f"{c_name} message"), loc,
                                                    f"{c_name} message"), row, loc, cfg)
    raise DataError(f"{loc}: {cfg.prompt_field!r} and {c_name!r} must both be text (plain) or both "
                    f"lists of messages (conversational, the completion not empty); got {type(p).__name__} and "
                    f"{type(c).__name__}.")


def _prompt_completion(row: dict, loc: str, cfg: DataConfig) -> list[dict]:
    """TRL's prompt-completion rows (see `_completed`)."""
    p, c = _value(row, "prompt_field", loc, cfg), _value(row, "completion_field", loc, cfg)
    return _completed(row, loc, cfg, p, c, cfg.completion_field)


def _preference(row: dict, loc: str, cfg: DataConfig) -> dict[str, list[dict]]:
    """TRL's preference rows (explicit prompt): {'chosen': prompt + chosen, 'rejected': prompt + rejected}, each
    as `_completed` reads a prompt-completion row (both texts, or all three message lists)."""
    p = _value(row, "prompt_field", loc, cfg)
    return {name: _completed(row, loc, cfg, p, _value(row, f"{name}_field", loc, cfg), getattr(cfg, f"{name}_field"))
            for name in ("chosen", "rejected")}


def _text_row(row: dict, loc: str, cfg: DataConfig) -> list[dict]:
    text = _value(row, "text_field", loc, cfg)
    if not isinstance(text, str) or not text:
        raise DataError(f"{loc}: the text column {cfg.text_field!r} must be non-empty text. Set data.text_field "
                        "to the right column.")
    return [{"role": "completion", "content": text}]


FORMATS: dict[str, Format] = {f.name: f for f in (  # in detection order
    # OpenAI messages, tool turns too; assistant turns trained
    Format("chat", ("messages_field", "tools_field"), ("messages_field",), _chat),
    # {conversations: [{from: system|human|gpt, value}, ...]}; gpt turns trained
    Format("sharegpt", ("conversations_field",), ("conversations_field",), _sharegpt),
    # {instruction, response[, input]}, Alpaca's instruction/input/output too; the response trained
    Format("instruction", ("instruction_field", "input_field", "response_field"), ("instruction_field",),
           _instruction, aliases={"response_field": ("output",)}),
    # TRL's {prompt, chosen, rejected}: texts or message lists; one pair per row (train.objective dpo/orpo)
    Format("preference", ("prompt_field", "chosen_field", "rejected_field", "tools_field"),
           ("prompt_field", "chosen_field", "rejected_field"), _preference, sequences=("chosen", "rejected")),
    # TRL's {prompt, completion}: two texts (no template) or two message lists; the completion trained
    Format("prompt_completion", ("prompt_field", "completion_field", "tools_field"),
           ("prompt_field", "completion_field"), _prompt_completion),
    # {text}: a plain completion, every token trained
    Format("text", ("text_field",), ("text_field",), _text_row),
)}


def detect(columns: list[str], cfg: DataConfig) -> Format:
    """The format of a source with these columns: `data.format`, or the first that matches (auto)."""
    if cfg.format != "auto":
        return FORMATS[cfg.format]
    for fmt in FORMATS.values():
        if fmt.detect(columns, cfg):
            return fmt
    wanted = ", ".join(f"{name} {' and '.join(repr(getattr(cfg, f)) for f in fmt.required)}"
                       for name, fmt in FORMATS.items())
    raise DataError(f"cannot tell the format from the columns ({', '.join(map(str, columns)) or 'none'}): {wanted}. "
                    "Set data.format, or the data.*_field naming the column that holds it (e.g. "
                    "data.instruction_field: question).")


def to_messages(row: dict, loc: str, cfg: DataConfig, fmt: str) -> list[dict] | dict[str, list[dict]]:
    """`row` in format `fmt` (a name of FORMATS) as a message list ({name: list} for a format with `sequences`)."""
    return FORMATS[fmt].to_messages(row, loc, cfg)
