"""`moetune chat` and `moetune generate`: talk to a trained model, or answer a JSONL file of prompts.

SOURCE is any of
- a run directory (`recipe.yaml` + `adapter/`): base model + the run's adapter;
- an export directory (`recipe.yaml` + the adapter files, or `adapter/` and `merged/`);
- a bare adapter directory (moetune `moetune.json` or a stock PEFT LoRA; base from its config);
- a merged model directory (`config.json`, e.g. `<run>/merged`).
The template and system prompt are the recipe's (`data.template`, `data.system_prompt`) when a
`recipe.yaml` sits in SOURCE or its parent directory, else the tokenizer's chat template.
`base=True` loads the base model without the adapter, to compare.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from moetune import recipe as R
from moetune.adapters.inject import mask_experts
from moetune.adapters.io import load_adapter
from moetune.core.adapter_files import find_adapter_dir, read_meta
from moetune.core.errors import DataError
from moetune.core.files import write_jsonl
from moetune.core.ui import console, plural, simple_progress
from moetune.data.read import read_file
from moetune.data.rows import Encoder
from moetune.eval.evaluate import eos_ids
from moetune.eval.generation import RoutingRecorder, Sampling, generate_batch, routing_lines
from moetune.export.merge import MERGE_INFO
from moetune.models.load import load_model, load_tokenizer, pick_device

HELP = "commands: /help, /reset (forget the conversation), /exit (quit); an empty line is ignored"
COMMANDS = ("/help      this list\n/reset     forget the conversation (the system prompt stays)\n"
            "/exit      quit (also /quit, or end of input: Ctrl-D)\n"
            "Ctrl-C     stop the answer being written (it is not kept in the conversation)\n")


@dataclass
class Loaded:
    """A model ready to generate, with the template that encodes its prompts."""

    model: torch.nn.Module
    tokenizer: object
    encoder: Encoder
    device: torch.device
    label: str                      # what was loaded, for the banner
    expert_type: str = "base"
    routed: bool = False
    history: list[dict] = field(default_factory=list)


def _find_recipe(source: Path) -> Path | None:
    for d in (source, source.parent):
        if (d / "recipe.yaml").is_file():
            return d / "recipe.yaml"
    return None


def _merged_dir(source: Path) -> Path | None:
    for d in (source, source / "merged"):
        if (d / "config.json").is_file():
            return d
    return None


def load_source(source: Path | None, base: bool = False, mask_experts: list[str] | None = None,
                overrides: list[str] | None = None, device: str | None = None) -> Loaded:
    """Load SOURCE (see the module docstring) for generation; RecipeError when it is none of those."""
    extra = list(overrides or []) + ([f"model.device={device}"] if device else [])
    if source is not None and "=" in str(source) and not Path(source).exists():  # `chat --base model.path=X`
        source, extra = None, [str(source), *extra]
    if source is None:
        if not base:
            raise R.RecipeError("chat/generate need SOURCE (a run, export, adapter or merged model directory), "
                                "or --base alone for the default base model.")
        rc = R.load_recipe(None, ["data.test=null", "eval.split=validation", *extra], check_files=False)
        return _finish(rc, None, f"base model {rc.model.path}", mask_experts)
    source = Path(source)
    if not source.is_dir():
        raise R.RecipeError(f"{source} is not a directory. Pass a run directory (the recipe's output_dir), an "
                            "export, adapter or merged model directory.")
    found = _find_recipe(source)
    adapter = find_adapter_dir(source)
    merged = _merged_dir(source) if adapter is None else None
    if adapter is None and merged is None:
        raise R.RecipeError(f"{source} holds neither an adapter (adapter_model.safetensors, here or in adapter/) nor "
                            "a model (config.json). Pass a run, export, adapter or merged model directory.")
    if found is not None:
        rc = R.load_run_recipe(found.parent, extra)   # data paths are neither read nor checked here
    else:
        model_path = read_meta(adapter).get("base_model") if adapter else str(merged)
        if not model_path:
            raise R.RecipeError(f"{adapter}: the adapter names no base model; pass model.path=MODEL.")
        where = Path(os.path.abspath(adapter or merged))
        model_path = R.anchor_path(model_path, [where, *where.parents, Path.cwd()])
        rc = R.load_recipe(None, [f"model.path={model_path}", "data.test=null", "eval.split=validation", *extra],
                           check_files=False)
    if base:
        return _finish(rc, None, f"base model {rc.model.path} (without the adapter of {source})", mask_experts)
    if merged is not None:
        info = _merge_info(merged)
        if found is None and info:  # a merged model alone: the template and system prompt it was trained with
            rc.data.template = info.get("template") or rc.data.template
            rc.data.system_prompt = info.get("system_prompt")
        kind = info.get("expert_type") or (rc.expert.type if found is not None else None)
        rc.model.path, rc.model.quantization = str(merged), "none"
        return _finish(rc, None, f"merged model {merged}", mask_experts, f"{kind}, merged" if kind else "model")
    return _finish(rc, adapter, f"{adapter} on {rc.model.path}", mask_experts)


def _merge_info(merged: Path) -> dict:
    """MOETUNE_MERGE.json of a model `merge-lora` or the merge stage wrote ({} for any other model)."""
    try:
        info = json.loads((merged / MERGE_INFO).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _finish(rc: R.Recipe, adapter: Path | None, label: str, mask: list[str] | None, kind: str = "base") -> Loaded:
    device = pick_device(rc.model)
    quiet = lambda msg: None  # noqa: E731 - model loading notes would interleave with the chat
    model = load_model(rc.model, device, log=quiet)
    expert_type = kind
    if adapter is not None:
        expert_type = load_adapter(model, adapter)["expert"]["type"]
    if mask:
        mask_experts(model, mask)
    model.eval()
    tok = load_tokenizer(rc.model, log=quiet)
    rec = RoutingRecorder(model)
    routed = bool(rec.names)
    rec.remove()
    return Loaded(model, tok, Encoder(tok, rc.data), device, label, expert_type, routed)


# ------------------------------------------------------------------ chat

class _Streamer:
    """A transformers streamer (put/end) that writes decoded text to `out` as tokens arrive,
    holding back text that may still change (an incomplete UTF-8 sequence)."""

    def __init__(self, tokenizer, out: TextIO, eos: list[int]) -> None:
        self.tok, self.out, self.eos = tokenizer, out, set(eos)
        self.first = True   # the first put() is the prompt
        self.ids: list[int] = []
        self.shown = 0
        self.done = False

    def put(self, value: torch.Tensor) -> None:
        if self.first:
            self.first = False
            return
        for t in value.reshape(-1).tolist():
            if self.done or t in self.eos:
                self.done = True
                return
            self.ids.append(t)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.shown:])
        self.out.flush()
        self.shown = len(text)

    def end(self) -> None:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[self.shown:] + "\n")
        self.out.flush()


def _fit_history(m: Loaded, messages: list[dict], max_new: int) -> list[int]:
    """Prompt ids of the conversation, dropping the oldest exchanges while it overflows the context."""
    limit = getattr(m.model.config, "max_position_embeddings", None) or 10 ** 9
    ids = m.encoder.prompt_ids(messages)
    while len(ids) + max_new > limit and len(messages) > 2:
        messages[:] = messages[2:]                      # oldest user + assistant pair
        ids = m.encoder.prompt_ids(messages)
    return ids


def answer(m: Loaded, text: str, sampling: Sampling, out: TextIO, show_routing: bool = False) -> str:
    """One chat turn: append `text`, stream the reply to `out`, keep both in the history."""
    m.history.append({"role": "user", "content": text})
    ids = _fit_history(m, m.history, sampling.max_new_tokens)
    rec = RoutingRecorder(m.model) if show_routing and m.routed else None
    try:
        streamer = _Streamer(m.tokenizer, out, eos_ids(m.model, m.tokenizer))
        new = generate_batch(m.model, m.tokenizer, [ids], sampling, m.device, streamer=streamer)[0]
        gates = rec.gates() if rec is not None else None
    finally:
        if rec is not None:
            rec.remove()
    reply = m.tokenizer.decode(new, skip_special_tokens=True)
    m.history.append({"role": "assistant", "content": reply.strip()})
    if gates is not None:
        pieces = [m.tokenizer.decode([t]) for t in new]
        for line in routing_lines(gates, rec.names, pieces):
            out.write(line + "\n")
        out.flush()
    return reply


def chat_loop(m: Loaded, sampling: Sampling, inp: TextIO | None = None, out: TextIO | None = None,
              show_routing: bool = False) -> int:
    """Read user lines from `inp` until /exit or end of input; returns the number of answered turns.
    Without a terminal (piped input) each line read is echoed after the prompt, so the output is a transcript;
    on a terminal `input()` reads the line (editing keys work)."""
    inp, out = inp or sys.stdin, out or sys.stdout
    tty = inp.isatty()
    out.write(f"moetune chat: {m.label} ({m.expert_type}); {HELP}\n")
    if show_routing and not m.routed:
        out.write(f"(--show-routing: a {m.expert_type} model has no router; nothing to show)\n")
    turns = 0
    while True:
        if tty and inp is sys.stdin and out is sys.stdout:
            try:
                text = input("you> ")                   # a terminal: line editing (and history with readline)
            except EOFError:
                out.write("\n")
                break
        else:
            out.write("you> ")
            out.flush()
            line = inp.readline()
            if not line:
                out.write("\n")
                break
            text = line.rstrip("\n")
            out.write(text + "\n")                      # piped input: echoed, so the output reads as a transcript
        cmd = text.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            break
        if cmd == "/reset":
            m.history.clear()
            out.write("(conversation cleared)\n")
            continue
        if cmd in ("/help", "/?"):
            out.write(COMMANDS)
            continue
        if cmd.startswith("/"):
            out.write(f"unknown command {cmd!r}; {HELP}\n")
            continue
        out.write("bot> ")
        out.flush()
        try:
            answer(m, text, sampling, out, show_routing)
        except KeyboardInterrupt:                       # Ctrl-C stops this answer, not the chat
            del m.history[len(m.history) - (m.history[-1]["role"] == "assistant") - 1:]
            out.write("\n(answer interrupted; it is not kept in the conversation)\n")
            continue
        turns += 1
    out.flush()
    return turns


# ------------------------------------------------------------------ generate

def read_prompts(path: Path) -> list[tuple[dict, list[dict]]]:
    """(row, messages ending with a user turn) per row of a JSONL file: a `prompt` string, or a
    `messages` list (a trailing assistant turn is dropped: its reply is what gets generated)."""
    rows = list(read_file(path))
    if not rows:
        raise DataError(f"{path}: no rows.")
    out = []
    for row, loc in rows:
        if isinstance(row.get("prompt"), str):
            msgs = [{"role": "user", "content": row["prompt"]}]
        elif isinstance(row.get("messages"), list) and row["messages"]:
            msgs = row["messages"]
            for j, mm in enumerate(msgs):
                if (not isinstance(mm, dict) or mm.get("role") not in ("system", "user", "assistant")
                        or not isinstance(mm.get("content"), str)):
                    raise DataError(f"{loc}: message {j} must be {{'role': system|user|assistant, 'content': str}}, "
                                    f"got {mm!r:.120}.")
            msgs = [{"role": x["role"], "content": x["content"]} for x in msgs]
            if msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
            if not msgs or msgs[-1]["role"] != "user":
                raise DataError(f"{loc}: the messages must end with a user turn (optionally followed by one "
                                "assistant turn, which is replaced by the generated one).")
        else:
            raise DataError(f"{loc}: a row needs a 'prompt' string or a non-empty 'messages' list "
                            f"(row keys: {', '.join(map(str, row)) or 'none'}).")
        out.append((row, msgs))
    return out


def generate_file(m: Loaded, prompts: Path, out: Path, sampling: Sampling, batch_size: int = 16,
                  field_name: str = "output", show: bool = True) -> int:
    """Answer every row of `prompts`; write each row with `field_name` added to `out` (input order,
    written atomically). Rows are batched by prompt length. Returns the number of rows."""
    items = read_prompts(prompts)
    ids = [m.encoder.prompt_ids(msgs) for _, msgs in items]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))      # similar lengths per batch
    texts: list[str | None] = [None] * len(ids)
    with simple_progress("generate", len(ids), enabled=show) as bar:
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            news = generate_batch(m.model, m.tokenizer, [ids[i] for i in chunk], sampling, m.device)
            for i, new in zip(chunk, news):
                texts[i] = m.tokenizer.decode(new, skip_special_tokens=True).strip()
            bar.advance(bar.task_ids[0], len(chunk))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, ({**row, field_name: text} for (row, _), text in zip(items, texts)))
    console.print(f"{plural(len(items), 'row')} -> {out}")
    return len(items)
