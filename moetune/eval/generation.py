"""Text generation shared by `moetune chat` and `moetune generate`: prompt ids in the run's template,
batched left-padded generation (greedy or sampled), streaming, and the per-token routing record.

Greedy generation here is the evaluation's (`moetune.eval.evaluate.exact_match`): same prompt ids,
same left padding, same EOS set, `do_sample=False`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moetune.adapters.inject import routed_layers
from moetune.eval.evaluate import eos_ids, generate_ids, left_pad
from moetune.models.layers import layer_index


@dataclass
class Sampling:
    """Decoding options: temperature 0 means greedy (argmax) decoding; top_p only applies when sampling."""

    temperature: float = 0.0
    top_p: float = 0.9
    max_new_tokens: int = 256
    seed: int | None = None

    def kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[list[int]], sampling: Sampling, device,
                   streamer=None) -> list[list[int]]:
    """New token ids for each prompt (EOS and padding stripped); prompts are left-padded together."""
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)                     # (B, T), (B, T)
    eos = eos_ids(model, tokenizer)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    out = generate_ids(model, ids, mask, device, max_new_tokens=sampling.max_new_tokens, eos_token_id=eos,
                       pad_token_id=tokenizer.pad_token_id, streamer=streamer, **sampling.kwargs())
    rows = []
    for row in out[:, ids.shape[1]:].tolist():                                # (B, <= max_new_tokens)
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


class RoutingRecorder:
    """Forward hooks on every router of a routed adapter that keep, for each forward call during
    generation, the gates of the last position: the gates that produced the next token.

    `gates()` is (S, L, N) for S decoding steps of a single sequence (batch 1)."""

    def __init__(self, model) -> None:
        self.layers = routed_layers(model)
        self.names = list(self.layers)
        self.steps: list[list[torch.Tensor]] = []
        self._cur: dict[int, torch.Tensor] = {}
        self.handles = [m.router.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers.values())]

    def _hook(self, i: int):
        def fn(module, inputs, output):
            n = output.shape[-1]
            last = output.detach().float().reshape(-1, n)[-1]                 # (N,): the sequence's last position
            if i in self._cur:                                                 # a new forward started
                self._flush()
            self._cur[i] = last.cpu()
        return fn

    def _flush(self) -> None:
        if len(self._cur) == len(self.names):
            self.steps.append([self._cur[i] for i in range(len(self.names))])
        self._cur = {}

    def start(self) -> None:
        self.steps, self._cur = [], {}

    def gates(self) -> torch.Tensor:
        self._flush()
        if not self.steps:
            return torch.zeros(0, len(self.names), 0)
        return torch.stack([torch.stack(s) for s in self.steps])              # (S, L, N)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


EXPERT_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"


def block_groups(names: list[str]) -> list[tuple[str, list[int]]]:
    """(label, module indices) per transformer block (modules without a block index: one group each)."""
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        k = layer_index(n)
        groups.setdefault(str(k) if k is not None else n, []).append(i)
    return list(groups.items())


def routing_lines(gates: torch.Tensor, names: list[str], tokens: list[str]) -> list[str]:
    """Compact text: one line per generated token, one character per transformer block giving the expert
    with the largest gate averaged over the block's routed modules; then each expert's share."""
    if gates.numel() == 0:
        return ["routing: no generated token"]
    groups = block_groups(names)
    n = gates.shape[-1]
    # (G, L) averaging matrix over each block's modules
    avg = torch.zeros(len(groups), len(names))
    for g, (_, idx) in enumerate(groups):
        avg[g, idx] = 1.0 / len(idx)
    per_block = torch.einsum("gl,sln->sgn", avg, gates)                         # (S, G, N)
    top = per_block.argmax(-1)                                                   # (S, G)
    labels = [repr(tokens[s]) if s < len(tokens) else "<eos>" for s in range(top.shape[0])]
    width = min(max(len(x) for x in labels), 16)
    lines = [f"routing: top expert (0-{EXPERT_CHARS[n - 1]}) per block, blocks {groups[0][0]}..{groups[-1][0]} "
             "left to right, for each generated token"]
    for s, label in enumerate(labels):
        lines.append(f"  {label[:width]:<{width}} " + "".join(EXPERT_CHARS[int(e)] for e in top[s]))
    share = gates.mean((0, 1))                                                   # (N,)
    lines.append("  mean gate per expert: " + "  ".join(f"{EXPERT_CHARS[i]}={float(share[i]):.2f}" for i in range(n)))
    return lines
