"""The decode loop: continuous batching of every served model on one worker thread.

Requests wait in one FIFO queue. Between two decode steps the engine admits waiting requests while
their model's batch has room (`max_batch` sequences per model): the new requests of one model are
prefilled together (left-padded, in the routing context `generate` uses, so sequence-level routers pool
each prompt's real tokens), their first tokens sampled, and their KV-cache rows join the model's
`RowBatch`. Each loop then runs ONE
decode step per model with sequences: the last token of every row, at its own position id, against the
left-padded cache; a row that finishes (EOS, a stop sequence, max_tokens, the context) or whose client
went away leaves the batch before the next step and frees its slot.

Per-request routing record (the `moetune_routing` extension): forward hooks on the routers of the
routed layers add up, per row, the gates of every position the model ran for it (the prompt at prefill,
then each fed token); the mean per layer is returned at the end.

The engine talks to the HTTP side through each request's `emit(kind, data)` callback, called on the
engine thread: ('delta', {'text'}), then ('done', {...}) or ('error', {'message'}).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache

from moetune.adapters.inject import routed_layers
from moetune.eval.evaluate import left_pad
from moetune.experts.context import RoutingContext, generation_routing, use_context
from moetune.serve.batch import RowBatch, merge, positions, select
from moetune.serve.decode import TextStream, choose, new_generator
from moetune.serve.loading import Served
from moetune.serve.metrics import Metrics
from moetune.serve.protocol import Parsed


@dataclass
class Job:
    """One request's generation: the checked request (its settings), then its progress (written by the engine
    thread only)."""

    req: Parsed
    emit: Callable[[str, dict], None]
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    generated: list[int] = field(default_factory=list)
    last: int = -1
    first_token: float | None = None
    gate_sum: torch.Tensor | None = None                 # (L, N)
    gate_tokens: int = 0

    def __post_init__(self) -> None:
        self.generator = new_generator(self.req.seed)
        self.text: TextStream | None = None


class GateTap:
    """Forward hooks on the routers of a model's routed layers; while `on`, keep each router's gates (B, T, N)."""

    def __init__(self, model) -> None:
        layers = routed_layers(model)
        self.names = list(layers)
        self.on = False
        self.out: list[torch.Tensor | None] = [None] * len(self.names)
        self.handles = [m.router.register_forward_hook(self._hook(i)) for i, m in enumerate(layers.values())]

    def arm(self, on: bool) -> None:
        """Record (or not) the gates of the next forward; forget any earlier one."""
        self.on = on and bool(self.names)
        self.out = [None] * len(self.names)

    def _hook(self, i: int):
        def fn(module, inputs, output):
            if self.on:
                self.out[i] = output.detach()
        return fn

    def take(self) -> torch.Tensor | None:
        """(L, B, T, N) gates of the last forward, or None when off or nothing routed."""
        if not self.on or any(o is None for o in self.out):
            return None
        return torch.stack([o.float().reshape(o.shape[0], -1, o.shape[-1]) for o in self.out])


class Engine:
    """Continuous batching over `models` (name -> Served); `start()`, `submit(job)`, `cancel(job)`, `close()`."""

    def __init__(self, models: dict[str, Served], max_batch: int, metrics: Metrics) -> None:
        self.models, self.max_batch, self.metrics = models, max_batch, metrics
        self.waiting: deque[Job] = deque()
        self.batches: dict[str, RowBatch] = {}
        self.taps = {name: GateTap(s.model) for name, s in models.items()}
        self.cv = threading.Condition()
        self.closing = False
        self.thread = threading.Thread(target=self._loop, name="moetune-engine", daemon=True)
        self.steps = 0

    # ------------------------------------------------------------ called from the HTTP side

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cv:
            self.waiting.append(job)
            self.metrics.set("moetune_queue_depth", len(self.waiting))
            self.cv.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: the job leaves its batch (or the queue) before the next step."""
        job.cancelled = True
        with self.cv:
            self.cv.notify()

    def close(self, timeout: float | None = None) -> None:
        """Cancel whatever is left and stop the thread."""
        with self.cv:
            self.closing = True
            for job in self.waiting:
                job.cancelled = True
            self.cv.notify()
        for b in list(self.batches.values()):
            for job in b.rows:
                job.cancelled = True
        self.thread.join(timeout)

    # ------------------------------------------------------------ the engine thread

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cv:
                    while not self.closing and not self.waiting and not self.batches:
                        self.cv.wait()
                    if self.closing and not self.waiting and not self.batches:
                        return
                    admit = self._admit()
                for name in dict.fromkeys(j.req.model for j in admit):          # one prefill per model, FIFO order
                    group = [j for j in admit if j.req.model == name]
                    self._guarded(self._prefill, group, group)
                for name in list(self.batches):
                    self._guarded(self._step, name, self.batches[name].rows)

    def _admit(self) -> list[Job]:
        """Waiting jobs (FIFO) whose model has room; cancelled ones are dropped. Holds the lock."""
        room = {n: self.max_batch - (b.size if (b := self.batches.get(n)) else 0) for n in self.models}
        admit, keep = [], deque()
        for job in self.waiting:
            if job.cancelled:
                self.metrics.inc("moetune_cancelled_requests_total", model=job.req.model)
            elif room[job.req.model] > 0 and not self.closing:
                room[job.req.model] -= 1
                admit.append(job)
            else:
                keep.append(job)
        self.waiting = keep
        self.metrics.set("moetune_queue_depth", len(keep))
        return admit

    def _guarded(self, fn, arg, jobs: list[Job]) -> None:
        """Run fn(arg); on an error, fail `jobs` (and drop their batch) but keep the worker alive."""
        try:
            fn(arg)
        except Exception as e:  # noqa: BLE001 - one failed forward must not kill the server
            for job in jobs:
                job.emit("error", {"message": f"generation failed: {type(e).__name__}: {e}"})
            if isinstance(arg, str):
                self.batches.pop(arg, None)
        self._gauge()

    def _gauge(self) -> None:
        self.metrics.set("moetune_active_sequences", sum(b.size for b in self.batches.values()))

    def _forward(self, s: Served, ids, mask, pos, cache):
        return s.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                       logits_to_keep=1)

    def _prefill(self, jobs: list[Job]) -> None:
        """Prefill new jobs of one model together (left-padded, as `generate` batches prompts), sample their first
        tokens, and add the rows that go on to the model's batch."""
        name = jobs[0].req.model
        s = self.models[name]
        for job in jobs:
            job.text = TextStream(s.tokenizer, job.req.stop)
            self.metrics.inc("moetune_prompt_tokens_total", len(job.req.prompt), model=name)
        ids, mask = left_pad([j.req.prompt for j in jobs], s.tokenizer.pad_token_id)  # (B, T), (B, T)
        ids, mask = ids.to(s.device), mask.to(s.device)
        pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)                      # (B, T): real tokens 0, 1, ...
        tap = self.taps[name]
        tap.arm(any(j.req.routing for j in jobs))
        cache = DynamicCache()
        with generation_routing(mask) as ctx:      # sequence-level routers pool each prompt, as in `generate`
            out = self._forward(s, ids, mask, pos, cache)
        state = s.state.snapshot() if s.state is not None else None
        self._add_gates(jobs, tap.take(), mask)
        new = RowBatch(list(jobs), cache, mask, dict(ctx.cache), state)
        finished = self._advance(s, new, choose(out.logits[:, -1].float(), jobs))
        new = select(new, [i for i in range(new.size) if i not in finished], s.state)
        if new is None:
            return
        old = self.batches.get(name)
        self.batches[name] = merge([old, new], s.state) if old is not None else new

    def _step(self, name: str) -> None:
        s, b = self.models[name], self.batches[name]
        gone = [i for i, j in enumerate(b.rows) if j.cancelled]
        for i in gone:
            self.metrics.inc("moetune_cancelled_requests_total", model=name)
        if gone:
            b = select(b, [i for i in range(b.size) if i not in gone], s.state)
            if b is None:
                del self.batches[name]
                return
        ids = torch.tensor([[j.last] for j in b.rows], device=s.device)         # (B, 1)
        pos = positions(b)                                                        # (B, 1)
        mask = torch.cat([b.mask, torch.ones_like(b.mask[:, :1])], 1)            # (B, T + 1)
        if s.state is not None:
            s.state.restore(b.state, b.cache)
        tap = self.taps[name]
        tap.arm(any(j.req.routing for j in b.rows))
        with use_context(RoutingContext(cache=b.route)):   # each row's pooled sequence-level gates
            out = self._forward(s, ids, mask, pos, b.cache)
        b.mask = mask
        if s.state is not None:
            b.state = s.state.snapshot()
        self._add_gates(b.rows, tap.take())
        self.steps += 1
        self.metrics.observe("moetune_batch_size", b.size, model=name)
        finished = self._advance(s, b, choose(out.logits[:, -1].float(), b.rows))
        keep = [i for i in range(b.size) if i not in finished]
        nb = select(b, keep, s.state)
        if nb is None:
            del self.batches[name]
        else:
            self.batches[name] = nb

    def _add_gates(self, jobs: list[Job], gates: torch.Tensor | None, mask: torch.Tensor | None = None) -> None:
        """Add each routing job's gates (L, B, T, N) over its real positions (mask (B, T); None: all)."""
        if gates is None:
            return
        if mask is not None:
            gates = gates * mask.to(gates.dtype)[None, :, :, None]
        for i, job in enumerate(jobs):
            if job.req.routing:
                g = gates[:, i].sum(1).cpu()                                      # (L, N)
                job.gate_sum = g if job.gate_sum is None else job.gate_sum + g
                job.gate_tokens += int(mask[i].sum()) if mask is not None else gates.shape[2]

    def _advance(self, s: Served, b: RowBatch, tokens: list[int]) -> set[int]:
        """Give each row its new token; emit text; return the indices of rows that finished."""
        now = time.perf_counter()
        done = set()
        for i, (job, tok) in enumerate(zip(b.rows, tokens)):
            if job.first_token is None:
                job.first_token = now
                self.metrics.observe("moetune_time_to_first_token_seconds", now - job.arrival, model=job.req.model)
            if tok in s.eos and not job.req.ignore_eos:
                self._finish(s, job, "stop", now)
                done.add(i)
                continue
            job.generated.append(tok)
            self.metrics.inc("moetune_completion_tokens_total", model=job.req.model)
            delta, stopped = job.text.push(tok)
            if delta:
                job.emit("delta", {"text": delta})
            full = len(job.req.prompt) + len(job.generated) >= s.context
            if stopped or len(job.generated) >= job.req.max_tokens or full:
                self._finish(s, job, "stop" if stopped else "length", now)
                done.add(i)
            else:
                job.last = tok
        return done

    def _finish(self, s: Served, job: Job, reason: str, now: float) -> None:
        rest = job.text.rest()
        if rest:
            job.emit("delta", {"text": rest})
        data = {"finish_reason": reason, "prompt_tokens": len(job.req.prompt), "completion_tokens": len(job.generated),
                "text": job.text.text}
        if job.req.routing:
            data["routing"] = self.routing(job)
        self.metrics.observe("moetune_request_latency_seconds", now - job.arrival, model=job.req.model)
        job.emit("done", data)

    def routing(self, job: Job) -> dict:
        """The extension's record: per routed layer, the mean gates over the request's tokens."""
        names = self.taps[job.req.model].names
        if not names or job.gate_sum is None:
            return {"layers": [], "experts": 0, "tokens": 0}
        mean = (job.gate_sum / max(job.gate_tokens, 1)).tolist()                  # (L, N)
        return {"experts": len(mean[0]), "tokens": job.gate_tokens,
                "layers": [{"name": n, "mean_gates": [round(x, 6) for x in row]} for n, row in zip(names, mean)]}
