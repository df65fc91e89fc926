"""OpenAI request checks and response bodies for `/v1/chat/completions` and `/v1/completions`.

Every bad request becomes an `APIError`: an HTTP status (4xx) and OpenAI's error object
`{"error": {"message", "type", "param", "code"}}`. Checked, as the OpenAI API documents them:
`model` (404 `model_not_found` when not served), `messages` (roles system, developer, user and assistant,
text content, ending with a user turn) or `prompt` (a string or token ids), `temperature` in [0, 2]
(default 1), `top_p` in [0, 1] (default 1), `max_tokens` / `max_completion_tokens` >= 1 and at most the
server's `--max-tokens-limit` (default: that limit for chat, 16 for completions, as OpenAI; either way
no more than the context leaves), `stop` (a string or up to 4), `seed`, `stream`, `stream_options`,
`n` (1 only). A prompt that leaves no room in the model's context is a 400 `context_length_exceeded`.
Unknown fields are refused as OpenAI does ("Unrecognized request argument"); fields the server does not
implement (tools, logprobs, penalties, logit_bias, echo, suffix, best_of > 1) are refused by name.

Extensions: `"moetune_routing": true` adds `moetune_routing` to the response (the final chunk when
streaming): for every routed layer, the mean gates over the request's tokens. `"ignore_eos": true`
(vLLM's name) decodes past the end-of-sequence token up to max_tokens (for benchmarks).
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

from moetune.core.errors import DataError, RecipeError
from moetune.core.ui import plural
from moetune.serve.loading import Served


class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Parsed:
    """A checked request: which model, the prompt's token ids and the decoding options."""

    model: str
    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    routing: bool = False
    ignore_eos: bool = False


COMMON = {"model", "temperature", "top_p", "n", "stream", "stream_options", "stop", "max_tokens", "seed",
          "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "user", "moetune_routing",
          "ignore_eos"}
IGNORED = {"user", "store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier"}
CHAT = COMMON | IGNORED | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
                           "function_call", "parallel_tool_calls", "response_format"}
COMPLETION = COMMON | IGNORED | {"prompt", "echo", "suffix", "best_of"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _bad(message: str, param: str | None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def _get(body: dict, key: str):
    return body.get(key)


def _number(body: dict, key: str, lo: float, hi: float, default: float) -> float:
    v = _get(body, key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(f"Invalid type for '{key}': expected a number, but got {type(v).__name__} {v!r:.60}.", key,
                   "invalid_type")
    if not lo <= v <= hi:
        raise _bad(f"Invalid '{key}': {v} is out of range; allowed: {lo} to {hi}.", key, "invalid_value")
    return float(v)


def _int(body: dict, key: str, lo: int, hi: int | None = None) -> int | None:
    v = _get(body, key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"Invalid type for '{key}': expected an integer, but got {type(v).__name__} {v!r:.60}.", key,
                   "invalid_type")
    if v < lo or (hi is not None and v > hi):
        raise _bad(f"Invalid '{key}': {v}; allowed: {lo} to {hi if hi is not None else 'any larger integer'}.", key,
                   "invalid_value")
    return v


def _bool(body: dict, key: str) -> bool:
    v = _get(body, key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _bad(f"Invalid type for '{key}': expected a boolean, but got {type(v).__name__} {v!r:.60}.", key,
                   "invalid_type")
    return v


def _unsupported(body: dict, key: str, ok, what: str) -> None:
    v = _get(body, key)
    if v is not None and not ok(v):
        raise _bad(f"'{key}' is not supported by moetune serve ({what}); got {v!r:.80}.", key, "unsupported_parameter")


def _stop(body: dict) -> list[str]:
    v = _get(body, "stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if (not isinstance(stops, list) or not 1 <= len(stops) <= 4
            or not all(isinstance(s, str) and s for s in stops)):
        raise _bad(f"Invalid 'stop': expected a non-empty string or a list of 1 to 4 non-empty strings, got {v!r:.80}.",
                   "stop", "invalid_value")
    return stops


def _common(body: dict, served: dict[str, Served], allowed: set[str]) -> Served:
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise _bad(f"Unrecognized request argument supplied: {', '.join(map(str, unknown))[:200]}", unknown[0])
    name = _get(body, "model")
    if not isinstance(name, str) or not name:
        raise _bad("you must provide a model parameter (a string: the name of a served model, GET /v1/models).", "model")
    if name not in served:
        raise APIError(404, f"The model `{name[:200]}` does not exist. Served: {', '.join(served)}.", "model",
                       "model_not_found")
    n = _int(body, "n", 1)
    if n is not None and n != 1:
        raise _bad(f"Invalid 'n': {n}; moetune serve returns one choice per request (n = 1); send {n} requests.",
                   "n", "unsupported_value")
    for key in ("presence_penalty", "frequency_penalty"):
        _number(body, key, -2.0, 2.0, 0.0)
        _unsupported(body, key, lambda v: v == 0, "no repetition penalties; only 0")
    _unsupported(body, "logit_bias", lambda v: v == {}, "no logit bias")
    return served[name]


def _options(body: dict, s: Served, prompt: list[int], limit: int, default_max: int) -> Parsed:
    temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    stream = _bool(body, "stream")
    opts = _get(body, "stream_options")
    if opts is not None:
        if not isinstance(opts, dict) or not stream or set(opts) - {"include_usage", "include_obfuscation"}:
            raise _bad("Invalid 'stream_options': a JSON object {\"include_usage\": bool}, only with \"stream\": true.",
                       "stream_options", "invalid_value")
        if not isinstance(opts.get("include_usage", False), bool):
            raise _bad("Invalid 'stream_options.include_usage': expected a boolean.", "stream_options.include_usage")
    routing = _bool(body, "moetune_routing")
    seed = _int(body, "seed", -(2 ** 63), 2 ** 63 - 1)
    stop = _stop(body)
    key = "max_completion_tokens" if _get(body, "max_completion_tokens") is not None else "max_tokens"
    asked = _int(body, key, 1)
    room = s.context - len(prompt)
    if room <= 0:
        raise _bad(f"This model's maximum context length is {plural(s.context, 'token')}. However, your prompt is "
                   f"{plural(len(prompt), 'token')}, which leaves no room for a completion. Please reduce the length of the prompt.",
                   "messages" if "messages" in body else "prompt", "context_length_exceeded")
    if asked is not None and asked > limit:
        raise _bad(f"Invalid '{key}': {asked} is larger than this server allows ({limit}; moetune serve "
                   "--max-tokens-limit).", key, "invalid_value")
    if asked is not None and asked > room:
        raise _bad(f"This model's maximum context length is {plural(s.context, 'token')}. However, you requested "
                   f"{plural(len(prompt) + asked, 'token')} ({len(prompt)} in the prompt, {asked} in the completion). Please "
                   "reduce the length of the prompt or the completion.", key, "context_length_exceeded")
    max_tokens = asked if asked is not None else min(default_max, limit, room)
    include = bool((opts or {}).get("include_usage", False))
    return Parsed(s.name, prompt, max_tokens, temperature, top_p, stop, seed, stream, include, routing,
                  _bool(body, "ignore_eos"))


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) for p in c):
        if all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in c):
            return "".join(p["text"] for p in c)
        kinds = sorted({str(p.get("type")) for p in c} - {"text"})
        raise _bad(f"messages[{i}].content: only text parts are supported, got {', '.join(kinds)[:80]}.",
                   f"messages[{i}].content", "unsupported_value")
    raise _bad(f"messages[{i}].content must be a string or a list of text parts, got {type(c).__name__}.",
               f"messages[{i}].content", "invalid_type")


def parse_chat(body: dict, served: dict[str, Served], limit: int) -> Parsed:
    s = _common(body, served, CHAT)
    _unsupported(body, "logprobs", lambda v: v is False, "no log probabilities")
    _unsupported(body, "top_logprobs", lambda v: False, "no log probabilities")
    for key in ("tools", "tool_choice", "functions", "function_call"):
        _unsupported(body, key, lambda v: v == [] or v == "none", "no tool calling")
    _unsupported(body, "response_format", lambda v: v == {"type": "text"}, "text responses only")
    msgs = _get(body, "messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty list of {\"role\", \"content\"} objects.", "messages")
    conv = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object with 'role' and 'content', got {type(m).__name__}.",
                       f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role is {role!r:.40}; allowed: system, developer, user, assistant (moetune serve "
                       "has no tool or function messages).", f"messages[{i}].role", "invalid_value")
        conv.append({"role": ROLES[role], "content": _content(m, i)})
    if conv[-1]["role"] != "user":
        raise _bad(f"The last message must be a user message (it is {msgs[-1]['role']!r}): the reply is generated for it.",
                   f"messages[{len(msgs) - 1}].role", "invalid_value")
    try:
        prompt = s.encoder.prompt_ids(conv)
    except (DataError, RecipeError) as e:
        raise _bad(f"The model's template cannot render these messages: {e}", "messages") from None
    return _options(body, s, prompt, limit, limit)


def parse_completion(body: dict, served: dict[str, Served], limit: int) -> Parsed:
    s = _common(body, served, COMPLETION)
    _unsupported(body, "logprobs", lambda v: v == 0, "no log probabilities")
    _unsupported(body, "echo", lambda v: v is False, "the prompt is not echoed")
    _unsupported(body, "suffix", lambda v: False, "no insertion")
    _unsupported(body, "best_of", lambda v: v == 1, "best_of 1 only")
    p = _get(body, "prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]                                      # a batch of one prompt
    vocab = len(s.tokenizer)
    if isinstance(p, str):
        prompt = s.tokenizer(p)["input_ids"] if p else []
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise _bad(f"Invalid 'prompt': token id {bad[0]} is outside the vocabulary (0 to {vocab - 1}).", "prompt",
                       "invalid_value")
        prompt = list(p)
    else:
        raise _bad("'prompt' must be a string, a list of token ids, or a list holding one of those (moetune serve "
                   f"answers one prompt per request), got {type(p).__name__}.", "prompt")
    if not prompt:
        raise _bad("'prompt' is empty: there is nothing to continue.", "prompt", "invalid_value")
    return _options(body, s, prompt, limit, 16)


# ------------------------------------------------------------------ responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(done: dict) -> dict:
    return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}


def chat_response(rid: str, model: str, done: dict) -> dict:
    out = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "message": {"role": "assistant", "content": done["text"]}, "logprobs": None,
                        "finish_reason": done["finish_reason"]}], "usage": usage(done)}
    if "routing" in done:
        out["moetune_routing"] = done["routing"]
    return out


def completion_response(rid: str, model: str, done: dict) -> dict:
    out = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "text": done["text"], "logprobs": None, "finish_reason": done["finish_reason"]}],
           "usage": usage(done)}
    if "routing" in done:
        out["moetune_routing"] = done["routing"]
    return out


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None = None, **extra) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None = None, **extra) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], **extra}
